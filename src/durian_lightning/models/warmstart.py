"""A format warm-start for tiny random VLMs, so the offline default run has something for RL to sharpen.

A VLM with random weights never writes ``<think>...</think> \\boxed{...}`` by chance, so every reward is 0, every
advantage is 0 and RL cannot start (real runs start from an instruction-tuned model for the same reason). This
supervised pass teaches only the *format*: on freshly generated synthetic images (a seed disjoint from the bundled
splits), the target is ``<think>...</think> \\boxed{a}`` with ``a`` drawn at random from the task's answer set,
independently of the image and question. The warm model answers in the right format and at chance accuracy;
what it gains above chance in ``durian fit`` is learned by RL.
"""

from __future__ import annotations

import random

import torch

from durian_lightning.models.prompts import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT, build_messages, render_prompt
from durian_lightning.models.supervised import supervised_loss
from durian_lightning.synthetic.scenes import COLORS, make_sample

ANSWERS = [str(n) for n in range(9)] + list(COLORS)
TARGET = "<think>I look at the shapes.</think> \\boxed{{{answer}}}"


def format_warmstart(model, processor, steps: int = 150, batch_size: int = 16, learning_rate: float = 3e-3, seed: int = 1234) -> None:
    """Supervised steps on the answer format (random answers); updates ``model`` in place."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            images, prompts, targets = [], [], []
            for _ in range(batch_size):
                image, row = make_sample(rng)
                images.append(image)
                prompts.append(render_prompt(processor, build_messages(row["problem"], 1, DEFAULT_SYSTEM_PROMPT, DEFAULT_INSTRUCTION)))
                targets.append(TARGET.format(answer=rng.choice(ANSWERS)))
            loss = supervised_loss(model, processor, images, prompts, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
