"""The learning experiment: every advantage estimator on the bundled synthetic task, several seeds, same compute.

    .venv/bin/python benchmarks/learning_experiment.py                 # the paper's 8 configs x seeds 0 1 2, then the report
    .venv/bin/python benchmarks/learning_experiment.py --report-only   # redraw the report from finished runs
    python benchmarks/learning_experiment.py --accelerator gpu --workers 16   # on one GPU, 16 runs side by side

Each (config, seed) is one `durian fit` on the offline default (configs/default.yaml) with a setup's overrides, then
a test evaluation (greedy, and mean@8 / pass@8 of 8 samples per prompt), in its own process with one torch thread.
Setups (``--setup``):

- ``pretrained`` (default): the shipped pretrained and instruction-tuned tiny VLM, rollout batches of 32 prompts
  with b = 8 reasoning groups (several prompts per confidence group, as in the paper's large batches), G = 8,
  lr 3e-4, 72 new tokens; ``--epochs`` (default 8: 104 updates).
- ``format``: the earlier model the first recorded results used (tiny LLaVA-style VLM with a random vision tower
  and the format warm-start, 8 prompts per step, b = 4, lr 1e-3, 24 new tokens; ``--epochs 6``: 300 steps), so
  that table stays reproducible.

Every run sees the same prompts in the same number of rollouts, so compute is equal; with DAPO's dynamic sampling
fewer of those rollouts turn into updates. A finished run leaves ``runs/<config>-seed<k>.json``; rerunning skips
it, so an interrupted experiment resumes. The report (``summary.json``, ``learning_curves.png``, the markdown tables
printed at the end) reads only those files.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUPS: dict[str, list[str]] = {
    "pretrained": ["--data.batch_size", "32", "--model.advantages.num_reasoning_groups", "8"],
    # the model and settings the first recorded results used
    "format": ["--model.model_name_or_path", "tiny:llava-format", "--model.optimization.learning_rate", "0.001",
               "--model.rollout.max_new_tokens", "24"],
    # the offline default (configs/default.yaml: batch 8, 4 epochs), to compare candidate defaults over seeds
    "default": [],
}
EPOCHS = {"pretrained": 8, "format": 6, "default": 4}
TEST_SAMPLES = 8  # mean@8 / pass@8 on the test split
GRPO_LOSS = ["--model.loss.preset", "grpo", "--model.loss.kl_coef", "0.0"]  # the default config's loss (no KL, as on CPU)
DAPO_LOSS = ["--model.loss.preset", "dapo", "--model.optimization.dynamic_sampling", "true"]
CONFIGS: dict[str, list[str]] = {
    "grpo": ["--model.advantages.estimator", "grpo", *GRPO_LOSS],
    "dr_grpo": ["--model.advantages.estimator", "dr_grpo", *GRPO_LOSS],
    "batch_std": ["--model.advantages.estimator", "batch", *GRPO_LOSS],
    # Durian's variants keep alpha_ori = 0.1 and give the rest to one or both difficulty axes
    "durian_perceptual": ["--model.advantages.estimator", "durian", "--model.advantages.alphas", "[0.1, 0.9, 0.0]", *GRPO_LOSS],
    "durian_reasoning": ["--model.advantages.estimator", "durian", "--model.advantages.alphas", "[0.1, 0.0, 0.9]", *GRPO_LOSS],
    "durian": ["--model.advantages.estimator", "durian", "--model.advantages.alphas", "[0.1, 0.2, 0.7]", *GRPO_LOSS],
    "dapo": ["--model.advantages.estimator", "grpo", *DAPO_LOSS],
    "durian_dapo": ["--model.advantages.estimator", "durian", "--model.advantages.alphas", "[0.1, 0.2, 0.7]", *DAPO_LOSS],
}
PAPER_CONFIGS = list(CONFIGS)  # the paper's comparison, what a sweep runs unless told otherwise
# candidate changes to the default run (Durian as configs/default.yaml, one change each)
DURIAN = CONFIGS["durian"]
CONFIGS |= {
    "durian_kl": [*DURIAN, "--model.loss.kl_coef", "0.05"],  # k3 KL to the start model against the drift to one answer
    "durian_fast": [*DURIAN, "--model.optimization.learning_rate", "0.0006"],
    "durian_fast_kl": [*DURIAN, "--model.optimization.learning_rate", "0.0006", "--model.loss.kl_coef", "0.05"],
    # 16 rollouts of 4 prompts per update instead of 8 of 8, as many updates (so as many rollouts) as the default:
    # more chances to sample a rare right answer, and with it a non-zero advantage
    "durian_g16": [*DURIAN, "--model.rollout.num_generations", "16", "--data.batch_size", "4", "--trainer.max_steps", "200"],
    # sampling at temperature 1.2 (the log-probs use it too): wider exploration for answers the policy rarely gives
    "durian_hot": [*DURIAN, "--model.rollout.temperature", "1.2"],
    # twice the prompts per update (run with --epochs 6: 150 updates, 1.5x the default's rollouts), the compute the
    # default's 10-minute budget affords since the policy pass shares each prompt's prefill
    "durian_b16": [*DURIAN, "--data.batch_size", "16"],
}
# the other estimators of the field, each alone and under Durian's groups; Durian under the other losses of the field
CONFIGS |= {
    **{name: ["--model.advantages.estimator", name, *GRPO_LOSS]
       for name in ("rloo", "reinforce_pp", "reinforce_pp_baseline")},
    **{f"durian_{name}": ["--model.advantages.estimator", f"durian_{name}", "--model.advantages.alphas",
                          "[0.1, 0.2, 0.7]", *GRPO_LOSS] for name in ("rloo", "reinforce_pp", "reinforce_pp_baseline")},
    **{f"durian_{loss}": [*DURIAN[:4], "--model.loss.preset", loss] for loss in ("gspo", "cispo", "sapo")},
}


# ------------------------------------------------------------------------------------------------ one run


def run_one(name: str, seed: int, epochs: int, out: Path, setup: str = "pretrained", accelerator: str = "cpu") -> dict:
    """Train one config with one seed, evaluate on the test split, and summarise the run's metrics."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dataclasses import replace

    import torch

    from durian_lightning.callbacks import error_by_difficulty
    from durian_lightning.cli import run_cli
    from durian_lightning.core.difficulty import perceptual_groups

    run_dir = out / "logs" / f"{name}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted attempt's metrics must not mix into this one
    start = time.perf_counter()
    cli = run_cli([
        "fit", *SETUPS[setup], *CONFIGS[name], "--seed_everything", str(seed), "--trainer.max_epochs", str(epochs),
        "--trainer.accelerator", accelerator, "--validate_before_fit", "false",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run_dir),
        "--trainer.logger.name", "", "--trainer.logger.version", "", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_model_summary", "false",
        "--data.source", str(REPO / "data" / "synthetic"), "--data.progress", "false",
    ])
    fit_seconds = time.perf_counter() - start
    cli.model.evaluation = replace(cli.model.evaluation, samples=TEST_SAMPLES)
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    thresholds = cli.datamodule.entropy_thresholds(cli.model.advantages.percentiles)
    records = cli.model.eval_records
    question_type = _question_types(REPO / "data" / "synthetic" / "test.jsonl")

    def by_type(key: str) -> dict[str, float]:
        values: dict[str, list[float]] = {}
        for r in records:
            values.setdefault(question_type[r["id"]], []).append(r[key])
        return {k: sum(v) / len(v) for k, v in sorted(values.items())}

    groups = perceptual_groups(torch.tensor([r["visual_entropy"] for r in records]), cli.model.advantages.percentiles,
                               thresholds).tolist()
    mean_by_group = {k: [r["mean@k"] for r, g in zip(records, groups) if g == k] for k in range(3)}
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))

    def series(key: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]

    kept = series("train/dynamic_sampling_kept")  # with dynamic sampling: the informative share of EVERY batch
    all_equal = [(s, 1.0 - v) for s, v in kept] if kept else series("difficulty/all_equal_ratio")
    result = {
        "config": name, "seed": seed, "epochs": epochs, "fit_seconds": fit_seconds,
        "updates": len(series("train/loss")),
        "val_curve": series("val/accuracy"),
        "train_accuracy_curve": series("train/reward_accuracy"),
        "all_equal_curve": all_equal,
        # over the prompts that were updated on (with dynamic sampling: the informative ones only)
        "extreme_curve": series("difficulty/extreme_ratio"),
        "test_accuracy": test["test/accuracy"],
        "test_mean_at_8": test[f"test/mean@{TEST_SAMPLES}"],
        "test_pass_at_8": test[f"test/pass@{TEST_SAMPLES}"],
        "test_accuracy_by_perceptual_group": {k: test.get(f"test/accuracy_perceptual_{k}") for k in range(3)},
        "test_mean_at_8_by_perceptual_group": {k: sum(v) / len(v) for k, v in mean_by_group.items() if v},
        "test_accuracy_by_question_type": by_type("correct"),
        "test_mean_at_8_by_question_type": by_type("mean@k"),
        "test_error_by_difficulty": error_by_difficulty(records, thresholds),
    }
    result["final_val_accuracy"] = result["val_curve"][-1][1]
    prefix = "val/accuracy_question_type_"
    result["final_val_accuracy_by_question_type"] = {
        key.removeprefix(prefix): float(value) for row in rows for key, value in row.items()
        if key.startswith(prefix) and value not in (None, "")}  # the last validation's values win
    (out / "runs").mkdir(parents=True, exist_ok=True)
    path = out / "runs" / f"{name}-seed{seed}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # a run either finished or left nothing
    return result


