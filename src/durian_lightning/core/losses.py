"""Policy losses: PPO's clipped surrogate, KL estimators to a reference policy, and how per-token losses are averaged.

Shapes: log-probs and the completion mask are ``(N, T)`` (N sequences, T completion positions, mask 1 on real
tokens); advantages are ``(N,)`` (broadcast to every token of the sequence) or ``(N, T)``.

Aggregation modes (how ``(N, T)`` token losses become one number) matter as much as the advantage:

* ``token-mean``: sum over all real tokens / number of real tokens (DAPO): every token weighs the same;
* ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (GRPO): every sequence weighs the
  same, so tokens of long answers weigh less; sequences with no real token are left out;
* ``seq-mean-token-sum``: mean over sequences of each sequence's token *sum* divided by a constant (Dr. GRPO),
  by default ``T``, the padded completion length, so the loss has no length bias.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3", "low_var_kl"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
RolloutCorrection = Literal["none", "token", "sequence"]
CorrectionMode = Literal["truncate", "mask"]

_MAX_LOG_RATIO = 20.0


def _broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if advantages.dim() == 1 and advantages.shape[0] == like.shape[0]:
        return advantages.unsqueeze(1)
    if tuple(advantages.shape) == tuple(like.shape):
        return advantages
    raise ValueError(f"advantages must be (N,) or (N, T) for log-probs of shape {tuple(like.shape)}, got {tuple(advantages.shape)}")


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
) -> torch.Tensor:
    """Per-token PPO loss ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``, ``ratio = pi / pi_old``.

    ``eps_high`` defaults to ``eps_low`` (symmetric PPO); DAPO's "clip-higher" uses 0.2 / 0.28. Where the clipped
    branch is the minimum and the ratio is outside the range, the gradient is exactly zero: the update stops there.
    """
    if tuple(logprobs.shape) != tuple(old_logprobs.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and old_logprobs {tuple(old_logprobs.shape)} must match")
    eps_high = eps_low if eps_high is None else eps_high
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"clip range needs 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    adv = _broadcast_advantages(advantages, logprobs).to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.minimum(unclipped, clipped)


def clipped_tokens(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the clipped branch is active, as ``(low, high)`` boolean masks shaped like ``logprobs``: the ratio fell
    below ``1 - eps_low`` on a negative advantage, or rose above ``1 + eps_high`` on a positive one. These tokens get
    no gradient."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = _broadcast_advantages(advantages, logprobs)
    return (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from samples of ``pi`` (Schulman's k1, k2, k3).

    With ``d = log pi_ref - log pi``: ``k1 = -d`` (unbiased, can be negative), ``k2 = d^2 / 2`` (biased, low variance),
    ``k3 = exp(d) - d - 1`` (unbiased, always >= 0; "low_var_kl" in verl). For k3, ``d`` is clamped to
    [-20, 20] before ``exp`` so one very unlikely token cannot overflow the loss.
    """
    if tuple(logprobs.shape) != tuple(ref_logprobs.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must match")
    d = ref_logprobs - logprobs
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d.square()
    if estimator in ("k3", "low_var_kl"):
        d = d.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(d) - d - 1.0
    raise ValueError(f"estimator must be 'k1', 'k2', 'k3' or 'low_var_kl', got {estimator!r}")


def truncated_importance_weights(
    proximal: torch.Tensor, behaviour: torch.Tensor, mask: torch.Tensor, level: RolloutCorrection, cap: float,
    mode: CorrectionMode = "truncate", low: float | None = None,
) -> torch.Tensor:
    """``(N, T)`` importance-sampling weights from the behaviour policy (the log-probs the rollout engine recorded
    while sampling) to the proximal one (the training forward's old log-probs), ``w = pi_prox / pi_behav`` per token,
    or per sequence from the product of its tokens' ratios (the same weight on each of its tokens). They correct for
    the two computing different numbers for the same policy (KV-cache decoding vs a full forward, bf16 kernels,
    another engine).

    ``truncate`` (TIS): ``min(w, cap)``. ``mask``: ``w`` where ``low <= w <= cap``, else 0 (the token, or the whole
    sequence, leaves the surrogate); ``low`` defaults to ``1 / cap``. Detached (a weight, not a path for gradients);
    0 on padding."""
    log_ratio = ((proximal - behaviour) * mask).detach().double()
    if level == "token":
        weights = log_ratio.exp()
    elif level == "sequence":
        weights = log_ratio.sum(dim=1, keepdim=True).exp().expand_as(log_ratio)
    else:
        raise ValueError(f"rollout_correction must be 'none', 'token' or 'sequence', got {level!r}")
    if mode == "truncate":
        weights = weights.clamp(max=cap)
    elif mode == "mask":
        low = 1.0 / cap if low is None else low
        weights = torch.where((weights >= low) & (weights <= cap), weights, torch.zeros_like(weights))
    else:
        raise ValueError(f"rollout_correction_mode must be 'truncate' or 'mask', got {mode!r}")
    return weights.to(proximal.dtype) * mask


def aggregation_numerator(
    token_loss: torch.Tensor, mask: torch.Tensor, mode: Aggregation = "token-mean", normalizer: float | None = None
) -> torch.Tensor:
    """The summed part of an aggregation: over micro-batches, these add up; divide the total by
    :func:`aggregation_denominator` of the whole batch to get :func:`aggregate_loss`."""
    if tuple(token_loss.shape) != tuple(mask.shape) or token_loss.dim() != 2:
        raise ValueError(f"token_loss and mask must both be (N, T); got {tuple(token_loss.shape)} and {tuple(mask.shape)}")
    weights = mask.to(token_loss.dtype)
    # where() rather than multiply: padded positions may hold inf or NaN (e.g. exp of a huge log-ratio)
    masked = torch.where(weights > 0, token_loss * weights, torch.zeros_like(token_loss))
    if mode == "token-mean":
        return masked.sum()
    if mode == "seq-mean-token-mean":  # a sequence with no real token adds 0 and is not counted below
        return (masked.sum(dim=1) / weights.sum(dim=1).clamp_min(1)).sum()
    if mode == "seq-mean-token-sum":
        normalizer = float(token_loss.shape[1]) if normalizer is None else float(normalizer)
        if not normalizer > 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer}")
        return (masked.sum(dim=1) / normalizer).sum()
    raise ValueError(f"mode must be 'token-mean', 'seq-mean-token-mean' or 'seq-mean-token-sum', got {mode!r}")


