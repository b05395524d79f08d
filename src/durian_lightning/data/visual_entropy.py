"""Scorers that turn images into visual entropy: the paper's spectral entropy of the VLM's own patch features,
and a model-free pixel-histogram fallback. Each has a ``fingerprint`` naming everything that changes its numbers."""

from __future__ import annotations

import hashlib
import json
from typing import Literal, Sequence

import torch
from PIL import Image

from ..difficulty import pixel_entropy, spectral_entropy

FeatureSource = Literal["vision_tower", "projector"]


class PixelEntropyScorer:
    """Shannon entropy of the grayscale histogram. Fast and model-free; not the paper's metric."""

    def __init__(self) -> None:
        self.fingerprint = hashlib.sha256(b"pixel-histogram-entropy/v1").hexdigest()
        self.calls = self.images_scored = 0

    def __call__(self, images: Sequence[Image.Image]) -> list[float]:
        self.calls += 1
        self.images_scored += len(images)
        return [pixel_entropy(image) for image in images]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a module's parameters and buffers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SpectralEntropyScorer:
    """Spectral entropy (DESIGN.md section 1) of the patch features of a VLM's vision encoder.

    ``feature_source="vision_tower"`` takes the vision tower's hidden state number ``vision_layer`` (before any
    projector / patch merger; 0 = patch embeddings, -1 = output of the last layer); ``"projector"`` takes the features after the multi-modal projector
    (what the language model sees). ``image_processor_kwargs`` are passed to the image processor (e.g. ``size`` or
    ``max_pixels``), which sets the resolution. All of these, the encoder's config and a hash of its weights make up
    the fingerprint that keys the cache.
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
        inner = getattr(model, "model", model)
        self.vision_tower = getattr(inner, "vision_tower", None)
        if self.vision_tower is None:
            raise ValueError(
                f"{type(model).__name__} has no vision_tower; spectral entropy supports LLaVA-style models here "
                "(use entropy_method='pixel' for others)"
            )
        self.model = model.to(device=device, dtype=dtype).eval()
        self.image_processor = processor.image_processor
        self.vision_layer = vision_layer
        self.feature_source = feature_source
        self.image_processor_kwargs = dict(image_processor_kwargs or {})
        self.device, self.dtype = torch.device(device), dtype
        self.calls = self.images_scored = 0  # encoder batches and images, so tests can count cache misses
        encoder = self.vision_tower if feature_source == "vision_tower" else model
        identity = {
            "scorer": "spectral-entropy/v1",
            "config": model.config.to_dict() if hasattr(model.config, "to_dict") else str(model.config),
            "weights": weights_fingerprint(encoder),
            "vision_layer": vision_layer,
            "feature_source": feature_source,
            "image_processor": self.image_processor.to_dict(),
            "image_processor_kwargs": self.image_processor_kwargs,
            "dtype": str(dtype),
        }
        self.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(B, P, d)`` patch features of a batch of images."""
        pixels = self.image_processor(list(images), return_tensors="pt", **self.image_processor_kwargs)["pixel_values"]
        pixels = pixels.to(self.device, self.dtype)
        if self.feature_source == "vision_tower":
            out = self.vision_tower(pixels, output_hidden_states=True)
            return out.hidden_states[self.vision_layer]
        inner = getattr(self.model, "model", self.model)
        out = inner.get_image_features(pixel_values=pixels, vision_feature_layer=self.vision_layer, vision_feature_select_strategy="full")
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (list, tuple)):
            feats = torch.stack(list(feats))
        return feats.reshape(len(images), -1, feats.shape[-1])

    def __call__(self, images: Sequence[Image.Image]) -> list[float]:
        self.calls += 1
        self.images_scored += len(images)
        return spectral_entropy(self.features(images).float()).tolist()
