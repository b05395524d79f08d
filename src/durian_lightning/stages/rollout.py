"""Batched generation of G rollouts per prompt and the log-probabilities of their completion tokens.

Prompts are left-padded so every completion starts at the same column. ``generate`` also records each sampled
token's log-prob (:class:`SampledTokenLogprobs`), which gives the sequence confidence without another forward pass.
Log-probs are recomputed with one forward function (:func:`completion_logprobs`) for the policy, the old policy (when
a rollout batch feeds several optimizer steps) and the reference, so the ratio is exactly 1 where the weights are the
same. Each forward re-encodes its rows' prompts with the processor: that keeps the code architecture-agnostic (LLaVA
pixel tensors, Qwen-VL patch lists with grids) at the cost of repeating the cheap image preprocessing; the expensive
part, the vision tower, runs once per image and step when an :class:`~durian_lightning.stages.image_features.ImageFeatures`
is passed (see there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor

from durian_lightning.models.families import explain_fast_path_off, fast_path_verified
from durian_lightning.models.parts import is_sharded, transformers_model
from durian_lightning.models.prompts import encode_prompts
from durian_lightning.stages.image_features import ImageFeatures
from durian_lightning.stages.shared_prefill import (
    can_share_generate_prefill,
    can_share_prefill,
    distinct_prompts,
    prefilled_generate_inputs,
    shared_prefill_logits,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    cache_implementation: str = "dynamic"  # or "static", for the families verified (models/families.py)
    share_prefill: bool = True  # each prompt prefilled once for its rows, where verified (dynamic cache only)


@dataclass(frozen=True)
class Rollout:
    """Completions flattened to rows, G consecutive rows per prompt (row ``i`` answers prompt ``i // G``)."""

    prompts: list[str]  # (N,) rendered prompt text per row
    images: list[list[Image.Image]]  # (N,) images per row
    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) 1 up to and including the first EOS
    completions: list[str]  # (N,) decoded completion text (special tokens dropped)
    sampled_logprobs: torch.Tensor  # (N, T) log-prob of each token when it was sampled (float32), 0 after EOS
    ended: torch.Tensor  # (N,) bool: the completion ended with EOS (False: cut off at max_new_tokens)
    token_entropy: torch.Tensor | None = None  # (N, T) entropy of the sampling distribution at each token, 0 after EOS

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows: Sequence[int]) -> "Rollout":
        """These rows, in this order."""
        rows = list(rows)
        return Rollout(
            prompts=[self.prompts[i] for i in rows], images=[self.images[i] for i in rows],
            completion_ids=self.completion_ids[rows], completion_mask=self.completion_mask[rows],
            completions=[self.completions[i] for i in rows], sampled_logprobs=self.sampled_logprobs[rows],
            ended=self.ended[rows], token_entropy=None if self.token_entropy is None else self.token_entropy[rows],
        )

    @staticmethod
    def concat(parts: Sequence["Rollout"]) -> "Rollout":
        """Rows of every part in order; completion tensors right-padded to the widest part (mask 0 there)."""
        width = max(part.completion_ids.shape[1] for part in parts)
        return Rollout(
            prompts=[p for part in parts for p in part.prompts], images=[im for part in parts for im in part.images],
            completion_ids=torch.cat([pad_completions(part.completion_ids, width) for part in parts]),
            completion_mask=torch.cat([pad_completions(part.completion_mask, width) for part in parts]),
            completions=[c for part in parts for c in part.completions],
            sampled_logprobs=torch.cat([pad_completions(part.sampled_logprobs, width) for part in parts]),
            ended=torch.cat([part.ended for part in parts]),
            token_entropy=None if any(part.token_entropy is None for part in parts)
            else torch.cat([pad_completions(part.token_entropy, width) for part in parts]),
        )

    def mean_token_entropy(self) -> float:
        """The policy's entropy per completion token, averaged over every token of every row (TRL's ``entropy``,
        verl's ``actor/entropy``): how far from deterministic the sampling still is. NaN when not recorded."""
        if self.token_entropy is None:
            return float("nan")
        mask = self.completion_mask.to(self.token_entropy.device, torch.float32)
        return float((self.token_entropy * mask).sum() / mask.sum().clamp(min=1))


