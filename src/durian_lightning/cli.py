"""``durian fit|validate|test|predict`` through LightningCLI.

With no arguments it runs the embedded offline default, configs/default.yaml: a tiny LLaVA-style VLM built from
config, the bundled synthetic data, Durian-GRPO. The datamodule's model path is
linked to the module's, so the entropy encoder is always the policy's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from lightning.pytorch.cli import LightningCLI

from .callbacks import CompletionSamplesCallback, DifficultyStatsCallback, ErrorVsDifficultyCallback
from .data import MultimodalReasoningDataModule
from .module import DurianGRPO

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "accelerator": "auto",
    "devices": 1,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
}


def default_callbacks() -> list:
    return [DifficultyStatsCallback(), CompletionSamplesCallback(), ErrorVsDifficultyCallback()]


class DurianCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")


DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"  # the checkout's (editable install)


def run_cli(args: list[str] | None = None, default_config: bool = True) -> DurianCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; returns the CLI (trainer, model, data).

    ``configs/default.yaml`` is read first when present, so no arguments run the embedded offline default and
    every ``--config`` / flag overrides it.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser_kwargs = {}
    if default_config and DEFAULT_CONFIG.is_file():
        parser_kwargs = {cmd: {"default_config_files": [str(DEFAULT_CONFIG)]} for cmd in ("fit", "validate", "test", "predict")}
    return DurianCLI(
        DurianGRPO,
        MultimodalReasoningDataModule,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": default_callbacks()},
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs,
        args=args,
    )


def main() -> None:
    """Console script ``durian``."""
    run_cli()


if __name__ == "__main__":
    main()
