"""Peak memory of a step's rollout against ``rollout.max_sequences_per_generate`` (rows per ``generate`` call).

    python benchmarks/bench_rollout_memory.py [--prompts 8] [--generations 8] [--new-tokens 384] [--repeats 2]

A tiny LLaVA-style VLM built from config but wider than the test one (text hidden 256, 4 layers, so its KV cache is
big enough to measure), 8 prompts x G = 8 = 64 rows, long completions (a random model rarely stops early). Each
setting runs in a fresh process, with glibc told to serve every block over 128 KB by mmap (freed at once), so the
resident set follows the live tensors instead of the allocator's free lists (the KV cache grows by reallocation each
token, which otherwise fragments the heap and hides the difference); the memory `generate_rollouts` adds is sampled
with ``_memory.PeakMemory`` (CUDA peak allocation on a GPU).
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


def _child(model_dir: str, prompts: int, generations: int, new_tokens: int, per_call: int) -> None:
    import torch
    from PIL import Image

    from _memory import PeakMemory  # benchmarks/, the script's folder
    from durian_lightning.models import load_policy
    from durian_lightning.stages.rollout import SamplingConfig, generate_rollouts

    torch.manual_seed(0)
    model, processor = load_policy(model_dir, use_lora=False)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [[Image.effect_noise((64, 64), 40 + i).convert("RGB")] for i in range(prompts)]
    memory = PeakMemory(interval=0.002)
    memory.start()
    rollout = generate_rollouts(model, processor, [prompt] * prompts, images, generations,
                                SamplingConfig(max_new_tokens=new_tokens), max_sequences_per_call=per_call)
    result = memory.stop()
    result["completion_tokens"] = int(rollout.completion_mask.sum())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child[0], args.prompts, args.generations, args.new_tokens, int(args.child[1]))
    from _memory import measuring_env  # benchmarks/, the script's folder
    from durian_lightning.models import build_tiny_llava

    rows = args.prompts * args.generations
    settings = [rows, rows // 2, rows // 4, rows // 8]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_tiny_llava(text_hidden=256, num_layers=4)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        env = measuring_env(Path(__file__).parent)
        runs: dict[int, list[dict]] = {s: [] for s in settings}
        for _ in range(args.repeats):
            for per_call in settings:  # in turns, so machine noise falls on every setting
                out = subprocess.run([sys.executable, __file__, "--child", tmp, str(per_call), "--prompts", str(args.prompts),
                                      "--generations", str(args.generations), "--new-tokens", str(args.new_tokens)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                runs[per_call].append(json.loads(out.strip().splitlines()[-1]))
        for per_call, measured in runs.items():
            results[per_call] = {"added_mb_median": round(statistics.median(r["added_mb"] for r in measured), 1),
                                 "added_mb_runs": [round(r["added_mb"], 1) for r in measured],
                                 "completion_tokens": measured[0]["completion_tokens"]}
    print(json.dumps({"rows": rows, "new_tokens": args.new_tokens, "by_max_sequences_per_generate": results}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
