"""Each prompt's prefill run once for all its rollouts: in ``generate`` and in a log-prob pass.

``generate`` (:func:`prefilled_generate_inputs`): the distinct prompts of a call run once, all but their last token,
with the KV cache on; the cache (and Qwen-VL's per-row ``rope_deltas``) is gathered to the G rows of each prompt and
``generate`` continues from it, so its first step runs the last prompt token on every row and then decodes as usual.

A rollout batch holds every prompt G times, and the prompt (image tokens, system prompt, question) is most of each
row. A log-prob pass (the policy's with gradients, the old policy's, the reference's) over the rows of a micro-batch
therefore runs the distinct prompts once with the KV cache on, gathers the cache to the rows (an index: under
autograd every row's gradient flows back into its prompt's one prefill), and runs only the completion tokens on
every row. The logits are those of the full forward over ``prompt + completion``: same attention, same positions
(Qwen-VL's 3-D M-RoPE positions are computed for the full rows, as the full forward would, and passed in).

Used only where it is the same computation: families the conformance suite shows exact
(:mod:`durian_lightning.models.families`; others, e.g. Gemma 4's image-token attention layout or Qwen3.5's
recurrent layers, may treat a split sequence differently), not with gradient checkpointing, under which
transformers drops the cache while training, and not while a dropout is active (LoRA dropout > 0 in the pass with
gradients: each row must draw its own mask).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from durian_lightning.models.families import fast_path_verified
from durian_lightning.models.parts import inner_model, is_sharded, transformers_model


def can_share_generate_prefill(model) -> bool:
    """``generate`` may start from a shared prefill: the family is verified and transformers computes generation
    positions with the hook used for the prefill's (sampling is in eval mode: no dropout, no checkpointing)."""
    return fast_path_verified(model, "share_generate_prefill") and hasattr(transformers_model(model), "_prepare_position_ids_for_generation")


def can_share_prefill(model) -> bool:
    """The family is verified, a cache will be kept (no gradient checkpointing), the forward is deterministic, and
    the model is not sharded: under fsdp2 the two forwards (prefill, then completions) gave gradients that differed in
    the last bit between a run and its resume from a checkpoint, so a resume would not reproduce the run."""
    return fast_path_verified(model, "share_prompt_prefill") and not has_active_dropout(model) and not any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules()) and not is_sharded(model)


def has_active_dropout(model) -> bool:
    """A dropout that is on: a ``Dropout`` module with p > 0 in train mode (LoRA's ``lora_dropout``, a base model's
    hidden dropout) or an attention layer in train mode with ``attention_dropout`` > 0. A shared prefill would then
    give the G rows of a prompt one dropout mask on the prompt instead of one each."""
    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        rate = getattr(module, "attention_dropout", 0.0)
        if isinstance(rate, float) and rate > 0:
            return True
    return False


def distinct_prompts(prompts: Sequence[str], images: Sequence[Sequence[object]]) -> tuple[list[int], list[int]]:
    """``(firsts, index)``: the position of each distinct (prompt text, image objects) pair's first row, and for
    every row the number of its pair, in order of first appearance. Rows of one prompt share its image objects."""
    numbers: dict[tuple, int] = {}
    firsts, index = [], []
    for row, (prompt, row_images) in enumerate(zip(prompts, images)):
        key = (prompt, tuple(id(image) for image in row_images))
        if key not in numbers:
            numbers[key] = len(firsts)
            firsts.append(row)
        index.append(numbers[key])
    return firsts, index


