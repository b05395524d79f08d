"""Every tiny VLM by its ``tiny:`` name, built offline once into a folder that ``from_pretrained`` loads: LLaVA and
Qwen2.5-VL (:mod:`.tiny`), the other families (:mod:`.tiny_families`), and the format warm-started LLaVA."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from durian_lightning.models.tiny import build_tiny_llava, build_tiny_qwen2_5_vl
from durian_lightning.models.tiny_families import BUILDERS as FAMILIES
from durian_lightning.models.warmstart import format_warmstart


def build_tiny_llava_format(**kwargs):
    """The tiny LLaVA with the format warm-start (:mod:`.warmstart`): answers in format, at chance accuracy."""
    model, processor = build_tiny_llava(**kwargs)
    format_warmstart(model, processor)
    return model, processor


def builders() -> dict:
    """``tiny:<name>`` -> builder: the two above, the format warm-start, and every family of :mod:`.tiny_families`."""
    return {"llava": build_tiny_llava, "qwen2_5_vl": build_tiny_qwen2_5_vl, "llava-format": build_tiny_llava_format,
            **FAMILIES}


def tiny_vlm_path(root: str | os.PathLike, architecture: str = "llava", wait_seconds: float = 600, **kwargs) -> Path:
    """Build a tiny VLM into ``root`` once (atomically) and return the folder, loadable by ``from_pretrained``.

    Several processes may ask at once (the ranks of a run): each builds into a staging folder of its own, and the
    first complete one is moved into place. Under torch.distributed, transformers' ``save_pretrained`` writes the
    model on rank 0 only, so another rank's staging folder lacks the weights: that rank waits for rank 0's build
    instead of moving an incomplete folder into place."""
    known = builders()
    if architecture not in known:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {sorted(known)}")
    root = Path(root)
    if _complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    model, processor = known[architecture](**kwargs)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    if _complete(staging):
        try:
            staging.rename(root)
        except OSError:  # another process finished first; its build is identical
            pass
    shutil.rmtree(staging, ignore_errors=True)
    deadline = time.monotonic() + wait_seconds
    while not _complete(root):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{root}: the tiny {architecture} model is incomplete after {wait_seconds:.0f} s (no "
                               "config.json, processor or weights): under torch.distributed only rank 0 writes it; "
                               "delete the folder and run again")
        time.sleep(0.2)
    return root


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "processor_config.json", "model.safetensors"))


def tiny_llava_path(root: str | os.PathLike, **kwargs) -> Path:
    """:func:`tiny_vlm_path` for the LLaVA-style architecture."""
    return tiny_vlm_path(root, "llava", **kwargs)
