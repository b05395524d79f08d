"""What a training step logs, over every rank's rollouts: the numbers one process holding the global batch would log.

Under DDP each rank holds its own share of the batch, and a value logged from one rank is that share's. Every metric
here is therefore kept as what adds up across ranks: a mean as (sum, count), a standard deviation as (sum, sum of
squares, count), a total, or an extreme. One all-reduce carries all the sums and one the extremes, so every rank logs
the same global value.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from durian_lightning._distributed import extremes_over_ranks, sum_over_ranks


class StepMetrics:
    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}  # name -> the numbers to add up across ranks
        self._kinds: dict[str, str] = {}  # name -> mean | std | total
        self._lows: dict[str, float] = {}
        self._highs: dict[str, float] = {}

    def mean(self, name: str, total: float, count: float) -> StepMetrics:
        """Logged as sum(total) / sum(count) over ranks."""
        return self._add(name, "mean", [float(total), float(count)])

    def std(self, name: str, values: torch.Tensor) -> StepMetrics:
        """The sample standard deviation (n - 1, as ``torch.std``) of every rank's values together."""
        v = values.detach().double()
        return self._add(name, "std", [float(v.sum()), float((v * v).sum()), float(v.numel())])

    def total(self, name: str, value: float) -> StepMetrics:
        return self._add(name, "total", [float(value)])

    def low(self, name: str, value: float) -> StepMetrics:
        self._lows[name] = float(value)
        return self

    def high(self, name: str, value: float) -> StepMetrics:
        self._highs[name] = float(value)
        return self

    def _add(self, name: str, kind: str, numbers: list[float]) -> StepMetrics:
        self._sums[name], self._kinds[name] = numbers, kind
        return self

    def reduce(self, world: int, device: torch.device | str = "cpu") -> dict[str, float]:
        """The global values (a collective when ``world > 1``: every rank must call it with the same names)."""
        names = sorted(self._sums)
        flat = sum_over_ranks([x for name in names for x in self._sums[name]], world, device)
        out, at = {}, 0
        for name in names:
            size = len(self._sums[name])
            numbers, at = flat[at : at + size], at + size
            out[name] = _value(self._kinds[name], numbers)
        lows, highs = sorted(self._lows), sorted(self._highs)
        low_values, high_values = extremes_over_ranks([self._lows[n] for n in lows], [self._highs[n] for n in highs],
                                                      world, device)
        out.update(zip(lows, low_values))
        out.update(zip(highs, high_values))
        return out


class PhaseTimer:
    """Wall time per phase of a step (summed when a phase runs several times), logged as ``perf/<phase>_s``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _value(kind: str, numbers: list[float]) -> float:
    if kind == "total":
        return numbers[0]
    if kind == "mean":
        total, count = numbers
        return total / count if count else math.nan
    total, squares, count = numbers
    if count < 2:
        return math.nan
    return math.sqrt(max(squares - total * total / count, 0.0) / (count - 1))


def training_step_metrics(scored, stats, grad_norms: list[float], phase_seconds: dict[str, float]) -> StepMetrics:
    """The update's metrics from this rank's scored rollouts and update statistics (names mapped to TRL's and verl's
    in the README). The gradient norm is already global (taken after the all-reduce); a phase's time is the
    slowest rank's, which is what the step waits for."""
    rollout = scored.rollout
    mask = rollout.completion_mask.float()
    lengths = mask.sum(dim=1)
    rows = float(len(lengths))
    metrics = (StepMetrics()
               .mean("train/loss", stats.loss, 1).mean("train/kl", stats.kl, 1)  # each rank's share of one loss
               .mean("train/grad_norm", sum(grad_norms), len(grad_norms) * 1.0)
               .mean("train/clip_fraction_low", stats.clip_fraction_low * stats.tokens, stats.tokens)
               .mean("train/clip_fraction_high", stats.clip_fraction_high * stats.tokens, stats.tokens)
               .mean("train/clip_fraction", stats.clip_fraction * stats.tokens, stats.tokens)
               .mean("train/reward", float(scored.rewards.sum()), rows).std("train/reward_std", scored.rewards)
               .mean("train/completion_length", float(lengths.sum()), rows)
               .low("train/completion_length_min", float(lengths.min())).high("train/completion_length_max",
                                                                                float(lengths.max()))
               .mean("train/truncated_fraction", float((1 - rollout.ended.float()).sum()), rows))
    metrics.mean("train/logprob_gap_mean", stats.gap_sum, stats.gap_tokens).high("train/logprob_gap_max", stats.gap_max)
    entropy = rollout.mean_token_entropy()  # per token: weighted by this rank's tokens
    metrics.mean("train/entropy", entropy * float(mask.sum()), float(mask.sum()))
    for name, values in scored.reward_components.items():
        metrics.mean(f"train/reward_{name}", float(values.sum()), float(values.numel()))
    for phase, seconds in phase_seconds.items():
        metrics.high(f"perf/{phase}_s", seconds)
    return metrics
