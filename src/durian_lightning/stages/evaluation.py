"""Evaluation of one completion per prompt: accuracy overall and per perceptual group, per-sample records (for the
error-vs-difficulty table and per-source accuracy), the breakdowns an epoch logs, and prediction rows. Plain
functions; the module runs them and logs what they return."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from durian_lightning._distributed import all_gather_records
from durian_lightning.core.difficulty import perceptual_groups
from durian_lightning.core.rewards import extract_answer
from durian_lightning.stages.answer_prior import answer_prior_accuracy, most_frequent_answers
from durian_lightning.stages.scoring import ScoredRollouts


def correctness(scored: ScoredRollouts) -> torch.Tensor:
    """The accuracy reward when there is one, else the total reward."""
    return scored.reward_components.get("accuracy", scored.rewards)


def sampled_accuracy(correct: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per prompt, from the correctness of k sampled completions (k consecutive rows per prompt): mean@k, their mean
    (the expected accuracy of one sample), and pass@k, 1 when at least one is right (with exactly k samples this is
    the unbiased pass@k estimate)."""
    if correct.numel() % k:
        raise ValueError(f"{correct.numel()} completions are not k = {k} per prompt")
    per_prompt = correct.view(-1, k)
    return {"mean@k": per_prompt.mean(1), "pass@k": (per_prompt > 0).any(1).to(correct.dtype)}


def sample_records(
    scored: ScoredRollouts, batch: dict[str, Any], percentiles: Sequence[float], thresholds: torch.Tensor | None
) -> list[dict[str, Any]]:
    """One record per sample: correctness, reward, difficulty scores and perceptual group (0 = simplest), completion
    and answer, its position in the dataset, and the breakdown columns (:data:`BREAKDOWNS`) the batch has."""
    correct = correctness(scored)
    groups = perceptual_groups(scored.visual_entropy, percentiles, thresholds).tolist()
    positions = batch.get("dataset_index") or [None] * scored.num_prompts
    return [
        {"id": scored.ids[i], "dataset_index": positions[i], "problem": scored.problems[i], "answer": scored.answers[i],
         "completion": scored.rollout.completions[i], "correct": float(correct[i]), "reward": float(scored.rewards[i]),
         "visual_entropy": float(scored.visual_entropy[i]), "confidence": float(scored.confidence[i]),
         "perceptual_group": int(groups[i]), **{column: batch[column][i] for column in BREAKDOWNS if column in batch}}
        for i in range(scored.num_prompts)
    ]


def unique_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each dataset position once: a distributed sampler pads the last ranks' shares with repeats of the first
    samples so that every rank has as many batches, and those repeats must not count twice."""
    seen: set = set()
    out = []
    for record in records:
        position = record.get("dataset_index")
        if position is None or position not in seen:
            seen.add(position)
            out.append(record)
    return out


def gathered_records(trainer, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's evaluation records, each sample once (a collective: every rank calls it)."""
    return unique_records(all_gather_records(trainer, list(records)))


def evaluation_metrics(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means over the records: accuracy, reward, accuracy per perceptual group (NaN for a group without samples: no
    sample, no accuracy, rather than a 0 that reads as all wrong), and ``mean@k`` / ``pass@k`` where recorded."""
    def mean(key: str, group: int | None = None) -> float:
        values = [r[key] for r in records if key in r and (group is None or r["perceptual_group"] == group)]
        return sum(values) / len(values) if values else math.nan

    metrics = {"accuracy": mean("correct"), "reward": mean("reward"),
               **{f"accuracy_perceptual_{k}": mean("correct", k) for k in range(3)}}
    metrics.update({name: mean(name) for name in ("mean@k", "pass@k") if any(name in r for r in records)})
    return metrics


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


def evaluation_records(generate: Callable[..., ScoredRollouts], batch: dict[str, Any], percentiles: Sequence[float],
                       thresholds: torch.Tensor | None, samples: int = 0) -> list[dict[str, Any]]:
    """The batch's records (:func:`sample_records`) of one greedy completion per prompt (``generate(batch)``), with
    mean@k / pass@k of ``samples`` sampled ones (``generate(batch, k, do_sample=True)``) when k > 0."""
    records = sample_records(generate(batch), batch, percentiles, thresholds)
    if samples:
        sampled = generate(batch, samples, do_sample=True)
        for name, values in sampled_accuracy(correctness(sampled), samples).items():
            for record, value in zip(records, values.tolist()):
                record[name] = value
    return records


def breakdown_metrics(records: Sequence[dict[str, Any]], stage: str, samples: int,
                      train: Sequence | None = None) -> dict[str, float]:
    """What an evaluation epoch logs, named ``<stage>/...``: :func:`evaluation_metrics` (``mean@k`` named for its k),
    accuracy per :data:`BREAKDOWNS` value, and beside them the answer prior, each question type's most frequent answer
    among the ``train`` samples (when given), scored on the same records."""
    metrics = {f"{stage}/{name.replace('@k', f'@{samples}')}": value for name, value in evaluation_metrics(records).items()}
    for column in BREAKDOWNS:
        metrics.update({f"{stage}/accuracy_{column}_{value}": acc for value, acc in accuracy_by(records, column).items()})
    if train and records:
        prior = most_frequent_answers((str(s.extra.get("question_type", "")), s.answer) for s in train)
        evaluated = [(str(r.get("question_type", "")), r["answer"]) for r in records]
        for key, accuracy in answer_prior_accuracy(prior, evaluated).items():
            metrics[f"{stage}/answer_prior" if key == "overall" else f"{stage}/answer_prior_question_type_{key}"] = accuracy
    return metrics
