"""Gradients under either layout: DDP (every rank holds every weight; the module averages the gradients once per
optimizer step) and fsdp2 (FSDP reduce-scatters the sharded ones in the backward; a LoRA adapter, left whole, is
averaged like DDP's)."""

from __future__ import annotations

import contextlib

import torch

from durian_lightning.models.parts import is_sharded, transformers_model


def backward_sync(strategy, model, last: bool):
    """The context of one micro-batch's backward: no collective in it until the optimizer step's ``last`` one.
    DDP's own all-reduce in every backward is blocked (the module averages once per step); a sharded model
    reduce-scatters in the last backward only (before it, its gradients accumulate unsharded)."""
    if is_sharded(model):
        transformers_model(model).set_requires_gradient_sync(last)
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()


def replicated(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters every rank holds whole (all of them under DDP; a LoRA adapter under fsdp2), whose gradients
    the module averages itself; FSDP2 has reduced the sharded ones (DTensors) in the backward."""
    from torch.distributed.tensor import DTensor

    return [p for p in params if not isinstance(p, DTensor)]


def global_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a number: over sharded gradients it is a DTensor of the global norm."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
