"""How far the log-probs ``generate`` records (the behaviour policy) are from the training forward's on the same tokens.

    python benchmarks/bench_logprob_gap.py [--prompts 8 --generations 8 --new-tokens 32]

The tiny Qwen2.5-VL (``tiny:qwen2_5_vl``) and the shipped pretrained LLaVA (``tiny:llava-pretrained``), LoRA adapters
moved off zero so the adapter counts, bundled synthetic prompts and images. Each model samples in float32 and in
bfloat16 (the weights cast, as ``--model.dtype bfloat16`` loads them), then ``completion_logprobs`` recomputes the
same tokens with one full forward under the same dtype: the pair the update's ratio and the
``train/logprob_gap_*`` metrics compare. Reported per real token: mean and max of |recorded - recomputed|, and the
mean token-level importance weight exp(recomputed - recorded) and its share over the default cap of 2.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def measure(name: str, dtype: torch.dtype, prompts: int, generations: int, new_tokens: int) -> dict:
    from durian_lightning.data import MultimodalReasoningDataModule
    from durian_lightning.models import load_policy, resolve_model_path
    from durian_lightning.stages.rollout import SamplingConfig, completion_logprobs, generate_rollouts

    torch.manual_seed(0)
    path = resolve_model_path(name)
    model, processor = load_policy(path, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    for parameter_name, parameter in model.named_parameters():
        if "lora_B" in parameter_name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.eval()
    data = MultimodalReasoningDataModule(str(REPO / "data" / "synthetic"), model_name_or_path=path,
                                         entropy_method="pixel", batch_size=prompts, progress=False,
                                         cache_dir=str(REPO / ".cache" / "durian" / "entropy"))
    data.setup()
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        rollout = generate_rollouts(model, processor, batch["prompt"], batch["images"], generations,
                                    SamplingConfig(max_new_tokens=new_tokens))
        recomputed = torch.cat([completion_logprobs(model, processor, rollout, rows)
                                for rows in torch.arange(len(rollout)).split(16)]).float()
    mask = rollout.completion_mask.bool()
    gap = (recomputed - rollout.sampled_logprobs.float())[mask]
    weights = gap.exp()
    return {"model": name, "dtype": str(dtype).removeprefix("torch."), "tokens": int(mask.sum()),
            "gap_mean": float(gap.abs().mean()), "gap_max": float(gap.abs().max()),
            "weight_mean": float(weights.mean()), "weight_over_cap_2": float((weights > 2).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = [measure(name, dtype, args.prompts, args.generations, args.new_tokens)
               for name in ("tiny:qwen2_5_vl", "tiny:llava-pretrained") for dtype in (torch.float32, torch.bfloat16)]
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
