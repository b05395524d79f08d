"""Peak memory and time of the token log-prob computation: ``token_logprobs`` against the plain
``log_softmax(logits.float() / T).gather(...)``, forward and backward, on logits of a real vocabulary size.

    .venv/bin/python benchmarks/bench_logprob_memory.py [--rows 4] [--length 512] [--vocab 151936] [--repeats 3]

Each (variant, dtype) runs in its own process, alternating, ``--repeats`` times. Memory is the peak resident set
sampled every 2 ms during the call minus the resident set just before it (the logits already exist), on the CPU;
torch's peak allocation above the start on a GPU. Both variants are checked to give the same log-probs first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from _memory import PeakMemory  # benchmarks/, the script's folder
from durian_lightning.stages.rollout import token_logprobs

VARIANTS = ("plain", "token_logprobs")


def _plain(logits, tokens, temperature):
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def run_one(variant: str, dtype: str, rows: int, length: int, vocab: int, temperature: float) -> dict:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.randn(rows, length, vocab, device=device).to(getattr(torch, dtype)).requires_grad_()
    tokens = torch.randint(0, vocab, (rows, length), device=device)
    fn = _plain if variant == "plain" else token_logprobs
    memory = PeakMemory(interval=0.002)
    memory.start()
    start = time.perf_counter()
    out = fn(logits, tokens, temperature)
    out.sum().backward()
    added = memory.stop()["added_mb"]  # synchronises on a GPU
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "added_mb": added, "logits_mb": logits.numel() * logits.element_size() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=151936, help="Qwen2.5-VL's vocabulary size")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.rows, args.length, args.vocab)
    if args.one:
        print(json.dumps(run_one(*args.one, *shape, args.temperature)))
        return
    small = torch.randn(2, 7, 300)
    small_tokens = torch.randint(0, 300, (2, 7))
    torch.testing.assert_close(token_logprobs(small, small_tokens, 0.7), _plain(small, small_tokens, 0.7))
    results: dict = {}
    for _ in range(args.repeats):
        for dtype in args.dtypes:
            for variant in VARIANTS:
                command = [sys.executable, __file__, "--one", variant, dtype, "--rows", str(args.rows),
                           "--length", str(args.length), "--vocab", str(args.vocab), "--temperature", str(args.temperature)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                results.setdefault(f"{dtype} {variant}", []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {"shape": list(shape), "temperature": args.temperature, "repeats": args.repeats}
    for key, runs in results.items():
        report[key] = {"median_seconds": statistics.median(r["seconds"] for r in runs),
                       "median_added_mb": statistics.median(r["added_mb"] for r in runs),
                       "logits_mb": runs[0]["logits_mb"]}
    for dtype in args.dtypes:
        plain, ours = report[f"{dtype} plain"], report[f"{dtype} token_logprobs"]
        report[f"{dtype} ratio"] = {"memory": ours["median_added_mb"] / plain["median_added_mb"],
                                    "time": ours["median_seconds"] / plain["median_seconds"]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
