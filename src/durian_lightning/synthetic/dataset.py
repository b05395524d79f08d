"""A seeded synthetic visual-reasoning dataset: shapes on backgrounds of varying clutter, short verifiable answers.

    python -m durian_lightning.synthetic.dataset data/synthetic

Scenes come from :mod:`durian_lightning.synthetic.scenes`: each image has a ``clutter`` level 0-3 that raises its perceptual
complexity (plain, gradient, stripes and distractors, pixel noise). Targets are circles, squares and triangles in six
colours. Questions:

* ``count``: "How many red circles are there?"       (answer 0-4)
* ``total``: "How many shapes are there in total?"   (answer 1-6)
* ``color``: "What color is the triangle?"            (exactly one triangle; answer a colour word)
* ``sum``:   "How many circles and squares are there together?" (answer 0-8)

Answers are short, so a tiny VLM can learn the format and some of the task with RL on a CPU; cluttered images are
harder to read. Everything is drawn with PIL from ``random.Random(seed)``: the same arguments give the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from durian_lightning.synthetic.scenes import make_sample

SPLITS = {"train": 400, "val": 100, "test": 100}


def generate(out_dir: str | Path, splits: dict[str, int] | None = None, seed: int = 0, image_size: int = 64) -> Path:
    """Write ``<split>.jsonl`` files and ``images/<split>-NNNNN.png`` under ``out_dir``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for offset, (split, count) in enumerate((splits or SPLITS).items()):
        rng = random.Random(f"{seed}-{split}")
        rows = []
        for i in range(count):
            image, row = make_sample(rng, image_size)
            name = f"images/{split}-{i:05d}.png"
            image.save(out / name, format="PNG", optimize=False, compress_level=9)
            rows.append({"id": f"{split}-{i:05d}", "images": [name], **row})
        with open(out / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate the bundled synthetic visual-reasoning dataset.")
    parser.add_argument("out_dir", nargs="?", default="data/synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    print(generate(args.out_dir, seed=args.seed, image_size=args.image_size))


if __name__ == "__main__":
    main()
