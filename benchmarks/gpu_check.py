"""The GPU check: on one CUDA device, in a few minutes, the CUDA-only tests and a few bf16 training steps of a
mid-size Qwen2.5-VL built from config (random weights), with step time, peak memory and generated tokens/s.

    python benchmarks/gpu_check.py                      # tests, then 4 steps of the ~0.5B model
    python benchmarks/gpu_check.py --skip-tests --steps 6 --json gpu_check.json
    python benchmarks/gpu_check.py --skip-tests --mode fsdp2-full   # every weight trained, sharded over every GPU
    python benchmarks/gpu_check.py --skip-tests --engine both       # rollouts from generate, then from vLLM

It needs torch, transformers, peft, lightning, torchmetrics, pillow and pytest, and none of datasets, jsonargparse
or math-verify: it builds the module and the data module directly (no CLI) and reads a local data folder it writes
(scenes at ``--image-size`` pixels). The package is imported from this checkout's src/, so no install is needed.

The training steps run as the recipes do (configs/recipes): bf16 base weights, ``bf16-mixed`` autocast, the LoRA
adapter in float32, LoRA r 64 on the language model, G = 8, Durian-GRPO with KL 0.01 against the base. Random
weights rarely emit EOS, so every completion runs to ``--new-tokens``: the generated tokens/s is that of full-length
completions.

``--mode fsdp2-full`` runs the paper's layout instead (configs/recipes without _lora): every weight trained, float32
weights sharded with fsdp2 over every GPU of the machine (2 or more), bf16 compute under ``bf16-mixed``, the KL
reference a sharded copy; compare its peak memory per GPU and step time with the default LoRA run. Lightning starts
the other ranks by running this file again: they find the model and data in ``--workdir``.

``--engine vllm`` rolls out with the vLLM engine (the ``vllm`` extra; docs/vllm.md), ``both`` runs the same steps
with ``hf`` and then with ``vllm`` on the same model and data. The engine lives in processes of its own, so besides
the training process's peak (``peak_memory_gib_per_gpu``) the check reports the device's used memory at the end of
each step (``device_used_gib``: both processes, the engine asleep between rollouts), and the weight sync's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402


class StepMeter(L.Callback):
    """Wall time, generation time and generated tokens of every training step, and the peak CUDA memory."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        update = pl_module.last_update
        tokens = int(update.local.rollout.completion_mask.sum()) if update is not None else 0
        self.steps.append({
            "seconds": time.perf_counter() - self.start,
            "generate_seconds": pl_module._timed.seconds.get("generate", float("nan")),
            "generated_tokens": tokens,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "device_used_gib": (lambda free, total: (total - free) / 2**30)(*torch.cuda.mem_get_info()),
            "weight_sync_seconds": pl_module._timed.seconds.get("weight_sync", 0.0),
        })
        print(f"step {len(self.steps)}: {self.steps[-1]}", flush=True)


def write_scenes(folder: Path, n: int, size: int) -> Path:
    """``n`` synthetic scene rows with ``size`` x ``size`` images (a seed of their own)."""
    from durian_lightning.synthetic.scenes import make_sample

    if (folder / "train.jsonl").is_file():  # written by rank 0 of this run (fsdp2-full)
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"gpu-check-{size}")
    with open(folder / "train.jsonl", "w") as f:
        for i in range(n):
            image, row = make_sample(rng, size)
            image.save(folder / "images" / f"{i:04d}.png")
            f.write(json.dumps({**row, "id": f"scene-{i:04d}", "images": [f"images/{i:04d}.png"]}) + "\n")
    return folder


