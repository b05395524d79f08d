"""Tiny offline builders of today's VLM families, one function each, beside LLaVA and Qwen2.5-VL in :mod:`.tiny`.

Each builds the family's own transformers architecture from its config (a few layers of 32-64 dims, random weights
from a fixed seed), a locally trained tokenizer with the family's special tokens, a chat template in the family's
turn markup with its image markup, and the family's processor class built from its parts, so the processor expands
image tokens exactly as the real one does (tiles, grids, per-image token counts). Image sizes stay small so a
forward takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch

from durian_lightning.models.tiny import _chat_template, _seeded_model, _text_config, _train_tokenizer

QWEN_VISION_MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _ids(tokenizer, **names: str) -> dict[str, int]:
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def _finish(model_class, config, tokenizer, seed: int):
    for part in (config, getattr(config, "text_config", None)):
        if part is not None:  # the defaults name the real vocabulary's ids
            part.bos_token_id, part.eos_token_id, part.pad_token_id = None, tokenizer.eos_token_id, tokenizer.pad_token_id
    model = _seeded_model(model_class, config, tokenizer, seed)
    # Some families initialise a matrix to zeros for fine-tuning from a checkpoint (Gemma 3's projector); random here,
    # so a tiny model's image features are not constant
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model


def _qwen_image_processor(patch_size: int, max_pixels: int, merge: int = 2):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=patch_size, merge_size=merge, min_pixels=(merge * patch_size) ** 2,
                                 max_pixels=max_pixels)


def _mrope(head_dim: int) -> list[int]:
    quarter = head_dim // 2 // 4  # the three sections add up to head_dim / 2
    return [head_dim // 2 - 2 * quarter, quarter, quarter]


def build_tiny_qwen2_vl(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                        max_pixels: int = 112 * 112):
    """Qwen2-VL: a ViT with 2-D RoPE and a patch merger, M-RoPE in the language model."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor

    template = _chat_template(QWEN_VISION_MARKUP)
    tokenizer = _train_tokenizer(vocab_size, template)
    head_dim = text_hidden // 4
    config = Qwen2VLConfig(
        text_config=dict(**_text_config(tokenizer, text_hidden, num_layers),
                         rope_parameters={"rope_type": "default", "mrope_section": _mrope(head_dim)}),
        vision_config=dict(depth=num_layers, embed_dim=32, hidden_size=text_hidden, mlp_ratio=2, num_heads=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **_ids(tokenizer, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>"),
    )
    model = _finish(Qwen2VLForConditionalGeneration, config, tokenizer, seed)
    processor = Qwen2VLProcessor(image_processor=_qwen_image_processor(14, max_pixels), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(patch_size=14), chat_template=template)
    return model, processor


def _qwen3_vision(num_layers: int, text_hidden: int, patch_size: int = 16) -> dict:
    return dict(depth=num_layers, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch_size,
                spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text_hidden, num_position_embeddings=64,
                deepstack_visual_indexes=[0])


def _build_qwen3_family(config_class, model_class, text_hidden: int, num_layers: int, vocab_size: int, seed: int,
                        max_pixels: int, text_extra: dict | None = None, rope_extra: dict | None = None,
                        deepstack: bool = True, head_dim: int = 16):
    """Qwen3-VL's ViT and processor with a Qwen3-style language model (``text_extra`` / ``rope_extra``: the variant's
    own settings; ``deepstack``: vision features added into early language layers)."""
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    template = _chat_template(QWEN_VISION_MARKUP)
    tokenizer = _train_tokenizer(vocab_size, template)
    rope = {"rope_type": "default", "mrope_section": _mrope(head_dim), "mrope_interleaved": True, **(rope_extra or {})}
    text = dict(**_text_config(tokenizer, text_hidden, num_layers), head_dim=head_dim, rope_parameters=rope,
                **(text_extra or {}))
    vision = _qwen3_vision(num_layers, text_hidden)
    if not deepstack:
        vision.pop("deepstack_visual_indexes")
    config = config_class(
        text_config=text, vision_config=vision,
        **_ids(tokenizer, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>"),
    )
    model = _finish(model_class, config, tokenizer, seed)
    processor = Qwen3VLProcessor(image_processor=_qwen_image_processor(16, max_pixels), tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(patch_size=16), chat_template=template)
    return model, processor


def build_tiny_qwen3_vl(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                        max_pixels: int = 128 * 128, head_dim: int = 16):
    """Qwen3-VL: DeepStack (vision features added into early language layers), interleaved M-RoPE."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    return _build_qwen3_family(Qwen3VLConfig, Qwen3VLForConditionalGeneration, text_hidden, num_layers, vocab_size,
                               seed, max_pixels, head_dim=head_dim)


def build_tiny_qwen3_vl_moe(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                            max_pixels: int = 128 * 128):
    """Qwen3-VL-MoE: Qwen3-VL with a mixture-of-experts language model (4 experts, 2 per token)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    return _build_qwen3_family(Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, text_hidden, num_layers,
                               vocab_size, seed, max_pixels, text_extra=moe)


def build_tiny_qwen3_5(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                       max_pixels: int = 128 * 128):
    """Qwen3.5: a hybrid language model (gated linear-attention layers beside full attention) with Qwen3-VL's ViT,
    without DeepStack."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    hybrid = dict(layer_types=["linear_attention", "full_attention"][:num_layers] if num_layers == 2 else None,
                  linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
    return _build_qwen3_family(Qwen3_5Config, Qwen3_5ForConditionalGeneration, text_hidden, num_layers, vocab_size,
                               seed, max_pixels, text_extra=hybrid, rope_extra={"partial_rotary_factor": 1.0},
                               deepstack=False)


def build_tiny_gemma3(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                      image_size: int = 64):
    """Gemma 3: a SigLIP tower pooled to ``mm_tokens_per_image`` tokens, bidirectional attention inside each image
    (its forward needs ``token_type_ids``), Gemma turn markup."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    template = _chat_template("<start_of_image>", ("<start_of_turn>{role}\n", "<end_of_turn>\n"), "model")
    names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _train_tokenizer(vocab_size, template, extra_tokens=["<start_of_turn>"], named_tokens=names,
                                 eos_token="<end_of_turn>")
    text = dict(**_text_config(tokenizer, text_hidden, num_layers), head_dim=16, query_pre_attn_scalar=16,
                sliding_window=64, layer_types=["sliding_attention", "full_attention"][:num_layers])
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=num_layers, num_attention_heads=2)
    tokens_per_image = 16  # (64 / 8)^2 = 64 patches, average-pooled to a 4 x 4 grid
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_image,
                          **_ids(tokenizer, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                                 image_token_index="<image_soft_token>"))
    model = _finish(Gemma3ForConditionalGeneration, config, tokenizer, seed)
    image_processor = Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                                image_seq_length=tokens_per_image)
    return model, processor


