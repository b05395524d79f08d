"""Callbacks that log what Durian does: difficulty-bucket statistics, completion samples, error vs. difficulty.

They read ``pl_module.last_update`` (an :class:`~durian_lightning.stages.global_batch.UpdateRecord`, set by every update
of :class:`~durian_lightning.module.DurianGRPO`) and ``pl_module.eval_records`` (one entry per evaluation sample), so
any module that fills those can use them. Nothing here depends on which advantage estimator ran.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from durian_lightning._distributed import STOPPED_TOGETHER, extremes_over_ranks
from durian_lightning.core.advantages import Advantages, consecutive_prompt_index, grpo_advantages
from durian_lightning.core.difficulty import perceptual_groups
from durian_lightning.core.rewards import RewardError
from durian_lightning.stages.evaluation import gathered_records


def _log_dir(trainer) -> Path:
    """The run's folder. ``Trainer.log_dir`` broadcasts from rank 0, so every rank must call this, not rank 0 alone."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def rollout_statistics(rewards: torch.Tensor, num_generations: int, advantages: Advantages) -> dict[str, float]:
    """Per-step statistics of a rollout batch (the paper's Appendix A, plus detail per difficulty group).

    ``all_equal_ratio``: prompts whose G rewards are all equal; ``extreme_ratio``: prompts where exactly one rollout
    differs from the other G-1 (the 1-vs-(G-1) cases GRPO blows up); max |A| under GRPO beside the estimator's; and,
    for every difficulty axis the estimator grouped by, per group: prompts, reward mean, shared std, mean |A|.
    """
    g = num_generations
    per_prompt = rewards.view(-1, g)
    high, low = per_prompt.amax(dim=1, keepdim=True), per_prompt.amin(dim=1, keepdim=True)
    all_equal = (high == low).squeeze(1)
    n_high, n_low = (per_prompt == high).sum(dim=1), (per_prompt == low).sum(dim=1)
    extreme = ~all_equal & ((n_high == 1) | (n_low == 1)) & (n_high + n_low == g)
    grpo = grpo_advantages(rewards, consecutive_prompt_index(per_prompt.shape[0], g, rewards.device))
    values = advantages.advantages
    stats = {
        "difficulty/all_equal_ratio": float(all_equal.float().mean()),
        "difficulty/extreme_ratio": float(extreme.float().mean()),
        "difficulty/max_abs_advantage": float(values.abs().max()),
        "difficulty/max_abs_advantage_grpo": float(grpo.abs().max()),
        "difficulty/mean_abs_advantage": float(values.abs().mean()),
    }
    for axis, group_ids in advantages.groups.items():
        prompt_groups = group_ids.view(-1, g)[:, 0]
        for k in prompt_groups.unique().tolist():
            rows = group_ids == k
            prefix = f"difficulty/{axis}_{k}"
            stats[f"{prefix}/prompts"] = float((prompt_groups == k).sum())
            stats[f"{prefix}/reward_mean"] = float(rewards[rows].mean())
            stats[f"{prefix}/shared_std"] = float(advantages.group_stds[axis][rows][0])
            stats[f"{prefix}/mean_abs_advantage"] = float(values[rows].abs().mean())
    return stats