def pad_completions(values: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad ``(N, T)`` completion values with zeros to ``(N, width)`` (padded positions are masked out)."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


def completion_mask_after_eos(completion_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS of each row, 0 after it."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long()


def multimodal_token_ids(model) -> list[int]:
    """Image / video placeholder tokens: a completion must never emit them (the forward pass would look for
    image features to put there)."""
    config = model.config
    names = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(getattr(config, n)) for n in names if isinstance(getattr(config, n, None), int)})


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


class SampledTokenLogprobs(LogitsProcessor):
    """A ``generate`` logits processor that records the log-prob of every sampled token under softmax(logits / T)
    (the distribution :func:`completion_logprobs` computes) and that distribution's entropy
    ``-sum_v p_v log p_v``, then bans the placeholder tokens.

    The token chosen at step t is known only at step t + 1 (the last of ``input_ids`` then), so one step of
    log-probs is kept (N x vocab, not T x N x vocab as ``output_logits`` would); :meth:`finish` reads the last token.
    Recording happens before the ban, so the banned tokens' mass stays in the normalizer, as in a plain forward.
    """

    def __init__(self, temperature: float, banned_token_ids: Sequence[int] = ()):
        self.temperature = temperature
        self.banned = list(banned_token_ids)
        self.previous: torch.Tensor | None = None
        self.recorded: list[torch.Tensor] = []
        self.entropies: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.recorded.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.entropies.append(torch.special.entr(self.previous.exp()).sum(dim=-1))  # entr(p) = -p log p, 0 at p = 0
        if self.banned:
            scores = scores.clone()
            scores[:, self.banned] = -float("inf")
        return scores

    def finish(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) log-probs of ``completion_ids`` (the generated tokens)."""
        if self.previous is not None and len(self.recorded) < completion_ids.shape[1]:
            self.recorded.append(self.previous.gather(1, completion_ids[:, len(self.recorded)].unsqueeze(1)).squeeze(1))
        self.previous = None
        return torch.stack(self.recorded, dim=1) if self.recorded else completion_ids.new_zeros(completion_ids.shape, dtype=torch.float32)

    def entropy(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) entropy of the distribution each token of ``completion_ids`` was drawn from."""
        width = completion_ids.shape[1]
        if not self.entropies:
            return completion_ids.new_zeros(completion_ids.shape, dtype=torch.float32)
        return torch.stack(self.entropies[:width], dim=1)


@contextlib.contextmanager
def _neutral_generation_config(model):
    """Sample from softmax(logits / T) exactly, the distribution the log-probs are computed under.

    ``generate`` fills every unset option from the checkpoint's generation_config.json, and real checkpoints set
    some (Qwen2.5-VL-Instruct: repetition_penalty 1.05, top_k 1, top_p 0.001, temperature 0.1): those would reshape
    the sampling distribution behind the loss's back. For the call, the model's config carries only its token ids.
    """
    inner = transformers_model(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
    )
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def generate_rollouts(
    model,
    processor,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    num_generations: int,
    sampling: SamplingConfig,
    max_prompt_length: int | None = None,
    ids: Sequence[str] | None = None,
    max_sequences_per_call: int | None = None,
    image_features: ImageFeatures | None = None,
) -> Rollout:
    """``num_generations`` completions of every prompt, G consecutive rows per prompt.

    ``max_sequences_per_call`` bounds how many rows one ``generate`` call holds (its KV cache grows with rows x
    tokens); by default all rows go in one call. ``image_features``: encode each image once for all its rows.
    """
    rows_prompts = [p for p in prompts for _ in range(num_generations)]
    rows_images = [list(im) for im in images for _ in range(num_generations)]
    rows_ids = [i for i in ids for _ in range(num_generations)] if ids is not None else None
    step = max_sequences_per_call or len(rows_prompts) or 1
    parts = [
        _generate(model, processor, rows_prompts[first : first + step], rows_images[first : first + step], sampling,
                  max_prompt_length, None if rows_ids is None else rows_ids[first : first + step], image_features)
        for first in range(0, len(rows_prompts), step)
    ]
    return parts[0] if len(parts) == 1 else Rollout.concat(parts)


