"""Gradients under either layout: DDP (every rank holds every weight; the module averages the gradients once per
optimizer step) and fsdp2 (FSDP reduce-scatters the sharded ones in the backward; a LoRA adapter, left whole, is
averaged like DDP's)."""

from __future__ import annotations

import contextlib

import torch

from durian_lightning._distributed import average_gradients
from durian_lightning.models.parts import is_sharded, transformers_model


def backward_sync(strategy, model, last: bool):
    """The context of one micro-batch's backward: no collective in it until the optimizer step's ``last`` one.
    DDP's own all-reduce in every backward is blocked (the module averages once per step); a sharded model
    reduce-scatters in the last backward only (before it, its gradients accumulate unsharded)."""
    if is_sharded(model):
        transformers_model(model).set_requires_gradient_sync(last)
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else contextlib.nullcontext()


def reduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Before an optimizer step: average the gradients of the weights every rank holds whole (all of them under DDP;
    a LoRA adapter under fsdp2) in one all-reduce; FSDP2 has reduce-scattered the sharded ones (DTensors) in the
    backward. A weight no forward reached gets a zero gradient either way, as DDP's average gives it, so AdamW keeps
    a state for every weight (a sharded checkpoint then holds them all) and weight decay applies to it as under DDP."""
    from torch.distributed.tensor import DTensor

    for p in params:
        if p.grad is None and isinstance(p, DTensor):
            p.grad = torch.zeros_like(p)
    average_gradients([p for p in params if not isinstance(p, DTensor)], world)


def global_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a number: over sharded gradients it is a DTensor of the global norm."""
    from torch.distributed.tensor import DTensor

    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
