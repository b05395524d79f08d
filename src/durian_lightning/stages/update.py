"""The update stage: PPO-style passes over a rollout batch, in mini-batches (one optimizer step each) and
micro-batches (gradient accumulation, memory only).

    rollout batch (P prompts x G rollouts)
      -> ``ppo_epochs`` passes over mini-batches of ``mini_batch_size`` prompts: one optimizer step each
        -> micro-batches of ``micro_batch_size`` rollouts: forward + backward, gradients accumulate

Each micro-batch's loss is :func:`~durian_lightning.core.losses.policy_loss` with the mini-batch's aggregation
denominator, so the accumulated gradient is exactly that of the mini-batch loss, whatever the micro-batch size.
Under data parallelism every rank divides by the mean of the ranks' denominators, so the averaged gradient is that
of the global mini-batch: for ``token-mean``, the sum over every rank's tokens / their number, not a mean of per-rank
token means (ranks' completions differ in length). The sequence modes' denominators are equal on every rank.

Also here: the optimizer the update steps (:func:`build_optimizer`) and the old-policy and reference log-prob passes
before it (:func:`old_and_reference_logprobs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from durian_lightning.core.losses import PolicyLossConfig, aggregation_denominator, policy_loss
from durian_lightning.stages.rollout import Rollout, evaluation_mode
from durian_lightning.stages.scoring import ScoredRollouts


@dataclass(frozen=True)
class UpdateBatch:
    """This rank's rollouts and what the loss needs of them (rows prompt-major, G per prompt)."""

    rollout: Rollout
    advantages: torch.Tensor  # (N,) float32
    num_generations: int
    old_logprobs: torch.Tensor | None = None  # (N, T); None: on-policy, see ppo_update
    ref_logprobs: torch.Tensor | None = None  # (N, T); needed when the loss has a KL term


@dataclass(frozen=True)
class UpdateStats:
    loss: float  # mean over optimizer steps of the mini-batch loss
    kl: float  # mean over optimizer steps of the aggregated KL estimate (0 without a KL term)
    clip_fraction_low: float  # share of all real tokens (over every pass) clipped at 1 - eps_low
    clip_fraction_high: float  # ... and at 1 + eps_high
    optimizer_steps: int
    tokens: float = 0.0  # real tokens over every pass (what the clip fractions are shares of)
    # |log-prob recorded while sampling - the training forward's| on the same tokens, before any optimizer step moved
    # the policy (the old log-probs, or the one step's own): its sum over gap_tokens tokens, and its max
    gap_sum: float = 0.0
    gap_max: float = 0.0
    gap_tokens: float = 0.0

    @property
    def clip_fraction(self) -> float:
        return self.clip_fraction_low + self.clip_fraction_high


