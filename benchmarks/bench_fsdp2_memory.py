"""Peak memory per rank of one full fine-tuning update, DDP against fsdp2, on 2 CPU processes (gloo).

    python benchmarks/bench_fsdp2_memory.py [--hidden 1024 --vision-hidden 512 --layers 12] [--repeats 2] [--json F]

A mid-size Qwen2.5-VL built from config (random weights, float32), every weight trained with AdamW (no LoRA, no KL
term), 2 prompts per rank x G 4 with 224 px images and 16 new tokens. Each strategy runs as its own 2-process
launch, in turns. The default loss (the grpo preset, KL 0.01) keeps a frozen reference copy: whole under DDP,
sharded under fsdp2. Reported per rank, above what the rank held before the model was built: what it holds once the
policy is built and laid out (``laid_out``), and the peak during the training step (``step_peak``: weights,
gradients, AdamW states, activations, the policy gathered for ``generate``), with glibc serving blocks over 128 KB
by mmap so the resident set follows live tensors; the median over repeats. Loading is left out: on the CPU each
rank reads the whole checkpoint before sharding it, which a GPU rank does in host memory.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STRATEGIES = ("ddp", "fsdp2")


def _rank(model_dir: str, data: str, strategy: str, out: str) -> None:
    """One launch (Lightning starts rank 1 by running this file again with the same arguments)."""
    import lightning as L

    from _memory import PeakMemory, held_mb
    from durian_lightning.data import MultimodalReasoningDataModule
    from durian_lightning.module import DurianGRPO
    from durian_lightning.settings import LoraSettings, OptimizationSettings, RolloutSettings

    class Peak(L.Callback):
        def setup(self, trainer, pl_module, stage) -> None:  # before configure_model builds the policy
            self.before_model = held_mb()

        def on_train_start(self, trainer, pl_module) -> None:  # built and laid out (sharded under fsdp2)
            self.laid_out = held_mb() - self.before_model
            self.memory = PeakMemory()
            self.memory.start()

        def on_fit_end(self, trainer, pl_module) -> None:
            peak = self.memory.stop()["peak_mb"] - self.before_model
            Path(f"{out}.rank{trainer.global_rank}").write_text(json.dumps({"laid_out_mb": self.laid_out,
                                                                             "step_peak_mb": peak}))

    L.seed_everything(0, verbose=False)
    model = DurianGRPO(model_dir, lora=LoraSettings(enabled=False),
                       rollout=RolloutSettings(num_generations=4, max_new_tokens=16),
                       optimization=OptimizationSettings(learning_rate=1e-6, micro_batch_size=4))
    datamodule = MultimodalReasoningDataModule(data, model_name_or_path=model_dir, batch_size=2, entropy_method="pixel",
                                               cache_dir=str(Path(out).parent / "entropy"), progress=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Peak()], default_root_dir=str(Path(out).parent))
    trainer.fit(model, datamodule=datamodule)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024, help="language model width")
    parser.add_argument("--vision-hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--rank", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        return _rank(*args.rank)
    from _memory import measuring_env
    from _mid_size import write_mid_size_qwen, write_noise_images

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = Path(tmp) / "model", Path(tmp) / "data"
        total = write_mid_size_qwen(model_dir, args.hidden, args.vision_hidden, args.layers)["parameters"]
        write_noise_images(data, 8)
        env = measuring_env(Path(__file__).parent)
        runs: dict[str, list[list[float]]] = {s: [] for s in STRATEGIES}
        for repeat in range(args.repeats):
            for strategy in STRATEGIES:  # in turns, so machine noise falls on both
                out = Path(tmp) / f"{strategy}-{repeat}"
                subprocess.run([sys.executable, __file__, "--rank", str(model_dir), str(data), strategy, str(out)],
                               env=env, check=True, capture_output=True, text=True, timeout=1800)
                runs[strategy].append([json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)])
    results = {"parameters": total, "fp32_weights_mb": round(total * 4 / 2**20, 1),
               "weights_grads_adamw_mb": round(total * 16 / 2**20, 1)}
    for strategy, measured in runs.items():
        results[strategy] = {f"rank{r}_{key}": round(statistics.median(m[r][key] for m in measured), 1)
                             for r in (0, 1) for key in ("laid_out_mb", "step_peak_mb")}
    results["fsdp2_over_ddp_step_peak"] = round(results["fsdp2"]["rank0_step_peak_mb"] /
                                                results["ddp"]["rank0_step_peak_mb"], 3)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
