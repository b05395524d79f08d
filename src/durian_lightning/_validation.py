"""Shared input checks for the math functions: every bad input raises a ValueError that says what was expected."""

from __future__ import annotations

import torch


def check_finite(name: str, values: torch.Tensor) -> None:
    """Raise if ``values`` holds NaN or inf, naming the first bad position."""
    if values.is_floating_point() or values.is_complex():
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            index = first[0] if len(first) == 1 else first
            raise ValueError(f"{name} must be finite, but {name}[{index}] = {values[first].item()}")


def check_vector(name: str, values: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """Check a 1-D tensor (optionally of a given length) and return it."""
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(values)
    if values.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(values.shape)}")
    if length is not None and values.numel() != length:
        raise ValueError(f"{name} must have {length} entries, got {values.numel()}")
    return values


def check_prompt_index(
    prompt_index: torch.Tensor, num_rollouts: int, num_prompts: int | None = None
) -> tuple[torch.Tensor, int]:
    """Validate a per-rollout prompt index and return it with the number of prompts.

    Prompts are numbered ``0 .. num_prompts - 1`` and every prompt must own at least one rollout, so that
    per-prompt statistics are always defined. ``num_prompts`` defaults to ``max(prompt_index) + 1``.
    """
    prompt_index = check_vector("prompt_index", prompt_index, num_rollouts)
    if prompt_index.is_floating_point() or prompt_index.dtype == torch.bool:
        raise ValueError(f"prompt_index must hold integers, got dtype {prompt_index.dtype}")
    prompt_index = prompt_index.long()
    if num_rollouts == 0:
        return prompt_index, 0 if num_prompts is None else num_prompts
    low, high = int(prompt_index.min()), int(prompt_index.max())
    if low < 0:
        raise ValueError(f"prompt_index must be >= 0, found {low} at rollout {int((prompt_index == low).nonzero()[0])}")
    if num_prompts is None:
        num_prompts = high + 1
    elif high >= num_prompts:
        raise ValueError(f"prompt_index must be < num_prompts={num_prompts}, found {high}")
    counts = torch.bincount(prompt_index, minlength=num_prompts)
    if bool((counts == 0).any()):
        missing = (counts == 0).nonzero().flatten()[:5].tolist()
        raise ValueError(f"every prompt in 0..{num_prompts - 1} needs at least one rollout; prompts {missing} have none")
    return prompt_index, num_prompts
