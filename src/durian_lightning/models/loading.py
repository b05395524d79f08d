"""Loading a VLM and its processor (any AutoModelForImageTextToText), optionally LoRA-adapted with peft."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
PRETRAINED = "llava-pretrained"
# LoRA on the language model's attention only (a bare ".*q_proj" would adapt the vision tower too). The language model
# is `language_model` in most families, `text_model` in Idefics3 / SmolVLM; Qwen3.5's linear-attention layers project
# with in_proj_qkv / out_proj.
DEFAULT_LORA_TARGETS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|in_proj_qkv|out_proj)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str, cache_root: str | os.PathLike | None = None) -> str:
    """``tiny:<family>`` (``tiny:llava``, ``tiny:qwen3_vl``, ... every family of :mod:`.families`) and
    ``tiny:llava-format`` build (once) a tiny offline VLM and return its folder; ``tiny:llava-pretrained`` is the pretrained and instruction-tuned one shipped with the package
    (:mod:`.pretrain`); other names pass."""
    if not name_or_path.startswith(TINY_PREFIX):
        return name_or_path
    from durian_lightning.models.tiny_registry import tiny_vlm_path

    architecture = name_or_path[len(TINY_PREFIX) :]
    if architecture == PRETRAINED:
        from durian_lightning.models.pretrain import SHIPPED

        if not (SHIPPED / "model.safetensors").exists():
            raise FileNotFoundError(
                f"{name_or_path}: the shipped weights are missing from {SHIPPED}; rebuild them with "
                "`python -m durian_lightning.models.pretrain`"
            )
        return str(SHIPPED)
    root = Path(cache_root or os.environ.get("DURIAN_CACHE", ".cache/durian")) / "models" / f"tiny-{architecture}"
    return str(tiny_vlm_path(root, architecture))


def load_policy(
    name_or_path: str,
    dtype: str = "float32",
    use_lora: bool = True,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_target_modules: str = DEFAULT_LORA_TARGETS,
    gradient_checkpointing: bool = False,
):
    """``(model, processor)``; with LoRA only the adapter trains and ``model.disable_adapter()`` is the reference."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from durian_lightning.models.families import FAMILIES

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(name_or_path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype])
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        raise ValueError(
            f"{path}: model type {_model_type(path)!r} is not an image-text-to-text model (AutoModelForImageTextToText "
            f"cannot load it), so it cannot be trained on images here. Use a VLM checkpoint; the families tested end to "
            f"end are {', '.join(f.name for f in FAMILIES.values())}"
        ) from error
    processor = AutoProcessor.from_pretrained(path)
    kind = model.config.model_type
    if getattr(processor, "chat_template", None) is None:
        raise ValueError(f"{path} (model type {kind!r}) has no chat template: prompts cannot be rendered. Use the "
                         "instruction-tuned checkpoint, or save a chat_template.jinja beside the processor")
    if kind not in FAMILIES:
        log.warning("model type %r is not covered by the conformance suite (tests/test_families.py): it runs on the "
                    "plain paths, unverified; check its log-probs with that suite's checks before a long run", kind)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if use_lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=lora_target_modules)
        model = get_peft_model(model, config)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"lora_target_modules={lora_target_modules!r} matched no module of {path}")
        if gradient_checkpointing:
            model.enable_input_require_grads()
    train_mode_where_trained(model)
    return model, processor


def train_mode_where_trained(model) -> None:
    """Every module holding a trained weight in train mode; the others keep their mode (the frozen vision tower and
    projector of a LoRA run, and dropout modules, stay in eval mode). transformers checkpoints a layer's activations
    only in train mode, and ``from_pretrained`` returns eval mode (peft switches on its adapter modules only), so
    without this ``gradient_checkpointing`` did nothing: the decoder layers were in eval mode."""
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters()):
            module.training = True


TEXT_PARTS = ("language_model", "text_model", "lm_head")  # what the image path never runs, across the families


def load_image_encoder(name_or_path: str, dtype: torch.dtype = torch.float32):
    """The VLM with only its image path loaded (vision encoder, projector): what the visual-entropy scorer runs.

    The language model is built with no blocks, so its weights are never read (a 7B model's 15 GB stay on disk), and
    then its remains (embeddings, head) are dropped. A family whose config does not allow that (Gemma 4 sizes
    per-layer embeddings by the block count) is loaded whole and stripped the same way. tests/test_families.py shows
    for every family that the entropies equal the full model's."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(name_or_path)
    text = config.get_text_config()
    model = None
    if text is not config:
        text.num_hidden_layers = 0
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = []
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the block weights left unread are listed at length otherwise
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # the empty block list
                model = AutoModelForImageTextToText.from_pretrained(name_or_path, config=config, dtype=dtype)
        except (RuntimeError, ValueError) as error:
            log.debug("%s cannot be built without its language model (%s); loading it whole", name_or_path, error)
        finally:
            hf_logging.set_verbosity(verbosity)
    if model is None:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype)
    for owner in (model, getattr(model, "model", None)):
        for name in TEXT_PARTS:
            if isinstance(getattr(owner, name, None), torch.nn.Module):
                setattr(owner, name, torch.nn.Identity())
    return model.eval()


def _model_type(path: str) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).model_type
