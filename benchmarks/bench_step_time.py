"""Seconds per training step of the offline default, for several checkouts side by side, and whether they train alike.

    git worktree add ../before <commit>
    python benchmarks/bench_step_time.py ../before . [--steps 30] [--repeats 2] [--json out.json]

Each checkout runs `durian fit` on its own configs/default.yaml for --steps updates (no validation), with this
checkout's virtual environment, in turns (A B A B ...) so that machine noise falls on both. It reports the median
wall time of steps 3.. per run and the median over runs, and compares the logged train/loss, train/reward and
difficulty/max_abs_advantage of every step between the first runs: a refactor should leave them identical.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

COMPARED = ("train/loss", "train/reward", "difficulty/max_abs_advantage")


class StepTimer(L.Callback):
    """Wall time of every training step, written as JSON at the end of fit."""

    def __init__(self, out: str):
        self.out, self.times, self.start = out, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.start)

    def on_train_end(self, trainer, pl_module):
        Path(self.out).write_text(json.dumps(self.times))


def _child(out: str, root: str, steps: int) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    from durian_lightning.cli import run_cli

    run_cli(["fit", "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", root,
             "--trainer.callbacks+=bench_step_time.StepTimer", f"--trainer.callbacks.out={out}"])


def _run(checkout: Path, steps: int, tmp: Path, tag: str) -> tuple[float, list[dict]]:
    out, root = tmp / f"{tag}.json", tmp / tag
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{Path(__file__).parent}:{checkout / 'src'}"}
    subprocess.run([sys.executable, __file__, "--child", str(out), str(root), "--steps", str(steps)], cwd=checkout,
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times = json.loads(out.read_text())[2:]  # steps 1-2 warm up
    (metrics,) = root.glob("lightning_logs/version_*/metrics.csv")
    rows = [{k: r[k] for k in COMPARED} for r in csv.DictReader(open(metrics)) if r.get("train/loss")]
    return statistics.median(times), rows


def _label(checkout: Path) -> str:
    """The checkout's commit, marked when it has uncommitted changes (no machine paths in results)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain", "--", "src") else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkouts", nargs="*", default=["."])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child, args.steps)
    checkouts = [Path(c).resolve() for c in args.checkouts]
    medians: dict[str, list[float]] = {str(c): [] for c in checkouts}
    first_rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for i, checkout in enumerate(checkouts):
                median, rows = _run(checkout, args.steps, Path(tmp), f"c{i}-r{repeat}")
                medians[str(checkout)].append(round(median, 4))
                first_rows.setdefault(str(checkout), rows)
    reference = first_rows[str(checkouts[0])]
    results = {
        _label(c): {"median_step_s_per_run": medians[str(c)], "median_of_medians_s": round(statistics.median(medians[str(c)]), 4),
                 "same_training_as_first": first_rows[str(c)] == reference}
        for c in checkouts
    }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
