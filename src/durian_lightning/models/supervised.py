"""Supervised next-token steps on (image, chat prompt, target) triples: the loss is on the target tokens only.

Shared by the format warm-start and the tiny model's pretraining and instruction tuning.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image


def supervised_loss(model, processor, images: Sequence[Image.Image], prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` (each followed by EOS) given image and prompt; prompt and padding masked."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "right"
    prompt_batch = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True)
    prompt_lengths = prompt_batch["attention_mask"].sum(dim=1)
    texts = [p + t + tokenizer.eos_token for p, t in zip(prompts, targets)]
    batch = processor(text=texts, images=list(images), return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    positions = torch.arange(labels.shape[1]).unsqueeze(0)
    labels[(positions < prompt_lengths.unsqueeze(1)) | (batch["attention_mask"] == 0)] = -100
    return model(**batch, labels=labels).loss
