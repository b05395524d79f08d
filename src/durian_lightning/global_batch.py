"""The statistics stage: every rank's rewards and difficulty scores gathered into the global batch.

Percentiles, quantile groups and shared stds are statistics over "the batch", which under data parallelism is the
global batch. Every rank gathers it, computes the same advantages for all of it, and trains on its own rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._distributed import all_gather_1d
from .advantages import Advantages, DifficultyScores, consecutive_prompt_index
from .scoring import ScoredRollouts
from .update import UpdateStats


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
