"""DAPO's dynamic sampling: only prompts whose rewards differ enter an update, and an update waits for a full batch.

A prompt whose G accuracy rewards are all equal carries no signal (DAPO filters on accuracy; the format reward alone
would keep prompts the model answers wrongly in the same way G times). The buffer collects informative prompts over
steps until a full batch is there; after the update takes its batch, the surplus is dropped, as verl does: it was
sampled by the policy the update replaces, and keeping it would let it grow stale and unbounded (under DDP every rank
waits for the poorest, so the others' surplus would pile up). So every prompt an update sees was sampled by the policy
being updated, and the buffer never holds more than one batch plus one step's prompts. Pending prompts are not
checkpointed: a resumed run starts collecting afresh.
"""

from __future__ import annotations

from typing import Callable

from durian_lightning.stages.scoring import ScoredRollouts
from durian_lightning.stages.step_metrics import StepMetrics


class PromptBuffer:
    """Informative prompts waiting for an update, oldest first."""

    def __init__(self) -> None:
        self._parts: list[ScoredRollouts] = []

    def __len__(self) -> int:
        return sum(part.num_prompts for part in self._parts)

    @staticmethod
    def informative(scored: ScoredRollouts, reward: str = "accuracy") -> ScoredRollouts:
        """The prompts of ``scored`` whose G values of ``reward`` (a component's name, or "total") are not all equal."""
        return scored.select_prompts(scored.informative_prompts(reward))

    def add(self, scored: ScoredRollouts) -> None:
        if scored.num_prompts:
            self._parts.append(scored)

    def take(self, num_prompts: int) -> ScoredRollouts:
        """The ``num_prompts`` oldest prompts, removed from the buffer."""
        if not 0 < num_prompts <= len(self):
            raise ValueError(f"cannot take {num_prompts} prompts from a buffer of {len(self)}")
        taken, count = [], 0
        while count < num_prompts:
            part = self._parts.pop(0)
            need = num_prompts - count
            if part.num_prompts > need:  # split: the rest stays at the front
                self._parts.insert(0, part.select_prompts(range(need, part.num_prompts)))
                part = part.select_prompts(range(need))
            taken.append(part)
            count += part.num_prompts
        return ScoredRollouts.concat(taken)

    def collect(self, scored: ScoredRollouts, batch_size: int, reward: str,
                fewest: Callable[[int], int] = lambda n: n) -> tuple[ScoredRollouts | None, StepMetrics]:
        """Buffer a step's informative prompts; once ``fewest(len(self))`` (the least any rank holds) reaches a batch,
        the oldest ``batch_size`` prompts, the surplus dropped; else None. With the metrics of it: the share kept, and
        how many were dropped."""
        informative = self.informative(scored, reward)
        metrics = StepMetrics().mean("train/dynamic_sampling_kept", informative.num_prompts, scored.num_prompts)
        self.add(informative)
        if fewest(len(self)) < batch_size:
            return None, metrics
        batch = self.take(batch_size)
        return batch, metrics.total("train/dynamic_sampling_dropped", self.clear())

    def clear(self) -> int:
        """Drop every waiting prompt; returns how many."""
        dropped = len(self)
        self._parts = []
        return dropped