def ppo_update(
    batch: UpdateBatch,
    logprobs: Callable[[torch.Tensor], torch.Tensor],
    loss_config: PolicyLossConfig,
    mini_batch_size: int,
    micro_batch_size: int,
    ppo_epochs: int,
    backward: Callable[[torch.Tensor, bool], None],
    optimizer_step: Callable[[], None],
    mean_over_ranks: Callable[[float], float] = lambda value: value,
) -> UpdateStats:
    """Run the passes; returns their statistics.

    ``logprobs(rows)`` gives the current policy's ``(len(rows), T)`` completion log-probs with gradients;
    ``backward(loss, last)`` accumulates gradients (``last``: the optimizer step's last micro-batch, where
    gradients sharded over ranks are reduced); ``optimizer_step()`` applies them and zeroes them (gradients must be
    zero on entry). ``mini_batch_size`` is in prompts, ``micro_batch_size`` in rollouts. ``mean_over_ranks`` (a
    collective under data parallelism) gives the mini-batch's loss denominator every rank uses. The rollout's recorded
    sampling log-probs are the behaviour policy: compared with the old ones (``gap_*`` statistics) and, with
    ``loss_config.rollout_correction``, the weights' denominator.

    Without ``old_logprobs`` the update is on-policy: its single optimizer step uses its own forward's detached
    log-probs as the old ones, which is exact (the weights have not moved, the ratio is 1) and saves a forward pass.
    That is only valid for one optimizer step per batch, so anything else is refused.
    """
    g = batch.num_generations
    num_prompts = len(batch.rollout) // g
    if batch.old_logprobs is None and (ppo_epochs > 1 or mini_batch_size < num_prompts):
        raise ValueError("old_logprobs are needed when a batch feeds more than one optimizer step")
    mask = batch.rollout.completion_mask.to(batch.advantages.device)
    step_losses, step_kls = [], []
    clipped_low = clipped_high = tokens = gap_sum = gap_max = gap_tokens = 0.0
    behaviour = batch.rollout.sampled_logprobs
    for epoch in range(ppo_epochs):
        for first in range(0, num_prompts, mini_batch_size):
            rows = torch.arange(first * g, min(num_prompts, first + mini_batch_size) * g)
            denominator = mean_over_ranks(aggregation_denominator(mask[rows], loss_config.aggregation))
            step_loss = step_kl = 0.0
            chunks = rows.split(micro_batch_size)
            for index, chunk in enumerate(chunks):
                current = logprobs(chunk)
                old = current.detach() if batch.old_logprobs is None else batch.old_logprobs[chunk]
                ref = None if batch.ref_logprobs is None else batch.ref_logprobs[chunk]
                recorded = None if behaviour is None else behaviour[chunk].to(current.device, current.dtype)
                out = policy_loss(current, old, batch.advantages[chunk], mask[chunk], ref, loss_config, denominator,
                                  recorded)
                if recorded is not None and epoch == 0:  # every row once, under the policy that sampled it
                    gap = (old.detach() - recorded).abs() * mask[chunk]
                    gap_sum, gap_max = gap_sum + float(gap.sum()), max(gap_max, float(gap.max()))
                    gap_tokens += float(mask[chunk].sum())
                backward(out.loss, index == len(chunks) - 1)
                step_loss += float(out.loss.detach())
                step_kl += float(out.kl)
                chunk_tokens = float(mask[chunk].sum())
                clipped_low += float(out.clip_fraction_low) * chunk_tokens
                clipped_high += float(out.clip_fraction_high) * chunk_tokens
                tokens += chunk_tokens
            optimizer_step()
            step_losses.append(step_loss)
            step_kls.append(step_kl)
    return UpdateStats(
        loss=sum(step_losses) / len(step_losses), kl=sum(step_kls) / len(step_kls),
        clip_fraction_low=clipped_low / max(tokens, 1.0), clip_fraction_high=clipped_high / max(tokens, 1.0),
        optimizer_steps=len(step_losses), tokens=tokens, gap_sum=gap_sum, gap_max=gap_max, gap_tokens=gap_tokens,
    )


def build_optimizer(parameters: list[torch.nn.Parameter], optimization) -> dict:
    """AdamW over the trained weights with a linear warm-up of ``optimization.warmup_steps`` optimizer steps; refused
    for weights in 16 bits, where AdamW's small updates are rounded away (3 steps at lr 1e-6 moved 35 of 16,384 LoRA
    entries in bf16-true, 16,301 in bf16-mixed, tiny LLaVA)."""
    half = {str(p.dtype) for p in parameters if p.dtype in (torch.bfloat16, torch.float16)}
    if half:
        raise ValueError(
            f"the trained weights are {', '.join(sorted(half))} (from --trainer.precision bf16-true / 16-true, or "
            "--model.dtype bfloat16 without LoRA): AdamW's small updates are rounded away in 16 bits. Use "
            "--trainer.precision bf16-mixed with --model.dtype bfloat16 (the frozen base stays in bfloat16, the "
            "LoRA adapter trains in float32), or --model.dtype float32 to train every weight"
        )
    optimizer = torch.optim.AdamW(parameters, lr=optimization.learning_rate, weight_decay=optimization.weight_decay)
    warmup = optimization.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def old_and_reference_logprobs(scored: ScoredRollouts, model, policy: Callable, reference: Callable | None,
                               micro_batch_size: int, old: bool, timed: Callable = lambda phase: contextlib.nullcontext()
                               ) -> ScoredRollouts:
    """``scored`` with the old-policy log-probs (``old``: the batch feeds several optimizer steps) and the reference's
    (when ``reference`` is given, for a KL term), each ``f(rollout, rows)`` run over micro-batches, without
    gradients and without dropout: these are the policies' own log-probs."""
    rows = torch.arange(len(scored.rollout))
    if not len(rows):
        return scored

    def run(logprobs) -> torch.Tensor:
        return torch.cat([logprobs(scored.rollout, chunk) for chunk in rows.split(micro_batch_size)])

    with torch.no_grad(), evaluation_mode(model):
        if old:
            with timed("old_logprobs"):
                scored = dataclasses.replace(scored, old_logprobs=run(policy))
        if reference is not None:
            with timed("ref_logprobs"):
                scored = dataclasses.replace(scored, ref_logprobs=run(reference))
    return scored
