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
    """Spectral entropy (docs/method.md) of the patch features of a VLM's vision encoder.

    Works with LLaVA-style models (a ``vision_tower`` + ``multi_modal_projector``) and Qwen-VL-style models (a
    ``visual`` ViT ending in a patch merger). ``feature_source="vision_tower"`` takes the encoder's hidden state number
    ``vision_layer`` before any projector / patch merger (0 = patch embeddings, i = output of block i, -1 = last
    block); ``"projector"`` takes the features after the projector / merger (what the language model sees; only
    ``vision_layer=-1`` for Qwen-VL). ``image_processor_kwargs`` go to the image processor (e.g. ``size`` or
    ``max_pixels``) and set the resolution. These, the encoder's config and a hash of its weights make up the
    fingerprint that keys the cache. Images with different patch counts are padded and masked.
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
        self.inner = getattr(model, "model", model)
        if getattr(self.inner, "vision_tower", None) is not None:
            self.kind, encoder = "llava", self.inner.vision_tower
        elif getattr(self.inner, "visual", None) is not None:
            self.kind, encoder = "qwen", self.inner.visual
            if feature_source == "projector" and vision_layer != -1:
                raise ValueError("Qwen-VL projector (patch merger) features exist only for vision_layer=-1")
        else:
            raise ValueError(
                f"{type(model).__name__} has neither a vision_tower (LLaVA-style) nor a visual encoder (Qwen-VL-style); "
                "use entropy_method='pixel' for it"
            )
        self.model = model.to(device=device, dtype=dtype).eval()
        self.encoder = encoder
        self.image_processor = processor.image_processor
        self.vision_layer = vision_layer
        self.feature_source = feature_source
        self.image_processor_kwargs = dict(image_processor_kwargs or {})
        self.device, self.dtype = torch.device(device), dtype
        self.calls = self.images_scored = 0  # encoder batches and images, so tests can count cache misses
        identity = {
            "scorer": "spectral-entropy/v1",
            "config": model.config.to_dict() if hasattr(model.config, "to_dict") else str(model.config),
            "weights": weights_fingerprint(encoder if feature_source == "vision_tower" else model),
            "vision_layer": vision_layer,
            "feature_source": feature_source,
            "image_processor": self.image_processor.to_dict(),
            "image_processor_kwargs": self.image_processor_kwargs,
            "dtype": str(dtype),
        }
        self.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    @torch.no_grad()
    def features(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, P, d)`` patch features of a batch of images and their ``(B, P)`` mask of real patches."""
        inputs = self.image_processor(list(images), return_tensors="pt", **self.image_processor_kwargs)
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        if self.kind == "llava":
            if self.feature_source == "vision_tower":
                feats = self.encoder(pixels, output_hidden_states=True).hidden_states[self.vision_layer]
            else:
                out = self.inner.get_image_features(
                    pixel_values=pixels, vision_feature_layer=self.vision_layer, vision_feature_select_strategy="full"
                )
                feats = out.pooler_output if hasattr(out, "pooler_output") else out
                feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
                feats = feats.reshape(len(images), -1, feats.shape[-1])
            return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        return self._qwen_features(pixels, inputs["image_grid_thw"].to(self.device))

    def _qwen_features(self, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The ViT returns the patches of all images concatenated (each image's rows contiguous, in window order,
        # which the entropy does not depend on); the merger folds merge_size^2 neighbours into one token.
        counts = grid.prod(dim=-1)
        captured = {}
        hook = None
        depth = len(self.encoder.blocks)
        layer = self.vision_layer % (depth + 1)
        if self.feature_source == "vision_tower" and layer != depth:
            target = self.encoder.patch_embed if layer == 0 else self.encoder.blocks[layer - 1]
            hook = target.register_forward_hook(
                lambda module, args, output: captured.update(x=output[0] if isinstance(output, tuple) else output)
            )
        try:
            out = self.encoder(pixels, grid_thw=grid)
        finally:
            if hook is not None:
                hook.remove()
        if self.feature_source == "projector":
            rows = out.pooler_output
            counts = counts // (self.encoder.spatial_merge_size**2)
        else:
            rows = captured.get("x", out.last_hidden_state)
        rows = rows.reshape(int(counts.sum()), -1)
        per_image = torch.split(rows, counts.tolist())
        feats = torch.nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)
        mask = torch.arange(feats.shape[1], device=feats.device)[None, :] < counts[:, None]
        return feats, mask

    def __call__(self, images: Sequence[Image.Image]) -> list[float]:
        self.calls += 1
        self.images_scored += len(images)
        feats, mask = self.features(images)
        return spectral_entropy(feats.float(), mask).tolist()
