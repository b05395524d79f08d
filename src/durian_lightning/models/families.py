"""The VLM families the conformance suite (tests/test_families.py) runs, and which fast paths it shows exact for each.

A fast path is on only for a family listed here with it verified: every other model, a family the suite does not
cover included, takes the plain path (each pass encodes its images, each row runs its whole prompt), with an info
line saying so. Adding a family: a tiny builder in :mod:`.tiny_families`, a row here, and the suite passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from durian_lightning.models.parts import transformers_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """``reuse_image_features``: images encoded once per step (:mod:`durian_lightning.stages.image_features`);
    ``share_prompt_prefill``: a prompt's prefill run once for its rows (:mod:`durian_lightning.stages.shared_prefill`);
    ``share_generate_prefill``: ``generate`` prefills each prompt once for its rows (the same module);
    ``static_cache``: ``rollout.cache_implementation: static`` decodes exactly as the dynamic cache does;
    ``vllm``: ``rollout.engine: vllm`` samples with log-probs within 1e-4 of the training forward (float32, on the
    CPU: tests/test_vllm_engine.py); ``vllm_limits`` says why a family is not."""

    model_type: str  # transformers' config.model_type
    name: str  # as people call it
    reuse_image_features: bool = False
    share_prompt_prefill: bool = False
    limits: str = ""
    static_cache: bool = True  # every family so far (the suite checks each one)
    share_generate_prefill: bool = True  # likewise
    vllm: bool = False
    vllm_limits: str = "not run under vLLM yet"


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llava", "LLaVA", True, True, vllm=True, vllm_limits=""),
    Family("qwen2_vl", "Qwen2-VL", True, True, vllm=True, vllm_limits=""),
    Family("qwen2_5_vl", "Qwen2.5-VL", True, True, vllm=True, vllm_limits=""),
    Family("qwen3_vl", "Qwen3-VL", True, True, vllm=True, vllm_limits=""),
    Family("qwen3_vl_moe", "Qwen3-VL-MoE", True, True),
    Family("qwen3_5", "Qwen3.5", True, False,
           "shared prefill off: the linear-attention layers' recurrent state cannot be gathered to rows"),
    Family("gemma3", "Gemma 3", True, True, vllm_limits="vLLM's CPU attention lacks its bidirectional attention among "
           "image tokens: on the CPU its log-probs differ by 4e-2 (the GPU backend has it; not run here)"),
    Family("gemma4", "Gemma 4", True, False,
           "shared prefill off: it changes the log-probs (the completion pass lacks the image-token attention layout)"),
    Family("internvl", "InternVL 3", True, True),
    Family("llava_onevision", "LLaVA-OneVision", False, True,
           "image-feature reuse off: a prompt with several images encodes each without AnyRes tiles, alone with them"),
    Family("idefics3", "Idefics3 / SmolVLM", True, True),
    Family("glm4v", "GLM-4.1V", True, True),
    Family("mistral3", "Mistral 3", False, True,
           "image-feature reuse off: the processor resizes images differently from its image processor called alone"),
)}


def model_type(model) -> str | None:
    """``config.model_type`` of a transformers model, under a peft wrapper too."""
    base = transformers_model(model)
    return getattr(getattr(base, "config", None), "model_type", None)


def fast_path_verified(model, path: str) -> bool:
    """Whether the suite showed ``path`` (a :class:`Family` field) exact for this model's family."""
    family = FAMILIES.get(model_type(model))
    return bool(family is not None and getattr(family, path))


def explain_fast_path_off(model, path: str) -> None:
    """The info line for a fast path left off because the model's family is not verified for it."""
    kind = model_type(model)
    why = "a family the conformance suite does not cover" if kind not in FAMILIES else "not verified exact for it"
    log.info("%s is off for model type %r (%s): the plain path runs", path, kind, why)
