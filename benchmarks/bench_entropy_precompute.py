"""Visual-entropy precompute throughput, cold vs. warm cache, and time to the first batch of a second run.

    python benchmarks/bench_entropy_precompute.py [--repeats 3]

Uses the bundled synthetic data (600 images, 64x64) and the tiny LLaVA-style encoder (spectral method), plus the
pixel method for comparison. Each repeat uses a fresh cache folder for the cold run, then a new DataModule on the
same folder for the warm run (the encoder is not called: checked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from durian_lightning.data import MultimodalReasoningDataModule  # noqa: E402
from durian_lightning.models import tiny_llava_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run(method: str, model: str | None, cache: str) -> tuple[float, float, int, int]:
    kwargs = dict(entropy_method=method, model_name_or_path=model, cache_dir=cache, progress=False, entropy_batch_size=64)
    start = time.perf_counter()
    cold = MultimodalReasoningDataModule(str(REPO / "data" / "synthetic"), **kwargs)
    cold.setup()
    t_cold = time.perf_counter() - start
    images = cold.images_scored
    start = time.perf_counter()
    warm = MultimodalReasoningDataModule(str(REPO / "data" / "synthetic"), **kwargs)
    warm.setup()
    next(iter(warm.train_dataloader()))
    t_warm_first_batch = time.perf_counter() - start
    assert warm.scorer_loads == 0, "warm run loaded the encoder"
    return t_cold, t_warm_first_batch, images, warm.encoder_calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_llava_path(Path(tmp) / "tiny"))
        results = {}
        for method in ("spectral", "pixel"):
            cold, warm = [], []
            for r in range(args.repeats):
                t_cold, t_warm, images, _ = run(method, model, f"{tmp}/cache-{method}-{r}")
                cold.append(t_cold)
                warm.append(t_warm)
            results[method] = {
                "images": images,
                "cold_setup_s": statistics.median(cold),
                "cold_images_per_s": images / statistics.median(cold),
                "warm_setup_to_first_batch_s": statistics.median(warm),
                "cold_over_warm": statistics.median(cold) / statistics.median(warm),
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
