"""Collectives over the ranks of a run; every rank must call them, in the same order."""

from __future__ import annotations

from typing import Any

import torch


def all_gather_1d(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate a 1-D tensor of the same length from every rank, in rank order (no autograd)."""
    out = torch.empty(world * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    torch.distributed.all_gather_into_tensor(out, tensor.contiguous())
    return out


def all_gather_records(trainer, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's per-sample records in rank order (each rank evaluates its own share of the data)."""
    if trainer is None or trainer.world_size <= 1:
        return list(records)
    parts: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, list(records))
    return [record for part in parts for record in part]
