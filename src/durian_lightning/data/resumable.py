"""A training DataLoader that Lightning can checkpoint mid-epoch, so ``--ckpt_path`` resumes at the next batch.

The order of epoch ``e`` is a permutation seeded by ``(seed, e)``; the loader's state is the epoch and how many
batches it has handed out, and a restored loader skips those. (Lightning only reads this state from loaders whose
length is known, where it also does no prefetching, so the count is exact.)
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffleSampler(Sampler[int]):
    def __init__(self, size: int, seed: int = 0):
        self.size, self.seed, self.epoch, self.skip = size, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        skip, self.skip = self.skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.size


class ResumableDataLoader(DataLoader):
    def __init__(self, dataset, batch_size: int, seed: int = 0, **kwargs: Any):
        sampler = EpochShuffleSampler(len(dataset), seed)
        # an explicit generator keeps the loader from drawing its worker base seed from the global RNG
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator().manual_seed(seed), **kwargs)
        self._served = 0
        self._resume_at = 0

    def __iter__(self):
        self._served, self._resume_at = self._resume_at, 0
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.epoch = state["epoch"]
        self.sampler.skip = state["batches_served"] * self.batch_size
        self._resume_at = state["batches_served"]
