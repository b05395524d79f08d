"""``durian fit|validate|test|predict`` through LightningCLI.

With no arguments it runs the embedded offline default, configs/default.yaml: the shipped tiny LLaVA-style VLM
(pretrained and instruction-tuned, ``tiny:llava-pretrained``), the bundled synthetic data, Durian-GRPO. The datamodule's model path is
linked to the module's, so the entropy encoder is always the policy's own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from durian_lightning.callbacks import (
    CompletionSamplesCallback,
    DifficultyStatsCallback,
    ErrorVsDifficultyCallback,
    EvaluationCompletionsCallback,
    PreemptionCheckpoint,
)
from durian_lightning.checkpointing import UpdateCheckpoint
from durian_lightning.data import MultimodalReasoningDataModule
from durian_lightning.module import DurianGRPO
from durian_lightning.settings import LossSettings

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "accelerator": "auto",
    "devices": 1,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
}


def default_callbacks() -> list:
    return [DifficultyStatsCallback(), CompletionSamplesCallback(), ErrorVsDifficultyCallback(),
            EvaluationCompletionsCallback(), PreemptionCheckpoint()]


def default_loggers(save_dir: str) -> list:
    """metrics.csv always (the file the README and the tests read), TensorBoard beside it when it is installed.

    Lightning's own default is TensorBoard *instead of* CSV whenever tensorboard is importable, so installing it
    would silently stop metrics.csv from being written."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(save_dir)]
    if any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        loggers.append(TensorBoardLogger(save_dir, version=loggers[0].version))
    return loggers


def check_checkpoint(path) -> None:
    """A ``--ckpt_path`` file that is not a training checkpoint gets a message naming it, before anything resumes
    (torch's own error on such a file advises weights_only=False, which would not help)."""
    if path is None or str(path) in ("last", "best", "hpc", "registry") or not Path(path).is_file():
        return
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # noqa: BLE001 - any failure means the same thing here
        raise ValueError(f"--ckpt_path {path} is not a readable checkpoint ({type(error).__name__}); it may be truncated "
                         "(a full disk, an interrupted copy) or another kind of file") from None
    missing = [key for key in ("state_dict", "loops") if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"--ckpt_path {path} is not a Lightning training checkpoint (no {', '.join(missing)})")


class DurianCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("model.dtype", "data.dtype")  # the entropy precompute runs the encoder as training does
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=0,
                            help="fit only: a checkpoint every N updates (rollout batches trained on, whatever their "
                                 "optimizer steps; the latest kept, plus last.ckpt for --ckpt_path), so a crash loses "
                                 "at most N updates; 0 = Lightning's default (each epoch "
                                 "end). A ModelCheckpoint of your own in trainer.callbacks takes precedence")
        parser.add_argument("--predictions_path", type=Optional[str], default=None,
                            help="predict only: the JSONL file predictions go to (default: the run's folder / "
                                 "predictions.jsonl)")
        parser.add_argument("--validate_before_fit", type=bool, default=False,
                            help="fit only: one validation pass before the first update (logged at step 0), the "
                                 "starting point every later validation is read against; skipped when resuming")

    def before_predict(self) -> None:
        path = self.config["predict"].get("predictions_path")
        if not path:
            return
        for callback in self.trainer.callbacks:
            if isinstance(callback, EvaluationCompletionsCallback):
                callback.predictions_path = path

    def before_fit(self) -> None:
        config = self.config["fit"]
        if not config.get("validate_before_fit") or config.get("ckpt_path") is not None:
            return
        # under no_grad, as fit's own validations run: metric states reset under inference mode could not be
        # updated by them afterwards
        loop = self.trainer.validate_loop
        loop.inference_mode, inference_mode = False, loop.inference_mode
        try:
            self.trainer.validate(self.model, datamodule=self.datamodule)
        finally:
            loop.inference_mode = inference_mode

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):  # not chosen: see default_loggers
            kwargs.setdefault("logger", default_loggers(config.get("default_root_dir") or os.getcwd()))
        every = self._get(self.config_init, "checkpoint_every_n_steps", default=0)
        if every < 0:
            raise ValueError(f"checkpoint_every_n_steps must be >= 0 (0 = each epoch end), got {every}")
        callbacks = list(config.get("callbacks") or [])
        if every and config.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, UpdateCheckpoint(every)])
        return super().instantiate_trainer(**kwargs)


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"  # the checkout's (editable install)


