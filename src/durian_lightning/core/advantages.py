"""Advantage estimators: GRPO, Dr. GRPO, batch-level std, RLOO, REINFORCE++ (with and without the prompt's baseline)
and Durian's difficulty-aware group normalization under each of them.

One calling convention for all: ``rewards`` is a flat ``(N,)`` tensor with one reward per rollout and
``prompt_index`` an ``(N,)`` integer tensor saying which prompt (``0 .. num_prompts - 1``) each rollout answers.
Prompts may have different numbers of rollouts (after filtering). Each estimator is a baseline (what it subtracts
from the reward) and a spread (what it divides by, if anything):

=========================  ==============================================  =========================================
estimator                  numerator                                       denominator
=========================  ==============================================  =========================================
``grpo``                   ``r - mean(prompt)``                            std of the prompt's own rewards
``dr_grpo``                ``r - mean(prompt)``                            none (Dr. GRPO removes the std)
``batch``                  ``r - mean(prompt)``                            one std over all rewards of the batch
``rloo``                   ``r - mean(the prompt's other rewards)``        none
``reinforce_pp``           ``r - mean(batch)``                             std of all rewards of the batch
``reinforce_pp_baseline``  ``b = r - mean(prompt)``                        std of ``b`` over the batch
``durian``                 GRPO's                                          std over all rewards of the prompts of
                                                                           similar difficulty (a group)
``durian_<estimator>``     that estimator's                                that estimator's spread, within Durian's
                                                                           groups (``rloo``: the rewards' std)
=========================  ==============================================  =========================================

Conventions, identical in every estimator:

* stds are unbiased sample stds (divide by ``n - 1``) around the mean of the set they describe, so a group
  std includes the spread between its prompts' means; a set with a single reward has std 0;
* ``A = numerator / (std + eps)``, ``eps = 1e-6`` as in GRPO;
* a prompt whose rewards are all equal gets exactly ``A = 0`` for every rollout wherever the baseline is the
  prompt's (its numerator is zero; this is set explicitly so that float rounding in the mean cannot leave
  ``1e-17 / eps`` behind); under ``reinforce_pp`` it is the whole batch that must be constant for that;
* a prompt with a single rollout has no leave-one-out baseline: ``rloo`` gives it 0;
* the arithmetic runs in float64 and the result has the rewards' float dtype (float32 for integer rewards);
* an empty batch gives empty results; NaN/inf rewards, bad indices and mismatched lengths raise ValueError.

Batch statistics are over what is passed in: in distributed training, gather the global batch first.

:data:`ESTIMATORS` is the table the training module reads: a name -> ``f(rewards, prompt_index, scores, settings)``
returning :class:`Advantages`. A new estimator is one function and one entry. The method and its choices:
docs/method.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from durian_lightning._validation import check_finite, check_prompt_index, check_vector
from durian_lightning.core.difficulty import _check_percentiles, perceptual_groups, reasoning_groups

DEFAULT_EPS = 1e-6


@dataclass(frozen=True)
class _Centred:
    """Rewards minus their prompt's mean (float64), exactly zero for prompts whose rewards are all equal."""

    rewards: torch.Tensor  # (N,) float64
    centred: torch.Tensor  # (N,) float64
    prompt_index: torch.Tensor  # (N,) long
    num_prompts: int
    out_dtype: torch.dtype


def consecutive_prompt_index(num_prompts: int, num_generations: int, device=None) -> torch.Tensor:
    """The ``prompt_index`` of rollouts stored G consecutive rows per prompt: ``0 0 .. 0 1 1 .. 1 ...``."""
    return torch.arange(num_prompts, device=device).repeat_interleave(num_generations)


def _centre(rewards: torch.Tensor, prompt_index: torch.Tensor, num_prompts: int | None) -> _Centred:
    rewards = check_vector("rewards", torch.as_tensor(rewards))
    check_finite("rewards", rewards)
    prompt_index, num_prompts = check_prompt_index(torch.as_tensor(prompt_index), rewards.numel(), num_prompts)
    prompt_index = prompt_index.to(rewards.device)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64)
    counts = torch.bincount(prompt_index, minlength=num_prompts).to(torch.float64)
    mean = r.new_zeros(num_prompts).index_add_(0, prompt_index, r) / counts.clamp_min(1)
    high = r.new_full((num_prompts,), -torch.inf).scatter_reduce_(0, prompt_index, r, reduce="amax")
    low = r.new_full((num_prompts,), torch.inf).scatter_reduce_(0, prompt_index, r, reduce="amin")
    constant = (high == low)[prompt_index]
    centred = torch.where(constant, torch.zeros_like(r), r - mean[prompt_index])
    return _Centred(r, centred, prompt_index, num_prompts, out_dtype)


