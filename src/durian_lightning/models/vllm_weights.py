"""The policy's weights as a vLLM engine loads them: checkpoint names, whole tensors, the base apart from the adapter.

vLLM reads a checkpoint in the format transformers saves (``save_pretrained`` reverts transformers 5's renames and
leaves out tied weights), plus a few names its own loaders expect. Sharded (fsdp2) weights are gathered one tensor
at a time: every rank calls this in the same order, since each rank's engine needs all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from durian_lightning.models.families import model_type
from durian_lightning.models.parts import transformers_model

# (prefix, what vLLM expects instead): LLaVA checkpoints written by transformers 5 name the SigLIP / CLIP tower's
# weights ``vision_tower.X``; vLLM's LLaVA loads ``vision_tower.vision_model.X``
_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "llava": (("vision_tower.", "vision_tower.vision_model."),),
}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A full, plain CPU tensor (an fsdp2 DTensor is gathered from every rank)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True).contiguous()


def _is_adapter_key(key: str) -> bool:
    return ".lora_" in key or ".lora_magnitude_vector" in key


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every weight of the policy without its LoRA adapter, under the names of a saved checkpoint (vLLM's)."""
    base = transformers_model(model)
    lora = hasattr(model, "peft_config")
    named = {}
    for key, value in model.state_dict().items():
        if lora:
            if _is_adapter_key(key):
                continue
            key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
        named[key] = value
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    # tied weights share storage (a shard's, under fsdp2): found before the copies below
    kept = remove_tied_weights_from_state_dict({k: v.to_local() if hasattr(v, "to_local") else v
                                                for k, v in named.items()}, base)
    state = revert_weight_conversion(base, {key: _whole(named[key]) for key in kept})
    renames = _RENAMES.get(model_type(model), ())
    for old, new in renames:
        state = {(new + k[len(old):] if k.startswith(old) and not k.startswith(new) else k): v for k, v in state.items()}
    return state


def write_checkpoint(model, processor, folder: Path) -> None:
    """A folder vLLM starts from: the config, the processor (tokenizer, chat template) and :func:`base_weights`."""
    folder.mkdir(parents=True, exist_ok=True)
    transformers_model(model).config.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_weights(model, folder)


def write_weights(model, folder: Path) -> None:
    """:func:`base_weights` as ``model.safetensors`` in ``folder`` (replaced whole)."""
    weights = base_weights(model)
    save_file(weights, str(folder / "model.safetensors.tmp"), metadata={"format": "pt"})
    (folder / "model.safetensors.tmp").replace(folder / "model.safetensors")


def write_adapter(model, folder: Path) -> None:
    """The LoRA adapter in peft's format (``adapter_config.json`` and ``adapter_model.safetensors``), for
    ``LoRARequest``. Written here rather than with ``save_pretrained``, which writes on rank 0 only under
    torch.distributed: every rank's engine needs it."""
    from peft import get_peft_model_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"]) if isinstance(config["target_modules"], set) \
        else config["target_modules"]
    config["peft_type"] = str(getattr(config["peft_type"], "value", config["peft_type"]))
    config["task_type"] = str(getattr(config.get("task_type"), "value", config.get("task_type")))
    (folder / "adapter_config.json").write_text(json.dumps(config, default=str, indent=2))
    weights = {k: _whole(v) for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
