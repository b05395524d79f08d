"""Memory of the visual-entropy precompute (``datamodule.setup()``): its peak, and what it still holds afterwards.

    python benchmarks/bench_scorer_memory.py [--hidden 2048 --vision-hidden 1024 --layers 24] [--repeats 2]

A mid-size Qwen2.5-VL built from config (random weights; by default a 0.9B language model beside a 0.28B vision
tower, 24 blocks each), saved in bfloat16 as released checkpoints are, 8 images of 224 px. Settings, each in a fresh process, in turns, with glibc serving blocks
over 128 KB by mmap so the resident set follows live tensors:

- ``previous``: what ``setup()`` did before: the whole VLM loaded in float32 and kept for the run.
- ``cold float32`` / ``cold bfloat16``: ``setup()`` on an empty cache (the image path loaded in that dtype, freed).
- ``warm``: ``setup()`` on a complete cache (no model loaded).

Reported: the peak the precompute adds, what it still holds after it, and the bytes of the weights the scorer loaded
(what a GPU rank would hold: the scorer moves them to the device). On a GPU the same script measures CUDA
allocation (``_memory.PeakMemory``) instead of the resident set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETTINGS = ("previous", "cold float32", "cold bfloat16", "warm")


def _child(model: str, data: str, cache: str, setting: str) -> None:
    import torch
    from PIL import Image

    from _memory import PeakMemory, held_mb
    from durian_lightning.data import MultimodalReasoningDataModule, SpectralEntropyScorer
    from durian_lightning.data import datamodule as datamodule_module

    weights = []
    real = datamodule_module.load_image_encoder

    def recording(*args, **kwargs):
        model = real(*args, **kwargs)
        weights.append(sum(p.nbytes for p in model.parameters()))
        return model

    datamodule_module.load_image_encoder = recording

    dtype = setting.split()[-1] if setting.startswith("cold") else "float32"
    dm = MultimodalReasoningDataModule(data, model_name_or_path=model, cache_dir=cache, progress=False, dtype=dtype)
    kept = None
    gc.collect()
    baseline = held_mb()
    memory = PeakMemory(interval=0.002)
    memory.start()
    if setting == "previous":
        from transformers import AutoModelForImageTextToText

        device = "cuda" if torch.cuda.is_available() else "cpu"
        full = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32)
        weights.append(sum(p.nbytes for p in full.parameters()))
        kept = SpectralEntropyScorer(full, dm.processor(), device=device)
        kept([Image.open(p).convert("RGB") for p in sorted(Path(data).glob("*.png"))])
    else:
        dm.setup()
    peak = memory.stop()
    gc.collect()
    held = held_mb() - baseline
    print(json.dumps({"peak_added_mb": peak["added_mb"], "held_after_mb": held, "weights_loaded_mb": sum(weights) / 2**20,
                      "kept": kept is not None}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048, help="language model width")
    parser.add_argument("--vision-hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child)
    import torch

    from _memory import measuring_env
    from _mid_size import write_mid_size_qwen, write_noise_images

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = Path(tmp) / "model", Path(tmp) / "data"
        counts = write_mid_size_qwen(model_dir, args.hidden, args.vision_hidden, args.layers, torch.bfloat16)
        total, vision = counts["parameters"], counts["vision_parameters"]
        write_noise_images(data, args.images)
        env = measuring_env(Path(__file__).parent)

        def child(cache: str, setting: str) -> dict:
            out = subprocess.run([sys.executable, __file__, "--child", str(model_dir), str(data), cache, setting],
                                 env=env, check=True, capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        warm_cache = str(Path(tmp) / "warm-cache")
        child(warm_cache, "cold float32")  # fills the cache the warm runs read
        runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
        for repeat in range(args.repeats):
            for setting in SETTINGS:  # in turns, so machine noise falls on every setting
                cache = warm_cache if setting == "warm" else str(Path(tmp) / f"cache-{repeat}-{setting.replace(' ', '-')}")
                runs[setting].append(child(cache, setting))
    results = {"parameters": total, "vision_parameters": vision}
    for setting, measured in runs.items():
        results[setting] = {key: round(statistics.median(r[key] for r in measured), 1)
                            for key in ("peak_added_mb", "held_after_mb", "weights_loaded_mb")}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