# the preset's own knobs (None: the preset's value); settings beside the preset (rollout_correction) stay as given
LOSS_OVERRIDES = [f.name for f in dataclasses.fields(LossSettings) if f.name != "preset" and f.default is None]


def _names_a_config(args: list[str]) -> bool:
    return any(a in ("-c", "--config") or a.startswith("--config=") for a in args)


def _preset_sets_its_own_values(args: list[str]) -> list[str]:
    """A loss preset named on the command line brings its own clip, KL and aggregation: the overrides a config file
    set for the previous preset are cleared (``null``), while overrides given on the command line still apply."""
    if not any(a == "--model.loss.preset" or a.startswith("--model.loss.preset=") for a in args):
        return args
    first = next(i for i, a in enumerate(args) if a.startswith("--model.loss."))
    return [*args[:first], *(f"--model.loss.{name}=null" for name in LOSS_OVERRIDES), *args[first:]]


# Warnings every run would print about this project's own deliberate choices (see the README's list of the
# third-party notices that remain)
QUIET_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",  # the frozen vision tower and projector stay in eval mode on purpose
    r"`is_gradient_checkpointing` is deprecated",  # peft asks transformers this while wrapping the model for LoRA
    # a ModelCheckpoint(every_n_train_steps) of the user's own under manual optimization, at every save: its checkpoint
    # holds the state after the optimizer step, which is what resuming needs (checkpointing.CHECKPOINT_CONTENTS)
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
)


EXPORT_HELP = ("durian export SOURCE --out FOLDER [--format merged|adapter]: a checkpoint's or adapter folder's policy as a "
               "merged model folder (or its adapter) for evaluation and serving tools; durian export --help for more")


def run_cli(args: list[str] | None = None, default_config: bool = True) -> DurianCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; returns the CLI (trainer, model, data).

    Without ``--config``, ``configs/default.yaml`` is read first, so no arguments run the embedded offline default and
    every flag overrides it. With ``--config`` only that file is read (plus the classes' defaults): a recipe gets
    exactly what it names, never the offline default's choices.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _preset_sets_its_own_values(list(sys.argv[1:] if args is None else args))
    for i, arg in enumerate(args):  # before LightningCLI reads the file's hyper-parameters
        if arg == "--ckpt_path" and i + 1 < len(args):
            check_checkpoint(args[i + 1])
        elif arg.startswith("--ckpt_path="):
            check_checkpoint(arg.split("=", 1)[1])
    parser_kwargs = {"epilog": EXPORT_HELP}
    if default_config and DEFAULT_CONFIG.is_file() and not _names_a_config(args):
        defaults = {"default_config_files": [str(DEFAULT_CONFIG)]}
        parser_kwargs.update({cmd: defaults for cmd in ("fit", "validate", "test", "predict")})
    with warnings.catch_warnings():
        # args always come from here (the command line passed through _preset_sets_its_own_values)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        return DurianCLI(
            DurianGRPO,
            MultimodalReasoningDataModule,
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": default_callbacks()},
            save_config_kwargs={"overwrite": True},
            parser_kwargs=parser_kwargs,
            args=args,
        )


def main() -> None:
    """Console script ``durian``: LightningCLI's subcommands, and ``durian export`` (:mod:`.export`)."""
    if sys.argv[1:2] == ["export"]:
        from durian_lightning.export import main as export

        export(sys.argv[2:])
        return
    run_cli()


if __name__ == "__main__":
    main()
