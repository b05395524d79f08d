"""The LightningModule. ``training_step`` reads top to bottom:

    rollout -> reward (+ confidence) -> [dynamic sampling] -> global difficulty scores -> advantages -> update

Each stage is a function or small class in the file named for it (:mod:`rollout`, :mod:`scoring`,
:mod:`dynamic_sampling`, :mod:`global_batch`, :mod:`advantages`, :mod:`update`), passing typed dataclasses. This class
keeps what belongs to Lightning: the model's life cycle, the optimizer, logging, evaluation and checkpoints.
The method and its choices are written up in docs/method.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from ._distributed import average_gradients, mean_over_ranks, min_over_ranks, require_ddp, stop_together
from .advantages import AdvantageSettings, get_estimator
from .answer_prior import answer_prior_accuracy, most_frequent_answers
from .checkpointing import restore_rng_state, rng_states, seed_rank, trainable_state
from .dynamic_sampling import PromptBuffer
from .evaluation import (
    BREAKDOWNS,
    accuracy_by,
    correctness,
    evaluation_metrics,
    gathered_records,
    prediction_rows,
    sample_records,
    sampled_accuracy,
)
from .global_batch import UpdateRecord, gather_global_batch
from .image_features import ImageFeatures
from .models.families import explain_fast_path_off, fast_path_verified
from .models.loading import load_policy
from .models.reference import ReferencePolicy
from .rollout import completion_logprobs, evaluation_mode, generate_rollouts
from .scoring import ScoredRollouts, score_rollouts
from .settings import (
    EvaluationSettings,
    LoraSettings,
    LossSettings,
    OptimizationSettings,
    RewardSettings,
    RolloutSettings,
    as_settings,
)
from .step_metrics import StepMetrics, training_step_metrics
from .update import UpdateBatch, ppo_update

log = logging.getLogger(__name__)


class DurianGRPO(L.LightningModule):
    """GRPO / DAPO with Durian's difficulty-aware advantages on a LoRA-adapted VLM.

    Args:
        model_name_or_path: VLM path or hub id, or tiny:<family> (any family of models/families.py, e.g. tiny:qwen3_vl,
                built offline) / tiny:llava-format / tiny:llava-pretrained (shipped: pretrained and instruction-tuned,
                see models/pretrain.py).
        dtype: weights dtype: float32 on CPU, bfloat16 on GPU.
        gradient_checkpointing: recompute activations in backward to save memory.
        lora: the LoRA adapter (or full fine-tuning).
        rollout: sampling the G training rollouts per prompt.
        reward: the verifiable reward.
        advantages: the advantage estimator and its difficulty groups.
        loss: the policy loss (a preset and overrides).
        optimization: how a rollout batch becomes optimizer steps; DAPO's dynamic sampling.
        evaluation: validation / test / predict generation.
        adapter_dir: where the LoRA adapter is saved at the end of fit (default: the run's log dir / adapter).
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny:llava",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        lora: LoraSettings = LoraSettings(),
        rollout: RolloutSettings = RolloutSettings(),
        reward: RewardSettings = RewardSettings(),
        advantages: AdvantageSettings = AdvantageSettings(),
        loss: LossSettings = LossSettings(),
        optimization: OptimizationSettings = OptimizationSettings(),
        evaluation: EvaluationSettings = EvaluationSettings(),
        adapter_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable weights only; the frozen ones come from the model
        # settings arrive as dataclasses, or as dicts from a checkpoint's hyper-parameters
        self.lora = as_settings(lora, LoraSettings)
        self.rollout = as_settings(rollout, RolloutSettings)
        self.advantages = as_settings(advantages, AdvantageSettings)
        self.optimization = as_settings(optimization, OptimizationSettings)
        self.evaluation = as_settings(evaluation, EvaluationSettings)
        self.estimator = get_estimator(self.advantages.estimator)
        self.loss_config = as_settings(loss, LossSettings).resolve(self.rollout.max_new_tokens)
        self.reward = as_settings(reward, RewardSettings).build()
        self.model = self.processor = None
        self.reference: ReferencePolicy | None = None  # for the KL term, built with the model
        self.image_features: ImageFeatures | None = None  # each image encoded once per step, built with the model
        self.buffer = PromptBuffer() if self.optimization.dynamic_sampling else None
        self.last_update: UpdateRecord | None = None  # what the last update saw, for callbacks
        self.updates = 0  # rollout batches trained on (each takes ppo_epochs x mini-batches optimizer steps)
        self._phase_seconds: dict[str, float] = {}
        self._grad_norms: list[float] = []  # the global gradient norm before clipping, per optimizer step of the update
        # this rank's per-sample evaluation results: the metrics, the breakdowns and the callbacks are computed from
        # every rank's, each sample once (a distributed sampler repeats some to even out the ranks)
        self.eval_records: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ model

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        self.model, self.processor = load_policy(
            hp.model_name_or_path, hp.dtype, self.lora.enabled, self.lora.r, self.lora.alpha, self.lora.dropout,
            self.lora.target_modules, hp.gradient_checkpointing,
        )
        if self.loss_config.kl_coef > 0:
            self.reference = ReferencePolicy(self.model, lora=self.lora.enabled)
        self.image_features = ImageFeatures(self.model, self.processor, self.rollout.reuse_image_features)
        if self.rollout.share_prompt_prefill and not fast_path_verified(self.model, "share_prompt_prefill"):
            explain_fast_path_off(self.model, "rollout.share_prompt_prefill in the log-prob passes")
        if self.rollout.cache_implementation == "static" and not fast_path_verified(self.model, "static_cache"):
            explain_fast_path_off(self.model, "rollout.cache_implementation: static")  # generate keeps dynamic

    def setup(self, stage: str) -> None:
        if stage == "fit":
            require_ddp(self.trainer)

    def configure_optimizers(self):
        half = {str(p.dtype) for p in self._trainable() if p.dtype in (torch.bfloat16, torch.float16)}
        if half:
            # 3 steps at lr 1e-6 moved 35 of 16,384 LoRA entries in bf16-true, 16,301 in bf16-mixed (tiny LLaVA)
            raise ValueError(
                f"the trained weights are {', '.join(sorted(half))} (from --trainer.precision bf16-true / 16-true, or "
                "--model.dtype bfloat16 without LoRA): AdamW's small updates are rounded away in 16 bits. Use "
                "--trainer.precision bf16-mixed with --model.dtype bfloat16 (the frozen base stays in bfloat16, the "
                "LoRA adapter trains in float32), or --model.dtype float32 to train every weight"
            )
        opt = self.optimization
        optimizer = torch.optim.AdamW(self._trainable(), lr=opt.learning_rate, weight_decay=opt.weight_decay)
        warmup = opt.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def policy_logprobs(self, rollout, rows: torch.Tensor) -> torch.Tensor:
        return completion_logprobs(self.model, self.processor, rollout, rows, self.rollout.temperature,
                                   self.image_features, self.rollout.share_prompt_prefill)

    def reference_logprobs(self, rollout, rows: torch.Tensor) -> torch.Tensor:
        # the reference differs from the policy only in trained weights, so reused image features are its own too
        return self.reference(completion_logprobs, self.processor, rollout, rows, self.rollout.temperature,
                              self.image_features, self.rollout.share_prompt_prefill)

    # ------------------------------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt = self.optimization
        self.last_update = None  # set again only if this step updates the policy
        self._phase_seconds, self._grad_norms = {}, []
        full_batch = getattr(self.trainer.train_dataloader, "batch_size", None) or len(batch["prompt"])
        rollout_batch_size, mini_batch_size = opt.batch_sizes(full_batch)

        with self._local_phase():
            with self._timed("generate"):
                generated = generate_rollouts(self.model, self.processor, batch["prompt"], batch["images"],
                                              self.rollout.num_generations, self.rollout.sampling(),
                                              self.rollout.max_prompt_length, batch["id"],
                                              self.rollout.max_sequences_per_generate, self.image_features)
            with self._timed("reward"):
                scored = score_rollouts(generated, batch, self.reward, self.rollout.num_generations,
                                        self.advantages.confidence_reduction, self.device)
        self._report_reward_failures(scored.reward_failures)
        if self.buffer is not None:
            scored = self._dynamic_sampling(scored, rollout_batch_size)
            if scored is None:
                return None  # not yet a full batch of informative prompts on every rank
        # one optimizer step from one pass: the update's own log-probs are the old ones (see ppo_update)
        with self._local_phase():
            scored = self._logprob_passes(scored, old=opt.ppo_epochs > 1 or mini_batch_size < scored.num_prompts)

        with self._timed("advantages"):
            world = gather_global_batch(scored, self.trainer.world_size, self.global_rank, self._entropy_thresholds())
            advantages = self.estimator(world.rewards, world.prompt_index, world.scores, self.advantages)
        self.last_update = UpdateRecord(world, advantages, scored)
        update = UpdateBatch(scored.rollout, self.last_update.local_advantages.float(), scored.num_generations,
                             scored.old_logprobs, scored.ref_logprobs)
        with self._timed("policy_update"):
            stats = ppo_update(update, partial(self.policy_logprobs, scored.rollout), self.loss_config, mini_batch_size,
                               opt.micro_batch_size, opt.ppo_epochs, self._backward, self._optimizer_step,
                               partial(mean_over_ranks, world=self.trainer.world_size, device=self.device))
        self.updates += 1
        self.last_update = dataclasses.replace(self.last_update, stats=stats)
        metrics = training_step_metrics(scored, stats, self._grad_norms, self._phase_seconds)
        metrics = metrics.reduce(self.trainer.world_size, self.device)  # global: every rank's rollouts
        self.log_dict(metrics)
        self.log("reward", metrics["train/reward"], prog_bar=True, logger=False)
        return None

    def on_train_batch_end(self, outputs, batch: dict[str, Any], batch_idx: int) -> None:
        self._forget_image_features()

    def _forget_image_features(self) -> None:
        """Free the features of this step's images (a buffered prompt's are encoded again when it is trained on)."""
        if self.image_features is not None:
            self.image_features.clear()

    def _report_reward_failures(self, failures: tuple[str, ...]) -> None:
        """With ``reward.on_error: zero``: how many scores failed this step (a metric, 0 on a healthy run), and what
        failed (a warning: the first three messages)."""
        self.log_dict(StepMetrics().total("train/reward_failures", len(failures))
                      .reduce(self.trainer.world_size, self.device))  # every rank's
        if failures:
            more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
            log.warning("step %d: %d reward score(s) failed and were set to 0%s: %s", self.global_step, len(failures),
                        more, " | ".join(failures[:3]))

    def _dynamic_sampling(self, scored: ScoredRollouts, rollout_batch_size: int) -> ScoredRollouts | None:
        """Buffer this step's informative prompts; once every rank has a full batch (the statistics and the all-reduce
        are collectives), the oldest batch, dropping the surplus (see dynamic_sampling.py)."""
        informative = self.buffer.informative(scored, self.optimization.dynamic_sampling_reward)
        self.log_dict(StepMetrics().mean("train/dynamic_sampling_kept", informative.num_prompts, scored.num_prompts)
                      .reduce(self.trainer.world_size, self.device))
        self.buffer.add(informative)
        if min_over_ranks(len(self.buffer), self.trainer.world_size, self.device) < rollout_batch_size:
            return None
        batch = self.buffer.take(rollout_batch_size)
        self.log_dict(StepMetrics().total("train/dynamic_sampling_dropped", self.buffer.clear())
                      .reduce(self.trainer.world_size, self.device))
        return batch

    def _logprob_passes(self, scored: ScoredRollouts, old: bool) -> ScoredRollouts:
        """The old-policy (when the batch feeds several optimizer steps) and reference (for a KL term) log-probs."""
        rows = torch.arange(len(scored.rollout))
        micro = self.optimization.micro_batch_size

        def run(logprobs) -> torch.Tensor:
            return torch.cat([logprobs(scored.rollout, chunk) for chunk in rows.split(micro)])

        if not len(rows):
            return scored
        with torch.no_grad(), evaluation_mode(self.model):  # no dropout: these are the policies' own log-probs
            if old:
                with self._timed("old_logprobs"):
                    scored = dataclasses.replace(scored, old_logprobs=run(self.policy_logprobs))
            if self.loss_config.kl_coef > 0:
                with self._timed("ref_logprobs"):
                    scored = dataclasses.replace(scored, ref_logprobs=run(self.reference_logprobs))
        return scored

    def _entropy_thresholds(self) -> torch.Tensor | None:
        """Training's perceptual thresholds: the batch's percentiles (None), or the dataset's when configured."""
        if self.advantages.entropy_thresholds == "batch":
            return None
        thresholds = self.perceptual_thresholds()
        if thresholds is None:
            raise ValueError("advantages.entropy_thresholds='dataset' needs a datamodule with entropy_thresholds(), "
                             "such as MultimodalReasoningDataModule")
        return thresholds

    def _backward(self, loss: torch.Tensor) -> None:
        # DistributedDataParallel would all-reduce in every backward (one per micro-batch); gradients stay local and
        # are averaged once per optimizer step in _optimizer_step
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        with block() if block is not None else contextlib.nullcontext():
            self.manual_backward(loss)

    def _optimizer_step(self) -> None:
        optimizer = self.optimizers()
        average_gradients(self._trainable(), self.trainer.world_size)
        optimizer.step()  # clips in on_before_optimizer_step
        self.lr_schedulers().step()
        optimizer.zero_grad()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip here, not before ``optimizer.step()``: under ``16-mixed`` the precision plugin unscales the gradients
        just before this hook, and clipping them still scaled (x 65,536) would shrink every update to nothing."""
        norm = torch.nn.utils.clip_grad_norm_(self._trainable(), self.optimization.max_grad_norm)
        self._grad_norms.append(float(norm))

    @contextlib.contextmanager
    def _local_phase(self):
        """A part of the step with no collective inside: an exception in it on one rank stops every rank right after
        it, with that rank's message (:func:`._distributed.stop_together`), instead of hanging the others."""
        error = None
        try:
            yield
        except Exception as caught:  # noqa: BLE001 - every failure is handed on, on every rank
            error = caught
        stop_together(error, self.trainer.world_size if self._trainer is not None else 1, self.device)

    @contextlib.contextmanager
    def _timed(self, phase: str):
        """Wall time of a phase of the step, logged as perf/<phase>_s (the step's cost breakdown)."""
        start = time.perf_counter()
        yield
        self._phase_seconds[phase] = self._phase_seconds.get(phase, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------------------------------ evaluation

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        rows = prediction_rows(self._generate_once(batch))
        self._forget_image_features()
        return rows

    def on_validation_epoch_start(self) -> None:
        self.eval_records = []

    def on_test_epoch_start(self) -> None:
        self.eval_records = []

    def on_validation_epoch_end(self) -> None:
        self._log_breakdowns("val")

    def on_test_epoch_end(self) -> None:
        self._log_breakdowns("test")

    def perceptual_thresholds(self) -> torch.Tensor | None:
        """Evaluation's perceptual thresholds: the dataset's train percentiles when the datamodule has them."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "entropy_thresholds"):
            return datamodule.entropy_thresholds(self.advantages.percentiles)
        return None

    def _generate_once(self, batch: dict[str, Any], k: int = 1, do_sample: bool | None = None) -> ScoredRollouts:
        """``k`` completions per prompt (one, greedy unless ``evaluation.do_sample``, by default), scored."""
        generated = generate_rollouts(self.model, self.processor, batch["prompt"], batch["images"], k,
                                      self.evaluation.sampling(self.rollout, do_sample), self.rollout.max_prompt_length,
                                      batch["id"], self.rollout.max_sequences_per_generate, self.image_features)
        return score_rollouts(generated, batch, self.reward, k, self.advantages.confidence_reduction, self.device)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        with self._local_phase():
            scored = self._generate_once(batch)
            records = sample_records(scored, batch, self.advantages.percentiles, self.perceptual_thresholds())
            if k := self.evaluation.samples:
                sampled = self._generate_once(batch, k, do_sample=True)
                for name, values in sampled_accuracy(correctness(sampled), k).items():
                    for record, value in zip(records, values.tolist()):
                        record[name] = value
        self.eval_records.extend(records)
        self._forget_image_features()

    def _log_breakdowns(self, stage: str) -> None:
        """Accuracy overall, per perceptual group, per source and per question type, and the answer-prior baseline
        beside each, over every rank's samples, each once (gathered records, not per-key syncs: ranks may hold
        different groups and values)."""
        records = gathered_records(self._trainer, self.eval_records)
        k = self.evaluation.samples
        for name, value in evaluation_metrics(records).items():
            self.log(f"{stage}/{name.replace('@k', f'@{k}')}", value, prog_bar=name == "accuracy")
        for column in BREAKDOWNS:
            for value, accuracy in accuracy_by(records, column).items():
                self.log(f"{stage}/accuracy_{column}_{value}", accuracy)
        train = getattr(getattr(self.trainer, "datamodule", None), "samples", {}).get("train")
        if not train or not records:
            return
        prior = most_frequent_answers((str(s.extra.get("question_type", "")), s.answer) for s in train)
        evaluated = [(str(r.get("question_type", "")), r["answer"]) for r in records]
        for key, accuracy in answer_prior_accuracy(prior, evaluated).items():
            self.log(f"{stage}/answer_prior" if key == "overall" else f"{stage}/answer_prior_question_type_{key}", accuracy)

    # ------------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = trainable_state(checkpoint["state_dict"], self.model)
        checkpoint["durian_rng"] = rng_states(self._trainer)
        checkpoint["durian_updates"] = self.updates

    def on_fit_start(self) -> None:
        if self.trainer.ckpt_path is None:  # a resumed run continues each rank's restored stream
            seed_rank(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_rng_state(checkpoint.get("durian_rng"), self.global_rank)
        self.updates = checkpoint.get("durian_updates", checkpoint.get("global_step", 0))  # older ones: 1 step per update

    def on_fit_end(self) -> None:
        self.save_adapter()

    def save_adapter(self) -> None:
        """The LoRA adapter in peft format, to ``adapter_dir`` (default: the run's folder / adapter); every rank calls
        it (the run's folder is a collective), rank 0 writes."""
        if not self.lora.enabled:
            return
        run_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if not self.trainer.is_global_zero:
            return
        folder = self.hparams.adapter_dir or str(Path(run_dir) / "adapter")
        config = self.model.peft_config["default"]
        if Path(config.base_model_name_or_path).exists():  # a local base (e.g. tiny:*): loadable from any folder
            config.base_model_name_or_path = str(Path(config.base_model_name_or_path).resolve())
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        (Path(folder) / "README.md").write_text(self.adapter_card(config.base_model_name_or_path, run_dir))

    def adapter_card(self, base: str, run_dir: str) -> str:
        """The adapter's model card: what it was trained from and with, and how to load it (replaces peft's blank
        template)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        source = getattr(datamodule, "hparams", {}).get("source", "unknown") if datamodule is not None else "unknown"
        advantages, rollout, loss = self.advantages, self.rollout, self.loss_config
        alphas = f", alphas {list(advantages.alphas)}" if advantages.estimator == "durian" else ""
        return "\n".join([
            "# LoRA adapter trained with durian-lightning",
            "",
            f"- base model: `{base}` (the path or hub id peft loads it from)",
            f"- data: `{source}`",
            f"- advantages: `{advantages.estimator}`{alphas}; loss: clip {loss.eps_low} / {loss.eps_high}, "
            f"KL {loss.kl_coef} ({loss.kl_estimator}), {loss.aggregation}"
            + (", dynamic sampling" if self.optimization.dynamic_sampling else ""),
            f"- G = {rollout.num_generations}, max_new_tokens {rollout.max_new_tokens}, temperature {rollout.temperature}, "
            f"learning rate {self.optimization.learning_rate}, LoRA r {self.lora.r} / alpha {self.lora.alpha} on `{self.lora.target_modules}`",
            f"- trained for {self.updates} update{'s' * (self.updates != 1)} ({self.trainer.global_step} optimizer steps)",
            f"- the full configuration: `{Path(run_dir).resolve() / 'config.yaml'}` (rerun with `durian fit --config` on it)",
            "",
            "Load it:",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "",
            f'model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{base}"), "<this folder>")',
            'processor = AutoProcessor.from_pretrained("<this folder>")',
            "```",
            "",
        ])
