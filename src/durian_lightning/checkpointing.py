"""What a checkpoint of the training module holds: the trainable weights only, and the sampling RNG."""

from __future__ import annotations

from typing import Any

import torch

from ._distributed import all_gather_records


def trainable_state(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str = "model.") -> dict:
    """``state_dict`` without the frozen weights of ``model`` (the adapter, not a 7B base model, is saved)."""
    trainable = {prefix + name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trainable or not k.startswith(prefix)}


def seed_rank(trainer) -> None:
    """Give every rank its own sampling stream (``seed_everything`` seeds all ranks alike, so their rollouts would
    draw the same random numbers): rank r continues from seed + r. One process is left as it is."""
    if trainer.world_size > 1:
        torch.manual_seed(torch.initial_seed() + trainer.global_rank)


def rng_states(trainer) -> list[dict[str, Any]]:
    """Every rank's torch (and CUDA) generator state, in rank order, so a resumed run samples what the uninterrupted
    one did on every rank (a collective under DDP: every rank saving a checkpoint calls it)."""
    local = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return all_gather_records(trainer, [local])


def restore_rng_state(saved: list[dict[str, Any]] | dict[str, Any] | None, rank: int) -> None:
    """This rank's saved state (a run resumed on a different number of ranks takes ``rank % saved ranks``)."""
    if saved is None:
        return
    states = [saved] if isinstance(saved, dict) else saved  # checkpoints of one process held one state
    state = states[rank % len(states)]
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
