"""The training module's settings, one dataclass per concept; LightningCLI shows each as a nested group
(``--model.rollout.num_generations 8``, or ``rollout:`` in a YAML file).

Each dataclass checks its own values when built, so an impossible setting fails before any data or model loads.
Plain dataclasses: importable without Lightning or a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from durian_lightning.core.advantages import AdvantageSettings
from durian_lightning.core.losses import (Aggregation, CorrectionMode, KLEstimator, PolicyLossConfig, RatioLevel,
                                          RolloutCorrection)
from durian_lightning.core.rewards import ON_ERROR, WeightedReward
from durian_lightning.models.loading import DEFAULT_LORA_TARGETS
from durian_lightning.stages.rollout import SamplingConfig

__all__ = [
    "AdvantageSettings",
    "EvaluationSettings",
    "LoraSettings",
    "LossSettings",
    "OptimizationSettings",
    "RewardSettings",
    "RolloutSettings",
]


def as_settings(value, cls):
    """``value`` as a ``cls`` instance: LightningCLI hands dataclasses, a checkpoint's hyper-parameters plain dicts."""
    return cls(**value) if isinstance(value, dict) else value


def _at_least(name: str, value: int | float, low: int | float) -> None:
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter (peft).

    Args:
        enabled: train a LoRA adapter (True) or every weight (False; a frozen copy is then the KL reference).
        r: LoRA rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the LoRA path.
        target_modules: regex of module names to adapt; the default adapts the language model's attention
            projections (never the vision tower); configs/default.yaml adds its MLP projections.
    """

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = DEFAULT_LORA_TARGETS

    def __post_init__(self) -> None:
        _at_least("lora.r", self.r, 1)


@dataclass(frozen=True)
class RolloutSettings:
    """Sampling the G training rollouts per prompt.

    Args:
        num_generations: G, rollouts per prompt (>= 2: advantages compare the rollouts of a prompt).
        max_new_tokens: completion length limit.
        temperature: sampling temperature (the log-probs use the same one).
        top_p: nucleus sampling threshold; must stay 1.0 (off) for training, see below.
        top_k: top-k sampling; must stay 0 (off) for training: truncated sampling draws from a distribution the
            log-probs (importance ratio, KL, confidence) do not describe. evaluation.top_p / top_k truncate evaluation.
        max_prompt_length: a prompt longer than this many tokens (images included) is an error naming the sample.
        max_sequences_per_generate: the most rows (prompts x G) one ``generate`` call holds; the KV cache of a call
            grows with rows x tokens, so this bounds a step's peak memory (default: the whole batch in one call).
        reuse_image_features: encode each image once per step and reuse its features in generation and every
            log-prob pass, when nothing on the image path trains (stages/image_features.py); False encodes in every pass.
        share_prompt_prefill: run each prompt once for all its rows: in ``generate`` (the G copies of a prompt start
            from one prefill; with the dynamic cache) and in the log-prob passes (each prompt once per micro-batch,
            then only the completions per row; off under gradient checkpointing). stages/shared_prefill.py; exact where on;
            False runs every row's prompt.
        cache_implementation: dynamic (transformers' default, grows with the tokens) or static (preallocated for
            max_new_tokens, which CUDA graphs / torch.compile need); static runs only for the families the
            conformance suite shows equal to dynamic, the others fall back to dynamic with an info line.
        engine: hf (transformers' ``generate`` on the policy itself) or vllm (a vLLM engine per rank, given the
            policy's weights after every update; stages/vllm_engine.py, docs/vllm.md). The fast paths above are hf's.
        vllm_max_model_len: prompt plus completion tokens per row (default: max_prompt_length + max_new_tokens).
        vllm_max_images: images one prompt may hold.
        vllm_gpu_memory_utilization: the share of GPU memory the engine takes for its weights and KV cache.
        vllm_tensor_parallel_size: GPUs one engine is split over (a model too big for one).
        vllm_sleep: on a GPU, free the engine's memory between rollouts so the update has it.
    """

    num_generations: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_length: int = 2048
    max_sequences_per_generate: int | None = None
    reuse_image_features: bool = True
    share_prompt_prefill: bool = True
    cache_implementation: Literal["dynamic", "static"] = "dynamic"
    engine: Literal["hf", "vllm"] = "hf"
    vllm_max_model_len: int | None = None
    vllm_max_images: int = 4
    vllm_gpu_memory_utilization: float = 0.3
    vllm_tensor_parallel_size: int = 1
    vllm_sleep: bool = True

    def __post_init__(self) -> None:
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"rollout.engine must be hf or vllm, got {self.engine!r}")
        for name in ("vllm_max_images", "vllm_tensor_parallel_size"):
            _at_least(f"rollout.{name}", getattr(self, name), 1)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"rollout.cache_implementation must be dynamic or static, got {self.cache_implementation!r}")
        if self.max_sequences_per_generate is not None:
            _at_least("max_sequences_per_generate", self.max_sequences_per_generate, 1)
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (advantages compare rollouts of a prompt), got {self.num_generations}"
            )
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_p < 1.0 or self.top_k > 0:
            raise ValueError(
                f"rollout.top_p={self.top_p} / rollout.top_k={self.top_k} would sample training rollouts from a truncated "
                "distribution while their log-probs (the PPO ratio, the KL, the confidence) are over the full "
                "vocabulary; train with top_p 1.0 and top_k 0 (evaluation.top_p / evaluation.top_k truncate evaluation)"
            )

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k, do_sample=True,
                              cache_implementation=self.cache_implementation, share_prefill=self.share_prompt_prefill)


@dataclass(frozen=True)
class EvaluationSettings:
    """Validation, test and predict generation (one completion per prompt).

    Args:
        max_new_tokens: completion length (default: the rollouts').
        do_sample: sample at the rollout temperature instead of greedy decoding.
        top_p: nucleus sampling threshold when sampling (1.0 = off).
        top_k: top-k sampling when sampling (0 = off).
        samples: k > 0 also samples k completions per prompt at the rollout temperature and logs mean@k (their mean
            accuracy: finer-grained than one greedy answer) and pass@k (whether any is right); 0 = off.
    """

    max_new_tokens: int | None = None
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        if self.samples < 0:
            raise ValueError(f"evaluation.samples must be >= 0 (0 = greedy only), got {self.samples}")

    def sampling(self, rollout: RolloutSettings, do_sample: bool | None = None) -> SamplingConfig:
        do_sample = self.do_sample if do_sample is None else do_sample
        return SamplingConfig(self.max_new_tokens or rollout.max_new_tokens, rollout.temperature, self.top_p,
                              self.top_k, do_sample=do_sample, cache_implementation=rollout.cache_implementation,
                              share_prefill=rollout.share_prompt_prefill)


@dataclass(frozen=True)
class RewardSettings:
    """The verifiable reward.

    Args:
        functions: import paths ``pkg.mod:fn`` of reward functions; default: the paper's 0.1 format + 0.9 accuracy.
        weights: one weight per reward function (default 1.0 each).
        on_error: a reward function that raises or returns a non-finite score: ``stop`` the run (after writing a
            checkpoint of the last completed update) or score that completion ``zero`` (counted in
            ``train/reward_failures``, each one logged as a warning).
    """

    functions: list[str] | None = None
    weights: list[float] | None = None
    on_error: Literal["stop", "zero"] = "stop"

    def __post_init__(self) -> None:
        if self.functions and self.weights is not None and len(self.weights) != len(self.functions):
            raise ValueError(f"{len(self.functions)} reward functions but {len(self.weights)} reward weights")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"reward.on_error must be one of {ON_ERROR}, got {self.on_error!r}")

    def build(self) -> WeightedReward:
        """The weighted reward (importing every function now, so a wrong path fails before any compute)."""
        if not self.functions:
            return WeightedReward.paper_default(on_error=self.on_error)
        weights = self.weights or [1.0] * len(self.functions)
        return WeightedReward([(fn, fn, weight) for fn, weight in zip(self.functions, weights)], self.on_error)


@dataclass(frozen=True)
class LossSettings:
    """The policy loss: a preset, and any knob of it overridden.

    Args:
        preset: grpo (clip 0.2, k3 KL 0.01, seq-mean-token-mean), dapo (clip 0.2 / 0.28, no KL, token-mean), gspo
            (the clip on each sequence's length-normalised ratio, 3e-4 / 4e-4, seq-mean-token-mean), cispo (the
            clipped ratio as a detached weight on A * log-prob, at most 1.28, token-mean) or sapo (a soft gate, tau
            1.0 / 1.05, token-mean); none of the last three has a KL term.
        eps_low: lower clip range (overrides the preset).
        eps_high: upper clip range (overrides the preset).
        kl_coef: KL penalty coefficient (overrides the preset).
        kl_estimator: k1, k2, k3 or low_var_kl (overrides the preset).
        aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum (overrides the preset).
        ratio_level: token or sequence (GSPO's length-normalised sequence ratio) (overrides the preset).
        sapo_tau_pos: sapo's gate temperature where the advantage is positive (overrides the preset).
        sapo_tau_neg: sapo's gate temperature elsewhere (overrides the preset).
    normalizer: the constant seq-mean-token-sum divides each sequence's token sum by (Dr. GRPO); default: the
        rollouts' max_new_tokens, so a sequence's loss never depends on how long its batch's other completions are.
        rollout_correction: none, token or sequence: importance sampling from the log-probs the rollout engine
            recorded to the training forward's (docs/method.md); off by default (exact in float32), the bf16
            recipes use token.
        rollout_correction_cap: the weights' upper bound, > 0.
        rollout_correction_mode: truncate (a weight above the cap becomes the cap) or mask (a token, or a
            sequence, whose weight is outside [rollout_correction_low, cap] leaves the loss).
        rollout_correction_low: mask's lower bound, in (0, cap] (default 1 / cap).
    """

    preset: Literal["grpo", "dapo", "gspo", "cispo", "sapo"] = "grpo"
    eps_low: float | None = None
    eps_high: float | None = None
    kl_coef: float | None = None
    kl_estimator: KLEstimator | None = None
    aggregation: Aggregation | None = None
    ratio_level: RatioLevel | None = None
    sapo_tau_pos: float | None = None
    sapo_tau_neg: float | None = None
    normalizer: float | None = None
    rollout_correction: RolloutCorrection = "none"
    rollout_correction_cap: float = 2.0
    rollout_correction_mode: CorrectionMode = "truncate"
    rollout_correction_low: float | None = None

    def __post_init__(self) -> None:
        self.resolve(1)  # an unknown preset or a bad value fails here
        if self.normalizer is not None and not self.normalizer > 0:
            raise ValueError(f"loss.normalizer must be > 0, got {self.normalizer}")
        if self.rollout_correction not in ("none", "token", "sequence"):
            raise ValueError(f"loss.rollout_correction must be none, token or sequence, got {self.rollout_correction!r}")
        if not self.rollout_correction_cap > 0:
            raise ValueError(f"loss.rollout_correction_cap must be > 0, got {self.rollout_correction_cap}")
        if self.rollout_correction_mode not in ("truncate", "mask"):
            raise ValueError(f"loss.rollout_correction_mode must be truncate or mask, got {self.rollout_correction_mode!r}")
        if self.rollout_correction_low is not None:
            if self.rollout_correction_mode != "mask":
                raise ValueError("loss.rollout_correction_low bounds mask mode only; set rollout_correction_mode: mask")
            if not 0 < self.rollout_correction_low <= self.rollout_correction_cap:
                raise ValueError(f"loss.rollout_correction_low must be in (0, rollout_correction_cap="
                                 f"{self.rollout_correction_cap}], got {self.rollout_correction_low}")

    def resolve(self, max_new_tokens: int) -> PolicyLossConfig:
        """The preset with the overrides applied (``max_new_tokens``: the default normalizer)."""
        overrides = {name: value for name, value in (
            ("eps_low", self.eps_low), ("eps_high", self.eps_high), ("kl_coef", self.kl_coef),
            ("kl_estimator", self.kl_estimator), ("aggregation", self.aggregation), ("ratio_level", self.ratio_level),
            ("sapo_tau_pos", self.sapo_tau_pos), ("sapo_tau_neg", self.sapo_tau_neg)) if value is not None}
        normalizer = float(self.normalizer if self.normalizer is not None else max_new_tokens)
        return PolicyLossConfig.preset(self.preset, normalizer=normalizer, rollout_correction=self.rollout_correction,
                                       rollout_correction_cap=self.rollout_correction_cap,
                                       rollout_correction_mode=self.rollout_correction_mode,
                                       rollout_correction_low=self.rollout_correction_low, **overrides)


@dataclass(frozen=True)
class OptimizationSettings:
    """How one rollout batch becomes optimizer steps.

    Args:
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        max_grad_norm: gradient clipping norm.
        rollout_batch_size: prompts per update (default: the dataloader's batch size).
        mini_batch_size: prompts per optimizer step; must divide the rollout batch (default: all of it).
        micro_batch_size: rollouts per forward/backward (gradient accumulation; memory only, the update is the same).
        ppo_epochs: passes over each rollout batch.
        dynamic_sampling: DAPO's filter: drop prompts whose G rewards are all equal and update once rollout_batch_size
            informative prompts are collected (the surplus is dropped after each update).
        dynamic_sampling_reward: the reward component the filter compares (default accuracy, as DAPO; "total" for
            the weighted sum, e.g. with reward functions that have no accuracy component).
    """

    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    rollout_batch_size: int | None = None
    mini_batch_size: int | None = None
    micro_batch_size: int = 16
    ppo_epochs: int = 1
    dynamic_sampling: bool = False
    dynamic_sampling_reward: str = "accuracy"

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "ppo_epochs"):
            _at_least(name, getattr(self, name), 1)
        for name in ("weight_decay", "warmup_steps"):
            _at_least(name, getattr(self, name), 0)
        for name in ("learning_rate", "max_grad_norm"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("rollout_batch_size", "mini_batch_size"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        if self.rollout_batch_size is not None and self.mini_batch_size is not None and self.rollout_batch_size % self.mini_batch_size:
            raise ValueError(f"mini_batch_size={self.mini_batch_size} must divide rollout_batch_size={self.rollout_batch_size}")

    def batch_sizes(self, loader_batch_size: int) -> tuple[int, int]:
        """``(rollout_batch_size, mini_batch_size)`` in prompts, for a dataloader whose full batches hold
        ``loader_batch_size`` prompts. A shorter batch (an epoch's last) still trains: its last mini-batch is short."""
        rollout = self.rollout_batch_size or loader_batch_size
        mini = self.mini_batch_size or rollout
        if rollout % mini:
            raise ValueError(f"mini_batch_size={mini} must divide the rollout batch of {rollout} prompts")
        return rollout, mini


def training_summary(lora: LoraSettings, rollout: RolloutSettings, advantages: AdvantageSettings,
                     loss: PolicyLossConfig, optimization: OptimizationSettings) -> list[str]:
    """The settings that say how a policy was trained, one line each (the adapter's model card)."""
    alphas = f", alphas {list(advantages.alphas)}" if advantages.estimator.startswith("durian") else ""
    sampling = ", dynamic sampling" if optimization.dynamic_sampling else ""
    return [
        f"advantages: `{advantages.estimator}`{alphas}; loss: clip {loss.eps_low} / {loss.eps_high}, KL {loss.kl_coef} "
        f"({loss.kl_estimator}), {loss.aggregation}{sampling}",
        f"G = {rollout.num_generations}, max_new_tokens {rollout.max_new_tokens}, temperature {rollout.temperature}, "
        f"learning rate {optimization.learning_rate}, LoRA r {lora.r} / alpha {lora.alpha} on `{lora.target_modules}`",
    ]
