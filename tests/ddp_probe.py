"""A callback that writes what each DDP rank computed, for tests/test_ddp.py (runs inside the ranks)."""

import json
from pathlib import Path

import lightning as L


def color_question_reward(completions, answers, problem, **fields):
    """Dense on color questions, 0 elsewhere: only about a quarter of the prompts are informative, so the ranks
    collect informative prompts at different speeds."""
    return [len(c) / 100 if "color" in p else 0.0 for c, p in zip(completions, problem)]


def fails_on_rank_one(completions, answers, **fields):
    """A reward function with a bug only rank 1's data reaches."""
    import torch.distributed

    if torch.distributed.get_rank() == 1:
        raise KeyError("'bbox' (this reward function's bug)")
    return [0.0] * len(completions)


class PromptLimitOnRank(L.Callback):
    """From the second step on, rank ``rank``'s prompts are over ``max_prompt_length`` (as a long prompt in that rank's
    share of the data would be)."""

    def __init__(self, rank: int, limit: int):
        self.rank, self.limit = rank, limit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import dataclasses

        if trainer.global_rank == self.rank and trainer.global_step >= 1:
            pl_module.rollout = dataclasses.replace(pl_module.rollout, max_prompt_length=self.limit)


class DumpRolloutCallback(L.Callback):
    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_validation_end(self, trainer, pl_module) -> None:
        from durian_lightning._distributed import all_gather_records

        gathered = all_gather_records(trainer, pl_module.eval_records)  # a collective: every rank calls it
        record = {"local": len(pl_module.eval_records), "ids": [r["id"] for r in gathered],
                  "correct": [r["correct"] for r in gathered],
                  "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "error/"))}}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}-validation-step{trainer.global_step}.json", "w") as f:
            json.dump(record, f)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = pl_module.last_update
        if last is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "ids": list(batch["id"]),
            "global_rewards": last.batch.rewards.tolist(),
            "global_entropy": last.batch.scores.visual_entropy.tolist(),
            "global_confidence": last.batch.scores.confidence.tolist(),
            "global_advantages": last.advantages.advantages.tolist(),
            "local_advantages": last.local_advantages.tolist(),
            "waiting": len(pl_module.buffer) if pl_module.buffer is not None else None,
            "lora_sums": [float(v.double().sum()) for k, v in sorted(pl_module.model.state_dict().items()) if "lora_" in k],
            "lengths": last.local.rollout.completion_mask.sum(dim=1).tolist(),
            "stats": {k: getattr(last.stats, k) for k in ("loss", "kl", "clip_fraction_low", "clip_fraction_high", "tokens")},
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")},
        }
        with open(self.folder / f"rank{trainer.global_rank}-step{trainer.global_step}.json", "w") as f:
            json.dump(record, f)


class DumpGradientCallback(L.Callback):
    """Before every optimizer step: this rank's rollouts and advantages, the trainable weights and the gradient the
    module is about to apply (after its all-reduce), for a single-process recomputation in the test."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.optimizers().optimizer.register_step_pre_hook(lambda *_: self.dump(trainer, pl_module))

    def dump(self, trainer, pl_module) -> None:
        import torch

        record = pl_module.last_update
        named = [(name, p) for name, p in pl_module.model.named_parameters() if p.requires_grad]
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({
            "rollout": record.local.rollout,
            "advantages": record.local_advantages.clone(),
            "weights": {name: p.detach().clone() for name, p in named},
            "grads": {name: p.grad.clone() for name, p in named},
        }, self.folder / f"rank{trainer.global_rank}-gradient-step{trainer.global_step}.pt")


class SigtermAtStep(L.Callback):
    """Sends this process SIGTERM (or ``signal_name``, e.g. SIGINT for a Ctrl-C) after the given optimizer step, as a
    scheduler's preemption would; with ``rank``, on that rank only (one node of several preempted)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM", rank: int | None = None):
        self.step = step
        self.signal_name = signal_name
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import os
        import signal

        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step == self.step and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), getattr(signal, self.signal_name))


class RecordCheckpoints(L.Callback):
    """Appends the optimizer step and update count of every checkpoint written to ``folder/checkpoints.jsonl``."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "checkpoints.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "updates": pl_module.updates}) + "\n")


class FailInBackward(L.Callback):
    """Rank ``rank`` raises inside the backward of the given step's update (as an out-of-memory error in one rank's
    backward would), in the middle of the model: the layers after it have already run their backward."""

    def __init__(self, rank: int, step: int = 1):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        from durian_lightning.models.parts import transformers_model

        layers = [m for m in transformers_model(pl_module.model).modules() if type(m).__name__.endswith("DecoderLayer")]

        def fail(module, grad_input, grad_output):
            raise RuntimeError("out of memory in this rank's backward (simulated)")

        layers[len(layers) // 2].register_full_backward_hook(fail)