def build_tiny_internvl(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                        image_size: int = 32):
    """InternVL 3: InternViT + pixel-shuffle projector; the image processor tiles large images (``crop_to_patches``)
    into up to ``max_patches`` crops plus a thumbnail, each crop its own run of image tokens."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    template = _chat_template("<IMG_CONTEXT>")
    names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer = _train_tokenizer(vocab_size, template, named_tokens=names)
    patch = 8
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=2,
                  image_size=[image_size, image_size], patch_size=[patch, patch])
    tokens_per_crop = int((image_size // patch) ** 2 * 0.25)
    config = InternVLConfig(vision_config=vision, text_config=dict(**_text_config(tokenizer, text_hidden, num_layers),
                                                                   model_type="qwen2"),
                            image_seq_length=tokens_per_crop, downsample_ratio=0.5,
                            **_ids(tokenizer, image_token_id="<IMG_CONTEXT>"))
    model = _finish(InternVLForConditionalGeneration, config, tokenizer, seed)
    image_processor = GotOcr2ImageProcessor(size={"height": image_size, "width": image_size}, crop_to_patches=True,
                                            min_patches=1, max_patches=4)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=tokens_per_crop,
                                  chat_template=template)
    return model, processor


def build_tiny_llava_onevision(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                               image_size: int = 32):
    """LLaVA-OneVision: SigLIP + MLP projector with AnyRes tiling (a base view plus grid crops, an image-newline
    token per row), ``image_sizes`` from the processor."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    template = _chat_template("<image>")
    tokenizer = _train_tokenizer(vocab_size, template, named_tokens={"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    vision = dict(model_type="siglip_vision_model", image_size=image_size, patch_size=8, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=2)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=dict(**_text_config(tokenizer, text_hidden, num_layers),
                                                                         model_type="qwen2"),
                                  image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
                                  **_ids(tokenizer, image_token_index="<image>", video_token_index="<video>"))
    model = _finish(LlavaOnevisionForConditionalGeneration, config, tokenizer, seed)
    image_processor = LlavaOnevisionImageProcessor(size={"height": image_size, "width": image_size},
                                                   image_grid_pinpoints=pinpoints)
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor(),
                                        num_image_tokens=(image_size // 8) ** 2, vision_feature_select_strategy="full",
                                        chat_template=template)
    return model, processor


