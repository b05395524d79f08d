"""A mid-size Qwen2.5-VL built from config and a folder of noise images, as the memory benchmarks use them."""

from __future__ import annotations

import json
from pathlib import Path


def write_mid_size_qwen(folder: Path, hidden: int, vision_hidden: int, layers: int, dtype=None) -> dict[str, int]:
    """Save a Qwen2.5-VL of ``layers`` text and vision blocks (random weights, 224 px images) to ``folder``, in
    ``dtype`` when given; returns its parameter counts, in total and of the vision tower + merger."""
    from durian_lightning.models.tiny import build_tiny_qwen2_5_vl

    model, processor = build_tiny_qwen2_5_vl(vision_hidden=vision_hidden, text_hidden=hidden, num_layers=layers,
                                             max_pixels=224 * 224, text_heads=hidden // 128,
                                             vision_heads=vision_hidden // 64)
    counts = {"parameters": sum(p.numel() for p in model.parameters()),
              "vision_parameters": sum(p.numel() for p in model.model.visual.parameters())}
    (model.to(dtype) if dtype is not None else model).save_pretrained(folder)
    processor.save_pretrained(folder)
    return counts


def write_noise_images(folder: Path, count: int) -> None:
    """``count`` 224 px noise images, each a one-image row of ``train.jsonl``."""
    from PIL import Image

    folder.mkdir(parents=True)
    rows = []
    for i in range(count):
        Image.effect_noise((224, 224), 20 + 5 * i).convert("RGB").save(folder / f"{i}.png")
        rows.append(json.dumps({"images": [f"{i}.png"], "problem": "How many?", "answer": "1"}))
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
