"""The reference policy of the KL term."""

from __future__ import annotations

import copy

import torch


class ReferencePolicy:
    """The base model with the LoRA adapter switched off (exact, and no extra memory), or, when every weight trains,
    a frozen copy of the model taken now. Not a ``torch.nn.Module``: the copy stays out of the checkpoint and the
    optimizer."""

    def __init__(self, model: torch.nn.Module, lora: bool):
        self.model = model
        self.frozen = None if lora else copy.deepcopy(model).eval().requires_grad_(False)

    def __call__(self, forward, *args, **kwargs):
        """``forward(reference_model, *args, **kwargs)`` under the reference weights."""
        if self.frozen is None:
            with self.model.disable_adapter():
                return forward(self.model, *args, **kwargs)
        self.frozen.to(next(self.model.parameters()).device)
        return forward(self.frozen, *args, **kwargs)