def build_tiny_idefics3(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                        image_size: int = 32):
    """Idefics3: SigLIP + pixel-shuffle connector; the processor splits an image into tiles of ``image_size`` plus a
    global view, marks them with ``<row_i_col_j>`` / ``<global-img>`` and returns ``pixel_attention_mask``."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    template = _chat_template("<image>", ("<|im_start|>{role}:", "<end_of_utterance>\n"), "Assistant", string_content=False)
    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer = _train_tokenizer(vocab_size, template,
                                 extra_tokens=["<fake_token_around_image>", "<global-img>", "<image>", *grid],
                                 eos_token="<end_of_utterance>")
    patch, scale = 8, 2
    vision = dict(image_size=image_size, patch_size=patch, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=num_layers, num_attention_heads=2)
    tokens_per_tile = (image_size // patch) ** 2 // scale**2
    text = dict(**_text_config(tokenizer, text_hidden, num_layers), model_type="llama")
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale,
                            **_ids(tokenizer, image_token_id="<image>"))
    model = _finish(Idefics3ForConditionalGeneration, config, tokenizer, seed)
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 2 * image_size},
                                             max_image_size={"longest_edge": image_size})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens_per_tile,
                                  chat_template=template)
    return model, processor


def build_tiny_glm4v(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                     max_pixels: int = 112 * 112):
    """GLM-4.1V: a Qwen-VL-like ViT with 2-D RoPE and a merger, 3-D RoPE positions in a GLM-4 language model."""
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    markup = "<|begin_of_image|><|image|><|end_of_image|>"
    template = _chat_template(markup, ("<|{role}|>\n", ""), "assistant")
    tokens = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|video|>", "<|begin_of_video|>",
              "<|end_of_video|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tokenizer = _train_tokenizer(vocab_size, template, extra_tokens=tokens, eos_token="<|endoftext|>")
    head_dim = text_hidden // 4
    text = dict(**_text_config(tokenizer, text_hidden, num_layers),
                rope_parameters={"rope_type": "default", "mrope_section": _mrope(head_dim // 2),
                                 "partial_rotary_factor": 0.5})
    vision = dict(depth=num_layers, hidden_size=32, intermediate_size=64, num_heads=2, image_size=28, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text_hidden)
    config = Glm4vConfig(text_config=text, vision_config=vision,
                         **_ids(tokenizer, image_token_id="<|image|>", video_token_id="<|video|>",
                                image_start_token_id="<|begin_of_image|>", image_end_token_id="<|end_of_image|>",
                                video_start_token_id="<|begin_of_video|>", video_end_token_id="<|end_of_video|>"))
    model = _finish(Glm4vForConditionalGeneration, config, tokenizer, seed)
    image_processor = Glm4vImageProcessor(patch_size=14, merge_size=2, size={"shortest_edge": 28 * 28,
                                                                             "longest_edge": max_pixels})
    processor = Glm4vProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=Glm4vVideoProcessor(), chat_template=template)
    return model, processor


def build_tiny_mistral3(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                        longest_edge: int = 64):
    """Mistral 3 (Small 3.1): a Pixtral ViT at the image's own aspect ratio (``image_sizes``), a patch merger, and
    ``[IMG]`` tokens broken per row by ``[IMG_BREAK]`` and closed by ``[IMG_END]``."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor, PixtralProcessor

    template = _chat_template("[IMG]", ("[INST]{role}\n", "[/INST]"), "assistant")
    tokenizer = _train_tokenizer(vocab_size, template, extra_tokens=["[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]"],
                                 eos_token="</s>")
    patch, merge = 8, 2
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                  num_attention_heads=2, image_size=longest_edge, patch_size=patch, head_dim=16)
    text = dict(**_text_config(tokenizer, text_hidden, num_layers), model_type="mistral", head_dim=16)
    config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=merge,
                            **_ids(tokenizer, image_token_index="[IMG]"))
    model = _finish(Mistral3ForConditionalGeneration, config, tokenizer, seed)
    image_processor = PixtralImageProcessor(size={"longest_edge": longest_edge}, patch_size=patch)
    processor = PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                 spatial_merge_size=merge, chat_template=template)
    return model, processor


