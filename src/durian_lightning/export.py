"""A trained policy as a folder other tools load: the LoRA adapter (peft), or a merged model.

Evaluation and serving tools (lmms-eval, VLMEvalKit, vLLM) load a plain model folder, so ``durian export`` can fold
the adapter into the base weights (peft's ``merge_and_unload``) and save the result with the processor and its chat
template: ``AutoModelForImageTextToText.from_pretrained(folder)`` then loads it alone. The source is a training
checkpoint (its trainable weights on the base model its hyper-parameters name; a file, or the folder an ``fsdp2`` run
writes) or an adapter folder that a run wrote.

Everything is loaded and merged in float32, and a merged model is saved in float32: a LoRA delta folded into bf16
weights is rounded to bf16's 8 bits of mantissa, which on tiny LLaVA cost 2% of the delta at lora_B std 3e-3 and 17%
at 3e-4 (RL adapters trained at small learning rates are that small). Cast the folder down yourself where that
rounding is acceptable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from durian_lightning.models.loading import load_policy, resolve_model_path
from durian_lightning.settings import LoraSettings, as_settings

FORMATS = ("merged", "adapter")


def save_adapter(model, processor, folder: str | Path, facts: list[str]) -> None:
    """The LoRA adapter in peft format with the processor and a model card (what it was trained from and with:
    ``facts``, one line each); a local base model's path is written absolute, so the folder loads from anywhere."""
    config = model.peft_config["default"]
    if Path(config.base_model_name_or_path).exists():
        config.base_model_name_or_path = str(Path(config.base_model_name_or_path).resolve())
    base = config.base_model_name_or_path
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (Path(folder) / "README.md").write_text(adapter_card(base, facts, [line.format(base=base) for line in PEFT_LOADING]))


def save_run_adapter(trainer, model, processor, folder: str | None, facts: list[str]) -> None:
    """A LoRA run's adapter at the end of fit, to ``folder`` (default: the run's folder / adapter), its card naming the
    data and the full configuration beside ``facts``; every rank calls it (the run's folder is a collective), rank 0
    writes. Nothing for a full fine-tuning run."""
    if not hasattr(model, "get_base_model"):  # not a peft model
        return
    run_dir = trainer.log_dir or trainer.default_root_dir
    if not trainer.is_global_zero:
        return
    datamodule = getattr(trainer, "datamodule", None)
    source = getattr(datamodule, "hparams", {}).get("source", "unknown") if datamodule is not None else "unknown"
    config = Path(run_dir).resolve() / "config.yaml"
    save_adapter(model, processor, folder or str(Path(run_dir) / "adapter"), [
        f"data: `{source}`", *facts, f"the full configuration: `{config}` (rerun with `durian fit --config` on it)"])


def adapter_card(base: str, facts: list[str], loading: list[str]) -> str:
    """A model card: what the weights were trained from and with (``facts``, one line each) and how to load them."""
    return "\n".join(["# Trained with durian-lightning", "", f"- base model: `{base}` (the path or hub id it loads from)",
                      *(f"- {fact}" for fact in facts), "", "Load it:", "", "```python", *loading, "```", ""])


PEFT_LOADING = [
    "from peft import PeftModel",
    "from transformers import AutoModelForImageTextToText, AutoProcessor",
    "",
    'model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{base}"), "<this folder>")',
    'processor = AutoProcessor.from_pretrained("<this folder>")',
]
MERGED_LOADING = [
    "from transformers import AutoModelForImageTextToText, AutoProcessor",
    "",
    'model = AutoModelForImageTextToText.from_pretrained("<this folder>")',
    'processor = AutoProcessor.from_pretrained("<this folder>")',
]


def load_trained(source: str | Path):
    """``(model, processor, base)`` of a checkpoint file or an adapter folder; the model is peft-wrapped when it was
    trained with LoRA."""
    source = Path(source)
    if source.is_dir() and (source / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel
        from transformers import AutoModelForImageTextToText, AutoProcessor

        base = PeftConfig.from_pretrained(str(source)).base_model_name_or_path
        model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32),
                                          str(source))
        return model, AutoProcessor.from_pretrained(str(source)), base
    if is_sharded_checkpoint(source):
        checkpoint = read_sharded_checkpoint(source)
    elif not source.is_file():
        raise ValueError(f"durian export: {source} is neither a checkpoint (a file, or an fsdp2 run's folder) nor an "
                         "adapter folder (one holding adapter_config.json, such as lightning_logs/version_N/adapter)")
    else:
        checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(f"durian export: {source} is not a checkpoint of a durian-lightning run (no hyper_parameters "
                         "or state_dict)")
    hp = checkpoint["hyper_parameters"]
    lora = as_settings(hp.get("lora", LoraSettings()), LoraSettings)
    base = resolve_model_path(hp["model_name_or_path"])
    model, processor = load_policy(base, "float32", lora.enabled, lora.r, lora.alpha, 0.0, lora.target_modules)
    trained = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    missing = [name for name, p in model.named_parameters() if p.requires_grad and name not in trained]
    if missing:
        raise ValueError(f"durian export: {source} lacks {len(missing)} trained weight(s) of its own settings "
                         f"(first: {missing[0]}); it was written by another configuration")
    model.load_state_dict(trained, strict=False)
    return model, processor, base


def is_sharded_checkpoint(path: Path) -> bool:
    """A checkpoint folder of an ``fsdp2`` run: torch.distributed.checkpoint shards plus Lightning's ``meta.pt``."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def read_sharded_checkpoint(path: Path) -> dict:
    """An ``fsdp2`` run's checkpoint folder as one checkpoint dict, its ``state_dict`` whole, read in this process
    (no process group: every shard is read and joined)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    prefix = "state_dict."
    state = {key.removeprefix(prefix): torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    load({"state_dict": state}, storage_reader=reader, no_dist=True)
    checkpoint = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = state
    return checkpoint


def export(source: str | Path, out: str | Path, format: str = "merged") -> Path:
    """Write the policy trained in ``source`` to ``out`` as a merged model (default) or as its adapter."""
    if format not in FORMATS:
        raise ValueError(f"durian export: --format must be one of {', '.join(FORMATS)}, got {format!r}")
    model, processor, base = load_trained(source)
    lora = hasattr(model, "merge_and_unload")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    facts = [f"exported from `{Path(source).resolve()}`"]
    if format == "adapter":
        if not lora:
            raise ValueError(f"durian export: {source} was trained without LoRA (full fine-tuning): there is no "
                             "adapter; use --format merged")
        save_adapter(model, processor, out, facts)
        return out
    merged = model.merge_and_unload() if lora else model
    merged.save_pretrained(out)
    processor.save_pretrained(out)  # with the chat template
    facts.append("the LoRA adapter merged into the base weights" if lora else "every weight trained (no adapter)")
    (out / "README.md").write_text(adapter_card(base, facts, MERGED_LOADING))
    return out


def main(args: list[str]) -> None:
    """``durian export SOURCE --out FOLDER [--format merged|adapter]``."""
    parser = argparse.ArgumentParser(prog="durian export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a checkpoint (lightning_logs/version_N/checkpoints/*.ckpt: a file, or a folder "
                                       "under fsdp2) or an adapter folder (lightning_logs/version_N/adapter)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--format", choices=FORMATS, default="merged",
                        help="merged: one model folder that AutoModelForImageTextToText loads alone (default); "
                             "adapter: the peft adapter and the processor")
    parsed = parser.parse_args(args)
    print(export(parsed.source, parsed.out, parsed.format))
