"""Evaluation of one completion per prompt: accuracy overall and per perceptual group, per-sample records (for the
error-vs-difficulty table and per-source accuracy), and prediction rows. Plain functions; the module logs them."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .difficulty import perceptual_groups
from .rewards import extract_answer
from .scoring import ScoredRollouts

# one metric per name and stage; every rank updates every one (an absent group is an empty update) so they sync as one
METRIC_NAMES = ("accuracy", "reward", *(f"accuracy_perceptual_{k}" for k in range(3)))
SAMPLED_METRIC_NAMES = ("mean@k", "pass@k")  # logged with k spelled out (mean@8) when evaluation.samples = k > 0


def correctness(scored: ScoredRollouts) -> torch.Tensor:
    """The accuracy reward when there is one, else the total reward."""
    return scored.reward_components.get("accuracy", scored.rewards)


def metric_updates(
    scored: ScoredRollouts, percentiles: Sequence[float], thresholds: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """The values each of :data:`METRIC_NAMES` averages, for one evaluation batch (perceptual group 0 = simplest)."""
    correct = correctness(scored)
    groups = perceptual_groups(scored.visual_entropy, percentiles, thresholds).to(correct.device)
    return {"accuracy": correct, "reward": scored.rewards,
            **{f"accuracy_perceptual_{k}": correct[groups == k] for k in range(3)}}


def sampled_accuracy(correct: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per prompt, from the correctness of k sampled completions (k consecutive rows per prompt): mean@k, their mean
    (the expected accuracy of one sample), and pass@k, 1 when at least one is right (with exactly k samples this is
    the unbiased pass@k estimate)."""
    if correct.numel() % k:
        raise ValueError(f"{correct.numel()} completions are not k = {k} per prompt")
    per_prompt = correct.view(-1, k)
    return {"mean@k": per_prompt.mean(1), "pass@k": (per_prompt > 0).any(1).to(correct.dtype)}


def sample_records(scored: ScoredRollouts, batch: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per sample: correctness, difficulty scores, completion and answer, and the breakdown columns
    (:data:`BREAKDOWNS`) the batch has."""
    correct = correctness(scored)
    return [
        {"id": scored.ids[i], "problem": scored.problems[i], "answer": scored.answers[i],
         "completion": scored.rollout.completions[i], "correct": float(correct[i]),
         "visual_entropy": float(scored.visual_entropy[i]), "confidence": float(scored.confidence[i]),
         **{column: batch[column][i] for column in BREAKDOWNS if column in batch}}
        for i in range(scored.num_prompts)
    ]


# dataset columns that evaluation accuracy is also reported by: the benchmark a sample comes from, its question type
BREAKDOWNS = ("source", "question_type")


def accuracy_by(records: Sequence[dict[str, Any]], column: str) -> dict[str, float]:
    """Mean correctness per value of ``column`` over the records that have it."""
    by_value: dict[str, list[float]] = {}
    for record in records:
        if column in record:
            by_value.setdefault(str(record[column]), []).append(record["correct"])
    return {value: sum(values) / len(values) for value, values in sorted(by_value.items())}


def prediction_rows(scored: ScoredRollouts) -> list[dict[str, Any]]:
    """What ``durian predict`` returns per sample: the question and the prompt the model saw, the completion, its
    extracted answer, the gold answer, the reward and the image's visual entropy."""
    completions = scored.rollout.completions
    return [
        {"id": scored.ids[i], "problem": scored.problems[i], "prompt": scored.rollout.prompts[i],
         "completion": completions[i], "prediction": extract_answer(completions[i]), "answer": scored.answers[i],
         "reward": float(scored.rewards[i]), "visual_entropy": float(scored.visual_entropy[i])}
        for i in range(scored.num_prompts)
    ]