def _question_types(jsonl: Path) -> dict[str, str]:
    with open(jsonl) as f:
        return {row["id"]: row["question_type"] for row in map(json.loads, f)}


# ------------------------------------------------------------------------------------------------ the sweep


def warm_up(setup: str, accelerator: str, out: Path) -> None:
    """Build the setup's model and fill the entropy cache once, before the runs start side by side."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from durian_lightning.cli import run_cli

    run_cli(["validate", *SETUPS[setup], "--trainer.accelerator", accelerator, "--trainer.limit_val_batches", "0",
             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--trainer.default_root_dir", str(out / "logs" / "warm-up"),
             "--data.source", str(REPO / "data" / "synthetic"), "--data.progress", "false"])


def sweep(configs: list[str], seeds: list[int], epochs: int, workers: int, out: Path, setup: str, accelerator: str) -> None:
    """Run every missing (config, seed) in ``workers`` processes of one torch thread each, showing progress."""
    warm_up(setup, accelerator, out)
    todo = [(c, s) for s in seeds for c in configs if not (out / "runs" / f"{c}-seed{s}.json").is_file()]
    total, done, running = len(todo), 0, []
    print(f"{total} runs to do ({len(configs) * len(seeds) - total} already finished) in {out}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    while todo or running:
        while todo and len(running) < workers:
            config, seed = todo.pop(0)
            log = open(out / "logs" / f"{config}-seed{seed}.log", "w")
            command = [sys.executable, __file__, "--one", config, "--seed", str(seed), "--epochs", str(epochs), "--out",
                       str(out), "--setup", setup, "--accelerator", accelerator]
            running.append((config, seed, subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in list(running):
            config, seed, process, log = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            done += 1
            status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode}, see logs/{config}-seed{seed}.log)"
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (total - done)
            print(f"[{done}/{total}] {config} seed {seed}: {status}  elapsed {elapsed / 60:.1f} min, eta {eta / 60:.1f} min", flush=True)


# ------------------------------------------------------------------------------------------------ the report


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _window_mean(curve: list[tuple[int, float]], first: int, last: int) -> float | None:
    values = [v for s, v in curve if first <= s < last]
    return sum(values) / len(values) if values else None


def report(configs: list[str], out: Path) -> dict:
    runs: dict[str, list[dict]] = {}
    for config in configs:
        for path in sorted((out / "runs").glob(f"{config}-seed*.json")):
            runs.setdefault(config, []).append(json.loads(path.read_text()))
    summary = {}
    for config, results in runs.items():
        steps = max(s for r in results for s, _ in r["train_accuracy_curve"]) + 1
        epoch = steps // results[0]["epochs"]
        row = {"seeds": [r["seed"] for r in results], "updates": _mean_std([r["updates"] for r in results])[0]}
        for key in ("final_val_accuracy", "test_accuracy", "test_mean_at_8", "test_pass_at_8", "fit_seconds"):
            if all(key in r for r in results):  # the format setup's recorded runs predate mean@8
                row[key] = _mean_std([r[key] for r in results])
        row["val_accuracy_after_epoch_1"] = _mean_std([r["val_curve"][0][1] for r in results])
        # the sampled policy's accuracy: less coarse than one greedy answer per question
        row["train_accuracy_first_epoch"] = _mean_std([_window_mean(r["train_accuracy_curve"], 0, epoch) for r in results])
        row["train_accuracy_last_epoch"] = _mean_std([_window_mean(r["train_accuracy_curve"], steps - epoch, steps) for r in results])
        for key, curve in (("all_equal", "all_equal_curve"), ("extreme", "extreme_curve")):
            for label, (a, b) in (("first_epoch", (0, epoch)), ("last_epoch", (steps - epoch, steps))):
                values = [v for r in results if (v := _window_mean(r[curve], a, b)) is not None]
                row[f"{key}_{label}"] = _mean_std(values) if values else None
        for key in ("test_error_by_difficulty", "test_accuracy_by_question_type", "test_mean_at_8_by_question_type",
                    "test_mean_at_8_by_perceptual_group", "final_val_accuracy_by_question_type"):
            if not all(key in r for r in results):
                continue
            names = sorted({k for r in results for k in r[key]})
            row[key] = {k: _mean_std([r[key][k] for r in results if k in r[key]]) for k in names}
        summary[config] = row
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    prior = answer_prior()
    (out / "answer_prior.json").write_text(json.dumps(prior, indent=1))
    _draw(runs, out / "learning_curves.png")
    text = _markdown(summary) + "\n\nAnswer prior (each question type's most frequent training answer, no image): " + "; ".join(
        f"{split} {accuracy['overall']:.3f} (" + ", ".join(f"{t} {a:.3f}" for t, a in accuracy.items() if t != "overall") + ")"
        for split, accuracy in prior.items())
    (out / "report.md").write_text(text + "\n")
    print(text)
    return summary


def answer_prior() -> dict[str, dict[str, float]]:
    """The baseline every accuracy above is read against, on the bundled validation and test splits."""
    from durian_lightning.stages.answer_prior import answer_prior_accuracy, most_frequent_answers

    def pairs(split: str) -> list[tuple[str, str]]:
        with open(REPO / "data" / "synthetic" / f"{split}.jsonl") as f:
            return [(row["question_type"], row["answer"]) for row in map(json.loads, f)]

    prior = most_frequent_answers(pairs("train"))
    return {split: answer_prior_accuracy(prior, pairs(split)) for split in ("val", "test")}


def _markdown(summary: dict) -> str:
    def ms(pair) -> str:
        return "n/a" if pair is None else f"{pair[0]:.3f} ± {pair[1]:.3f}"

    lines = ["| config | updates | val accuracy after epoch 1 | final val accuracy | test accuracy "
             "| sampled train accuracy (first → last epoch) | all-equal (first → last epoch) "
             "| 1-vs-(G-1) (first → last epoch) | fit time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for config, row in summary.items():
        lines.append(
            f"| {config} | {row['updates']:.0f} | {ms(row['val_accuracy_after_epoch_1'])} | {ms(row['final_val_accuracy'])} | "
            f"{ms(row['test_accuracy'])} | {ms(row['train_accuracy_first_epoch'])} → {ms(row['train_accuracy_last_epoch'])} | "
            f"{ms(row['all_equal_first_epoch'])} → {ms(row['all_equal_last_epoch'])} | "
            f"{ms(row['extreme_first_epoch'])} → {ms(row['extreme_last_epoch'])} | {row['fit_seconds'][0]:.0f} |"
        )
    entropy = sorted({k for row in summary.values() for k in row["test_error_by_difficulty"] if "entropy_group" in k})
    lines += ["", "Test error by perceptual group (entropy terciles 25/50/25 %, dataset thresholds), mean over seeds:", "",
              "| config | " + " | ".join(f"H group {k.rsplit('_', 1)[1]}" for k in entropy) + " | color | count | sum | total |",
              "|---|" + "---|" * (len(entropy) + 4)]
    for config, row in summary.items():
        errors = row["test_error_by_difficulty"]
        types = row["test_accuracy_by_question_type"]
        lines.append(f"| {config} | " + " | ".join(f"{errors[k][0]:.2f}" for k in entropy) + " | "
                     + " | ".join(f"{1 - types[t][0]:.2f}" if t in types else "n/a" for t in ("color", "count", "sum", "total")) + " |")
    if all("test_mean_at_8" in row for row in summary.values()):
        lines += ["", "Test mean@8 (8 samples per prompt at temperature 1) per question type and per perceptual group "
                  "(0 = simplest images), mean ± std over seeds:", "",
                  "| config | mean@8 | pass@8 | color | count | sum | total | H group 0 | H group 1 | H group 2 |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for config, row in summary.items():
            types, groups = row["test_mean_at_8_by_question_type"], row["test_mean_at_8_by_perceptual_group"]
            lines.append(f"| {config} | {ms(row['test_mean_at_8'])} | {ms(row['test_pass_at_8'])} | "
                         + " | ".join(ms(types.get(t)) for t in ("color", "count", "sum", "total")) + " | "
                         + " | ".join(ms(groups.get(str(k), groups.get(k))) for k in range(3)) + " |")
        lines += ["", _differences(summary)]
    return "\n".join(lines)


def _differences(summary: dict) -> str:
    """Each config against the baseline (GRPO, or the first config without it): the difference of seed means, and
    whether it exceeds the seed spread (the sum of the two standard deviations, a cautious reading for 3-5 seeds)."""
    baseline = "grpo" if "grpo" in summary else next(iter(summary))
    lines = [f"Against {baseline} (difference of means; 'yes' where it is larger than std({baseline}) + std(config)):", "",
             "| config | Δ greedy test accuracy | larger than the spread | Δ test mean@8 | larger than the spread |",
             "|---|---|---|---|---|"]
    base = summary[baseline]
    for config, row in summary.items():
        if config == baseline:
            continue
        cells = []
        for key in ("test_accuracy", "test_mean_at_8"):
            delta = row[key][0] - base[key][0]
            cells += [f"{delta:+.3f}", "yes" if abs(delta) > row[key][1] + base[key][1] else "no"]
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _draw(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for config, results in runs.items():
        style = "-" if "durian" in config else "--"
        steps = [s for s, _ in results[0]["val_curve"]]
        mean = [sum(r["val_curve"][i][1] for r in results) / len(results) for i in range(len(steps))]
        axes[0].plot(steps, mean, style, marker="o", label=config)
        axes[1].plot(*_smoothed_mean([r["train_accuracy_curve"] for r in results]), style, label=config)
        axes[2].plot(*_smoothed_mean([r["all_equal_curve"] for r in results]), style, label=config)
    axes[0].set(title="validation accuracy (greedy, mean over seeds)", xlabel="step")
    axes[1].set(title="train accuracy reward (sampled, 20-step mean)", xlabel="step")
    axes[2].set(title="share of prompts with all-equal rewards (20-step mean)", xlabel="step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _smoothed_mean(curves: list[list[tuple[int, float]]], window: int = 20) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for s, v in curve:
            by_step.setdefault(s, []).append(v)
    steps = sorted(by_step)
    means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    smooth = [sum(means[max(0, i - window + 1): i + 1]) / len(means[max(0, i - window + 1): i + 1]) for i in range(len(means))]
    return steps, smooth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                        help="default: the paper's 8 to run; every config with finished runs to report")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--setup", choices=list(SETUPS), default="pretrained")
    parser.add_argument("--epochs", type=int, help="default: 8 (pretrained), 6 (format), 4 (default)")
    parser.add_argument("--workers", type=int, default=2, help="runs side by side, one torch thread each")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or gpu: every run on the one visible GPU")
    parser.add_argument("--out", type=Path, help="default: results/learning-<setup> (results/learning for format)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)  # a single run (used by the sweep)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs = args.epochs or EPOCHS[args.setup]
    results = REPO / "benchmarks" / "results"
    out = args.out or (results / "learning" if args.setup == "format" else results / f"learning-{args.setup}")
    if args.one:
        run_one(args.one, args.seed, epochs, out, args.setup, args.accelerator)
        return
    if not args.report_only:
        sweep(args.configs or PAPER_CONFIGS, args.seeds, epochs, args.workers, out, args.setup, args.accelerator)
    report(args.configs or list(CONFIGS), out)


if __name__ == "__main__":
    main()
