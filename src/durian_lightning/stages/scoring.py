"""The reward stage: a rollout batch scored by the verifiable reward, with each prompt's confidence.

:class:`ScoredRollouts` is what flows from the rollout to the update: the completions, their rewards, and the
per-prompt difficulty scores (visual entropy from the data, confidence from the sampled log-probs). Its rows are
grouped by prompt, G consecutive rows each, so prompts can be selected and concatenated (dynamic sampling does both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from durian_lightning.core.advantages import consecutive_prompt_index
from durian_lightning.core.difficulty import Reduction, sequence_confidence
from durian_lightning.core.rewards import WeightedReward
from durian_lightning.stages.rollout import Rollout, pad_completions

# batch keys that are not passed to reward functions (the rest, e.g. a dataset's own columns, are)
_NOT_REWARD_FIELDS = ("images", "prompt", "answer", "messages", "visual_entropy", "id", "problem", "dataset_index")


@dataclass(frozen=True)
class ScoredRollouts:
    """G rollouts per prompt with their rewards and difficulty scores (rows: prompt-major, G per prompt)."""

    rollout: Rollout
    num_generations: int
    ids: list[str]  # (P,) sample id per prompt
    problems: list[str]  # (P,) the question as the data states it
    answers: list[str]  # (P,) the gold answer
    visual_entropy: torch.Tensor  # (P,) perceptual difficulty
    confidence: torch.Tensor  # (P,) mean sequence log-prob of the prompt's rollouts when they were sampled
    rewards: torch.Tensor  # (N,) weighted total reward per rollout
    reward_components: dict[str, torch.Tensor]  # reward function name -> (N,) raw scores
    old_logprobs: torch.Tensor | None = None  # (N, T) under the policy that sampled (None: not computed)
    ref_logprobs: torch.Tensor | None = None  # (N, T) under the reference policy (None: no KL term)
    reward_failures: tuple[str, ...] = ()  # with reward.on_error="zero": the scores that failed and were set to 0

    @property
    def num_prompts(self) -> int:
        return len(self.ids)

    @property
    def prompt_index(self) -> torch.Tensor:
        """(N,) the prompt each row answers."""
        return consecutive_prompt_index(self.num_prompts, self.num_generations, self.rewards.device)

    def informative_prompts(self, reward: str = "total") -> list[int]:
        """Prompts whose G values of ``reward`` (a reward component's name, or ``"total"``) are not all equal."""
        if reward == "total":
            values = self.rewards
        elif reward in self.reward_components:
            values = self.reward_components[reward]
        else:
            raise ValueError(f"no reward component {reward!r} to filter on; the reward has "
                             f"{sorted(self.reward_components)} (or 'total', the weighted sum)")
        per_prompt = values.view(-1, self.num_generations)
        return (per_prompt.amax(dim=1) != per_prompt.amin(dim=1)).nonzero().flatten().tolist()

    def select_prompts(self, prompts: Sequence[int]) -> "ScoredRollouts":
        """These prompts (with all their rows), in this order."""
        g = self.num_generations
        prompts = list(prompts)
        rows = [p * g + k for p in prompts for k in range(g)]

        def pick(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[rows]

        return replace(
            self, rollout=self.rollout.select(rows), ids=[self.ids[p] for p in prompts],
            problems=[self.problems[p] for p in prompts], answers=[self.answers[p] for p in prompts],
            visual_entropy=self.visual_entropy[prompts], confidence=self.confidence[prompts], rewards=self.rewards[rows],
            reward_components={name: values[rows] for name, values in self.reward_components.items()},
            old_logprobs=pick(self.old_logprobs), ref_logprobs=pick(self.ref_logprobs),
        )

    @staticmethod
    def concat(parts: Sequence["ScoredRollouts"]) -> "ScoredRollouts":
        """The prompts of every part, in order (completion tensors right-padded to the widest part)."""
        rollout = Rollout.concat([part.rollout for part in parts])
        width = rollout.completion_ids.shape[1]

        def stack(name: str) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else torch.cat([pad_completions(v, width) for v in values])

        first = parts[0]
        return ScoredRollouts(
            rollout=rollout, num_generations=first.num_generations, ids=[i for part in parts for i in part.ids],
            problems=[q for part in parts for q in part.problems], answers=[a for part in parts for a in part.answers],
            visual_entropy=torch.cat([part.visual_entropy for part in parts]),
            confidence=torch.cat([part.confidence for part in parts]),
            rewards=torch.cat([part.rewards for part in parts]),
            reward_components={name: torch.cat([part.reward_components[name] for part in parts])
                               for name in first.reward_components},
            old_logprobs=stack("old_logprobs"), ref_logprobs=stack("ref_logprobs"),
        )


def reward_failures_message(failures: Sequence[str], step: int) -> str | None:
    """The warning for reward scores that failed and were set to 0 (``reward.on_error: zero``): the first three."""
    if not failures:
        return None
    more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
    return f"step {step}: {len(failures)} reward score(s) failed and were set to 0{more}: {' | '.join(failures[:3])}"


def score_rollouts(
    rollout: Rollout,
    batch: dict[str, Any],
    reward: WeightedReward,
    num_generations: int,
    confidence_reduction: Reduction = "sum",
    device: torch.device | str = "cpu",
) -> ScoredRollouts:
    """Reward every completion against its prompt's answer, and each prompt's confidence from the log-probs
    recorded while sampling (no extra forward pass).

    Reward functions get ``problem`` and every dataset column the batch carries besides the model inputs, one entry
    per completion.
    """
    g = num_generations

    def per_row(values: Sequence) -> list:
        return [v for v in values for _ in range(g)]

    fields = {key: per_row(values) for key, values in batch.items() if key not in _NOT_REWARD_FIELDS}
    scores = reward(rollout.completions, per_row(batch["answer"]), sample_ids=per_row(batch["id"]),
                    problem=per_row(batch["problem"]), **fields)
    num_prompts = len(batch["id"])
    prompt_index = consecutive_prompt_index(num_prompts, g, device)
    confidence = sequence_confidence(rollout.sampled_logprobs.to(device), rollout.completion_mask.to(device),
                                     prompt_index, confidence_reduction, num_prompts)
    return ScoredRollouts(
        rollout=rollout, num_generations=g, ids=list(batch["id"]), problems=list(batch["problem"]),
        answers=list(batch["answer"]),
        visual_entropy=batch["visual_entropy"].to(device), confidence=confidence, rewards=scores.total.to(device),
        reward_components={name: values.to(device) for name, values in scores.components.items()},
        reward_failures=tuple(scores.failures),
    )
