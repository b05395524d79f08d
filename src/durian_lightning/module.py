"""The LightningModule: ``training_step`` = rollout -> reward -> confidence -> difficulty groups -> advantages -> loss.

The math lives in :mod:`difficulty`, :mod:`advantages`, :mod:`losses` and :mod:`rewards`; this module only
orchestrates. Optimization is manual so that one rollout batch feeds several optimizer steps:

    rollout batch (prompts from the dataloader, G rollouts each)
      -> ``ppo_epochs`` passes over mini-batches of ``mini_batch_size`` prompts (one optimizer step each)
        -> micro-batches of ``micro_batch_size`` rollouts (gradient accumulation, memory only)
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics

from ._distributed import all_gather_1d, all_gather_records
from .advantages import batch_std_advantages, dr_grpo_advantages, durian_advantages, grpo_advantages
from .difficulty import perceptual_groups, sequence_logprob
from .losses import (
    PolicyLossConfig,
    aggregate_loss,
    aggregation_denominator,
    aggregation_numerator,
    clipped_surrogate,
    clipped_tokens,
    kl_penalty,
)
from .models.loading import DEFAULT_LORA_TARGETS, load_policy
from .rewards import WeightedReward, load_reward_function
from .rollout import SamplingConfig, completion_logprobs, generate_rollouts

Estimator = Literal["grpo", "dr_grpo", "batch", "durian"]


class DurianGRPO(L.LightningModule):
    """GRPO / DAPO with Durian's difficulty-aware advantages on a LoRA-adapted VLM.

    Args:
        model_name_or_path: VLM path or hub id, or tiny:llava / tiny:qwen2_5_vl / tiny:llava-format (built offline).
        dtype: weights dtype: float32 on CPU, bfloat16 on GPU.
        use_lora: train a LoRA adapter (True) or every weight (False).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA path.
        lora_target_modules: regex of module names to adapt; the default adapts the language model's attention only.
        gradient_checkpointing: recompute activations in backward to save memory.
        num_generations: G, rollouts per prompt (>= 2).
        max_new_tokens: completion length limit for rollouts.
        temperature: sampling temperature (log-probs use the same temperature).
        top_p: nucleus sampling threshold (1.0 = off).
        top_k: top-k sampling (0 = off).
        max_prompt_length: prompts longer than this many tokens (images included) are an error.
        reward_functions: import paths pkg.mod:fn of reward functions; default 0.1 format + 0.9 accuracy.
        reward_weights: one weight per reward function (default 1.0 each).
        estimator: advantage estimator: grpo, dr_grpo, batch or durian.
        alphas: Durian's (alpha_ori, alpha_percep, alpha_reason).
        num_reasoning_groups: b, equal-frequency groups of confidence (the paper finds 12-16 best).
        percentiles: the two entropy percentiles splitting the three perceptual groups.
        confidence_reduction: sequence log-prob as the token sum (paper) or the per-token mean.
        entropy_thresholds: perceptual thresholds from the batch (paper) or from the dataset's train entropies.
        advantage_eps: epsilon added to every std.
        loss_preset: grpo (clip 0.2, k3 KL 0.01, seq-mean-token-mean) or dapo (clip 0.2/0.28, no KL, token-mean).
        eps_low: lower clip range (overrides the preset).
        eps_high: upper clip range (overrides the preset).
        kl_coef: KL penalty coefficient (overrides the preset).
        kl_estimator: k1, k2, k3 or low_var_kl (overrides the preset).
        aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum (overrides the preset).
        dynamic_sampling: DAPO's filter: drop prompts whose G rewards are equal and update once rollout_batch_size
            informative prompts are collected.
        rollout_batch_size: prompts per update (default: the dataloader's batch size).
        mini_batch_size: prompts per optimizer step; must divide the rollout batch (default: all of it).
        micro_batch_size: rollouts per forward/backward (memory only).
        ppo_epochs: passes over each rollout batch.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up, in optimizer steps.
        max_grad_norm: gradient clipping norm.
        eval_max_new_tokens: completion length for validation / test / predict (default: max_new_tokens).
        eval_do_sample: sample in evaluation instead of greedy decoding.
        adapter_dir: where the LoRA adapter is saved at the end of fit (default: the run's log dir / adapter).
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny:llava",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        use_lora: bool = True,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        lora_target_modules: str = DEFAULT_LORA_TARGETS,
        gradient_checkpointing: bool = False,
        num_generations: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_prompt_length: int = 2048,
        reward_functions: list[str] | None = None,
        reward_weights: list[float] | None = None,
        estimator: Estimator = "durian",
        alphas: tuple[float, float, float] = (0.1, 0.2, 0.7),
        num_reasoning_groups: int = 12,
        percentiles: tuple[float, float] = (0.25, 0.75),
        confidence_reduction: Literal["sum", "mean"] = "sum",
        entropy_thresholds: Literal["batch", "dataset"] = "batch",
        advantage_eps: float = 1e-6,
        loss_preset: Literal["grpo", "dapo"] = "grpo",
        eps_low: float | None = None,
        eps_high: float | None = None,
        kl_coef: float | None = None,
        kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] | None = None,
        aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] | None = None,
        dynamic_sampling: bool = False,
        rollout_batch_size: int | None = None,
        mini_batch_size: int | None = None,
        micro_batch_size: int = 16,
        ppo_epochs: int = 1,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        eval_max_new_tokens: int | None = None,
        eval_do_sample: bool = False,
        adapter_dir: str | None = None,
    ):
        super().__init__()
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages compare rollouts of a prompt), got {num_generations}")
        if rollout_batch_size is not None and mini_batch_size is not None and rollout_batch_size % mini_batch_size:
            raise ValueError(f"mini_batch_size={mini_batch_size} must divide rollout_batch_size={rollout_batch_size}")
        for name, value in (("micro_batch_size", micro_batch_size), ("ppo_epochs", ppo_epochs), ("max_new_tokens", max_new_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if estimator not in ("grpo", "dr_grpo", "batch", "durian"):
            raise ValueError(f"estimator must be 'grpo', 'dr_grpo', 'batch' or 'durian', got {estimator!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        overrides = {k: v for k, v in dict(eps_low=eps_low, eps_high=eps_high, kl_coef=kl_coef, kl_estimator=kl_estimator, aggregation=aggregation).items() if v is not None}
        self.loss_config = PolicyLossConfig.preset(loss_preset, **overrides)
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k, do_sample=True)
        self.eval_sampling = SamplingConfig(eval_max_new_tokens or max_new_tokens, temperature, top_p, top_k, do_sample=eval_do_sample)
        if reward_functions:
            weights = reward_weights or [1.0] * len(reward_functions)
            if len(weights) != len(reward_functions):
                raise ValueError(f"{len(reward_functions)} reward_functions but {len(weights)} reward_weights")
            self.reward = WeightedReward([(fn, load_reward_function(fn), w) for fn, w in zip(reward_functions, weights)])
        else:
            self.reward = WeightedReward.paper_default()
        self.model = None
        self.processor = None
        self._frozen_reference: list = []  # a list keeps the copy out of the checkpoint and the optimizer
        self._phase_seconds: dict[str, float] = {}
        self._pending: list[dict[str, Any]] = []  # dynamic sampling: informative prompts waiting for a full batch
        self.last_rollout: dict[str, Any] | None = None  # what the last update saw, for callbacks
        # accuracy overall and per perceptual group (0 simple .. 2 complex images), for validation and test
        self.eval_metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": torchmetrics.MeanMetric()
            for stage in ("val", "test") for name in ("accuracy", "reward", "accuracy_perceptual_0", "accuracy_perceptual_1", "accuracy_perceptual_2")
        })
        self.eval_records: list[dict[str, Any]] = []  # per-sample validation results, for the error-vs-difficulty callback

    # ------------------------------------------------------------------------------------------ model

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.model, self.processor = load_policy(
            hp.model_name_or_path, hp.dtype, hp.use_lora, hp.lora_r, hp.lora_alpha, hp.lora_dropout,
            hp.lora_target_modules, hp.gradient_checkpointing,
        )
        if not hp.use_lora and self.loss_config.kl_coef > 0:
            # full fine-tuning has no adapter to switch off: keep a frozen copy (outside the state dict)
            self._frozen_reference = [copy.deepcopy(self.model).eval().requires_grad_(False)]

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.world_size > 1:
            from lightning.pytorch.strategies import DDPStrategy

            if not isinstance(self.trainer.strategy, DDPStrategy):
                # FSDP / DeepSpeed shard gradients, which the one flat all-reduce per optimizer step does not handle
                raise ValueError(
                    f"multi-process training supports --trainer.strategy ddp, got {type(self.trainer.strategy).__name__} "
                    "(FSDP / DeepSpeed: see the README section 'Larger models')"
                )

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def reference_logprobs(self, rollout, rows: torch.Tensor) -> torch.Tensor:
        """Log-probs under the reference policy: the base model with the LoRA adapter switched off (exact), or the
        frozen copy made at the start when fine-tuning all weights."""
        hp = self.hparams
        if hp.use_lora:
            with self.model.disable_adapter():
                return completion_logprobs(self.model, self.processor, rollout, rows, hp.temperature)
        reference = self._frozen_reference[0].to(self.device)
        return completion_logprobs(reference, self.processor, rollout, rows, hp.temperature)

    # ------------------------------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        self.last_rollout = None  # set again only if this step updates the policy
        rollout_batch_size = hp.rollout_batch_size or len(batch["prompt"])
        mini_batch_size = hp.mini_batch_size or rollout_batch_size
        if rollout_batch_size % mini_batch_size:
            raise ValueError(f"mini_batch_size={mini_batch_size} must divide the rollout batch of {rollout_batch_size} prompts")
        self._phase_seconds = {}
        # one optimizer step from one pass over the batch: the policy that computes the loss is the one that sampled
        # (not with dynamic sampling, whose leftover prompts wait across an update and need their own old log-probs)
        on_policy = hp.ppo_epochs == 1 and mini_batch_size == rollout_batch_size and not hp.dynamic_sampling
        group = self._rollout_and_score(batch, old_logprobs=not on_policy)
        if hp.dynamic_sampling:
            group = self._dynamic_sampling(group, rollout_batch_size)
            if group is None:
                return None
        with self._timed("advantages"):
            update = self._advantages(group)
        with self._timed("policy_update"):
            self._optimize(update, mini_batch_size)
        self.log_dict({f"perf/{phase}_s": seconds for phase, seconds in self._phase_seconds.items()})
        return None

    @contextlib.contextmanager
    def _timed(self, phase: str):
        """Wall time of a phase of the step, logged as perf/<phase>_s (the step's cost breakdown)."""
        start = time.perf_counter()
        yield
        self._phase_seconds[phase] = self._phase_seconds.get(phase, 0.0) + time.perf_counter() - start

    def _rollout_and_score(self, batch: dict[str, Any], old_logprobs: bool = True) -> dict[str, Any]:
        """Generate, score, and the log-prob passes the update needs. Without ``old_logprobs`` (on-policy: one
        optimizer step per rollout batch) the update uses its own forward's detached log-probs as the old ones, which
        is exact (the ratio is 1 there) and saves a forward pass over the batch."""
        hp = self.hparams
        with self._timed("generate"):
            rollout = generate_rollouts(
                self.model, self.processor, batch["prompt"], batch["images"], hp.num_generations, self.sampling,
                hp.max_prompt_length, batch["id"],
            )
        g = hp.num_generations
        answers = [a for a in batch["answer"] for _ in range(g)]
        extra = {k: [v for v in values for _ in range(g)] for k, values in batch.items()
                 if k not in ("images", "prompt", "answer", "messages", "visual_entropy", "id", "problem")}
        with self._timed("reward"):
            scores = self.reward(rollout.completions, answers, problem=[p for p in batch["problem"] for _ in range(g)], **extra)
        rows = torch.arange(len(rollout))
        old = ref = None
        with torch.no_grad():
            if old_logprobs:
                with self._timed("old_logprobs"):
                    old = torch.cat([completion_logprobs(self.model, self.processor, rollout, chunk, hp.temperature)
                                     for chunk in rows.split(hp.micro_batch_size)])
            if self.loss_config.kl_coef > 0:
                with self._timed("ref_logprobs"):
                    ref = torch.cat([self.reference_logprobs(rollout, chunk) for chunk in rows.split(hp.micro_batch_size)])
        device = self.device
        mask = rollout.completion_mask.to(device)
        return {
            "rollout": rollout,
            "rewards": scores.total.to(device),
            "reward_components": {k: v.to(device) for k, v in scores.components.items()},
            "old_logprobs": old,
            "ref_logprobs": ref,
            # confidence: the completion's log-prob when it was sampled (recorded by generate, no extra pass)
            "sequence_logprob": sequence_logprob(rollout.sampled_logprobs.to(device), mask, hp.confidence_reduction),
            "visual_entropy": batch["visual_entropy"].to(device),
            "ids": list(batch["id"]),
        }

    def _dynamic_sampling(self, group: dict[str, Any], rollout_batch_size: int) -> dict[str, Any] | None:
        """Keep the prompts whose rewards differ; update only once ``rollout_batch_size`` of them are collected (on
        every rank)."""
        g = self.hparams.num_generations
        rewards = group["rewards"].view(-1, g)
        informative = (rewards.amax(dim=1) != rewards.amin(dim=1)).nonzero().flatten().tolist()
        self.log("train/dynamic_sampling_kept", len(informative) / rewards.shape[0])
        for p in informative:
            self._pending.append(_select_prompt(group, p, g))
        ready = len(self._pending)
        if self._trainer is not None and self.trainer.world_size > 1:
            # every rank must update at the same step with the same number of prompts (the global-batch statistics
            # and the gradient all-reduce are collectives): wait for the rank with the fewest; the others keep extras
            count = torch.tensor([ready], device=self.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MIN)
            ready = int(count)
        if ready < rollout_batch_size:
            return None
        taken, self._pending = self._pending[:rollout_batch_size], self._pending[rollout_batch_size:]
        return _concat_prompts(taken, g)

    def _advantages(self, group: dict[str, Any]) -> dict[str, Any]:
        """Advantages over the GLOBAL batch: every rank gathers all rewards and scores, computes, keeps its rows."""
        hp = self.hparams
        g = hp.num_generations
        rewards = group["rewards"]
        confidence = group["sequence_logprob"].view(-1, g).mean(dim=1)
        entropy = group["visual_entropy"].to(rewards.dtype)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:  # the statistics are over the global batch: every rank computes them all, then keeps its rows
            rewards, confidence, entropy = (all_gather_1d(t, world) for t in (rewards, confidence, entropy))
        num_prompts = entropy.numel()
        prompt_index = torch.arange(num_prompts, device=rewards.device).repeat_interleave(g)
        details = None
        if hp.estimator == "durian":
            thresholds = None
            if hp.entropy_thresholds == "dataset":
                thresholds = self.trainer.datamodule.entropy_thresholds(hp.percentiles)
            details = durian_advantages(
                rewards, prompt_index, visual_entropy=entropy, confidence=confidence, alphas=hp.alphas,
                num_reasoning_groups=hp.num_reasoning_groups, percentiles=hp.percentiles,
                entropy_thresholds=thresholds, eps=hp.advantage_eps,
            )
            advantages = details.advantages
        else:
            fn = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "batch": batch_std_advantages}[hp.estimator]
            advantages = fn(rewards, prompt_index, eps=hp.advantage_eps)
        grpo = details.grpo if details is not None else (
            advantages if hp.estimator == "grpo" else grpo_advantages(rewards, prompt_index, eps=hp.advantage_eps)
        )
        self.last_rollout = {
            "rewards": rewards.detach(),
            "prompt_index": prompt_index,
            "num_generations": g,
            "advantages": advantages.detach(),
            "grpo_advantages": grpo.detach(),
            "durian": details,
            "visual_entropy": entropy,
            "confidence": confidence,
            "completions": group["rollout"].completions,
            "reward_components": group["reward_components"],
            "ids": group["ids"],
        }
        n = len(group["rewards"])
        local = slice(self.global_rank * n, (self.global_rank + 1) * n) if world > 1 else slice(None)
        self.last_rollout["local_advantages"] = advantages[local].detach()
        return {**group, "advantages": advantages[local].float()}

    def _optimize(self, update: dict[str, Any], mini_batch_size: int) -> None:
        hp = self.hparams
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        g = hp.num_generations
        rollout = update["rollout"]
        mask = rollout.completion_mask.to(self.device)
        num_prompts = len(rollout) // g
        stats = {"loss": [], "kl": [], "clip_fraction": []}
        for _ in range(hp.ppo_epochs):
            for first in range(0, num_prompts, mini_batch_size):
                rows = torch.arange(first * g, min(num_prompts, first + mini_batch_size) * g)
                optimizer.zero_grad()
                denominator = aggregation_denominator(mask[rows], self.loss_config.aggregation)
                total = 0.0
                for chunk in rows.split(hp.micro_batch_size):
                    logprobs = completion_logprobs(self.model, self.processor, rollout, chunk, hp.temperature)
                    loss, kl, clipped = self._micro_loss(logprobs, update, chunk, mask[chunk], denominator)
                    with self._local_backward():
                        self.manual_backward(loss)
                    total += float(loss.detach())
                    stats["kl"].append(kl)
                    stats["clip_fraction"].append(clipped)
                self._average_gradients_across_ranks()
                self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                scheduler.step()
                stats["loss"].append(total)
        rewards = update["rewards"]
        self.log_dict({
            "train/loss": sum(stats["loss"]) / len(stats["loss"]),
            "train/reward": float(rewards.mean()),
            "train/kl": sum(stats["kl"]) / len(stats["kl"]),
            "train/clip_fraction": sum(stats["clip_fraction"]) / len(stats["clip_fraction"]),
            "train/completion_length": float(mask.sum(dim=1).float().mean()),
            **{f"train/reward_{k}": float(v.mean()) for k, v in update["reward_components"].items()},
        }, prog_bar=False)
        self.log("reward", float(rewards.mean()), prog_bar=True, logger=False)

    def _local_backward(self):
        """DistributedDataParallel would all-reduce in every backward (one per micro-batch); keep gradients local and
        average them once per optimizer step in :meth:`_average_gradients_across_ranks` instead."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else contextlib.nullcontext()

    def _average_gradients_across_ranks(self) -> None:
        """Mean of every trainable gradient over ranks (the data-parallel update), in one flat all-reduce."""
        if self.trainer.world_size <= 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.trainer.world_size
        for p, piece in zip(params, flat.split([p.numel() for p in params])):
            p.grad = piece.view_as(p).clone()

    def _micro_loss(self, logprobs, update, chunk, mask, denominator):
        """This micro-batch's share of the mini-batch loss: its summed terms over the mini-batch's normalizer."""
        cfg = self.loss_config
        old = logprobs.detach() if update["old_logprobs"] is None else update["old_logprobs"][chunk]
        token_loss = clipped_surrogate(logprobs, old, update["advantages"][chunk], cfg.eps_low, cfg.eps_high)
        kl_value = 0.0
        if cfg.kl_coef > 0:
            kl = kl_penalty(logprobs, update["ref_logprobs"][chunk], cfg.kl_estimator)
            token_loss = token_loss + cfg.kl_coef * kl
            kl_value = float(aggregate_loss(kl.detach(), mask, "token-mean"))
        loss = aggregation_numerator(token_loss, mask, cfg.aggregation, cfg.normalizer) / denominator
        with torch.no_grad():
            clipped = clipped_tokens(logprobs, old, update["advantages"][chunk], cfg.eps_low, cfg.eps_high)
            clip_fraction = float(aggregate_loss(clipped.float(), mask, "token-mean"))
        return loss, kl_value, clip_fraction

    # ------------------------------------------------------------------------------------------ evaluation

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.eval_records = []

    def on_test_epoch_start(self) -> None:
        self.eval_records = []

    def _generate_and_score_once(self, batch: dict[str, Any]):
        """One evaluation completion per prompt (greedy unless ``eval_do_sample``) and its reward scores."""
        rollout = generate_rollouts(self.model, self.processor, batch["prompt"], batch["images"], 1, self.eval_sampling,
                                    self.hparams.max_prompt_length, batch["id"])
        return rollout, self.reward(rollout.completions, list(batch["answer"]))

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        rollout, scores = self._generate_and_score_once(batch)
        correct = scores.components.get("accuracy", scores.total)
        confidence = sequence_logprob(rollout.sampled_logprobs, rollout.completion_mask, self.hparams.confidence_reduction)
        entropy = batch["visual_entropy"]
        thresholds = None
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "entropy_thresholds"):
            thresholds = datamodule.entropy_thresholds(self.hparams.percentiles)
        groups = perceptual_groups(entropy, self.hparams.percentiles, thresholds)
        correct = correct.to(self.device)
        updates = {"accuracy": correct, "reward": scores.total.to(self.device)}
        for k in range(3):  # every rank logs the same keys (an absent group is an empty update): they sync as one
            updates[f"accuracy_perceptual_{k}"] = correct[groups.to(self.device) == k]
        for name, values in updates.items():
            metric = self.eval_metrics[f"{stage}_{name}"]
            metric.update(values)
            self.log(f"{stage}/{name}", metric, prog_bar=name == "accuracy")
        for i in range(len(correct)):
            self.eval_records.append({
                "id": batch["id"][i], "correct": float(correct[i]), "visual_entropy": float(entropy[i]),
                "confidence": float(confidence[i]), "completion": rollout.completions[i], "answer": batch["answer"][i],
                **({"source": batch["source"][i]} if "source" in batch else {}),
            })

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy_per_source("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy_per_source("test")

    def _log_accuracy_per_source(self, stage: str) -> None:
        """Accuracy per benchmark when the data has a ``source`` column, over every rank's samples (ranks may hold
        different sources, so this is computed from the gathered records rather than synced per key)."""
        records = all_gather_records(self._trainer, self.eval_records)
        by_source: dict[str, list[float]] = {}
        for record in records:
            if "source" in record:
                by_source.setdefault(str(record["source"]), []).append(record["correct"])
        for source, values in sorted(by_source.items()):
            self.log(f"{stage}/accuracy_source_{source}", sum(values) / len(values))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Greedy (or ``eval_do_sample``) completions with their extracted answers and rewards."""
        from .rewards import extract_answer

        rollout, scores = self._generate_and_score_once(batch)
        return [
            {"id": batch["id"][i], "completion": rollout.completions[i], "prediction": extract_answer(rollout.completions[i]),
             "answer": batch["answer"][i], "reward": float(scores.total[i])}
            for i in range(len(rollout))
        ]

    # ------------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable weights (the adapter, not a 7B base model) and the sampling RNG state."""
        trainable = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable or not k.startswith("model.")}
        checkpoint["durian_rng"] = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        checkpoint["durian_pending"] = len(self._pending)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.strict_loading = False  # frozen base weights come from model_name_or_path, not the checkpoint
        rng = checkpoint.get("durian_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------------------------------ end of fit

    def on_fit_end(self) -> None:
        if not self.hparams.use_lora:
            return
        run_dir = self.trainer.log_dir or self.trainer.default_root_dir  # on every rank: log_dir is a collective
        if not self.trainer.is_global_zero:
            return
        folder = self.hparams.adapter_dir or str(Path(run_dir) / "adapter")
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)