def build_model(folder: Path, hidden: int, layers: int, image_size: int) -> tuple[Path, int]:
    """A Qwen2.5-VL of ``layers`` text and vision blocks of width ``hidden`` (random weights), saved to ``folder``."""
    from durian_lightning.models.tiny import build_tiny_qwen2_5_vl

    if (folder / "parameters.txt").is_file():  # built by rank 0 of this run (fsdp2-full)
        return folder, int((folder / "parameters.txt").read_text())
    model, processor = build_tiny_qwen2_5_vl(vision_hidden=hidden, text_hidden=hidden, num_layers=layers,
                                             max_pixels=image_size * image_size, text_heads=hidden // 128,
                                             vision_heads=hidden // 64)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "parameters.txt").write_text(str(parameters))
    return folder, parameters


def training_steps(args, tmp: Path, engine: str = "hf") -> dict:
    from durian_lightning.data import MultimodalReasoningDataModule
    from durian_lightning.module import DurianGRPO
    from durian_lightning.settings import (
        AdvantageSettings,
        LoraSettings,
        LossSettings,
        OptimizationSettings,
        RolloutSettings,
    )

    model_path, parameters = build_model(tmp / "model", args.hidden, args.layers, args.image_size)
    print(f"model: Qwen2.5-VL architecture, {parameters / 1e6:.0f}M parameters, hidden {args.hidden}, "
          f"{args.layers} layers", flush=True)
    data = MultimodalReasoningDataModule(
        str(write_scenes(tmp / "data", args.prompts * (args.steps + 1), args.image_size)), model_name_or_path=str(model_path),
        cache_dir=str(tmp / "cache"), batch_size=args.prompts, image_processor_kwargs={"max_pixels": args.image_size ** 2},
        progress=False,
    )
    full = args.mode == "fsdp2-full"
    module = DurianGRPO(
        str(model_path), dtype="float32" if full else "bfloat16", gradient_checkpointing=full,
        lora=LoraSettings(enabled=not full, r=64, alpha=128),
        rollout=RolloutSettings(num_generations=8, max_new_tokens=args.new_tokens,
                                max_sequences_per_generate=args.sequences_per_generate, engine=engine),
        advantages=AdvantageSettings(num_reasoning_groups=4), loss=LossSettings(preset="grpo"),
        optimization=OptimizationSettings(learning_rate=1e-6, micro_batch_size=args.micro_batch_size),
    )
    meter = StepMeter()
    trainer = L.Trainer(accelerator="gpu", devices=torch.cuda.device_count() if full else 1,
                        strategy="fsdp2" if full else "auto", precision="bf16-mixed", max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, callbacks=[meter],
                        default_root_dir=str(tmp / "run"))
    trainer.fit(module, datamodule=data)
    timed = meter.steps[1:] or meter.steps  # the first step compiles kernels and warms the allocator
    median = lambda key: sorted(s[key] for s in timed)[len(timed) // 2]  # noqa: E731
    return {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "parameters": parameters,
        "mode": args.mode, "engine": engine, "gpus": trainer.world_size,
        "image_size": args.image_size, "prompts_per_step": args.prompts, "G": 8, "new_tokens": args.new_tokens,
        "median_step_seconds": median("seconds"), "median_generate_seconds": median("generate_seconds"),
        "generated_tokens_per_second": median("generated_tokens") / median("generate_seconds"),
        "peak_memory_gib_per_gpu": max(s["peak_memory_gib"] for s in meter.steps),
        "device_used_gib": max(s["device_used_gib"] for s in meter.steps),
        "median_weight_sync_seconds": median("weight_sync_seconds"), "steps": meter.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (x G = 8 rollouts)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--sequences-per-generate", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--mode", choices=("lora", "fsdp2-full"), default="lora",
                        help="lora: LoRA on one GPU (the _lora recipes); fsdp2-full: every weight, sharded over every GPU")
    parser.add_argument("--engine", choices=("hf", "vllm", "both"), default="hf",
                        help="the rollout engine; both: the same steps with hf, then with vllm")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "durian-gpu-check",
                        help="fsdp2-full: where the model and data are written, once, for every rank")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device; torch sees none")
    if args.mode == "fsdp2-full" and torch.cuda.device_count() < 2:
        sys.exit(f"--mode fsdp2-full shards over 2 or more GPUs; this machine has {torch.cuda.device_count()}")
    args.workdir = args.workdir / f"hidden{args.hidden}-layers{args.layers}-{args.image_size}px"
    engines = ["hf", "vllm"] if args.engine == "both" else [args.engine]
    if os.environ.get("LOCAL_RANK", "0") != "0":  # a rank Lightning started: train only
        for engine in engines:
            training_steps(args, args.workdir, engine)
        return
    start = time.perf_counter()
    result: dict = {}
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO),
                                                                                   os.environ.get("PYTHONPATH")]))})
        result["cuda_tests"] = "passed" if tests.returncode == 0 else f"FAILED (exit {tests.returncode})"
        print(f"CUDA tests: {result['cuda_tests']} ({time.perf_counter() - start:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir if args.mode == "fsdp2-full" else Path(tmp)
        runs = {engine: training_steps(args, folder, engine) for engine in engines}
    result.update(runs[engines[-1]] if len(engines) == 1 else {"engines": runs})
    if len(engines) == 2:
        result["vllm_vs_hf_step_time"] = runs["vllm"]["median_step_seconds"] / runs["hf"]["median_step_seconds"]
        result["vllm_vs_hf_tokens_per_second"] = (runs["vllm"]["generated_tokens_per_second"]
                                                  / runs["hf"]["generated_tokens_per_second"])
    result["total_seconds"] = time.perf_counter() - start
    summary = {k: ({e: {k2: v2 for k2, v2 in r.items() if k2 != "steps"} for e, r in v.items()} if k == "engines" else v)
               for k, v in result.items() if k != "steps"}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if result.get("cuda_tests", "passed") != "passed":
        sys.exit(1)


if __name__ == "__main__":
    main()
