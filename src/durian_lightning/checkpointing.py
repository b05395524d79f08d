"""What a checkpoint of the training module holds: the trainable weights only, and the sampling RNG."""

from __future__ import annotations

from typing import Any

import torch


def trainable_state(state_dict: dict[str, torch.Tensor], model: torch.nn.Module, prefix: str = "model.") -> dict:
    """``state_dict`` without the frozen weights of ``model`` (the adapter, not a 7B base model, is saved)."""
    trainable = {prefix + name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trainable or not k.startswith(prefix)}


def rng_state() -> dict[str, Any]:
    """The torch (and CUDA) generators rollouts sample from, so a resumed run samples what the uninterrupted one did."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict[str, Any] | None) -> None:
    if state is None:
        return
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
