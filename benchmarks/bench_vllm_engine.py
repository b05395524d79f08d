"""The vLLM rollout engine against transformers' ``generate``: generated tokens per second, and the engine's weight
sync per update (LoRA adapter, and every weight for full fine-tuning).

    HF_HUB_OFFLINE=1 .venv-vllm/bin/python benchmarks/bench_vllm_engine.py [--calls 3] [--repeats 3] [--json out.json]

Runs in the environment scripts/make_vllm_env.sh builds (vLLM's CPU build), or on a GPU with the ``vllm`` extra.
The shape is the default run's: tiny:llava-pretrained, 8 bundled prompts x G = 8 rows, 72 new tokens, temperature 1,
float32; ``hf`` is ``generate_rollouts`` with its fast paths (image features encoded once, each prompt prefilled
once), ``vllm`` is :class:`~durian_lightning.stages.vllm_engine.VLLMEngine`. The two alternate within each repeat.
Reported: medians over all timed calls of generated tokens (up to each row's EOS) per second, and of the seconds
one sync takes after the weights changed (LoRA: write and register the adapter; full: write and reload every
weight). The engine's start (20-50 s on a CPU) is reported once, not in the rates.

``--lora-gap`` measures instead how far a LoRA policy's engine samples from the training forward, for the two ways
an engine can hold the adapter: as a vLLM LoRA adapter (what the engine does), or merged into the base weights. The
adapter's ``lora_B`` is drawn at RL-sized scales; reported are the largest and the mean absolute log-prob gap over
the sampled tokens, per dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
MODEL, PROMPTS, G, MAX_NEW_TOKENS = "tiny:llava-pretrained", 8, 8, 72


def _batch():
    from durian_lightning.data import MultimodalReasoningDataModule

    data = MultimodalReasoningDataModule(source=str(REPO / "data" / "synthetic"), model_name_or_path=MODEL,
                                         batch_size=PROMPTS, progress=False)
    data.prepare_data()
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _nudge(model, step: int) -> None:
    """A stand-in for an update: every trained weight moves, so the sync has new weights to send."""
    import torch

    generator = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-4)


def measure(calls: int, repeats: int) -> dict:
    import torch

    from durian_lightning.models import load_policy
    from durian_lightning.stages.image_features import ImageFeatures
    from durian_lightning.stages.rollout import SamplingConfig, generate_rollouts
    from durian_lightning.stages.vllm_engine import VLLMEngine

    batch = _batch()
    sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS)
    report = {}
    for kind, lora in (("lora", True), ("full", False)):
        model, processor = load_policy(MODEL, use_lora=lora)
        model.eval()
        features = ImageFeatures(model, processor)
        start = time.perf_counter()
        engine = VLLMEngine(model, processor, 1024, 4, 16 if lora else None, 1.0)
        started = time.perf_counter() - start
        engine.sync(model, 0)
        engine.generate(batch["prompt"], batch["images"], G, sampling)  # warm-up
        rates: dict[str, list[float]] = {"hf": [], "vllm": []}
        syncs: list[float] = []
        version = 0
        for repeat in range(repeats):
            for call in range(calls):
                torch.manual_seed(1000 * repeat + call)
                features.clear()
                begin = time.perf_counter()
                rollout = generate_rollouts(model, processor, batch["prompt"], batch["images"], G, sampling,
                                            image_features=features)
                rates["hf"].append(int(rollout.completion_mask.sum()) / (time.perf_counter() - begin))
                version += 1
                _nudge(model, version)
                begin = time.perf_counter()
                engine.sync(model, version)
                syncs.append(time.perf_counter() - begin)
                begin = time.perf_counter()
                rollout = engine.generate(batch["prompt"], batch["images"], G, sampling)
                rates["vllm"].append(int(rollout.completion_mask.sum()) / (time.perf_counter() - begin))
            print(f"{kind} repeat {repeat + 1}/{repeats}: hf {statistics.median(rates['hf']):.0f} tok/s, vllm "
                  f"{statistics.median(rates['vllm']):.0f} tok/s, sync {statistics.median(syncs):.3f} s",
                  file=sys.stderr, flush=True)
        engine.close()
        report[kind] = {"hf_tokens_per_s": round(statistics.median(rates["hf"]), 1),
                        "vllm_tokens_per_s": round(statistics.median(rates["vllm"]), 1),
                        "vllm_vs_hf_speed": round(statistics.median(rates["vllm"]) / statistics.median(rates["hf"]), 3),
                        "sync_s_median": round(statistics.median(syncs), 4), "engine_start_s": round(started, 1)}
    report["settings"] = {"model": MODEL, "prompts": PROMPTS, "G": G, "max_new_tokens": MAX_NEW_TOKENS,
                          "calls_per_repeat": calls, "repeats": repeats,
                          "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}
    return report


def lora_gap(dtypes: list[str], stds: tuple[float, ...] = (3e-3, 3e-4), new_tokens: int = 32) -> dict:
    import copy

    import torch

    from durian_lightning.models import load_policy
    from durian_lightning.stages.rollout import SamplingConfig, completion_logprobs
    from durian_lightning.stages.vllm_engine import VLLMEngine

    batch = _batch()
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    report = {}
    for dtype in dtypes:
        model, processor = load_policy(MODEL, dtype, True, 16, 32)
        model.eval()
        adapter_engine = VLLMEngine(model, processor, 1024, 4, 16, 1.0)
        merged_engine = None
        for version, std in enumerate(stds):
            generator = torch.Generator().manual_seed(version)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
            merged = copy.deepcopy(model).merge_and_unload()
            merged_engine = merged_engine or VLLMEngine(merged, processor, 1024, 4, None, 1.0)
            row = {}
            for way, engine, policy in (("adapter", adapter_engine, model), ("merged", merged_engine, merged)):
                engine.sync(policy, version)
                torch.manual_seed(version)
                rollout = engine.generate(batch["prompt"], batch["images"], 2, sampling)
                with torch.no_grad():
                    forward = completion_logprobs(model, processor, rollout, list(range(len(rollout))),
                                                  share_prefill=False)
                gap = (forward.float() - rollout.sampled_logprobs.float()).abs()[rollout.completion_mask.bool()]
                row[way] = {"max": float(gap.max()), "mean": float(gap.mean())}
            report[f"{dtype} lora_B std {std:g}"] = row
            print(dtype, std, row, file=sys.stderr, flush=True)
        adapter_engine.close()
        merged_engine.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3, help="timed calls per engine and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--lora-gap", nargs="*", metavar="DTYPE", default=None,
                        help="measure the LoRA adapter against merged weights in these dtypes (default: float32 "
                             "bfloat16) instead of the speed")
    args = parser.parse_args()
    if args.lora_gap is not None:
        results = lora_gap(args.lora_gap or ["float32", "bfloat16"])
    else:
        results = measure(args.calls, args.repeats)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
