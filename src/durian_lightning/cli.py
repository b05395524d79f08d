"""``durian fit|validate|test|predict`` through LightningCLI.

With no arguments it runs the embedded offline default: the tiny LLaVA-style VLM built from config, the bundled
synthetic data, Durian-GRPO (configs/default.yaml spells the same settings out). The datamodule's model path is
linked to the module's, so the entropy encoder is always the policy's own.
"""

from __future__ import annotations

import os
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


def run_cli(args: list[str] | None = None) -> DurianCLI:
    """Parse ``args`` (default: the command line) and run the subcommand; returns the CLI (trainer, model, data)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DurianCLI(
        DurianGRPO,
        MultimodalReasoningDataModule,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": default_callbacks()},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main() -> None:
    """Console script ``durian``."""
    run_cli()


if __name__ == "__main__":
    main()
