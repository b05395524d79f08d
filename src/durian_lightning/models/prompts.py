"""Chat prompts for a multimodal reasoning sample: where the images go, the system prompt and the instruction to
think in ``<think>`` and answer in ``\\boxed{}``. Shared by the data package, the rollouts and the tiny model's training; and the prompts tokenized with their images."""

from __future__ import annotations

from typing import Sequence

from PIL import Image

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant that reasons about images."
DEFAULT_INSTRUCTION = (
    "Think step by step inside <think> </think> tags, then give the final answer in \\boxed{}."
)
IMAGE_PLACEHOLDER = "<image>"


def build_messages(problem: str, num_images: int, system_prompt: str | None, instruction: str | None) -> list[dict]:
    """Chat messages for one sample. ``<image>`` placeholders in the problem place the images; without any, the
    images come first. A placeholder count that differs from the number of images is an error."""
    pieces = problem.split(IMAGE_PLACEHOLDER)
    placeholders = len(pieces) - 1
    content: list[dict] = []
    if placeholders == 0:
        content += [{"type": "image"}] * num_images
        pieces = [problem]
    elif placeholders != num_images:
        raise ValueError(f"problem has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the row has {num_images} image(s)")
    for i, piece in enumerate(pieces):
        if i > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece})
    if instruction:
        content.append({"type": "text", "text": ("\n" if content and content[-1]["type"] == "text" else "") + instruction})
    # the system prompt as a list of parts too: some families' templates (Idefics3, SmolVLM) iterate parts and drop a
    # plain string silently
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    return messages + [{"role": "user", "content": content}]


def render_prompt(processor, messages: list[dict]) -> str:
    """The prompt text the model continues: ``messages`` in the processor's chat template, assistant turn opened."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(processor, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]], max_prompt_length: int | None, ids: Sequence[str] | None = None):
    """Tokenize prompts with their images, left-padded; a prompt over ``max_prompt_length`` tokens is an error.

    Images go nested per prompt: every family's processor takes that, and some need it (Gemma 3 and 4 count images
    per prompt; LLaVA-OneVision expands a flat list differently)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    nested = [list(row) for row in images]
    encoded = processor(text=list(prompts), images=nested if any(nested) else None, return_tensors="pt", padding=True)
    if max_prompt_length is not None:
        lengths = encoded["attention_mask"].sum(dim=1)
        too_long = (lengths > max_prompt_length).nonzero().flatten().tolist()
        if too_long:
            row = too_long[0]
            name = f"sample {ids[row]!r}" if ids is not None else f"prompt {row}"
            raise ValueError(
                f"{name} has {int(lengths[row])} prompt tokens (images included), over max_prompt_length="
                f"{max_prompt_length}; raise the limit or shrink the images"
            )
    return encoded