def aggregation_denominator(mask: torch.Tensor, mode: Aggregation = "token-mean") -> float:
    """What an aggregation divides by: real tokens, sequences with a real token, or all sequences."""
    tokens_per_seq = mask.sum(dim=1)
    if not bool((tokens_per_seq > 0).any()):
        raise ValueError("the completion mask has no real token: the loss is undefined for an empty batch")
    if mode == "token-mean":
        return float(tokens_per_seq.sum())
    if mode == "seq-mean-token-mean":
        return float((tokens_per_seq > 0).sum())
    if mode == "seq-mean-token-sum":
        return float(mask.shape[0])
    raise ValueError(f"mode must be 'token-mean', 'seq-mean-token-mean' or 'seq-mean-token-sum', got {mode!r}")


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: Aggregation = "token-mean",
    normalizer: float | None = None,
) -> torch.Tensor:
    """Reduce ``(N, T)`` token losses over the real tokens of ``mask`` to a scalar (see the module docstring).

    ``normalizer`` is only used by ``seq-mean-token-sum`` (default: ``T``). Raises if the mask has no real token,
    where every mode is undefined.
    """
    return aggregation_numerator(token_loss, mask, mode, normalizer) / aggregation_denominator(mask, mode)


@dataclass(frozen=True)
class PolicyLossConfig:
    """Every knob of the policy loss; :meth:`preset` gives the paper's GRPO and DAPO settings.

    ``grpo``: symmetric clip 0.2, KL to the reference (k3, coefficient 0.01), per-sequence token mean.
    ``dapo``: clip-higher 0.2 / 0.28, no KL, token mean over the batch. (DAPO's dynamic sampling is a property of
    the rollout loop, not of the loss.)
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    aggregation: Aggregation = "token-mean"
    normalizer: float | None = None
    rollout_correction: RolloutCorrection = "none"  # importance sampling from the recorded log-probs
    rollout_correction_cap: float = 2.0
    rollout_correction_mode: CorrectionMode = "truncate"
    rollout_correction_low: float | None = None  # mask's lower bound (default 1 / cap)

    @classmethod
    def preset(cls, name: Literal["grpo", "dapo"], **overrides) -> "PolicyLossConfig":
        presets = {
            "grpo": cls(eps_low=0.2, eps_high=0.2, kl_coef=0.01, kl_estimator="k3", aggregation="seq-mean-token-mean"),
            "dapo": cls(eps_low=0.2, eps_high=0.28, kl_coef=0.0, aggregation="token-mean"),
        }
        if name not in presets:
            raise ValueError(f"unknown loss preset {name!r}; choose one of {sorted(presets)}")
        return replace(presets[name], **overrides)


@dataclass(frozen=True)
class PolicyLoss:
    """The loss to back-propagate and detached diagnostics."""

    loss: torch.Tensor  # scalar: policy-gradient term + kl_coef * KL term
    policy_loss: torch.Tensor  # scalar: the surrogate term alone (detached)
    kl: torch.Tensor  # scalar: the aggregated KL estimate (detached; 0 without a reference)
    clip_fraction_low: torch.Tensor  # scalar: share of real tokens clipped at 1 - eps_low (A < 0; detached)
    clip_fraction_high: torch.Tensor  # scalar: share of real tokens clipped at 1 + eps_high (A > 0; detached)

    @property
    def clip_fraction(self) -> torch.Tensor:
        """Share of real tokens where the clipped branch was taken."""
        return self.clip_fraction_low + self.clip_fraction_high


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    config: PolicyLossConfig = PolicyLossConfig(),
    denominator: float | None = None,
    behaviour_logprobs: torch.Tensor | None = None,
) -> PolicyLoss:
    """Clipped surrogate plus ``kl_coef`` times the KL estimate, both aggregated with ``config.aggregation``.

    With ``config.rollout_correction`` the surrogate of each token is weighted by
    :func:`truncated_importance_weights` from ``behaviour_logprobs`` (what the rollout recorded) to ``old_logprobs``.

    ``denominator`` is :func:`aggregation_denominator` of the whole batch when this call sees one micro-batch of it:
    the micro-batches' ``loss``, ``policy_loss`` and ``kl`` then add up exactly to the whole batch's. By default it is
    this batch's own. The clip fractions are always this call's shares of clipped real tokens.
    """
    if denominator is None:
        denominator = aggregation_denominator(mask, config.aggregation)

    def aggregate(token_values: torch.Tensor) -> torch.Tensor:
        return aggregation_numerator(token_values, mask, config.aggregation, config.normalizer) / denominator

    surrogate = clipped_surrogate(logprobs, old_logprobs, advantages, config.eps_low, config.eps_high)
    if config.rollout_correction != "none":
        if behaviour_logprobs is None:
            raise ValueError(f"rollout_correction={config.rollout_correction!r} needs the log-probs recorded while "
                             "sampling (behaviour_logprobs)")
        surrogate = surrogate * truncated_importance_weights(old_logprobs, behaviour_logprobs, mask,
                                                             config.rollout_correction, config.rollout_correction_cap,
                                                             config.rollout_correction_mode, config.rollout_correction_low)
    token_loss = surrogate
    kl_value = logprobs.new_zeros(())
    if config.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError(f"kl_coef={config.kl_coef} needs ref_logprobs; pass them or set kl_coef=0")
        kl = kl_penalty(logprobs, ref_logprobs, config.kl_estimator)
        token_loss = surrogate + config.kl_coef * kl
        kl_value = aggregate(kl.detach())
    loss = aggregate(token_loss)
    with torch.no_grad():
        low, high = (aggregate_loss(c.to(logprobs.dtype), mask, "token-mean")
                     for c in clipped_tokens(logprobs, old_logprobs, advantages, config.eps_low, config.eps_high))
        pg = aggregate(surrogate.detach())
    return PolicyLoss(loss=loss, policy_loss=pg, kl=kl_value, clip_fraction_low=low, clip_fraction_high=high)
