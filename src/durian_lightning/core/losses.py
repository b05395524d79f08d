"""Policy losses: PPO's clipped surrogate (per token, or GSPO's per sequence), CISPO's clipped importance weight,
SAPO's soft gate, KL estimators to a reference policy, and how per-token losses are averaged.

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
Objective = Literal["clip", "cispo", "sapo"]
RatioLevel = Literal["token", "sequence"]
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
    log_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token PPO loss ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``, ``ratio = pi / pi_old``.

    ``eps_high`` defaults to ``eps_low`` (symmetric PPO); DAPO's "clip-higher" uses 0.2 / 0.28. Where the clipped
    branch is the minimum and the ratio is outside the range, the gradient is exactly zero: the update stops there.
    ``log_ratio`` replaces ``log pi - log pi_old`` (GSPO's sequence ratio: :func:`importance_log_ratio`).
    """
    if tuple(logprobs.shape) != tuple(old_logprobs.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and old_logprobs {tuple(old_logprobs.shape)} must match")
    eps_high = eps_low if eps_high is None else eps_high
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"clip range needs 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
    adv = _broadcast_advantages(advantages, logprobs).to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs if log_ratio is None else log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.minimum(unclipped, clipped)


def clipped_tokens(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float,
    log_ratio: torch.Tensor | None = None, objective: Objective = "clip",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the ratio was clipped, as ``(low, high)`` boolean masks shaped like ``logprobs``.

    ``clip``: the clipped branch is active (the ratio fell below ``1 - eps_low`` on a negative advantage, or rose
    above ``1 + eps_high`` on a positive one); these tokens get no gradient. ``cispo``: the weight was clipped, at
    either end, whatever the advantage. ``sapo`` clips nothing."""
    ratio = torch.exp(logprobs - old_logprobs if log_ratio is None else log_ratio)
    if objective == "sapo":
        return torch.zeros_like(ratio, dtype=torch.bool), torch.zeros_like(ratio, dtype=torch.bool)
    if objective == "cispo":
        return ratio < 1 - eps_low, ratio > 1 + eps_high
    adv = _broadcast_advantages(advantages, logprobs)
    return (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)


def importance_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
                         level: RatioLevel = "token") -> torch.Tensor:
    """``(N, T)`` log of the importance ratio ``pi / pi_old`` the objective uses.

    ``token``: each token's own, ``log pi_t - log pi_old_t``. ``sequence`` (GSPO): every token of a sequence carries
    the sequence's length-normalised log-ratio ``s = mean over its real tokens of (log pi_t - log pi_old_t)``, with
    the gradient of its own log-prob: ``sg(s) + log pi_t - sg(log pi_t)``. Averaged over the sequence's tokens, the
    gradient is then exactly that of ``s``. 0 on padding.
    """
    if tuple(logprobs.shape) != tuple(old_logprobs.shape):
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and old_logprobs {tuple(old_logprobs.shape)} must match")
    real = mask > 0  # where(), not a product: padded positions may hold inf or NaN
    token = torch.where(real, logprobs - old_logprobs, torch.zeros_like(logprobs))
    if level == "token":
        return token
    if level != "sequence":
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {level!r}")
    sequence = token.detach().sum(dim=1, keepdim=True) / real.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(real, sequence + logprobs - logprobs.detach(), torch.zeros_like(logprobs))


def cispo_surrogate(logprobs: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                    eps_high: float) -> torch.Tensor:
    """Per-token CISPO loss ``-sg(clip(ratio, 1 - eps_low, 1 + eps_high)) * A * log pi``: the ratio is clipped as a
    weight, not as a branch of a min, so every token keeps a gradient (of size the weight times ``A``).
    ``eps_low = 1`` leaves the weight unbounded below, as MiniMax-M1 does."""
    if not (0 <= eps_low <= 1 and eps_high >= 0):
        raise ValueError(f"CISPO's clip range needs 0 <= eps_low <= 1 and eps_high >= 0, got eps_low={eps_low}, "
                         f"eps_high={eps_high}")
    adv = _broadcast_advantages(advantages, logprobs).to(logprobs.dtype)
    weight = torch.clamp(log_ratio.detach().exp(), 1.0 - eps_low, 1.0 + eps_high)
    return -weight * adv * logprobs


def sapo_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float, tau_neg: float) -> torch.Tensor:
    """Per-token SAPO loss ``-f(ratio) * A`` with the soft gate ``f(r) = 4 / tau * sigmoid(tau * (r - 1))``, ``tau``
    ``tau_pos`` where ``A > 0`` and ``tau_neg`` elsewhere. ``f'(1) = 1``: on-policy it is the plain policy gradient;
    away from 1 the gradient ``4 s (1 - s)``, ``s = sigmoid(tau * (r - 1))``, fades smoothly instead of stopping."""
    if not (tau_pos > 0 and tau_neg > 0):
        raise ValueError(f"SAPO's temperatures must be > 0, got tau_pos={tau_pos}, tau_neg={tau_neg}")
    adv = _broadcast_advantages(advantages, log_ratio).to(log_ratio.dtype)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    gate = 4.0 / tau * torch.sigmoid(tau * (log_ratio.clamp(max=_MAX_LOG_RATIO).exp() - 1.0))
    return -gate * adv


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
    """Every knob of the policy loss; :meth:`preset` gives the paper's GRPO and DAPO settings and the other
    objectives of the field.

    ``grpo``: symmetric clip 0.2, KL to the reference (k3, coefficient 0.01), per-sequence token mean.
    ``dapo``: clip-higher 0.2 / 0.28, no KL, token mean over the batch. (DAPO's dynamic sampling is a property of
    the rollout loop, not of the loss.)
    ``gspo``: the clip on the sequence's length-normalised ratio, range 3e-4 / 4e-4, no KL, per-sequence token mean.
    ``cispo``: the clipped ratio as a detached weight on ``A * log pi``, unbounded below, 0.28 above, no KL,
    token mean.
    ``sapo``: the soft gate, temperatures 1.0 (``A > 0``) and 1.05 (``A <= 0``), no KL, token mean.
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
    objective: Objective = "clip"  # PPO's clipped min, CISPO's clipped weight, or SAPO's soft gate
    ratio_level: RatioLevel = "token"  # sequence: GSPO's length-normalised sequence ratio
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05

    def __post_init__(self) -> None:  # a bad value fails when the settings are read, not at the first update
        if self.objective not in ("clip", "cispo", "sapo"):
            raise ValueError(f"objective must be 'clip', 'cispo' or 'sapo', got {self.objective!r}")
        if self.ratio_level not in ("token", "sequence"):
            raise ValueError(f"ratio_level must be 'token' or 'sequence', got {self.ratio_level!r}")
        below_one = self.eps_low <= 1 if self.objective == "cispo" else self.eps_low < 1  # CISPO: 1 = no lower bound
        if not (0 <= self.eps_low and below_one and self.eps_high >= 0):
            raise ValueError(f"the {self.objective} objective's clip range needs 0 <= eps_low "
                             f"{'<=' if self.objective == 'cispo' else '<'} 1 and eps_high >= 0, got "
                             f"eps_low={self.eps_low}, eps_high={self.eps_high}")
        if not (self.sapo_tau_pos > 0 and self.sapo_tau_neg > 0):
            raise ValueError(f"SAPO's temperatures must be > 0, got {self.sapo_tau_pos} and {self.sapo_tau_neg}")

    @classmethod
    def preset(cls, name: Literal["grpo", "dapo", "gspo", "cispo", "sapo"], **overrides) -> "PolicyLossConfig":
        presets = {
            "grpo": cls(eps_low=0.2, eps_high=0.2, kl_coef=0.01, kl_estimator="k3", aggregation="seq-mean-token-mean"),
            "dapo": cls(eps_low=0.2, eps_high=0.28, kl_coef=0.0, aggregation="token-mean"),
            "gspo": cls(eps_low=3e-4, eps_high=4e-4, kl_coef=0.0, aggregation="seq-mean-token-mean",
                        ratio_level="sequence"),
            "cispo": cls(eps_low=1.0, eps_high=0.28, kl_coef=0.0, aggregation="token-mean", objective="cispo"),
            "sapo": cls(kl_coef=0.0, aggregation="token-mean", objective="sapo"),
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
    """The objective's surrogate (``config.objective``, on ``config.ratio_level``'s ratio) plus ``kl_coef`` times the
    KL estimate, both aggregated with ``config.aggregation``.

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

    log_ratio = importance_log_ratio(logprobs, old_logprobs, mask, config.ratio_level)
    if config.objective == "clip":  # the token level as it always was: padding is left to the aggregation
        surrogate = clipped_surrogate(logprobs, old_logprobs, advantages, config.eps_low, config.eps_high,
                                      log_ratio=None if config.ratio_level == "token" else log_ratio)
    elif config.objective == "cispo":
        surrogate = cispo_surrogate(logprobs, log_ratio, advantages, config.eps_low, config.eps_high)
    else:  # sapo (PolicyLossConfig admits no other objective)
        surrogate = sapo_surrogate(log_ratio, advantages, config.sapo_tau_pos, config.sapo_tau_neg)
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
                     for c in clipped_tokens(logprobs, old_logprobs, advantages, config.eps_low, config.eps_high,
                                             log_ratio, config.objective))
        pg = aggregate(surrogate.detach())
    return PolicyLoss(loss=loss, policy_loss=pg, kl=kl_value, clip_fraction_low=low, clip_fraction_high=high)