def _select_prompt(group: dict[str, Any], prompt: int, g: int) -> dict[str, Any]:
    rows = list(range(prompt * g, (prompt + 1) * g))
    r = group["rollout"]
    return {
        "rows": rows, "rollout": r, "rewards": group["rewards"][rows], "old": None if group["old_logprobs"] is None else group["old_logprobs"][rows],
        "ref": None if group["ref_logprobs"] is None else group["ref_logprobs"][rows],
        "components": {k: v[rows] for k, v in group["reward_components"].items()},
        "seq": group["sequence_logprob"][rows], "entropy": group["visual_entropy"][prompt], "id": group["ids"][prompt],
    }


def _concat_prompts(items: list[dict[str, Any]], g: int) -> dict[str, Any]:
    from .rollout import Rollout

    width = max(item["rollout"].completion_ids.shape[1] for item in items)

    def pad(t, value=0):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    rollout = Rollout(
        prompts=[item["rollout"].prompts[i] for item in items for i in item["rows"]],
        images=[item["rollout"].images[i] for item in items for i in item["rows"]],
        prompt_index=torch.arange(len(items)).repeat_interleave(g),
        completion_ids=torch.cat([pad(item["rollout"].completion_ids[item["rows"]]) for item in items]),
        completion_mask=torch.cat([pad(item["rollout"].completion_mask[item["rows"]]) for item in items]),
        completions=[item["rollout"].completions[i] for item in items for i in item["rows"]],
        sampled_logprobs=torch.cat([pad(item["rollout"].sampled_logprobs[item["rows"]]) for item in items]),
    )
    return {
        "rollout": rollout,
        "rewards": torch.cat([item["rewards"] for item in items]),
        "reward_components": {k: torch.cat([item["components"][k] for item in items]) for k in items[0]["components"]},
        "old_logprobs": None if items[0]["old"] is None else torch.cat([pad(item["old"]) for item in items]),
        "ref_logprobs": None if items[0]["ref"] is None else torch.cat([pad(item["ref"]) for item in items]),
        "sequence_logprob": torch.cat([item["seq"] for item in items]),
        "visual_entropy": torch.stack([item["entropy"] for item in items]),
        "ids": [item["id"] for item in items],
    }
