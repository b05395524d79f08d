"""A tiny LLaVA-style VLM built offline from transformers configs: random weights, a locally trained tokenizer.

It exercises exactly the code paths of a real VLM (AutoModelForImageTextToText, AutoProcessor, chat template,
vision tower, generate) in seconds on a CPU, with no download. Weights come from a fixed seed, so two builds are
byte-identical and the visual-entropy cache keyed on them stays valid across runs.
"""

from __future__ import annotations

from typing import Sequence

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<pad>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]



def _chat_template(image_markup: str, turn: tuple[str, str] = ("<|im_start|>{role}\n", "<|im_end|>\n"),
                   assistant: str = "assistant", string_content: bool = True) -> str:
    """A chat template in a family's turn markup (ChatML by default), each image rendered as ``image_markup`` where
    the message content puts it. Content may be a string or a list of parts, for every role; with
    ``string_content=False`` only parts, as Idefics3's and SmolVLM's own templates (a plain string renders empty)."""
    start, end = (part.replace("{role}", "' + (m['role'] if m['role'] != 'assistant' else '" + assistant + "') + '")
                  for part in turn)
    return (
        "{% for m in messages %}{{ '" + start + "' }}"
        + ("{% if m['content'] is string %}{{ m['content'] }}{% else %}" if string_content else "{% if m['content'] is not string %}")
        + "{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image_markup + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        "{{ '" + end + "' }}{% endfor %}{% if add_generation_prompt %}{{ '"
        + turn[0].replace("{role}", assistant) + "' }}{% endif %}"
    )


TINY_CHAT_TEMPLATE = _chat_template("<image>")
QWEN_CHAT_TEMPLATE = _chat_template("<|vision_start|><|image_pad|><|vision_end|>")

_CORPUS = [
    "<think>I count the shapes one by one.</think> The answer is \\boxed{3}.",
    "How many red circles are in the image? What color is the square? How many shapes are there in total?",
    "Reason step by step inside <think> </think> and put the final answer in \\boxed{}.",
    "0 1 2 3 4 5 6 7 8 9 10 red green blue yellow purple orange circle square triangle plus minus",
    "You are a helpful assistant that reasons about images.",
]


def _train_tokenizer(vocab_size: int, chat_template: str = TINY_CHAT_TEMPLATE, corpus: list[str] | None = None,
                     extra_tokens: Sequence[str] = (), named_tokens: dict[str, str] | None = None,
                     eos_token: str = "<|im_end|>"):
    """Byte-level BPE (any text is spellable) whose merges come from ``corpus`` (default: the task's words).

    ``extra_tokens``: a family's special tokens beyond :data:`SPECIAL_TOKENS` (appended, so the shared ones keep their
    ids); ``named_tokens``: attributes processors read (``image_token``, ``boi_token``, ...), each also a special token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    named = dict(named_tokens or {})
    specials = list(dict.fromkeys([*SPECIAL_TOKENS, *extra_tokens, *named.values(), eos_token]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((_CORPUS + list(corpus or [])) * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token, pad_token="<pad>",
                                   **({"extra_special_tokens": named} if named else {}))
    fast.chat_template = chat_template
    return fast


def _text_config(tokenizer, hidden: int, num_layers: int, num_heads: int = 4) -> dict:
    """The tiny Qwen2-style language model both builders share (``num_heads`` heads of hidden/heads, half as many
    KV heads)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def _seeded_model(model_class, config, tokenizer, seed: int):
    """Random weights from ``seed`` without touching the caller's RNG; generation stops at the tokenizer's EOS."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_llava(
    image_size: int = 64,
    patch_size: int = 16,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    corpus: list[str] | None = None,
):
    """Build ``(model, processor)``: a SigLIP vision tower + Qwen2 language model joined LLaVA-style."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    tokenizer = _train_tokenizer(vocab_size, corpus=corpus)
    vision = SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
    )
    text = Qwen2Config(**_text_config(tokenizer, text_hidden, num_layers))
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    model = _seeded_model(LlavaForConditionalGeneration, config, tokenizer, seed)
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    return model, processor


def build_tiny_qwen2_5_vl(
    patch_size: int = 14,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    num_layers: int = 2,
    vocab_size: int = 512,
    max_pixels: int = 112 * 112,
    seed: int = 0,
    text_heads: int = 4,
    vision_heads: int = 2,
):
    """Build ``(model, processor)`` with the Qwen2.5-VL architecture (windowed ViT + patch merger, M-RoPE), tiny by
    default; wider and deeper settings give a mid-size model of the same architecture (the GPU check uses one)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _train_tokenizer(vocab_size, QWEN_CHAT_TEMPLATE)
    head_dim = text_hidden // text_heads
    quarter = head_dim // 2 // 4  # mrope_section must add up to head_dim / 2
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **_text_config(tokenizer, text_hidden, num_layers, text_heads),
            rope_scaling={"type": "mrope", "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]},
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=num_layers,
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_heads=vision_heads,
            out_hidden_size=text_hidden,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[num_layers - 1],
            window_size=4 * patch_size,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded_model(Qwen2_5_VLForConditionalGeneration, config, tokenizer, seed)
    image_processor = Qwen2VLImageProcessor(patch_size=patch_size, min_pixels=(2 * patch_size) ** 2, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(patch_size=patch_size)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=QWEN_CHAT_TEMPLATE
    )
    return model, processor
