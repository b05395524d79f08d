"""The LightningModule: it calls the stages in order and keeps what belongs to Lightning. ``training_step`` reads top
to bottom:

    rollout -> reward (+ confidence) -> [dynamic sampling] -> global difficulty scores -> advantages -> update

Each stage is a function or small class in ``stages/`` (``rollout`` or ``vllm_engine``, ``scoring``, ``update``, ...;
the estimators in ``core/advantages``), passing typed dataclasses. This class holds the model's life cycle, the
optimizer, logging, the evaluation loop and checkpoints. The method and its choices are in docs/method.md.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import Any, Literal

import lightning as L
import torch

from durian_lightning._distributed import failing_inside_collectives, failing_together, mean_over_ranks, min_over_ranks
from durian_lightning.checkpointing import restore_rng_state, rng_states, seed_rank, trainable_state
from durian_lightning.core.advantages import AdvantageSettings, get_estimator
from durian_lightning.export import save_run_adapter
from durian_lightning.models.loading import load_policy
from durian_lightning.models.reference import ReferencePolicy
from durian_lightning.scale.fsdp2 import unsharded
from durian_lightning.scale.gradients import backward_sync, global_norm, reduce_gradients
from durian_lightning.settings import (EvaluationSettings, LoraSettings, LossSettings, OptimizationSettings,
                                      RewardSettings, RolloutSettings, as_settings, training_summary)
from durian_lightning.stages.dynamic_sampling import PromptBuffer
from durian_lightning.stages.evaluation import breakdown_metrics, evaluation_records, gathered_records, prediction_rows
from durian_lightning.stages.global_batch import UpdateRecord, gather_global_batch, training_thresholds
from durian_lightning.stages.image_features import ImageFeatures
from durian_lightning.stages.rollout import completion_logprobs, explain_rollout_fast_paths_off, generate_rollouts
from durian_lightning.stages.scoring import ScoredRollouts, reward_failures_message, score_rollouts
from durian_lightning.stages.step_metrics import PhaseTimer, StepMetrics, training_step_metrics
from durian_lightning.stages.update import UpdateBatch, build_optimizer, old_and_reference_logprobs, ppo_update
from durian_lightning.stages.vllm_engine import VLLMEngine, start_engine
from durian_lightning.strategy import check_strategy, shard_under_fsdp2

log = logging.getLogger(__name__)


class DurianGRPO(L.LightningModule):
    """GRPO / DAPO with Durian's difficulty-aware advantages on a LoRA-adapted VLM.

    Args:
        model_name_or_path: VLM path or hub id, or tiny:<family> (any family of models/families.py, built offline),
                tiny:llava-format, tiny:llava-pretrained (shipped: pretrained and instruction-tuned, models/pretrain.py).
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
        self.engine: VLLMEngine | None = None  # rollout.engine: vllm (else the policy generates itself)
        self.buffer = PromptBuffer() if self.optimization.dynamic_sampling else None
        self.last_update: UpdateRecord | None = None  # what the last update saw, for callbacks
        self.updates = 0  # rollout batches trained on (each takes ppo_epochs x mini-batches optimizer steps)
        self._timed = PhaseTimer()  # the step's phases, logged as perf/<phase>_s
        self._grad_norms: list[float] = []  # the global gradient norm before clipping, per optimizer step of the update
        # this rank's per-sample evaluation results (metrics and callbacks use every rank's, each sample once)
        self.eval_records: list[dict[str, Any]] = []

    def configure_model(self) -> None:
        if self.model is None:
            hp = self.hparams
            self.model, self.processor = load_policy(hp.model_name_or_path, hp.dtype, self.lora.enabled, self.lora.r,
                                                     self.lora.alpha, self.lora.dropout, self.lora.target_modules,
                                                     hp.gradient_checkpointing)
            if self.loss_config.kl_coef > 0:  # a full fine-tuning reference is copied before sharding, then sharded too
                self.reference = ReferencePolicy(self.model, lora=self.lora.enabled)
            shard_under_fsdp2(self._trainer, [self.model, getattr(self.reference, "frozen", None)], not self.lora.enabled)
            self.image_features = ImageFeatures(self.model, self.processor, self.rollout.reuse_image_features)
            explain_rollout_fast_paths_off(self.model, self.rollout.share_prompt_prefill, self.rollout.cache_implementation)
        self.engine = self.engine or start_engine(self.model, self.processor, self.rollout, self.lora, self.evaluation)

    def teardown(self, stage: str) -> None:
        # a vLLM engine stops its processes (close() returns None); configure_model starts one again (validate after fit)
        self.engine = self.engine and self.engine.close()

    def setup(self, stage: str) -> None:
        if stage == "fit":
            check_strategy(self.trainer)

    def configure_optimizers(self):
        return build_optimizer(self._trainable(), self.optimization)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def policy_logprobs(self, rollout, rows: torch.Tensor) -> torch.Tensor:
        return completion_logprobs(self.model, self.processor, rollout, rows, self.rollout.temperature,
                                   self.image_features, self.rollout.share_prompt_prefill)

    def reference_logprobs(self, rollout, rows: torch.Tensor) -> torch.Tensor:
        # the reference differs from the policy only in trained weights, so reused image features are its own too
        return self.reference(completion_logprobs, self.processor, rollout, rows, self.rollout.temperature,
                              self.image_features, self.rollout.share_prompt_prefill)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt = self.optimization
        self.last_update = None  # set again only if this step updates the policy
        self._timed, self._grad_norms = PhaseTimer(), []
        full_batch = getattr(self.trainer.train_dataloader, "batch_size", None) or len(batch["prompt"])
        rollout_batch_size, mini_batch_size = opt.batch_sizes(full_batch)

        with self._local_phase():
            with self._timed("generate"):
                generated = self._generate(batch, self.rollout.num_generations, self.rollout.sampling())
            with self._timed("reward"):
                scored = score_rollouts(generated, batch, self.reward, self.rollout.num_generations,
                                        self.advantages.confidence_reduction, self.device)
        self._report_reward_failures(scored.reward_failures)
        if self.buffer is not None:
            scored = self._dynamic_sampling(scored, rollout_batch_size)
            if scored is None:
                return None  # not yet a full batch of informative prompts on every rank
        # old-policy log-probs only for several optimizer steps (one step's own are the old ones: see ppo_update)
        with self._local_phase():
            reference = self.reference_logprobs if self.loss_config.kl_coef > 0 else None
            scored = old_and_reference_logprobs(scored, self.model, self.policy_logprobs, reference, opt.micro_batch_size,
                                                opt.ppo_epochs > 1 or mini_batch_size < scored.num_prompts, self._timed)

        with self._timed("advantages"):
            thresholds = training_thresholds(self.advantages.entropy_thresholds, self.perceptual_thresholds)
            world = gather_global_batch(scored, self.trainer.world_size, self.global_rank, thresholds)
            advantages = self.estimator(world.rewards, world.prompt_index, world.scores, self.advantages)
        self.last_update = UpdateRecord(world, advantages, scored)
        update = UpdateBatch(scored.rollout, self.last_update.local_advantages.float(), scored.num_generations,
                             scored.old_logprobs, scored.ref_logprobs)
        with self._timed("policy_update"), failing_inside_collectives(self._world()):
            stats = ppo_update(update, partial(self.policy_logprobs, scored.rollout), self.loss_config, mini_batch_size,
                               opt.micro_batch_size, opt.ppo_epochs, self._backward, self._optimizer_step,
                               partial(mean_over_ranks, world=self._world(), device=self.device))
        self.updates += 1
        self.last_update = dataclasses.replace(self.last_update, stats=stats)
        metrics = training_step_metrics(scored, stats, self._grad_norms, self._timed.seconds)
        metrics = metrics.reduce(self._world(), self.device)  # global: every rank's rollouts
        self.log_dict(metrics)
        self.log("reward", metrics["train/reward"], prog_bar=True, logger=False)
        return None

    def on_train_batch_end(self, outputs, batch: dict[str, Any], batch_idx: int) -> None:
        self.image_features.clear()  # this step's (a buffered prompt's images are encoded again when it is trained on)

    def _report_reward_failures(self, failures: tuple[str, ...]) -> None:
        """How many scores failed this step (a metric over every rank, 0 on a healthy run), and what failed."""
        self.log_dict(StepMetrics().total("train/reward_failures", len(failures)).reduce(self._world(), self.device))
        if message := reward_failures_message(failures, self.global_step):
            log.warning(message)

    def _dynamic_sampling(self, scored: ScoredRollouts, rollout_batch_size: int) -> ScoredRollouts | None:
        """The oldest full batch of informative prompts once every rank has one (see stages/dynamic_sampling.py)."""
        fewest = partial(min_over_ranks, world=self._world(), device=self.device)
        batch, metrics = self.buffer.collect(scored, rollout_batch_size, self.optimization.dynamic_sampling_reward, fewest)
        self.log_dict(metrics.reduce(self._world(), self.device))
        return batch

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """DDP would all-reduce in every backward (one per micro-batch): the module averages once per optimizer step
        instead. FSDP2 reduce-scatters its sharded gradients in the backward of the step's last micro-batch only."""
        with backward_sync(self.trainer.strategy, self.model, last):
            self.manual_backward(loss)

    def _optimizer_step(self) -> None:
        optimizer = self.optimizers()
        reduce_gradients(self._trainable(), self.trainer.world_size)
        optimizer.step()  # clips in on_before_optimizer_step
        self.lr_schedulers().step()
        optimizer.zero_grad()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip here, not before ``optimizer.step()``: under ``16-mixed`` the precision plugin unscales the gradients
        just before this hook, and clipping them still scaled (x 65,536) would shrink every update to nothing."""
        norm = torch.nn.utils.clip_grad_norm_(self._trainable(), self.optimization.max_grad_norm)
        self._grad_norms.append(global_norm(norm))

    def _local_phase(self):
        """A part of the step with no collective inside: one rank's exception stops every rank right after it."""
        return failing_together(self._world(), self.device)

    def _world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        rows = prediction_rows(self._generate_once(batch))
        self.image_features.clear()
        return rows

    def _start_records(self) -> None:
        self.eval_records = []

    on_validation_epoch_start = on_test_epoch_start = _start_records

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

    def _generate(self, batch: dict[str, Any], k: int, sampling):
        if self.engine is not None:  # given the latest update's weights first (perf/weight_sync_s)
            return self.engine.rollouts(self.model, self.updates, batch, k, sampling, self.rollout.max_prompt_length, self._timed)
        with unsharded(self.model):  # under fsdp2: every unit gathered once for the call, not once per token
            return generate_rollouts(self.model, self.processor, batch["prompt"], batch["images"], k, sampling,
                                     self.rollout.max_prompt_length, batch["id"], self.rollout.max_sequences_per_generate,
                                     self.image_features)

    def _generate_once(self, batch: dict[str, Any], k: int = 1, do_sample: bool | None = None) -> ScoredRollouts:
        """``k`` completions per prompt (one, greedy unless ``evaluation.do_sample``, by default), scored."""
        generated = self._generate(batch, k, self.evaluation.sampling(self.rollout, do_sample))
        return score_rollouts(generated, batch, self.reward, k, self.advantages.confidence_reduction, self.device)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        with self._local_phase():
            records = evaluation_records(self._generate_once, batch, self.advantages.percentiles,
                                         self.perceptual_thresholds(), self.evaluation.samples)
        self.eval_records.extend(records)
        self.image_features.clear()

    def _log_breakdowns(self, stage: str) -> None:
        """Every rank's samples, each once (gathered records, not per-key syncs: ranks may hold different groups)."""
        records = gathered_records(self._trainer, self.eval_records)
        train = getattr(getattr(self.trainer, "datamodule", None), "samples", {}).get("train")
        for name, value in breakdown_metrics(records, stage, self.evaluation.samples, train).items():
            self.log(name, value, prog_bar=name == f"{stage}/accuracy")

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
        """The LoRA adapter in peft format, with its card (:func:`~durian_lightning.export.save_run_adapter`)."""
        save_run_adapter(self.trainer, self.model, self.processor, self.hparams.adapter_dir, [
            *training_summary(self.lora, self.rollout, self.advantages, self.loss_config, self.optimization),
            f"trained for {self.updates} update{'s' * (self.updates != 1)} ({self.trainer.global_step} optimizer steps)"])
