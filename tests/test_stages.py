"""The training step's stages on hand-made batches: selecting and joining prompts, the dynamic-sampling buffer, the
global batch of one process, and the update's refusal of a shortcut that would be wrong."""

from dataclasses import replace

import pytest
import torch
from PIL import Image

from durian_lightning.dynamic_sampling import PromptBuffer
from durian_lightning.global_batch import gather_global_batch
from durian_lightning.losses import PolicyLossConfig
from durian_lightning.rollout import Rollout
from durian_lightning.scoring import ScoredRollouts
from durian_lightning.update import UpdateBatch, ppo_update

G = 2


def scored(ids, rewards, width, old=False):
    """Prompts ``ids`` with G rows each; row r's completion is ``width`` tokens valued r + 1, its mask all ones."""
    n = len(ids) * G
    values = torch.arange(1, n + 1).unsqueeze(1).repeat(1, width)
    rollout = Rollout(
        prompts=[f"prompt {i}" for i in ids for _ in range(G)], images=[[Image.new("RGB", (4, 4))] for _ in range(n)],
        completion_ids=values, completion_mask=torch.ones(n, width, dtype=torch.long),
        completions=[f"{i}/{k}" for i in ids for k in range(G)], sampled_logprobs=-values.float(),
        ended=torch.arange(n) % 2 == 0,
    )
    return ScoredRollouts(
        rollout=rollout, num_generations=G, ids=list(ids), problems=[f"problem {i}" for i in ids],
        answers=[f"answer {i}" for i in ids], visual_entropy=torch.arange(len(ids)).float(),
        confidence=-torch.arange(len(ids)).float(), rewards=torch.tensor(rewards, dtype=torch.float32),
        reward_components={"accuracy": torch.tensor(rewards, dtype=torch.float32)},
        old_logprobs=-values.float() / 10 if old else None,
    )


def test_select_and_concat_prompts():
    a = scored(["a0", "a1", "a2"], [1, 0, 1, 1, 0, 1], width=2, old=True)
    b = scored(["b0"], [0, 1], width=4, old=True)
    picked = a.select_prompts([2, 0])
    assert picked.ids == ["a2", "a0"] and picked.rewards.tolist() == [0, 1, 1, 0]
    assert picked.problems == ["problem a2", "problem a0"] and picked.answers == ["answer a2", "answer a0"]
    assert picked.rollout.completions == ["a2/0", "a2/1", "a0/0", "a0/1"]
    assert picked.visual_entropy.tolist() == [2, 0] and picked.old_logprobs[:, 0].tolist() == pytest.approx([-0.5, -0.6, -0.1, -0.2])
    joined = ScoredRollouts.concat([picked, b])
    assert joined.ids == ["a2", "a0", "b0"] and joined.num_prompts == 3
    assert joined.answers == ["answer a2", "answer a0", "answer b0"]
    assert joined.rollout.ended.tolist() == [True, False, True, False, True, False]
    assert joined.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    # a's completions are 2 wide, b's 4: a's rows are right-padded with zeros, masked out
    assert joined.rollout.completion_ids.shape == (6, 4)
    assert joined.rollout.completion_mask[:4].tolist() == [[1, 1, 0, 0]] * 4
    assert joined.rollout.completion_mask[4:].tolist() == [[1, 1, 1, 1]] * 2
    assert joined.old_logprobs[0].tolist() == pytest.approx([-0.5, -0.5, 0, 0])
    assert joined.reward_components["accuracy"].tolist() == [0, 1, 1, 0, 0, 1]


def test_informative_prompts_are_those_whose_rewards_differ():
    s = scored(["p0", "p1", "p2"], [1, 1, 0, 1, 0.5, 0.5], width=1)
    assert s.informative_prompts() == [1]
    assert PromptBuffer.informative(s).ids == ["p1"]


def test_the_buffer_hands_out_the_oldest_prompts_first_and_keeps_the_rest():
    buffer = PromptBuffer()
    buffer.add(scored(["a0", "a1", "a2"], [1, 0] * 3, width=1, old=True))
    buffer.add(scored([], [], width=1))  # an empty step adds nothing
    buffer.add(scored(["b0", "b1"], [0, 1] * 2, width=3, old=True))
    assert len(buffer) == 5
    first = buffer.take(2)
    assert first.ids == ["a0", "a1"] and len(buffer) == 3
    second = buffer.take(2)  # spans the two steps, padded to the wider one
    assert second.ids == ["a2", "b0"] and second.rollout.completion_ids.shape == (4, 3)
    assert len(buffer) == 1 and buffer.take(1).ids == ["b1"]
    with pytest.raises(ValueError, match="cannot take 1 prompts from a buffer of 0"):
        buffer.take(1)


def test_the_global_batch_of_one_process_is_the_local_batch():
    s = scored(["p0", "p1"], [1, 0, 0, 0], width=1)
    thresholds = torch.tensor([0.2, 0.8])
    world = gather_global_batch(s, entropy_thresholds=thresholds)
    assert world.rewards.tolist() == [1, 0, 0, 0] and world.prompt_index.tolist() == [0, 0, 1, 1]
    assert world.scores.visual_entropy.tolist() == [0, 1] and world.scores.confidence.tolist() == [0, -1]
    assert world.scores.entropy_thresholds is thresholds and world.local_rows == slice(0, 4)


@pytest.mark.parametrize("ppo_epochs, mini_batch_size", [(2, 2), (1, 1)])
def test_the_update_refuses_the_on_policy_shortcut_for_several_optimizer_steps(ppo_epochs, mini_batch_size):
    s = scored(["p0", "p1"], [1, 0, 0, 1], width=2)
    batch = UpdateBatch(s.rollout, torch.ones(4), G)  # no old log-probs
    with pytest.raises(ValueError, match="old_logprobs are needed"):
        ppo_update(batch, lambda rows: torch.zeros(len(rows), 2), PolicyLossConfig(), mini_batch_size, 4, ppo_epochs,
                   lambda loss: None, lambda: None)


def test_the_filter_compares_the_named_reward_component():
    s = replace(scored(["p0", "p1"], [1, 0, 1, 1], width=1), reward_components={"accuracy": torch.tensor([1.0, 1, 0, 1]), "format": torch.tensor([1.0, 0, 1, 1])})
    assert s.informative_prompts("total") == [0]
    assert s.informative_prompts("accuracy") == [1]
    assert s.informative_prompts("format") == [0]
    with pytest.raises(ValueError, match=r"no reward component 'answer' to filter on; the reward has \['accuracy', 'format'\]"):
        s.informative_prompts("answer")


def test_clearing_the_buffer_drops_the_surplus():
    buffer = PromptBuffer()
    buffer.add(scored(["a0", "a1", "a2"], [1, 0] * 3, width=1))
    assert buffer.take(2).ids == ["a0", "a1"]
    assert buffer.clear() == 1 and len(buffer) == 0
