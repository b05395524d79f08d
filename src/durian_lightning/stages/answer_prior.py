"""The answer-prior baseline: how far a model gets by ignoring the image and answering each question type's most
frequent training answer. An accuracy means little without it: on the bundled synthetic task the prior alone scores
about a third (answering "1" to every count question is right three times in four).

Plain functions over ``(question_type, answer)`` pairs; data without a question-type column is one type, ``""``.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

from durian_lightning.core.rewards import answers_match, normalize_answer


def most_frequent_answers(train: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Each question type's most frequent training answer (compared after normalization; a tie goes to the answer
    seen first)."""
    counts: dict[str, Counter] = {}
    first_form: dict[tuple[str, str], str] = {}
    for question_type, answer in train:
        key = normalize_answer(str(answer))
        counts.setdefault(question_type, Counter())[key] += 1
        first_form.setdefault((question_type, key), str(answer))
    # Counter.most_common keeps insertion order among equal counts
    return {t: first_form[(t, c.most_common(1)[0][0])] for t, c in counts.items()}


def answer_prior_accuracy(prior: dict[str, str], evaluated: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Accuracy of answering ``prior[question_type]`` on each evaluated ``(question_type, gold answer)``: per type and
    ``"overall"`` (over samples, not types). A type the prior never saw counts as wrong."""
    correct: dict[str, list[float]] = {}
    for question_type, gold in evaluated:
        guess = prior.get(question_type)
        correct.setdefault(question_type, []).append(float(guess is not None and answers_match(guess, str(gold))))
    out = {t: sum(v) / len(v) for t, v in sorted(correct.items())}
    every = [x for v in correct.values() for x in v]
    if every:
        out["overall"] = sum(every) / len(every)
    return out
