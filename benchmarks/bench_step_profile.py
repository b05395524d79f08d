"""Where a training step's time goes: generate, reward, old / reference log-probs, advantages, policy update.

    python benchmarks/bench_step_profile.py [--steps 30] [--json out.json]

Runs `durian fit` on the offline default (configs/default.yaml) for --steps updates, once with the grpo loss preset's
KL term (so the reference pass runs) and once without, and reports the median seconds per phase from the module's
perf/* metrics (they are logged every step by DurianGRPO) and each phase's share of the step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from durian_lightning.cli import run_cli  # noqa: E402

PHASES = ["generate", "reward", "old_logprobs", "ref_logprobs", "advantages", "policy_update"]


def profile(steps: int, kl_coef: float, root: str) -> dict:
    cli = run_cli(["fit", "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
                   "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", root,
                   "--model.loss.kl_coef", str(kl_coef)])
    rows = list(csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv")))
    medians = {}
    for phase in PHASES:
        values = [float(r[f"perf/{phase}_s"]) for r in rows[2:] if r.get(f"perf/{phase}_s")]  # skip warm-up steps
        if values:
            medians[phase] = statistics.median(values)
    total = sum(medians.values())
    return {phase: {"median_s": round(v, 4), "share": round(v / total, 3)} for phase, v in medians.items()} | {"step_s": round(total, 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {"with_kl": profile(args.steps, 0.01, f"{tmp}/kl"), "without_kl": profile(args.steps, 0.0, f"{tmp}/nokl")}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
