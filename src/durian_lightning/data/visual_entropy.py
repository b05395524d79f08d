"""Scorers that turn images into visual entropy: the paper's spectral entropy of the VLM's own patch features,
and a model-free pixel-histogram fallback; and the fingerprint naming everything that changes their numbers."""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Sequence

import torch
from PIL import Image

from durian_lightning.core.difficulty import pixel_entropy, spectral_entropy
from durian_lightning.models.parts import image_encoder_inputs, inner_model

FeatureSource = Literal["vision_tower", "projector"]


def entropy_fingerprint(method: str, **identity) -> str:
    """SHA-256 naming what a scorer's number depends on besides the image bytes: the method, and for the spectral
    one the model's file hashes, layer, feature source, image processor and its arguments, dtype; and the
    ``max_image_side`` the image is shrunk to before any of that. Computed without loading any model."""
    # v3: a flat image's spectral entropy is 0 (core.difficulty.FLAT_ULPS), not that of rounding noise
    payload = {"scorer": f"{method}-entropy/{'v3' if method == 'spectral' else 'v2'}", **identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class PixelEntropyScorer:
    """Shannon entropy of the grayscale histogram. Fast and model-free; not the paper's metric."""

    def __call__(self, images: Sequence[Image.Image]) -> list[float]:
        return [pixel_entropy(image) for image in images]


VISION_ENCODERS = ("vision_tower", "visual", "vision_model")  # the encoder's attribute name across families


def vision_encoder(inner) -> torch.nn.Module | None:
    """The vision encoder of a transformers VLM's inner model (``vision_tower``: LLaVA, Gemma, InternVL, Mistral 3;
    ``visual``: Qwen-VL, GLM-4.1V; ``vision_model``: Idefics3 / SmolVLM)."""
    return next((getattr(inner, name) for name in VISION_ENCODERS if getattr(inner, name, None) is not None), None)


def encoder_blocks(encoder: torch.nn.Module, depth: int) -> torch.nn.ModuleList:
    """The encoder's list of ``depth`` transformer blocks, wherever the family keeps it."""
    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == depth:
            return module
    raise ValueError(f"{type(encoder).__name__} has no list of {depth} blocks (its config's depth)")


class SpectralEntropyScorer:
    """Spectral entropy (docs/method.md) of the patch features of a VLM's own vision encoder, one value per image.

    Works for any VLM whose inner model has ``get_image_features`` and a vision encoder (:func:`vision_encoder`): every
    family of :mod:`durian_lightning.models.families`. ``feature_source="vision_tower"`` takes the encoder's hidden
    state number ``vision_layer`` before any projector / patch merger (0 = the patch embeddings entering the first
    block, i = output of block i, -1 = last block); ``"projector"`` takes what ``get_image_features`` returns (after
    the projector / merger: what the language model sees; ``vision_layer=-1`` only).

    A processor that tiles (InternVL's crops, LLaVA-OneVision's AnyRes views, Idefics3's splits) gets one image per
    encoder call, so the tiles are that image's only: **their patches together are the image's patch set**, one
    covariance and one entropy per image. Batches share a call where each image's rows are known to be its own
    (Qwen-VL patch grids, fixed-size images). Padding patches a processor adds (Gemma 4's, position -1) are left out.
    ``image_processor_kwargs`` go to the image processor (e.g. ``size`` or ``max_pixels``) and set the resolution.
    ``model`` needs only its image path (:func:`durian_lightning.models.loading.load_image_encoder`).
    """

    def __init__(
        self,
        model,
        processor,
        vision_layer: int = -1,
        feature_source: FeatureSource = "vision_tower",
        image_processor_kwargs: dict | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if feature_source not in ("vision_tower", "projector"):
            raise ValueError(f"feature_source must be 'vision_tower' or 'projector', got {feature_source!r}")
        if feature_source == "projector" and vision_layer != -1:
            raise ValueError("projector features are the model's own get_image_features output: only vision_layer=-1")
        self.inner = inner_model(model)
        encoder = vision_encoder(self.inner)
        model_type = getattr(model.config, "model_type", type(model).__name__)
        if encoder is None or not hasattr(self.inner, "get_image_features"):
            raise ValueError(
                f"{type(model).__name__} (model type {model_type!r}) has no vision encoder this scorer can reach "
                f"(looked for {', '.join(VISION_ENCODERS)} and get_image_features); use entropy_method='pixel' for it"
            )
        self.model = model.to(device=device, dtype=dtype).eval()
        self.encoder = encoder
        vision_config = getattr(model.config, "vision_config", None)
        depth = getattr(vision_config, "num_hidden_layers", None) or getattr(vision_config, "depth", None)
        self.blocks = encoder_blocks(encoder, depth) if feature_source == "vision_tower" else None
        if self.blocks is not None and not -len(self.blocks) - 1 <= vision_layer <= len(self.blocks):
            raise ValueError(f"vision_layer={vision_layer} is outside the encoder's 0..{len(self.blocks)} hidden states")
        self.image_processor = processor.image_processor
        self.vision_layer = vision_layer
        self.feature_source = feature_source
        self.image_processor_kwargs = dict(image_processor_kwargs or {})
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, P, d)`` patch features of a batch of images, each padded to the longest, and their ``(B, P)`` mask of
        real patches. One encoder call for the batch where its output says which rows are whose, else one per image
        (tiling processors, encoders that join all images into one sequence)."""
        per_image = self._encode(list(images))
        if per_image is None:
            per_image = [self.image_features(image) for image in images]
        feats = torch.nn.utils.rnn.pad_sequence(per_image, batch_first=True)
        counts = torch.tensor([len(f) for f in per_image], device=feats.device)
        return feats, torch.arange(feats.shape[1], device=feats.device)[None, :] < counts[:, None]

    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        """``(patches, d)``: every patch feature of one image, its tiles' together."""
        return self._encode([image])[0]

    def _encode(self, images: list[Image.Image]) -> list[torch.Tensor] | None:
        """Each image's ``(patches, d)`` features from one encoder call; ``None`` when the output cannot be cut per
        image (one image always can: all of it is that image's)."""
        inputs = self.image_processor(images, return_tensors="pt", **self.image_processor_kwargs)
        kwargs = image_encoder_inputs(self.inner, inputs, self.device, self.dtype)
        captured: list[torch.Tensor] = []
        hook = None
        if self.blocks is not None:
            layer = self.vision_layer % (len(self.blocks) + 1)
            if layer == 0:  # what enters the first block
                hook = self.blocks[0].register_forward_pre_hook(
                    lambda module, args, kw: captured.append(args[0] if args else kw["hidden_states"]), with_kwargs=True)
            else:
                hook = self.blocks[layer - 1].register_forward_hook(
                    lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            out = self.inner.get_image_features(**kwargs, return_dict=True)
        finally:
            if hook is not None:
                hook.remove()
        rows = captured[0] if self.blocks is not None else out.pooler_output
        positions = inputs.get("image_position_ids") if self.blocks is not None else None
        real = None if positions is None else (positions.to(self.device) >= 0).all(-1)  # Gemma 4 pads patches
        # Batches are cut only where each image's rows are known to be its own at its own size: Qwen-VL-style patch
        # grids, or fixed-size images one row each. Processors that resize or pad per batch (``image_sizes``:
        # Mistral 3, LLaVA-OneVision's AnyRes) and tiling ones encode one image per call (a test checks batched = alone).
        count, grid = len(images), inputs.get("image_grid_thw")
        if count == 1:
            parts = [torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])] if isinstance(rows, (list, tuple)) else [rows]
            real = None if real is None else real.reshape(1, -1)
        elif grid is not None and isinstance(rows, (list, tuple)):  # one entry per image
            parts = list(rows)
        elif grid is not None and rows.dim() == 2 and rows.shape[0] == int(grid.prod(-1).sum()):
            parts = list(rows.split(grid.prod(-1).tolist()))  # the ViT's patches of all images, image after image
        elif "image_sizes" not in inputs and torch.is_tensor(rows) and rows.dim() == 3 and rows.shape[0] == count:
            parts = list(rows)  # (images, patches, d)
        else:
            return None
        if len(parts) != count:
            return None
        parts = [part.reshape(-1, part.shape[-1]) for part in parts]
        if real is not None:
            parts = [part[mask.reshape(-1)] for part, mask in zip(parts, real)]
        return parts

    def __call__(self, images: Sequence[Image.Image]) -> list[float]:
        feats, mask = self.features(images)
        return spectral_entropy(feats.float(), mask).tolist()