class DifficultyStatsCallback(L.Callback):
    """Logs :func:`rollout_statistics` of the global batch after every update."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = getattr(pl_module, "last_update", None)
        if record is None:
            return
        stats = rollout_statistics(record.batch.rewards, record.batch.num_generations, record.advantages)
        pl_module.log_dict(stats, on_step=True, on_epoch=False)


class CompletionSamplesCallback(L.Callback):
    """On the first update and every ``every_n_steps`` after, appends ``num_samples`` of rank 0's completions with
    their rewards and advantages to a JSONL file."""

    def __init__(self, every_n_steps: int = 10, num_samples: int = 4, filename: str = "completions.jsonl"):
        self.every_n_steps, self.num_samples, self.filename = every_n_steps, num_samples, filename
        self.updates_seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = getattr(pl_module, "last_update", None)
        if record is None:
            return
        self.updates_seen += 1
        if (self.updates_seen - 1) % self.every_n_steps:  # the 1st, then every n-th
            return
        folder = _log_dir(trainer)  # on every rank: Trainer.log_dir is a collective
        if not trainer.is_global_zero:
            return
        path = folder / self.filename
        local, g = record.local, record.local.num_generations
        samples = [
            {
                "step": trainer.global_step,
                "id": local.ids[row // g],
                "problem": local.problems[row // g],
                "answer": local.answers[row // g],
                "completion": local.rollout.completions[row],
                "reward": float(local.rewards[row]),
                "advantage": float(record.local_advantages[row]),
            }
            for row in range(min(self.num_samples, len(local.rollout)))
        ]
        _append_jsonl(path, samples)
        _log_text(trainer.logger, "completions", samples, trainer.global_step)


def _log_text(logger, key: str, rows: list[dict[str, Any]], step: int) -> None:
    """Text to loggers that take it (W&B tables, TensorBoard text); others get the file only."""
    if logger is None or not rows:
        return
    if hasattr(logger, "log_text"):
        columns = list(rows[0])
        logger.log_text(key=key, columns=columns, data=[[r[c] for c in columns] for r in rows], step=step)
    elif hasattr(getattr(logger, "experiment", None), "add_text"):
        logger.experiment.add_text(key, "\n\n".join(json.dumps(r) for r in rows), global_step=step)


def error_by_difficulty(records: list[dict[str, Any]], thresholds: torch.Tensor | None = None) -> dict[str, float]:
    """Error rate per perceptual (entropy) group and per confidence decile (the paper's Tables 5-6)."""
    if not records:
        return {}
    correct = torch.tensor([r["correct"] for r in records], dtype=torch.float64)
    entropy = torch.tensor([r["visual_entropy"] for r in records], dtype=torch.float64)
    confidence = torch.tensor([r["confidence"] for r in records], dtype=torch.float64)
    out = {}
    groups = perceptual_groups(entropy, thresholds=thresholds)
    for k in range(3):
        chosen = groups == k
        if bool(chosen.any()):
            out[f"error/entropy_group_{k}"] = float(1 - correct[chosen].mean())
    order = torch.sort(confidence, stable=True).indices
    deciles = torch.empty_like(order)
    deciles[order] = torch.arange(len(order)) * 10 // len(order)
    for d in range(10):
        chosen = deciles == d
        if bool(chosen.any()):
            out[f"error/confidence_decile_{d}"] = float(1 - correct[chosen].mean())
    return out


def error_table(records: list[dict[str, Any]], thresholds: torch.Tensor | None = None,
                min_per_bin: int = 20) -> dict[str, list[tuple[str, float, int]]]:
    """The chart's numbers: ``(label, error rate, samples)`` per perceptual group, and per confidence bin, with as
    many equal-count bins (at most 10) as keep ``min_per_bin`` samples in each, so no bar rests on a handful."""
    if not records:
        return {}
    correct = torch.tensor([r["correct"] for r in records], dtype=torch.float64)
    groups = perceptual_groups(torch.tensor([r["visual_entropy"] for r in records], dtype=torch.float64), thresholds=thresholds)
    perceptual = [(f"H{k}", float(1 - correct[groups == k].mean()), int((groups == k).sum())) for k in range(3)
                  if bool((groups == k).any())]
    bins = max(1, min(10, len(records) // min_per_bin))
    order = torch.sort(torch.tensor([r["confidence"] for r in records], dtype=torch.float64), stable=True).indices
    bin_of = torch.empty_like(order)
    bin_of[order] = torch.arange(len(order)) * bins // len(order)
    confidence = [(f"c{b}", float(1 - correct[bin_of == b].mean()), int((bin_of == b).sum())) for b in range(bins)]
    return {"perceptual group (H0 simplest images)": perceptual,
            f"confidence, {bins} equal-count bin{'s' * (bins > 1)} (c0 least confident)": confidence}


def draw_error_chart(panels: dict[str, list[tuple[str, float, int]]], path: Path, title: str) -> None:
    """Error rate bars, one panel per difficulty axis, on a 0-1 axis with gridlines, each bar labelled with its error
    and sample count (PIL only, so no plotting dependency)."""
    from PIL import Image, ImageDraw

    bar, gap, left, top, plot_height = 36, 14, 44, 72, 180
    widths = [left + len(rows) * (bar + gap) + 20 for rows in panels.values()]
    image = Image.new("RGB", (max(sum(widths), 360), top + plot_height + 54), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black")
    x0 = 0
    for (name, rows), width in zip(panels.items(), widths):
        draw.text((x0 + left, top - 40), name, fill="black")
        base = top + plot_height
        for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = base - int(plot_height * tick)
            draw.line([x0 + left - 4, y, x0 + width - 16, y], fill=(225, 225, 225) if tick else "black")
            draw.text((x0 + 8, y - 6), f"{tick:.2f}", fill="black")
        draw.line([x0 + left, top, x0 + left, base], fill="black")
        draw.text((x0 + 4, top - 20), "error rate", fill="black")
        for i, (label, error, count) in enumerate(rows):
            x = x0 + left + gap // 2 + i * (bar + gap)
            y = base - int(plot_height * max(0.0, min(1.0, error)))
            draw.rectangle([x, y, x + bar, base], fill=(70, 110, 200))
            draw.text((x + 2, y - 12), f"{error:.2f}", fill="black")
            draw.text((x + 6, base + 4), label, fill="black")
            draw.text((x + 2, base + 18), f"n={count}", fill=(90, 90, 90))
        x0 += width
    image.save(path)


class ErrorVsDifficultyCallback(L.Callback):
    """At the end of validation: logs error per entropy group and confidence decile (the paper's tables) and draws
    them as a PNG chart (confidence in bins large enough to read)."""

    def __init__(self, filename: str = "error_vs_difficulty.png"):
        self.filename = filename

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        records = gathered_records(trainer, getattr(pl_module, "eval_records", []))  # every rank's samples, once
        thresholds = pl_module.perceptual_thresholds() if hasattr(pl_module, "perceptual_thresholds") else None
        stats = error_by_difficulty(records, thresholds)
        if not stats:
            return
        pl_module.log_dict(stats)
        folder = _log_dir(trainer)  # on every rank: Trainer.log_dir is a collective
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            title = (f"validation error rate vs. difficulty ({len(records)} samples), epoch {trainer.current_epoch}, "
                     f"step {trainer.global_step}")
            draw_error_chart(error_table(records, thresholds), folder / self.filename, title)


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


class EvaluationCompletionsCallback(L.Callback):
    """Every evaluation completion, to read beside its question and gold answer: ``val_completions.jsonl`` and
    ``test_completions.jsonl`` (one line per sample and validation run, with the step), and ``predictions.jsonl``
    for ``durian predict`` (one file per rank when several predict)."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")

    def _write(self, trainer, pl_module, stage: str) -> None:
        records = gathered_records(trainer, getattr(pl_module, "eval_records", []))  # a collective
        folder = _log_dir(trainer)  # on every rank: Trainer.log_dir is a collective
        if trainer.is_global_zero and records:
            _append_jsonl(folder / f"{stage}_completions.jsonl", [{"step": trainer.global_step, **r} for r in records])

    def __init__(self, predictions_path: str | None = None):
        self.predictions_path = predictions_path  # default: the run's folder / predictions.jsonl

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        _append_jsonl(self._predictions_path(trainer), list(outputs))

    def on_predict_end(self, trainer, pl_module) -> None:
        rank_zero_info(f"predictions written to {self._predictions_path(trainer)}")

    def _predictions_path(self, trainer) -> Path:
        path = Path(self.predictions_path) if self.predictions_path else _log_dir(trainer) / "predictions.jsonl"
        return path if trainer.world_size == 1 else path.with_name(f"{path.stem}-rank{trainer.global_rank}{path.suffix}")


class PreemptionCheckpoint(L.Callback):
    """A scheduler's SIGTERM during fit: every rank stops after the same step; this writes ``last.ckpt`` of that
    exact position (into the checkpoint folder) and the adapter, and makes the process exit with status 143
    (128 + SIGTERM) instead of 0, so the scheduler sees the run as interrupted. Resume with
    ``--ckpt_path <that folder>/last.ckpt``. A first Ctrl-C (SIGINT) takes the same path, exiting with 130; a second
    one stops at once, mid-step, writing nothing (a checkpoint taken mid-update could hold half an optimizer step).

    The signal may reach the ranks at different times, or some of them only (one node of several preempted), so a
    signal only sets this rank's flag, and the flags are all-reduced at the end of every step: all ranks see the stop
    at the same step boundary and write the checkpoint together (it is a collective). Lightning's own handler acts
    on each rank's flag alone (and broadcasts from within the handler), which leaves ranks in different collectives.

    A failure every rank stopped at together (:func:`._distributed.stop_together`: a reward function that fails with
    ``reward.on_error: stop``, a prompt over ``max_prompt_length``, any error in the rollout, reward or log-prob
    passes) writes ``reward-failure.ckpt`` (``failure.ckpt`` for the others), the state after the last completed
    update, and adds its path to the error, so the run resumes there (the failed batch is drawn again) once the
    cause is fixed."""

    def __init__(self) -> None:
        self._interrupted_by: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer, pl_module) -> None:  # after Lightning set its own handlers (it restores them)
        self._interrupted_by = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def preempted(signum, frame) -> None:
            self._interrupted_by = signal.SIGTERM

        def interrupted(signum, frame) -> None:
            if self._interrupted_by is not None:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._interrupted_by = signal.SIGINT
            rank_zero_info("Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again stops at once, "
                           "saving nothing)")

        self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, preempted),
                          signal.SIGINT: signal.signal(signal.SIGINT, interrupted)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        _, (received,) = extremes_over_ranks([], [float(self._interrupted_by or 0)], trainer.world_size,
                                             trainer.strategy.root_device)  # every rank, every step
        if received:
            self._interrupted_by = int(received)  # SIGTERM where any rank got one, else SIGINT
            rank_zero_info(f"{signal.Signals(int(received)).name} received: stopping after step {trainer.global_step} "
                           "on every rank")
            raise SIGTERMException()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._restore_handlers()  # the teardown hook is not called on this path
        if trainer.state.fn != "fit":
            return
        if getattr(exception, STOPPED_TOGETHER, False):  # every rank is here: the checkpoint's collective is safe
            name = "reward-failure.ckpt" if isinstance(exception, RewardError) else "failure.ckpt"
            path = self._folder(trainer) / name
            trainer.save_checkpoint(path)
            what = "the reward function" if isinstance(exception, RewardError) else "the cause"
            exception.args = (f"{exception.args[0]}\nThe last completed update is saved: fix {what}, then resume with "
                              f"--ckpt_path {path}", *exception.args[1:])
            return
        if not isinstance(exception, SIGTERMException) or self._interrupted_by is None:
            return
        trainer.save_checkpoint(self._folder(trainer) / "last.ckpt")  # every rank: the checkpoint's contents are gathered
        if hasattr(pl_module, "save_adapter"):
            pl_module.save_adapter()
        exception.code = 128 + self._interrupted_by

    @staticmethod
    def _folder(trainer) -> Path:
        checkpoint = trainer.checkpoint_callback
        return Path(checkpoint.dirpath) if checkpoint is not None and checkpoint.dirpath else _log_dir(trainer) / "checkpoints"