def group_std(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Unbiased std of ``values`` within each group id (two-pass, so large offsets do not cancel); 0 for size 1.

    ``values`` and ``group`` are ``(N,)``; returns ``(num_groups,)``. Empty groups also get 0.
    """
    counts = torch.bincount(group, minlength=num_groups).to(values.dtype)
    mean = values.new_zeros(num_groups).index_add_(0, group, values) / counts.clamp_min(1)
    squares = values.new_zeros(num_groups).index_add_(0, group, (values - mean[group]).square())
    return torch.where(counts > 1, squares / (counts - 1).clamp_min(1), torch.zeros_like(squares)).sqrt()


def _normalize(c: _Centred, rollout_group: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r - mean(prompt)) / (std(group) + eps)`` per rollout, and the shared std each rollout was divided by."""
    return _divide(c.centred, c.rewards, rollout_group, num_groups, eps)


def _divide(numerator: torch.Tensor, spread: torch.Tensor, rollout_group: torch.Tensor, num_groups: int,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``numerator / (std of spread within the rollout's group + eps)``, and that std per rollout."""
    std = group_std(spread, rollout_group, num_groups)[rollout_group]
    return numerator / (std + eps), std


@dataclass(frozen=True)
class _Baseline:
    """An estimator as Durian reuses it: its own advantage, the reward minus its baseline, and the values whose std
    it divides by (Durian takes that std within its difficulty groups instead)."""

    own: torch.Tensor  # (N,) float64
    numerator: torch.Tensor  # (N,) float64
    spread: torch.Tensor  # (N,) float64


def _whole_batch(c: _Centred) -> torch.Tensor:
    return torch.zeros_like(c.prompt_index)


def _grpo_baseline(c: _Centred, eps: float) -> _Baseline:
    own, _ = _normalize(c, c.prompt_index, c.num_prompts, eps)
    return _Baseline(own, c.centred, c.rewards)


def _rloo_baseline(c: _Centred, eps: float) -> _Baseline:
    """``r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(prompt))``; 0 for a prompt with one rollout."""
    counts = torch.bincount(c.prompt_index, minlength=c.num_prompts).to(torch.float64)[c.prompt_index]
    loo = torch.where(counts > 1, c.centred * counts / (counts - 1).clamp_min(1), torch.zeros_like(c.centred))
    return _Baseline(loo, loo, c.rewards)


def _reinforce_pp_baseline_free(c: _Centred, eps: float) -> _Baseline:
    """REINFORCE++: the rewards whitened over the whole batch (exactly 0 where the batch is constant)."""
    constant = c.rewards.numel() == 0 or bool(c.rewards.max() == c.rewards.min())
    numerator = torch.zeros_like(c.rewards) if constant else c.rewards - c.rewards.mean()
    own, _ = _divide(numerator, c.rewards, _whole_batch(c), 1, eps)
    return _Baseline(own, numerator, c.rewards)


def _reinforce_pp_with_baseline(c: _Centred, eps: float) -> _Baseline:
    """REINFORCE++-baseline: ``b = r - mean(prompt)``, whitened over the whole batch. ``b`` has mean 0 over the batch
    and over any set of whole prompts, so whitening only divides."""
    own, _ = _divide(c.centred, c.centred, _whole_batch(c), 1, eps)
    return _Baseline(own, c.centred, c.centred)


BASELINES: dict[str, Callable[[_Centred, float], _Baseline]] = {
    "grpo": _grpo_baseline, "rloo": _rloo_baseline, "reinforce_pp": _reinforce_pp_baseline_free,
    "reinforce_pp_baseline": _reinforce_pp_with_baseline,
}
"""The estimators Durian's difficulty groups combine with, by name (``durian`` is ``grpo``'s form)."""


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def grpo_advantages(
    rewards: torch.Tensor, prompt_index: torch.Tensor, *, eps: float = DEFAULT_EPS, num_prompts: int | None = None
) -> torch.Tensor:
    """GRPO: ``A = (r - mean(prompt)) / (std(prompt) + eps)``."""
    _check_eps(eps)
    c = _centre(rewards, prompt_index, num_prompts)
    advantages, _ = _normalize(c, c.prompt_index, c.num_prompts, eps)
    return advantages.to(c.out_dtype)


def dr_grpo_advantages(
    rewards: torch.Tensor, prompt_index: torch.Tensor, *, eps: float = DEFAULT_EPS, num_prompts: int | None = None
) -> torch.Tensor:
    """Dr. GRPO: ``A = r - mean(prompt)``, no std (``eps`` is accepted for a uniform signature and unused)."""
    _check_eps(eps)
    c = _centre(rewards, prompt_index, num_prompts)
    return c.centred.to(c.out_dtype)


def batch_std_advantages(
    rewards: torch.Tensor, prompt_index: torch.Tensor, *, eps: float = DEFAULT_EPS, num_prompts: int | None = None
) -> torch.Tensor:
    """Batch-level std: ``A = (r - mean(prompt)) / (std(all rewards of the batch) + eps)``."""
    _check_eps(eps)
    c = _centre(rewards, prompt_index, num_prompts)
    advantages, _ = _normalize(c, torch.zeros_like(c.prompt_index), 1, eps)
    return advantages.to(c.out_dtype)


def rloo_advantages(
    rewards: torch.Tensor, prompt_index: torch.Tensor, *, eps: float = DEFAULT_EPS, num_prompts: int | None = None
) -> torch.Tensor:
    """RLOO: ``A_i = r_i - mean of the prompt's other rewards``, no std (``eps`` unused); 0 for a lone rollout."""
    return _own("rloo", rewards, prompt_index, eps, num_prompts)


def reinforce_pp_advantages(
    rewards: torch.Tensor, prompt_index: torch.Tensor, *, eps: float = DEFAULT_EPS, num_prompts: int | None = None
) -> torch.Tensor:
    """REINFORCE++: ``A = (r - mean(batch)) / (std(batch) + eps)``; the prompt plays no part."""
    return _own("reinforce_pp", rewards, prompt_index, eps, num_prompts)


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, prompt_index: torch.Tensor, *, eps: float = DEFAULT_EPS, num_prompts: int | None = None
) -> torch.Tensor:
    """REINFORCE++-baseline: ``b = r - mean(prompt)``, ``A = b / (std of b over the batch + eps)``."""
    return _own("reinforce_pp_baseline", rewards, prompt_index, eps, num_prompts)


def _own(baseline: str, rewards, prompt_index, eps: float, num_prompts: int | None) -> torch.Tensor:
    _check_eps(eps)
    c = _centre(rewards, prompt_index, num_prompts)
    return BASELINES[baseline](c, eps).own.to(c.out_dtype)


@dataclass(frozen=True)
class Advantages:
    """What every estimator returns: the advantage per rollout and, for logging, how it was made.

    ``groups`` maps a difficulty axis (``"perceptual"``, ``"reasoning"``) to each rollout's group id on it and
    ``group_stds`` to the shared std that rollout was divided by; ``terms`` holds the advantage terms a mixture
    combines (Durian's ``"grpo"``, ``"perceptual"``, ``"reasoning"``) and ``alphas`` their weights. Estimators without
    groups or terms leave them empty, so a caller never needs to know which estimator ran.
    """

    advantages: torch.Tensor  # (N,) what the loss uses
    groups: dict[str, torch.Tensor] = field(default_factory=dict)  # axis -> (N,) group id
    group_stds: dict[str, torch.Tensor] = field(default_factory=dict)  # axis -> (N,) shared std
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # term -> (N,) advantages before mixing
    alphas: tuple[float, ...] = ()  # the weights applied to ``terms`` (after dropping absent terms)


def effective_alphas(
    alphas: Sequence[float], has_perceptual: bool, has_reasoning: bool
) -> tuple[float, float, float]:
    """The alphas actually applied: an absent term's weight is dropped and the others rescaled to the same sum.

    So ``(0.1, 0.2, 0.7)`` with no confidence becomes ``(1/3, 2/3, 0)``: the perceptual-only ablation keeps the
    ratio of the remaining weights and the overall advantage scale.
    """
    if len(alphas) != 3:
        raise ValueError(f"alphas must be (alpha_ori, alpha_percep, alpha_reason), got {tuple(alphas)}")
    a = [float(x) for x in alphas]
    if any(not (0 <= x < math.inf) for x in a):
        raise ValueError(f"alphas must be finite and >= 0, got {tuple(a)}")
    total = sum(a)
    if not total > 0:
        raise ValueError(f"alphas must not all be 0, got {tuple(a)}")
    kept = [a[0], a[1] if has_perceptual else 0.0, a[2] if has_reasoning else 0.0]
    if not sum(kept) > 0:
        raise ValueError(
            f"alphas {tuple(a)} put all weight on terms whose scores were not given "
            f"(visual_entropy given: {has_perceptual}, confidence given: {has_reasoning})"
        )
    scale = total / sum(kept)
    return (kept[0] * scale, kept[1] * scale, kept[2] * scale)


def _per_prompt_score(name: str, values: torch.Tensor | None, num_prompts: int, device: torch.device) -> torch.Tensor | None:
    if values is None:
        return None
    values = check_vector(name, torch.as_tensor(values, device=device), num_prompts)
    check_finite(name, values)
    return values


def durian_advantages(
    rewards: torch.Tensor,
    prompt_index: torch.Tensor,
    *,
    visual_entropy: torch.Tensor | None = None,
    confidence: torch.Tensor | None = None,
    alphas: Sequence[float] = (0.1, 0.2, 0.7),
    num_reasoning_groups: int = 12,
    percentiles: Sequence[float] = (0.25, 0.75),
    entropy_thresholds: torch.Tensor | Sequence[float] | None = None,
    eps: float = DEFAULT_EPS,
    num_prompts: int | None = None,
    baseline: str = "grpo",
) -> Advantages:
    """Durian: ``A = a_ori * A_grpo + a_percep * A_percep + a_reason * A_reason``.

    ``A_percep = (r - mean(prompt)) / (std(R_a) + eps)`` where ``R_a`` are all rewards of the prompts in the same
    perceptual group as this one (three groups by ``visual_entropy`` split at ``percentiles`` of the batch, or at
    ``entropy_thresholds`` such as the dataset's); ``A_reason`` likewise over ``num_reasoning_groups``
    equal-frequency groups of ``confidence`` (one per prompt when there are fewer prompts than groups).

    ``visual_entropy`` and ``confidence`` are per prompt, ``(num_prompts,)``. Passing only one of them, or setting
    an alpha to 0, gives the perceptual-only or reasoning-only ablation (see :func:`effective_alphas`).

    ``baseline`` puts the groups under another estimator of :data:`BASELINES`: ``A_grpo`` becomes that estimator's
    own advantage, and each group term divides its numerator by the std of what it divides by (``rloo``: the
    rewards), taken within the group. ``grpo`` is the paper's Durian.
    """
    _check_eps(eps)
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r} for Durian; choose one of {sorted(BASELINES)}")
    c = _centre(rewards, prompt_index, num_prompts)
    device = c.rewards.device
    entropy = _per_prompt_score("visual_entropy", visual_entropy, c.num_prompts, device)
    conf = _per_prompt_score("confidence", confidence, c.num_prompts, device)
    weights = effective_alphas(alphas, entropy is not None, conf is not None)

    base = BASELINES[baseline](c, eps)
    combined = weights[0] * base.own
    terms, groups, stds = {baseline: base.own}, {}, {}
    if weights[1] > 0:
        groups["perceptual"] = perceptual_groups(entropy, percentiles, entropy_thresholds)[c.prompt_index]
        terms["perceptual"], stds["perceptual"] = _divide(base.numerator, base.spread, groups["perceptual"], 3, eps)
        combined = combined + weights[1] * terms["perceptual"]
    if weights[2] > 0:
        groups["reasoning"] = reasoning_groups(conf, num_reasoning_groups)[c.prompt_index]
        num_groups = min(num_reasoning_groups, c.num_prompts)
        terms["reasoning"], stds["reasoning"] = _divide(base.numerator, base.spread, groups["reasoning"], num_groups,
                                                        eps)
        combined = combined + weights[2] * terms["reasoning"]

    def cast(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.to(c.out_dtype) for name, t in values.items()}

    return Advantages(combined.to(c.out_dtype), groups, cast(stds), cast(terms), weights)


@dataclass(frozen=True)
class DifficultyScores:
    """Per-prompt difficulty scores handed to every estimator (each uses what it needs)."""

    visual_entropy: torch.Tensor | None = None  # (P,) perceptual difficulty
    confidence: torch.Tensor | None = None  # (P,) mean sequence log-prob of the prompt's rollouts
    entropy_thresholds: torch.Tensor | None = None  # (2,) fixed perceptual thresholds; None: the batch's percentiles


@dataclass(frozen=True)
class AdvantageSettings:
    """How advantages are computed.

    Args:
        estimator: a name in :data:`ESTIMATORS`: grpo, dr_grpo, batch, rloo, reinforce_pp, reinforce_pp_baseline,
            durian (Durian over GRPO) or durian_rloo, durian_reinforce_pp, durian_reinforce_pp_baseline (or one you
            register).
        alphas: Durian's (alpha_ori, alpha_percep, alpha_reason); (0.1, 0.9, 0) or (0.1, 0, 0.9) are the one-axis ablations.
        num_reasoning_groups: b, equal-frequency groups of confidence (the paper finds 12-16 best).
        percentiles: the two entropy percentiles splitting the three perceptual groups.
        confidence_reduction: sequence log-prob as the token sum (the paper's formula) or the per-token mean.
        entropy_thresholds: perceptual thresholds from the batch (the paper) or from the dataset's train entropies.
        eps: added to every std.
    """

    estimator: str = "durian"
    alphas: tuple[float, float, float] = (0.1, 0.2, 0.7)
    num_reasoning_groups: int = 12
    percentiles: tuple[float, float] = (0.25, 0.75)
    confidence_reduction: Literal["sum", "mean"] = "sum"
    entropy_thresholds: Literal["batch", "dataset"] = "batch"
    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:  # what can be checked without data fails before any is loaded
        effective_alphas(self.alphas, True, True)
        _check_percentiles(self.percentiles)
        if self.num_reasoning_groups < 1:
            raise ValueError(f"num_reasoning_groups must be >= 1, got {self.num_reasoning_groups}")
        _check_eps(self.eps)


Estimator = Callable[[torch.Tensor, torch.Tensor, DifficultyScores, AdvantageSettings], Advantages]


def _grpo(rewards, prompt_index, scores: DifficultyScores, settings: AdvantageSettings) -> Advantages:
    return Advantages(grpo_advantages(rewards, prompt_index, eps=settings.eps))


def _dr_grpo(rewards, prompt_index, scores: DifficultyScores, settings: AdvantageSettings) -> Advantages:
    return Advantages(dr_grpo_advantages(rewards, prompt_index, eps=settings.eps))


def _batch_std(rewards, prompt_index, scores: DifficultyScores, settings: AdvantageSettings) -> Advantages:
    return Advantages(batch_std_advantages(rewards, prompt_index, eps=settings.eps))


def _own_estimator(baseline: str) -> Estimator:
    def estimate(rewards, prompt_index, scores: DifficultyScores, settings: AdvantageSettings) -> Advantages:
        return Advantages(_own(baseline, rewards, prompt_index, settings.eps, None))

    return estimate


def _durian_over(baseline: str) -> Estimator:
    def estimate(rewards, prompt_index, scores: DifficultyScores, settings: AdvantageSettings) -> Advantages:
        return durian_advantages(
            rewards, prompt_index, visual_entropy=scores.visual_entropy, confidence=scores.confidence,
            alphas=settings.alphas, num_reasoning_groups=settings.num_reasoning_groups,
            percentiles=settings.percentiles, entropy_thresholds=scores.entropy_thresholds, eps=settings.eps,
            baseline=baseline,
        )

    return estimate


ESTIMATORS: dict[str, Estimator] = {
    "grpo": _grpo, "dr_grpo": _dr_grpo, "batch": _batch_std, "durian": _durian_over("grpo"),
    **{name: _own_estimator(name) for name in ("rloo", "reinforce_pp", "reinforce_pp_baseline")},
    **{f"durian_{name}": _durian_over(name) for name in ("rloo", "reinforce_pp", "reinforce_pp_baseline")},
}
"""Every estimator by name: ``f(rewards, prompt_index, scores, settings) -> Advantages``. Register one by adding it."""


def get_estimator(name: str) -> Estimator:
    """The estimator registered as ``name``, or a ValueError listing the registered ones."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; registered: {', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]
