"""Time the vectorized math core against straightforward per-item implementations.

    python benchmarks/bench_math.py [--repeats 5] [--json out.json]

1. durian_advantages on 1,000,000 rollouts (125,000 prompts x G=8) vs. a per-prompt Python loop.
2. batched spectral_entropy (B=256, P=256, d=1280) vs. per-image NumPy (np.cov + eigvalsh of the d x d covariance).

Both sides run in this process, one after the other, on the same inputs; we report medians over repeats and their
ratio. The NumPy baseline is timed on a subset of images (it takes ~1 s per image) and scaled to B per image.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from durian_lightning.core.advantages import durian_advantages
from durian_lightning.core.difficulty import spectral_entropy


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_durian(rewards, entropy, confidence, group_size, alphas=(0.1, 0.2, 0.7), b=12, eps=1e-6):
    """What one writes first: per-prompt slices, per-group Python loops (contiguous rollouts, fixed G)."""
    n_prompts = len(entropy)
    per_prompt = [rewards[p * group_size : (p + 1) * group_size] for p in range(n_prompts)]
    q_lo, q_hi = np.percentile(entropy, [25, 75])
    percep = [0 if h <= q_lo else 2 if h >= q_hi else 1 for h in entropy]
    order = sorted(range(n_prompts), key=lambda p: (confidence[p], p))
    reason = [0] * n_prompts
    for rank, p in enumerate(order):
        reason[p] = rank * b // n_prompts
    pools_p, pools_r = {}, {}
    for p in range(n_prompts):
        pools_p.setdefault(percep[p], []).append(per_prompt[p])
        pools_r.setdefault(reason[p], []).append(per_prompt[p])
    std_p = {g: np.concatenate(v).std(ddof=1) for g, v in pools_p.items()}
    std_r = {g: np.concatenate(v).std(ddof=1) for g, v in pools_r.items()}
    out = np.empty_like(rewards)
    for p in range(n_prompts):
        r = per_prompt[p]
        centred = r - r.mean() if r.max() != r.min() else np.zeros_like(r)
        out[p * group_size : (p + 1) * group_size] = (
            alphas[0] * centred / (r.std(ddof=1) + eps)
            + alphas[1] * centred / (std_p[percep[p]] + eps)
            + alphas[2] * centred / (std_r[reason[p]] + eps)
        )
    return out


def bench_advantages(repeats: int) -> dict:
    prompts, group_size = 125_000, 8
    gen = torch.Generator().manual_seed(0)
    rewards = (torch.rand(prompts * group_size, generator=gen) < 0.4).float() * 0.9 + 0.1
    prompt_index = torch.arange(prompts).repeat_interleave(group_size)
    entropy, confidence = torch.rand(prompts, generator=gen), torch.randn(prompts, generator=gen)
    fast = lambda: durian_advantages(rewards, prompt_index, visual_entropy=entropy, confidence=confidence)
    np_rewards, np_entropy, np_conf = rewards.double().numpy(), entropy.numpy(), confidence.tolist()
    slow = lambda: loop_durian(np_rewards, np_entropy, np_conf, group_size)
    # same numbers from both, or the timing means nothing
    np.testing.assert_allclose(fast().advantages.numpy(), slow(), rtol=1e-4, atol=1e-5)
    t_fast, t_slow = median_seconds(fast, repeats), median_seconds(slow, max(1, repeats // 2))
    return {"rollouts": prompts * group_size, "vectorized_s": t_fast, "loop_s": t_slow, "speedup": t_slow / t_fast}


def bench_spectral_entropy(repeats: int, baseline_images: int) -> dict:
    batch, patches, dim = 256, 256, 1280
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(batch, patches, dim, generator=gen) * torch.rand(dim, generator=gen)
    np_features = features.double().numpy()

    def numpy_one(f):
        lam = np.clip(np.linalg.eigvalsh(np.cov(f, rowvar=False)), 0, None)
        p = lam / lam.sum()
        p = p[p > 0]
        return -(p * np.log(p)).sum()

    reference = np.array([numpy_one(f) for f in np_features[:4]])
    np.testing.assert_allclose(spectral_entropy(features[:4]).numpy(), reference, rtol=1e-6)
    t_batched = median_seconds(lambda: spectral_entropy(features), repeats)
    t_baseline = median_seconds(lambda: [numpy_one(f) for f in np_features[:baseline_images]], repeats)
    t_baseline_full = t_baseline * batch / baseline_images
    return {
        "shape": [batch, patches, dim],
        "batched_s": t_batched,
        "numpy_per_image_s": t_baseline / baseline_images,
        "numpy_all_images_s": t_baseline_full,
        "speedup": t_baseline_full / t_batched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-images", type=int, default=16)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "repeats": args.repeats,
        "durian_advantages": bench_advantages(args.repeats),
        "spectral_entropy": bench_spectral_entropy(args.repeats, args.baseline_images),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
