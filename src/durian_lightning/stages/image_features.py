"""Each image of a step encoded once.

A training step runs the model over the same images many times: ``generate`` holds G copies of every prompt, and
the old-policy, reference and policy log-prob passes hold them again. When nothing on the image path trains (LoRA on
the language model, the default), the vision tower and projector give the same features every time, so
:class:`ImageFeatures` encodes each distinct image once and hands the model its features in place of the pixels
(transformers' ``mm_encoder_outputs``: the model skips its vision tower and scatters the given features into the
image-token positions, exactly as it would its own). For Qwen2.5-VL-7B that is the 675M-parameter vision tower over
up to thousands of patches per image, once instead of G x (passes + 1) times.

Features are computed in eval mode and without gradients; they are reused only when no module the image path runs
holds a trainable parameter (checked once, on the first image), so a trained vision tower or projector (LoRA on it,
or full fine-tuning) always re-encodes.
Transformers before 5.18 cannot take precomputed features: there every pass encodes its rows' images, as before.
Only for the families the conformance suite shows exact (:mod:`durian_lightning.models.families`): for the others an
image encoded alone is not what the forward makes of it inside a prompt (LLaVA-OneVision drops AnyRes tiles in
multi-image prompts; Mistral 3's processor resizes differently from its image processor).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from PIL import Image

from durian_lightning.models.families import explain_fast_path_off, fast_path_verified
from durian_lightning.models.parts import image_encoder_inputs, inner_model

log = logging.getLogger(__name__)


def accepts_precomputed_features(model) -> bool:
    """Whether this transformers model takes ``mm_encoder_outputs`` (transformers 5.18 and later)."""
    inner = inner_model(model)
    return hasattr(inner, "get_image_features") and "mm_encoder_outputs" in inspect.signature(inner.forward).parameters


class ImageFeatures:
    """The features of the images of one step, each encoded once; :meth:`clear` between steps.

    Keyed by image object: the G rows of a prompt share its ``PIL.Image`` objects (``generate_rollouts`` repeats
    references, not copies), so a row finds its prompt's features whatever batch or chunk it lands in. The images are
    held with their features, so a key is never reused by another object while cached.
    """

    def __init__(self, model, processor, enabled: bool = True):
        self.model, self.processor = model, processor
        verified = fast_path_verified(model, "reuse_image_features")
        self.enabled = enabled and verified and accepts_precomputed_features(model)
        self._encoder_is_frozen: bool | None = None  # decided on the first image
        self._cache: dict[int, tuple[Image.Image, ImageOutput]] = {}
        if enabled and not verified:
            explain_fast_path_off(model, "rollout.reuse_image_features")
        elif enabled and not self.enabled:
            log.info("this transformers version cannot take precomputed image features (5.18 and later can): every "
                     "pass encodes its rows' images")

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    def reusable(self, images: Sequence[Image.Image]) -> bool:
        """Features can stand in for pixels: supported, and nothing on the image path trains."""
        if not self.enabled or not images:
            return False
        if self._encoder_is_frozen is None:
            self._encoder_is_frozen = not self._image_path_trains(images[0])
            log.info("image features: %s", "each image encoded once per step (the image path is frozen)"
                     if self._encoder_is_frozen else "encoded in every pass (the vision tower or projector trains)")
        return self._encoder_is_frozen

    def model_inputs(self, encoded, rows_images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """The processor's ``encoded`` rows as model keyword arguments: with the cached features of their images in
        place of ``pixel_values`` when they can be reused, else unchanged. The token ids, attention mask and image
        grids stay (positions, e.g. Qwen-VL's M-RoPE, are computed from them)."""
        flat = [image for row in rows_images for image in row]
        inputs = dict(encoded)
        if "pixel_values" not in inputs or not self.reusable(flat):
            return inputs
        self._add(flat)
        device = inputs["pixel_values"].device
        for key in PIXEL_ONLY_INPUTS:
            inputs.pop(key, None)
        inputs["mm_encoder_outputs"] = {"image": combine([self._cache[id(image)][1] for image in flat], device)}
        return inputs

    def _image_path_trains(self, image: Image.Image) -> bool:
        """Whether a module the encoder runs holds a trainable parameter. Read from the modules, not from the output's
        ``requires_grad``, which is False under ``no_grad`` / ``inference_mode`` (validation) whatever trains."""
        ran: list[torch.nn.Module] = []
        handles = [m.register_forward_pre_hook(lambda module, args: ran.append(module)) for m in self.model.modules()]
        try:
            with torch.no_grad():
                self._encode([image])
        finally:
            for handle in handles:
                handle.remove()
        return any(p.requires_grad for module in ran for p in module.parameters(recurse=False))

    def _add(self, images: Iterable[Image.Image]) -> None:
        missing = list({id(image): image for image in images if id(image) not in self._cache}.values())
        if missing:
            with torch.no_grad():
                for image, features in zip(missing, self._encode(missing)):
                    self._cache[id(image)] = (image, features)

    def _encode(self, images: Sequence[Image.Image]) -> list[ImageOutput]:
        """Each image's encoder output, as the model's forward computes it from pixels: one batched call, split per
        image where the output says which part is whose, else one call per image (tiling processors)."""
        pieces = split_per_image(self._encoder_output(images), len(images))
        if pieces is None:
            pieces = [split_per_image(self._encoder_output([image]), 1) for image in images]
            if any(piece is None for piece in pieces):
                raise TypeError(f"{type(inner_model(self.model)).__name__}'s image features have a layout this reuse "
                                "cannot cut per image; run with rollout.reuse_image_features false")
            pieces = [piece[0] for piece in pieces]
        return pieces

    def _encoder_output(self, images: Sequence[Image.Image]):
        inner = inner_model(self.model)
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")
        kwargs = image_encoder_inputs(inner, pixels, next(self.model.parameters()).device)
        was_training = self.model.training
        self.model.eval()
        try:
            return inner.get_image_features(**kwargs, return_dict=True)
        finally:
            self.model.train(was_training)


# What the processor gives only for the vision encoder: dropped when features stand in for the pixels.
PIXEL_ONLY_INPUTS = ("pixel_values", "pixel_attention_mask", "image_position_ids")


@dataclass(frozen=True)
class ImageOutput:
    """One image's share of an encoder output: its ``pooler_output`` rows and its tensor of every per-layer list
    (Qwen3-VL's DeepStack features), and whether the model takes the pooled features as a list or one tensor."""

    output_type: type
    pooled: torch.Tensor
    as_list: bool
    layers: dict[str, list[torch.Tensor]]


def split_per_image(output, count: int) -> list[ImageOutput] | None:
    """``output`` of ``get_image_features`` over ``count`` images, cut into each image's part; ``None`` when its
    layout does not say which rows are whose (a tiling processor's crops: several rows per image)."""
    pooled = output.pooler_output
    as_list = isinstance(pooled, (list, tuple))
    if count == 1:  # all of it is the one image's, tiles included
        parts = [torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])] if as_list else [pooled]
    elif len(pooled) == count:
        parts = list(pooled) if as_list else list(pooled.split(1))
    else:
        return None
    layers: dict[str, list[list[torch.Tensor]]] = {}
    for name, value in output.items():
        if name in ("pooler_output", "last_hidden_state", "hidden_states", "attentions") or value is None:
            continue
        per_layer = []
        for layer in value if isinstance(value, (list, tuple)) else [None]:
            if isinstance(layer, (list, tuple)) and len(layer) == count:  # already one tensor per image
                per_layer.append(list(layer) if count > 1 else [torch.cat(list(layer))])
            else:
                return None  # a field we cannot cut per image: encode per image
        layers[name] = per_layer
    return [ImageOutput(type(output), part, as_list, {name: [layer[i] for layer in per] for name, per in layers.items()})
            for i, part in enumerate(parts)]


def combine(pieces: Sequence[ImageOutput], device) -> Any:
    """The encoder output the forward would have computed for these images, in this order."""
    first = pieces[0]
    pooled = [p.pooled.to(device) for p in pieces]
    # per-layer lists go back in the layout the model gives them: one tensor per image (Qwen3-VL's DeepStack)
    fields = {name: [tuple(p.layers[name][k].to(device) for p in pieces) for k in range(len(layer))]
              for name, layer in first.layers.items()}
    return first.output_type(pooler_output=tuple(pooled) if first.as_list else torch.cat(pooled), **fields)