def prefilled_generate_inputs(model, prompt_inputs: dict, index: Sequence[int],
                              placeholder_token_ids: Sequence[int]) -> dict | None:
    """``generate`` keyword arguments for the rows, starting from one prefill of each distinct prompt.

    ``prompt_inputs``: the model inputs of the distinct prompts (left-padded to width P, as the rows would be);
    ``index``: each row's prompt (:func:`distinct_prompts`). The prompts run over their first P - 1 tokens (images
    included); the rows get their prompt's cache, their token inputs over all P tokens and no pixels: ``generate``
    then runs only the uncached last token. ``None`` when a prompt's last token is not text (it would need its image
    in the continuation): the caller takes the plain path.
    """
    ids = prompt_inputs["input_ids"]
    if bool(torch.isin(ids[:, -1], torch.tensor(list(placeholder_token_ids), device=ids.device)).any()):
        return None
    per_token = [key for key, value in prompt_inputs.items()
                 if isinstance(value, torch.Tensor) and value.shape == ids.shape]
    if any(key.endswith("token_type_ids") and bool(prompt_inputs[key][:, -1].any()) for key in per_token):
        return None
    index = torch.as_tensor(index, device=ids.device)
    prefix = {key: (value[:, :-1] if key in per_token else value) for key, value in prompt_inputs.items()}
    # the positions generate would give these tokens (from the attention mask: left padding shifts them; Qwen-VL's
    # M-RoPE from the image grids, which also sets its rope_deltas)
    prefix["position_ids"] = transformers_model(model)._prepare_position_ids_for_generation(prefix["input_ids"], dict(prefix))
    out = model(**prefix, use_cache=True, logits_to_keep=1)
    cache_name = "cache" if hasattr(out, "cache") else "past_key_values"  # as in shared_prefill_logits
    cache = getattr(out, cache_name)
    cache.reorder_cache(index)  # gathers every layer's state to the rows (recurrent layers' too, unlike batch_select)
    inner = inner_model(model)
    if isinstance(getattr(inner, "rope_deltas", None), torch.Tensor):  # Qwen-VL: per prompt row, set by the prefill
        inner.rope_deltas = inner.rope_deltas[index]
    rows = {key: prompt_inputs[key][index] for key in per_token}
    rows[cache_name] = cache
    return rows


def _rope_positions(model, prompt_inputs: dict, index: torch.Tensor, images_per_prompt: Sequence[int],
                    completion: torch.Tensor, full_mask: torch.Tensor) -> torch.Tensor | None:
    """Qwen-VL's ``(3, rows, P + T)`` M-RoPE positions of the full rows, as its full forward computes them; ``None``
    for 1-D RoPE models, whose positions in a cached forward continue from the cache length like the full one's.
    Passed explicitly because Qwen-VL's cached forward would otherwise offset them by ``rope_deltas`` kept from
    whichever call set it last (e.g. ``generate`` on other rows)."""
    inner = inner_model(model)
    if not hasattr(inner, "get_rope_index"):
        return None
    rows, width = completion.shape[0], prompt_inputs["input_ids"].shape[1] + completion.shape[1]
    if prompt_inputs.get("image_grid_thw") is None:  # text only: the full forward counts 0 .. P + T - 1
        return torch.arange(width, device=completion.device).expand(3, rows, width)
    grids = prompt_inputs["image_grid_thw"].split(list(images_per_prompt))
    kwargs = dict(image_grid_thw=torch.cat([grids[i] for i in index.tolist()]), attention_mask=full_mask)
    full_ids = torch.cat([prompt_inputs["input_ids"][index], completion], dim=1)
    if "mm_token_type_ids" in inspect.signature(inner.get_rope_index).parameters:
        kwargs["mm_token_type_ids"] = torch.cat([prompt_inputs["mm_token_type_ids"][index], torch.zeros_like(completion)], dim=1)
    return inner.get_rope_index(full_ids, **kwargs)[0]


def shared_prefill_logits(model, prompt_inputs: dict, firsts: Sequence[int], index: Sequence[int],
                          images_per_prompt: Sequence[int], completion: torch.Tensor,
                          completion_mask: torch.Tensor) -> torch.Tensor:
    """``(rows, T, vocab)`` logits predicting each completion token.

    ``prompt_inputs``: the model inputs of the distinct prompts (left-padded to width P, as the rows would be);
    ``firsts`` / ``index``: as :func:`distinct_prompts` gives them; ``completion`` / ``completion_mask``: ``(rows, T)``.
    """
    index = torch.as_tensor(index, device=completion.device)
    prompt_mask = prompt_inputs["attention_mask"]
    full_mask = torch.cat([prompt_mask[index], completion_mask.to(prompt_mask.dtype)], dim=1)
    width = prompt_mask.shape[1]
    positions = _rope_positions(model, prompt_inputs, index, images_per_prompt, completion, full_mask)
    prefill = dict(prompt_inputs)
    if positions is not None:
        prefill["position_ids"] = positions[:, list(firsts), :width]
    out = model(**prefill, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1][index].unsqueeze(1)  # predicts completion token 0
    if completion.shape[1] == 1:
        return first
    # transformers 5.2x names the cache ``cache`` in outputs and arguments; earlier versions ``past_key_values``
    cache_name = "cache" if hasattr(out, "cache") else "past_key_values"
    cache = getattr(out, cache_name)
    cache.batch_select_indices(index)
    rest = {"input_ids": completion[:, :-1], "attention_mask": full_mask[:, :-1], "use_cache": True, cache_name: cache}
    if positions is not None:
        rest["position_ids"] = positions[:, :, width:-1]
    return torch.cat([first, model(**rest).logits], dim=1)
