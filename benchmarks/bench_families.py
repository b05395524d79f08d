"""Seconds per training step of the offline default's shape on other families' tiny models, fast paths on and off.

    python benchmarks/bench_families.py [qwen3_vl gemma3 internvl] [--steps 8] [--repeats 2] [--json out.json]

For each family, `durian fit` runs configs/default.yaml with `--model.model_name_or_path tiny:<family>` for --steps
updates (no validation), once with the fast paths the support matrix turns on (image-feature reuse, shared prefill)
and once with both off, in turns (on off on off ...) so that machine noise falls on both. It reports the median wall
time of steps 3.. per run, the median over runs and their ratio. That the fast paths give the plain path's log-probs
and gradients is tests/test_families.py's job (a random tiny model earns no reward here, so its loss says nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SIDES = {"fast paths on": [], "fast paths off": ["--model.rollout.reuse_image_features", "false",
                                                  "--model.rollout.share_prompt_prefill", "false"]}


def _child(out: str, root: str, steps: int, family: str, extra: list[str]) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from durian_lightning.cli import run_cli

    run_cli(["fit", "--model.model_name_or_path", f"tiny:{family}", "--trainer.max_steps", str(steps),
             "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
             "--trainer.default_root_dir", root, "--data.progress", "false",
             "--trainer.callbacks+=bench_step_time.StepTimer", f"--trainer.callbacks.out={out}", *extra])


def _run(family: str, side: str, steps: int, tmp: Path, tag: str) -> float:
    out, root = tmp / f"{tag}.json", tmp / tag
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DURIAN_CACHE": str(tmp / "cache"),
           "PYTHONPATH": str(Path(__file__).parent)}
    subprocess.run([sys.executable, __file__, "--child", str(out), str(root), family, str(steps), *SIDES[side]],
                   cwd=Path(__file__).parents[1], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return statistics.median(json.loads(out.read_text())[2:])  # steps 1-2 warm up


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # one run: out, root, family, steps, then the side's options
        out, root, family, steps, *extra = sys.argv[2:]
        return _child(out, root, int(steps), family, extra)
    parser = argparse.ArgumentParser()
    parser.add_argument("families", nargs="*", default=["qwen3_vl", "gemma3", "internvl"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            medians = {side: [] for side in SIDES}
            for repeat in range(args.repeats):
                for side in SIDES:
                    tag = f"{family}-{repeat}-{side.split()[-1]}"
                    medians[side].append(round(_run(family, side, args.steps, Path(tmp), tag), 4))
            on, off = (statistics.median(medians[side]) for side in SIDES)
            results[family] = {**{f"{side} s/step per run": medians[side] for side in SIDES},
                               "on / off": round(on / off, 3)}
            print(family, json.dumps(results[family]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