def explain_rollout_fast_paths_off(model, share_prompt_prefill: bool, cache_implementation: str) -> None:
    """An info line for each fast path asked for that this model's family is not verified for (the plain path runs)."""
    if share_prompt_prefill and not fast_path_verified(model, "share_prompt_prefill"):
        explain_fast_path_off(model, "rollout.share_prompt_prefill in the log-prob passes")
    elif share_prompt_prefill and is_sharded(model):
        log.info("rollout.share_prompt_prefill in the log-prob passes is off under fsdp2 (a resume would not reproduce "
                 "the run's gradients to the last bit); generate still shares each prompt's prefill")
    if cache_implementation == "static" and not fast_path_verified(model, "static_cache"):
        explain_fast_path_off(model, "rollout.cache_implementation: static")  # generate keeps the dynamic cache


@contextlib.contextmanager
def evaluation_mode(model):
    """Every module in eval mode (no dropout: rollouts and the no-grad log-prob passes are those of the policy
    itself), each put back in its own mode after (the frozen vision tower stays in eval mode while training)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _generate(model, processor, rows_prompts, rows_images, sampling: SamplingConfig, max_prompt_length, rows_ids,
              image_features: ImageFeatures | None) -> Rollout:
    """One batched ``generate`` call over these rows; each distinct prompt prefilled once where that is verified."""
    static = sampling.cache_implementation == "static" and fast_path_verified(model, "static_cache")
    firsts, index = ([], []) if static or not (sampling.share_prefill and can_share_generate_prefill(model)) \
        else distinct_prompts(rows_prompts, rows_images)
    shared = 0 < len(firsts) < len(rows_prompts)
    if shared:  # encode (and check the length of) each distinct prompt once
        encoded = encode_prompts(processor, [rows_prompts[i] for i in firsts], [rows_images[i] for i in firsts],
                                 max_prompt_length, None if rows_ids is None else [rows_ids[i] for i in firsts])
    else:
        encoded = encode_prompts(processor, rows_prompts, rows_images, max_prompt_length, rows_ids)
    device = next(model.parameters()).device
    encoded = encoded.to(device)
    encoded_images = [rows_images[i] for i in firsts] if shared else rows_images
    inputs = image_features.model_inputs(encoded, encoded_images) if image_features is not None else dict(encoded)
    eos_ids = _eos_ids(model, processor.tokenizer)
    temperature = sampling.temperature if sampling.do_sample else 1.0
    placeholders = multimodal_token_ids(model)
    recorder = SampledTokenLogprobs(temperature, placeholders)
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=sampling.do_sample, eos_token_id=eos_ids,
                  pad_token_id=processor.tokenizer.pad_token_id, logits_processor=[recorder])
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    if static:
        kwargs["cache_implementation"] = "static"
    if shared:
        with evaluation_mode(model):
            rows_inputs = prefilled_generate_inputs(model, inputs, index, placeholders)
        if rows_inputs is None:  # a prompt ends in an image token: every row runs its prompt
            return _generate(model, processor, rows_prompts, rows_images,
                             dataclasses.replace(sampling, share_prefill=False), max_prompt_length, rows_ids, image_features)
        inputs = rows_inputs
    with evaluation_mode(model), _neutral_generation_config(model):
        output = model.generate(**inputs, **kwargs)
    completion_ids = output[:, inputs["input_ids"].shape[1] :]
    mask = completion_mask_after_eos(completion_ids, eos_ids)
    sampled_logprobs = recorder.finish(completion_ids) * mask
    token_entropy = recorder.entropy(completion_ids) * mask
    texts = processor.tokenizer.batch_decode(completion_ids * mask + processor.tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    ended = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device)).any(dim=1)
    return Rollout(rows_prompts, rows_images, completion_ids, mask.to(completion_ids.device), texts, sampled_logprobs, ended,
                   token_entropy)


def completion_logprobs(model, processor, rollout: Rollout, rows: torch.Tensor | Sequence[int], temperature: float = 1.0,
                        image_features: ImageFeatures | None = None, share_prefill: bool = True) -> torch.Tensor:
    """``(len(rows), T)`` log-probs of the completion tokens under ``model`` (gradients flow if enabled).

    The logits are divided by the sampling temperature, so the old-policy log-probs match the distribution the
    completions were sampled from. ``image_features``: the step's encoded images, reused instead of re-encoding.
    ``share_prefill``: rows of one prompt run its prompt once (:mod:`.shared_prefill`) where that is verified exact.
    """
    rows = torch.as_tensor(rows).tolist()
    prompts, rows_images = [rollout.prompts[i] for i in rows], [rollout.images[i] for i in rows]
    device = next(model.parameters()).device
    completion = rollout.completion_ids[rows].to(device)
    mask = rollout.completion_mask[rows].to(device)
    firsts, index = distinct_prompts(prompts, rows_images) if share_prefill and can_share_prefill(model) else ([], [])
    shared = 0 < len(firsts) < len(rows)
    if shared:
        prompts, rows_images = [prompts[i] for i in firsts], [rows_images[i] for i in firsts]
    encoded = encode_prompts(processor, prompts, rows_images, None).to(device)
    inputs = image_features.model_inputs(encoded, rows_images) if image_features is not None else dict(encoded)
    if shared:
        logits = shared_prefill_logits(model, inputs, firsts, index, [len(images) for images in rows_images],
                                       completion, mask)
        return token_logprobs(logits, completion, temperature)
    inputs.update(extend_token_inputs(encoded, completion, mask))
    length = completion.shape[1]
    logits = model(**inputs, logits_to_keep=length + 1).logits[:, :-1, :]
    return token_logprobs(logits, completion, temperature)


def extend_token_inputs(encoded, completion: torch.Tensor, completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The processor's per-token inputs of the prompts, continued over the completion: the ids and attention mask, and
    every other ``(rows, prompt length)`` tensor (Gemma's ``token_type_ids``, Qwen-VL's and Gemma 4's
    ``mm_token_type_ids``) with 0 = text for the completion tokens."""
    prompt_ids = encoded["input_ids"]
    extended = {"input_ids": torch.cat([prompt_ids, completion], dim=1),
                "attention_mask": torch.cat([encoded["attention_mask"], completion_mask.to(encoded["attention_mask"].dtype)], dim=1)}
    for key, value in encoded.items():
        if key not in extended and isinstance(value, torch.Tensor) and value.shape == prompt_ids.shape:
            extended[key] = torch.cat([value, torch.zeros_like(completion, dtype=value.dtype)], dim=1)
    return extended


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)[token]`` at every position of ``(B, T, vocab)`` logits, as
    ``logit[token] / T - logsumexp(logits / T)``, one row at a time in float32.

    Same numbers as ``log_softmax(...).gather(...)``, but the full-vocabulary work of a row (cast, scale, normalizer)
    is never materialised for the whole batch at once: with a 152k vocabulary that is the biggest tensor of a
    log-prob pass (benchmarks/bench_logprob_memory.py).
    """
    rows = []
    for row_logits, row_tokens in zip(logits, tokens):
        row = row_logits.float()
        if temperature != 1.0:
            row = row / temperature
        rows.append(row.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)
