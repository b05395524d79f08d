"""Make the tiny VLM that can see: perception pretraining, then instruction tuning, before any RL.

    python -m durian_lightning.models.pretrain [OUT_DIR]

Real VLM RL starts from a model that already describes images and answers in format; a random vision tower gives RL
nothing to sharpen (it can only learn each question type's most frequent answer). This script gives the tiny
LLaVA-style model (:func:`..tiny.build_tiny_llava`, about 1.2M parameters) the same two stages, all weights trained,
on freshly generated scenes (:mod:`durian_lightning.synthetic.scene_text`; seeds disjoint from the bundled splits):

1. *Perception pretraining*: "Describe the image." -> every object with colour, shape and place, and the background;
   "List the shapes by kind." -> ``2 red circles, 1 blue square``.
2. *Instruction tuning*, in the RL prompt format: questions of the instruction types only (is there a red circle,
   how many red shapes, what shape is red, what shape / colour is at a place), answered
   ``<think>red shapes: red circle (1), red square (2)</think> \\boxed{2}`` (find what the question is about, then
   answer), mixed with stage-1 captions so description is not forgotten. The RL question types are never answered.

The result is shipped with the package (``models/pretrained/llava``, loaded as ``tiny:llava-pretrained``) together
with ``manifest.json``: the arguments and the SHA-256 of the weights, so ``--check`` can tell whether this machine
rebuilds the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from durian_lightning.models.prompts import (
    DEFAULT_INSTRUCTION,
    DEFAULT_SYSTEM_PROMPT,
    build_messages,
    encode_prompts,
    render_prompt,
)
from durian_lightning.models.supervised import supervised_loss
from durian_lightning.models.tiny import build_tiny_llava
from durian_lightning.synthetic.scene_text import (
    COLORS,
    description,
    instruction_sample,
    random_scene,
    summary,
    vocabulary_corpus,
)

SHIPPED = Path(__file__).parent / "pretrained" / "llava"
DESCRIBE = "Describe the image."
LIST_SHAPES = "List the shapes by kind."


@dataclass(frozen=True)
class PretrainSettings:
    """Model size and the two stages' schedules. The defaults made the shipped weights."""

    hidden: int = 128
    num_layers: int = 3
    vocab_size: int = 1024
    caption_steps: int = 1200
    instruction_steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 2e-3
    caption_share_in_instruction: float = 0.25
    seed: int = 7  # scenes from random.Random(f"pretrain-{seed}-<stage>"), never the bundled splits' "0-train" etc.


def caption_example(rng: random.Random):
    image, scene = random_scene(rng)
    if rng.random() < 0.5:
        return image, DESCRIBE, description(scene), None
    return image, LIST_SHAPES, summary(scene), None


def instruction_example(rng: random.Random):
    image, scene = random_scene(rng)
    _, question, reasoning, answer = instruction_sample(rng, scene)
    return image, question, f"<think>{reasoning}</think> \\boxed{{{answer}}}", DEFAULT_INSTRUCTION


def _learning_rate(step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_stage(model, processor, settings: PretrainSettings, steps: int, make_example, name: str, log_every: int) -> None:
    """``steps`` AdamW steps on batches from ``make_example``. Scenes come from the stage's own stream
    (``pretrain-<seed>-<name>``), so each stage is reproducible on its own; the caller's torch RNG is left as it was."""
    rng = random.Random(f"pretrain-{settings.seed}-{name}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    model.train()
    start = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(step, steps, settings.learning_rate)
            examples = [make_example(rng) for _ in range(settings.batch_size)]
            prompts = [
                render_prompt(processor, build_messages(question, 1, DEFAULT_SYSTEM_PROMPT, instruction))
                for _, question, _, instruction in examples
            ]
            loss = supervised_loss(model, processor, [e[0] for e in examples], prompts, [e[2] for e in examples])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if log_every and (step + 1) % log_every == 0:
                print(f"{name} step {step + 1}/{steps}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    model.eval()


def base_model(settings: PretrainSettings):
    """The random tiny LLaVA with a tokenizer that holds the scene vocabulary."""
    return build_tiny_llava(
        vision_hidden=settings.hidden,
        text_hidden=settings.hidden,
        num_layers=settings.num_layers,
        vocab_size=settings.vocab_size,
        seed=settings.seed,
        corpus=vocabulary_corpus(),
    )


def perception_pretraining(model, processor, settings: PretrainSettings, log_every: int = 0) -> None:
    _train_stage(model, processor, settings, settings.caption_steps, caption_example, "perception", log_every)


def instruction_tuning(model, processor, settings: PretrainSettings, log_every: int = 0) -> None:
    def mixed(r: random.Random):
        return caption_example(r) if r.random() < settings.caption_share_in_instruction else instruction_example(r)

    _train_stage(model, processor, settings, settings.instruction_steps, mixed, "instruction", log_every)


def build_pretrained_llava(settings: PretrainSettings = PretrainSettings(), log_every: int = 0):
    """``(model, processor)`` after both stages; deterministic for given settings (on one machine and torch)."""
    model, processor = base_model(settings)
    perception_pretraining(model, processor, settings, log_every)
    instruction_tuning(model, processor, settings, log_every)
    return model, processor


@torch.no_grad()
def caption_color_overlap(model, processor, num_scenes: int = 16, seed: str = "held-out") -> float:
    """Mean Jaccard overlap between the colours a greedy "List the shapes by kind." caption names and the scene's
    colours, over held-out scenes: a quick check that the model sees (a random model scores 0)."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(num_scenes)]
    prompt = render_prompt(processor, build_messages(LIST_SHAPES, 1, DEFAULT_SYSTEM_PROMPT, None))
    encoded = encode_prompts(processor, [prompt] * num_scenes, [[image] for image, _ in scenes], None)
    generated = model.generate(**encoded, max_new_tokens=48, do_sample=False)
    captions = processor.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    named = [{w for w in caption.replace(",", " ").split() if w in COLORS} for caption in captions]
    truth = [{o.color for o in scene.objects} for _, scene in scenes]
    return sum(len(n & t) / len(n | t) for n, t in zip(named, truth)) / num_scenes


def weights_sha256(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def save(model, processor, out_dir: Path, settings: PretrainSettings) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    manifest = {"settings": asdict(settings), "torch": torch.__version__, "sha256": weights_sha256(out_dir)}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description="Pretrain and instruction-tune the tiny VLM (about 15 min on a 2-core CPU).")
    parser.add_argument("out_dir", nargs="?", default=str(SHIPPED))
    parser.add_argument("--check", action="store_true", help="rebuild into OUT_DIR and compare with the shipped weights")
    parser.add_argument("--caption-steps", type=int, default=PretrainSettings.caption_steps)
    parser.add_argument("--instruction-steps", type=int, default=PretrainSettings.instruction_steps)
    args = parser.parse_args()
    settings = PretrainSettings(caption_steps=args.caption_steps, instruction_steps=args.instruction_steps)
    model, processor = build_pretrained_llava(settings, log_every=50)
    out = save(model, processor, Path(args.out_dir), settings)
    print(out)
    if args.check:
        shipped = json.loads((SHIPPED / "manifest.json").read_text())["sha256"]
        same = shipped == weights_sha256(out)
        print("identical to the shipped weights" if same else "DIFFERENT from the shipped weights")
        raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
