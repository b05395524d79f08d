"""Time per optimizer step and peak memory: DurianGRPO against TRL's GRPOTrainer on the same tiny VLM and batch.

    .venv/bin/pip install -e ".[bench]"          # TRL is a benchmark-only extra
    .venv/bin/python benchmarks/bench_vs_trl.py [--shape small|realistic] [--steps 12] [--warmup 3] [--repeats 3]
                                                [--json out.json]

Both sides train the same model from the same weights (float32, CPU or one GPU), with the same LoRA (r 16, alpha 32,
the default config's target modules), 8 prompts x G = 8 rollouts per optimizer step in one micro-batch, temperature 1,
lr 1e-3, no KL term (so neither side runs a reference pass), the GRPO loss (clip 0.2, per-sequence token mean), one
pass over each rollout batch and the same reward function (0.1 format + 0.9 accuracy). Shapes:

* ``small``      tiny:llava-format on the bundled 64 x 64 images, 24 new tokens (16 image tokens: the vision tower
                 costs next to nothing)
* ``realistic``  a tiny Qwen2.5-VL (the test architecture) on the bundled scenes upscaled to 448 x 448 (1,024 patches,
                 256 image tokens per prompt), 128 new tokens

Sides:

* ``ours-grpo``   DurianGRPO with estimator=grpo (the same algorithm as TRL's)
* ``ours-durian`` DurianGRPO with estimator=durian (adds the confidence grouping; entropies come from the cache)
* ``ours-grpo-encode-every-pass``  ours-grpo with ``rollout.reuse_image_features: false``: the vision tower runs on
                  every row of every pass, as before images were encoded once per step (the before of that change)
* ``ours-grpo-prefill-per-row``  ours-grpo with ``rollout.share_prompt_prefill: false``: generate and the log-prob
                  passes run every row's prompt, as before a prompt's prefill was shared by its rollouts
* ``ours-grpo-generate-prefill-per-row``  ours-grpo with only ``generate`` prefilling every row (the log-prob passes
                  still share): the before of sharing generate's prefill, run by marking the family unverified for it
* ``trl-grpo``    trl.GRPOTrainer with scale_rewards="group", loss_type="grpo", beta=0

Every side runs in its own process (peak memory is per process), the sides alternate ``--repeats`` times, and the
report gives the median step time over all timed steps of all repeats, the median peak memory (and the part of it the
training steps add) and the ratios to TRL.
Step time is the wall time from the start of an optimizer step (batch in hand) to its end: generation, reward,
log-prob passes, advantages, backward and the AdamW step. Memory: see ``_Timer``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _memory import PeakMemory  # benchmarks/, the script's folder

REPO = Path(__file__).resolve().parents[1]
PROMPTS, G, LR = 8, 8, 1e-3
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
# ours-grpo with one speed-up switched off: the "before" of that change, measured in the same run
BEFORE = {"encode-every-pass": {"reuse_image_features": False}, "prefill-per-row": {"share_prompt_prefill": False},
          "generate-prefill-per-row": {}}
# ... or with a fast path marked unverified for every family (models/families.py) in that side's process
UNVERIFIED = {"generate-prefill-per-row": "share_generate_prefill"}
SIDES = ("ours-grpo", "ours-durian", *(f"ours-grpo-{name}" for name in BEFORE), "trl-grpo")
MAX_NEW_TOKENS = {"small": 24, "realistic": 128}
REALISTIC_IMAGE_SIZE = 448


def prepare_shape(shape: str, folder: Path) -> tuple[str, str]:
    """``(model, data source)`` of a shape; the realistic one is built into ``folder``: a tiny Qwen2.5-VL that keeps
    448 x 448 images whole, and the bundled training rows with their images upscaled to that size."""
    bundled = REPO / "data" / "synthetic"
    if shape == "small":
        return "tiny:llava-format", str(bundled)
    from PIL import Image

    from durian_lightning.models import tiny_vlm_path

    model = tiny_vlm_path(folder / "tiny-qwen2.5-vl-448", "qwen2_5_vl", max_pixels=REALISTIC_IMAGE_SIZE**2)
    source = folder / "scenes-448"
    (source / "images").mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (bundled / "train.jsonl").read_text().splitlines()]
    for row in rows:
        for name in row["images"]:
            image = Image.open(bundled / name).convert("RGB")
            image.resize((REALISTIC_IMAGE_SIZE,) * 2, Image.Resampling.BICUBIC).save(source / name)
    (source / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(model), str(source)


class _Timer:
    """Wall time of each optimizer step (CUDA synchronised), the mean completion length of each step's rollouts
    (the step's cost grows with it, and the two sides' policies drift apart as they train), and the memory the
    steps add (``_memory.PeakMemory`` from the first step on: imports, model and data are already loaded by then)."""

    def __init__(self):
        self.seconds: list[float] = []
        self.lengths: list[float] = []
        self._start = 0.0
        self.memory: PeakMemory | None = None

    def start(self) -> None:
        if self.memory is None:
            self.memory = PeakMemory(interval=0.005)
            self.memory.start()
        _synchronize()
        self._start = time.perf_counter()

    def stop(self) -> None:
        _synchronize()
        self.seconds.append(time.perf_counter() - self._start)

    def result(self) -> dict:
        memory = self.memory.stop()
        return {"step_seconds": self.seconds, "completion_lengths": self.lengths,
                "step_memory_mb": memory["added_mb"], "peak_memory_mb": memory["peak_mb"]}


def _data(model: str, source: str):
    """The shape's data with the default prompts, entropies from the policy's encoder (cached)."""
    from durian_lightning.data import MultimodalReasoningDataModule

    return MultimodalReasoningDataModule(source=source, model_name_or_path=model, batch_size=PROMPTS, progress=False)


def run_ours(estimator: str, rollout_options: dict, model: str, source: str, max_new_tokens: int, steps: int,
             root: str) -> dict:
    import lightning as L

    from durian_lightning import DurianGRPO

    timer = _Timer()

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            timer.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.stop()
            timer.lengths.append(float(trainer.callback_metrics["train/completion_length"]))

    from durian_lightning.settings import (
        AdvantageSettings,
        LoraSettings,
        LossSettings,
        OptimizationSettings,
        RolloutSettings,
    )

    module = DurianGRPO(
        model_name_or_path=model,
        lora=LoraSettings(r=LORA["r"], alpha=LORA["lora_alpha"], dropout=LORA["lora_dropout"],
                          target_modules=LORA["target_modules"]),
        rollout=RolloutSettings(num_generations=G, max_new_tokens=max_new_tokens, temperature=1.0, **rollout_options),
        advantages=AdvantageSettings(estimator=estimator, num_reasoning_groups=4),
        loss=LossSettings(preset="grpo", kl_coef=0.0),
        optimization=OptimizationSettings(learning_rate=LR, micro_batch_size=PROMPTS * G),
        adapter_dir=f"{root}/adapter",
    )
    trainer = L.Trainer(
        accelerator="gpu" if _has_cuda() else "cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTimer()],
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=_data(model, source))
    return timer.result()


def run_trl(model: str, source: str, max_new_tokens: int, steps: int, root: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from durian_lightning.core.rewards import WeightedReward
    from durian_lightning.models.loading import resolve_model_path

    data = _data(model, source)
    data.prepare_data()
    data.setup("fit")
    rows = []
    for item in data.dataset("train"):  # the very prompts our module sees: same system prompt, instruction, images
        messages = [  # Arrow wants every message content as a list of parts (the chat template renders both forms)
            {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
            for m in item["messages"]
        ]
        rows.append({"prompt": messages, "images": item["images"], "answer": item["answer"]})
    dataset = Dataset.from_list(rows)
    reward = WeightedReward.paper_default()

    def paper_reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward(texts, list(answer)).total.tolist()

    timer = _Timer()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.start()

        def on_step_end(self, args, state, control, **kwargs):
            timer.stop()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                timer.lengths.append(float(logs["completions/mean_length"]))

    path = resolve_model_path(model)
    config = GRPOConfig(
        output_dir=root, per_device_train_batch_size=PROMPTS * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=max_new_tokens, temperature=1.0, learning_rate=LR, lr_scheduler_type="constant",
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group", max_grad_norm=1.0,
        max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=not _has_cuda(), bf16=False,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
        gradient_checkpointing=False,  # as ours; TRL defaults to True, which also turns off the KV cache in generate
    )
    trainer = GRPOTrainer(
        model=AutoModelForImageTextToText.from_pretrained(path), processing_class=AutoProcessor.from_pretrained(path),
        reward_funcs=paper_reward, args=config, train_dataset=dataset, peft_config=LoraConfig(**LORA),
        callbacks=[StepTimer()],
    )
    trainer.train()
    return timer.result()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_side(side: str, model: str, source: str, max_new_tokens: int, steps: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as root:
        if side == "trl-grpo":
            return run_trl(model, source, max_new_tokens, steps, root)
        estimator, _, before = side.removeprefix("ours-").partition("-")
        if before in UNVERIFIED:
            import dataclasses

            from durian_lightning.models import families

            for kind, family in families.FAMILIES.items():
                families.FAMILIES[kind] = dataclasses.replace(family, **{UNVERIFIED[before]: False})
        return run_ours(estimator, BEFORE.get(before, {}), model, source, max_new_tokens, steps, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(MAX_NEW_TOKENS), default="small")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, caches)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, the sides alternating")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one run, in its own process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    max_new_tokens = MAX_NEW_TOKENS[args.shape]
    if args.side:
        result = run_side(args.side, args.model, args.source, max_new_tokens, args.warmup + args.steps)
        result["step_seconds"] = result["step_seconds"][args.warmup:]
        result["completion_lengths"] = result["completion_lengths"][args.warmup:]
        Path(args.out).write_text(json.dumps(result))
        return
    runs: dict[str, list[dict]] = {side: [] for side in args.sides}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        model, source = prepare_shape(args.shape, Path(tmp))
        for repeat in range(args.repeats):
            for side in args.sides:
                out = Path(tmp) / f"{side}-{repeat}.json"
                command = [sys.executable, __file__, "--side", side, "--shape", args.shape, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--out", str(out), "--model", model, "--source", source]
                done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{side} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
                runs[side].append(json.loads(out.read_text()))
                step = statistics.median(runs[side][-1]["step_seconds"])
                print(f"repeat {repeat + 1}/{args.repeats} {side}: median step {step:.3f} s", file=sys.stderr, flush=True)
    report = {}
    for side, results in runs.items():
        report[side] = {
            "median_step_s": statistics.median(s for r in results for s in r["step_seconds"]),
            "median_peak_memory_mb": statistics.median(r["peak_memory_mb"] for r in results),
            "median_step_memory_mb": statistics.median(r["step_memory_mb"] for r in results),
            "mean_completion_tokens": statistics.mean(x for r in results for x in r["completion_lengths"]),
        }
    if "trl-grpo" in report:
        trl = report["trl-grpo"]
        for side, row in report.items():
            row["step_time_vs_trl"] = row["median_step_s"] / trl["median_step_s"]
            row["peak_memory_vs_trl"] = row["median_peak_memory_mb"] / trl["median_peak_memory_mb"]
            row["step_memory_vs_trl"] = row["median_step_memory_mb"] / trl["median_step_memory_mb"]
    for name in BEFORE:
        if {"ours-grpo", f"ours-grpo-{name}"} <= report.keys():
            before = report[f"ours-grpo-{name}"]["median_step_s"]
            report["ours-grpo"][f"step_time_vs_{name.replace('-', '_')}"] = report["ours-grpo"]["median_step_s"] / before
    report["settings"] = {"shape": args.shape, "prompts": PROMPTS, "G": G, "max_new_tokens": max_new_tokens,
                          "timed_steps": args.steps, "warmup_steps": args.warmup, "repeats": args.repeats,
                          "device": "cuda" if _has_cuda() else "cpu"}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
