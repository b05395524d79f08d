"""Where a model keeps its parts, whatever its family: the transformers model under a peft wrapper, the model under
its generation head (the one with ``get_image_features``), and the image inputs that encoder takes."""

from __future__ import annotations

import inspect

import torch


def transformers_model(model):
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_sharded(model) -> bool:
    """Whether the model is sharded with FSDP2 (its transformers model is the root unit, see scale/fsdp2.py)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(transformers_model(model), FSDPModule)


def inner_model(model):
    """The transformers model under a peft wrapper, and under its ``ForConditionalGeneration`` head."""
    base = transformers_model(model)
    return getattr(base, "model", base)


def image_encoder_inputs(inner, pixels, device, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The image processor's outputs that ``inner.get_image_features`` takes (``image_grid_thw``, ``image_sizes``,
    ``pixel_attention_mask``, ...), on ``device``; floating ones in ``dtype`` when given."""
    accepted = inspect.signature(inner.get_image_features).parameters
    return {k: v.to(device, dtype if dtype is not None and v.is_floating_point() else None)
            for k, v in pixels.items() if k in accepted and isinstance(v, torch.Tensor)}
