"""The statistics stage: every rank's rewards and difficulty scores gathered into the global batch.

Percentiles, quantile groups and shared stds are statistics over "the batch", which under data parallelism is the
global batch. Every rank gathers it, computes the same advantages for all of it, and trains on its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from durian_lightning._distributed import all_gather_1d
from durian_lightning.core.advantages import Advantages, DifficultyScores, consecutive_prompt_index
from durian_lightning.stages.scoring import ScoredRollouts
from durian_lightning.stages.update import UpdateStats


@dataclass(frozen=True)
class GlobalBatch:
    """Rewards and per-prompt difficulty scores of every rank, in rank order."""

    rewards: torch.Tensor  # (world * N,)
    num_generations: int
    scores: DifficultyScores  # per prompt, (world * P,)
    local_rows: slice  # this rank's rows of ``rewards``

    @property
    def prompt_index(self) -> torch.Tensor:
        return consecutive_prompt_index(self.rewards.numel() // self.num_generations, self.num_generations,
                                        self.rewards.device)


def training_thresholds(mode: str, dataset_thresholds: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
    """The perceptual thresholds training groups by: the batch's own percentiles (None, ``mode`` "batch"), or the
    dataset's (``mode`` "dataset"), which need a datamodule that has them."""
    if mode == "batch":
        return None
    thresholds = dataset_thresholds()
    if thresholds is None:
        raise ValueError("advantages.entropy_thresholds='dataset' needs a datamodule with entropy_thresholds(), "
                         "such as MultimodalReasoningDataModule")
    return thresholds


def gather_global_batch(
    scored: ScoredRollouts, world_size: int = 1, rank: int = 0, entropy_thresholds: torch.Tensor | None = None
) -> GlobalBatch:
    """Every rank's rewards, entropies and confidences (a collective when ``world_size > 1``: all ranks call it
    with the same number of rows)."""
    rewards, entropy, confidence = scored.rewards, scored.visual_entropy.to(scored.rewards.dtype), scored.confidence
    if world_size > 1:
        rewards, entropy, confidence = (all_gather_1d(t, world_size) for t in (rewards, entropy, confidence))
    n = scored.rewards.numel()
    return GlobalBatch(
        rewards=rewards, num_generations=scored.num_generations,
        scores=DifficultyScores(visual_entropy=entropy, confidence=confidence, entropy_thresholds=entropy_thresholds),
        local_rows=slice(rank * n, (rank + 1) * n),
    )


@dataclass(frozen=True)
class UpdateRecord:
    """What one update saw, for callbacks: the global batch, its advantages, and this rank's scored rollouts."""

    batch: GlobalBatch
    advantages: Advantages  # over the global batch
    local: ScoredRollouts
    stats: UpdateStats | None = None  # this rank's update statistics, once the update ran

    @property
    def local_advantages(self) -> torch.Tensor:
        return self.advantages.advantages[self.batch.local_rows]
