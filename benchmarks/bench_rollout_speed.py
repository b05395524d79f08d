"""Rollout speed: generated tokens per second of ``generate_rollouts``, each prompt prefilled per row or once.

    .venv/bin/python benchmarks/bench_rollout_speed.py [--shape small|realistic|both] [--calls 5] [--repeats 3]
                                                       [--json out.json]

One rollout batch as a training step makes it: 8 prompts x G = 8 rows in one ``generate`` call, temperature 1,
images encoded once (``ImageFeatures``), float32 on the CPU or one GPU. Shapes as ``bench_vs_trl.py``: ``small`` is
tiny:llava-format on the bundled 64 x 64 images with 24 new tokens, ``realistic`` a tiny Qwen2.5-VL on the bundled
scenes upscaled to 448 x 448 (256 image tokens, ~300 prompt tokens per row) with 128 new tokens. Paths:

* ``per-row``   every row runs its whole prompt (``rollout.share_prompt_prefill: false``), the dynamic KV cache
* ``shared``    each prompt's prefill runs once and its cache is gathered to its G rows (the default)
* ``static``    per-row prefill into transformers' static (preallocated) KV cache, ``rollout.cache_implementation:
                static`` (the cache CUDA graphs need; a shared prefill is not combined with it)

The paths alternate within each repeat and start from the same seed, so they sample the same tokens (they are exact:
tests/test_families.py) and time the same work. Reported: the median seconds per call over all timed calls of all
repeats, generated tokens (up to each row's EOS) per second, and each path's time relative to ``per-row``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import G, MAX_NEW_TOKENS, PROMPTS, prepare_shape  # noqa: E402  (same shapes as the TRL comparison)

PATHS = {"per-row": dict(share_prefill=False), "shared": dict(share_prefill=True),
         "static": dict(share_prefill=False, cache_implementation="static")}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(shape: str, calls: int, repeats: int, folder: Path) -> dict:
    import torch

    from durian_lightning.data import MultimodalReasoningDataModule
    from durian_lightning.models import load_policy, resolve_model_path
    from durian_lightning.stages.image_features import ImageFeatures
    from durian_lightning.stages.rollout import SamplingConfig, generate_rollouts

    model_name, source = prepare_shape(shape, folder)
    data = MultimodalReasoningDataModule(source=source, model_name_or_path=model_name, batch_size=PROMPTS,
                                         progress=False)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load_policy(resolve_model_path(model_name), use_lora=True)
    model.to(device)
    features = ImageFeatures(model, processor)
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    tokens: dict[str, list[int]] = {path: [] for path in PATHS}
    for repeat in range(repeats):
        for path, options in PATHS.items():
            sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS[shape], **options)
            for call in range(calls + 1):  # the first call of each path warms up (allocator, static cache)
                torch.manual_seed(1000 * repeat + call)
                features.clear()
                _synchronize()
                start = time.perf_counter()
                rollout = generate_rollouts(model, processor, batch["prompt"], batch["images"], G, sampling,
                                            image_features=features)
                _synchronize()
                if call:
                    seconds[path].append(time.perf_counter() - start)
                    tokens[path].append(int(rollout.completion_mask.sum()))
        line = ", ".join(f"{path} {statistics.median(seconds[path][-calls:]):.3f} s" for path in PATHS)
        print(f"{shape} repeat {repeat + 1}/{repeats}: {line}", file=sys.stderr, flush=True)
    report = {}
    for path in PATHS:
        median = statistics.median(seconds[path])
        report[path] = {"median_call_s": round(median, 4),
                        "tokens_per_s": round(statistics.median(t / s for t, s in zip(tokens[path], seconds[path])), 1),
                        "mean_generated_tokens": round(statistics.mean(tokens[path]), 1),
                        "time_vs_per_row": round(median / statistics.median(seconds["per-row"]), 3)}
    label = model_name if shape == "small" else "tiny Qwen2.5-VL, 448 px"  # (built in a temporary folder)
    report["settings"] = {"shape": shape, "model": label, "prompts": PROMPTS, "G": G,
                          "max_new_tokens": MAX_NEW_TOKENS[shape], "timed_calls_per_repeat": calls,
                          "repeats": repeats, "device": device, "threads": torch.get_num_threads()}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=[*MAX_NEW_TOKENS, "both"], default="both")
    parser.add_argument("--calls", type=int, default=5, help="timed generate calls per path and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, the paths alternating in each")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    shapes = list(MAX_NEW_TOKENS) if args.shape == "both" else [args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        results = {shape: measure(shape, args.calls, args.repeats, Path(tmp)) for shape in shapes}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
