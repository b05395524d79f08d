"""A training DataLoader that Lightning can checkpoint mid-epoch, so ``--ckpt_path`` resumes at the next batch.

The order of epoch ``e`` is ``DistributedSampler``'s permutation seeded by ``seed + e``, split across ranks when a
process group is up (being a DistributedSampler, Lightning keeps it instead of wrapping it). The loader's state is
the epoch and how many batches it has handed out; a restored loader skips those. (Lightning reads this state only
from loaders whose length is known, where it also does no prefetching, so the count is exact.)
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    def __init__(self, dataset, seed: int = 0):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=True,
            seed=seed,
        )
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    def __init__(self, dataset, batch_size: int, seed: int = 0, **kwargs: Any):
        # an explicit generator keeps the loader from drawing its worker base seed from the global RNG
        super().__init__(dataset, batch_size=batch_size, sampler=EpochShuffleSampler(dataset, seed),
                         generator=torch.Generator().manual_seed(seed), **kwargs)
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
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["batches_served"] * self.batch_size
        self._resume_at = state["batches_served"]