BUILDERS = {
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
    "qwen3_vl_moe": build_tiny_qwen3_vl_moe,
    "qwen3_5": build_tiny_qwen3_5,
    "gemma3": build_tiny_gemma3,
    "internvl": build_tiny_internvl,
    "llava_onevision": build_tiny_llava_onevision,
    "idefics3": build_tiny_idefics3,
    "glm4v": build_tiny_glm4v,
    "mistral3": build_tiny_mistral3,
}


def build_tiny_gemma4(text_hidden: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0,
                      max_soft_tokens: int = 70):
    """Gemma 4: a vision encoder at the image's aspect ratio pooled 3 x 3 (``image_position_ids``, a soft-token count
    per image), ``<|image|>`` runs between begin/end-of-image tokens, Gemma turn markup; no audio tower."""
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    template = _chat_template("<|image|>", ("<start_of_turn>{role}\n", "<end_of_turn>\n"), "model")
    names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<|image|>",
             "audio_token": "<|audio|>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}
    tokenizer = _train_tokenizer(vocab_size, template, extra_tokens=["<start_of_turn>", "<|video|>"],
                                 named_tokens=names, eos_token="<end_of_turn>")
    text = dict(**_text_config(tokenizer, text_hidden, num_layers), head_dim=16, sliding_window=64,
                layer_types=["sliding_attention", "full_attention"][:num_layers], vocab_size_per_layer_input=len(tokenizer),
                hidden_size_per_layer_input=8, global_head_dim=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=8, pooling_kernel_size=3, position_embedding_size=64)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                          **_ids(tokenizer, boi_token_id="<start_of_image>", eoi_token_id="<end_of_image>",
                                 image_token_id="<|image|>", video_token_id="<|video|>", boa_token_id="<start_of_audio>",
                                 eoa_token_index="<end_of_audio>", audio_token_id="<|audio|>"))
    model = _finish(Gemma4ForConditionalGeneration, config, tokenizer, seed)
    image_processor = Gemma4ImageProcessor(patch_size=8, max_soft_tokens=max_soft_tokens, pooling_kernel_size=3)
    processor = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor,
                                tokenizer=tokenizer, video_processor=Gemma4VideoProcessor(), chat_template=template,
                                image_seq_length=max_soft_tokens)
    return model, processor


BUILDERS["gemma4"] = build_tiny_gemma4
