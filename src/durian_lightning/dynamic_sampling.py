"""DAPO's dynamic sampling: only prompts whose rewards differ enter an update, and an update waits for a full batch.

A prompt whose G rewards are all equal has zero advantage under every estimator and only dilutes the loss. The
buffer holds informative prompts first in, first out, across steps; a prompt that waits over an update was sampled
by an older policy, so it must carry its own old log-probs (the caller computes them before adding it).
"""

from __future__ import annotations

from .scoring import ScoredRollouts


class PromptBuffer:
    """Informative prompts waiting for an update, oldest first."""

    def __init__(self) -> None:
        self._parts: list[ScoredRollouts] = []

    def __len__(self) -> int:
        return sum(part.num_prompts for part in self._parts)

    @staticmethod
    def informative(scored: ScoredRollouts) -> ScoredRollouts:
        """The prompts of ``scored`` whose G rewards are not all equal."""
        return scored.select_prompts(scored.informative_prompts())

    def add(self, scored: ScoredRollouts) -> None:
        if scored.num_prompts:
            self._parts.append(scored)

    def take(self, num_prompts: int) -> ScoredRollouts:
        """The ``num_prompts`` oldest prompts, removed from the buffer."""
        if not 0 < num_prompts <= len(self):
            raise ValueError(f"cannot take {num_prompts} prompts from a buffer of {len(self)}")
        taken, count = [], 0
        while count < num_prompts:
            part = self._parts.pop(0)
            need = num_prompts - count
            if part.num_prompts > need:  # split: the rest stays at the front
                self._parts.insert(0, part.select_prompts(range(need, part.num_prompts)))
                part = part.select_prompts(range(need))
            taken.append(part)
            count += part.num_prompts
        return ScoredRollouts.concat(taken)
