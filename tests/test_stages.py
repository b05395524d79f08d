"""The training step's stages on hand-made batches: selecting and joining prompts, the dynamic-sampling buffer, the
global batch of one process, and the update's refusal of a shortcut that would be wrong."""

import math
from dataclasses import replace

import pytest
import torch
from PIL import Image

from durian_lightning.core.losses import PolicyLossConfig
from durian_lightning.stages.dynamic_sampling import PromptBuffer
from durian_lightning.stages.global_batch import gather_global_batch
from durian_lightning.stages.rollout import Rollout
from durian_lightning.stages.scoring import ScoredRollouts
from durian_lightning.stages.update import UpdateBatch, ppo_update

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
                   lambda loss, last: None, lambda: None)


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


def test_step_metrics_reduce_to_the_global_batchs_numbers_by_hand():
    from durian_lightning.stages.step_metrics import StepMetrics

    # one process: the values themselves; 1, 2, 4: mean 7/3, std sqrt(((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2)
    out = (StepMetrics().mean("m", 7.0, 3).std("s", torch.tensor([1.0, 2.0, 4.0])).total("t", 5)
           .low("lo", 2.0).high("hi", 9.0).mean("empty", 0.0, 0).std("one", torch.tensor([3.0]))).reduce(world=1)
    assert out["m"] == pytest.approx(7 / 3) and out["s"] == pytest.approx((14 / 9 * 3 / 2) ** 0.5)
    assert (out["t"], out["lo"], out["hi"]) == (5.0, 2.0, 9.0)
    assert torch.isnan(torch.tensor(out["empty"])) and torch.isnan(torch.tensor(out["one"]))


def test_the_steps_metrics_weight_clip_fractions_by_tokens_and_entropy_per_token():
    from durian_lightning.stages.step_metrics import training_step_metrics
    from durian_lightning.stages.update import UpdateStats

    batch = scored(["a", "b"], [0.0, 1.0, 1.0, 1.0], width=3)
    batch.rollout.completion_mask[0, 1:] = 0  # row lengths 1, 3, 3, 3
    batch = replace(batch, rollout=replace(batch.rollout, token_entropy=torch.tensor(
        [[2.0, 9.0, 9.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])))
    stats = UpdateStats(loss=0.5, kl=0.1, clip_fraction_low=0.25, clip_fraction_high=0.5, optimizer_steps=2, tokens=10)
    out = training_step_metrics(batch, stats, [1.0, 3.0], {"generate": 2.0}).reduce(world=1)
    assert out["train/reward"] == 0.75 and out["train/reward_std"] == pytest.approx(0.5)
    assert (out["train/completion_length"], out["train/completion_length_min"], out["train/completion_length_max"]) \
        == (2.5, 1.0, 3.0)
    assert out["train/truncated_fraction"] == 0.5  # rows 1 and 3 did not end
    assert out["train/entropy"] == pytest.approx(11 / 10)  # (2 + 9 x 1) / 10 real tokens; the masked 9s not counted
    assert (out["train/clip_fraction"], out["train/grad_norm"], out["perf/generate_s"]) == (0.75, 2.0, 2.0)
    assert (out["train/loss"], out["train/kl"]) == (0.5, pytest.approx(0.1))


def test_evaluation_counts_each_sample_once_whatever_the_sampler_repeats():
    from durian_lightning.stages.evaluation import evaluation_metrics, unique_records

    # 3 samples over 2 ranks: the sampler gives rank 1 a repeat of sample 0 (position 0) to even out the shares
    rank0 = [{"dataset_index": 0, "correct": 1.0, "reward": 1.5, "perceptual_group": 0, "mean@k": 0.5, "pass@k": 1.0},
             {"dataset_index": 2, "correct": 0.0, "reward": 0.0, "perceptual_group": 2, "mean@k": 0.0, "pass@k": 0.0}]
    rank1 = [{"dataset_index": 1, "correct": 0.0, "reward": 0.5, "perceptual_group": 2, "mean@k": 0.25, "pass@k": 1.0},
             {**rank0[0]}]
    records = unique_records(rank0 + rank1)
    assert [r["dataset_index"] for r in records] == [0, 2, 1]
    metrics = evaluation_metrics(records)
    group_1 = metrics.pop("accuracy_perceptual_1")
    assert metrics == pytest.approx({"accuracy": 1 / 3, "reward": 2 / 3, "accuracy_perceptual_0": 1.0,
                                     "accuracy_perceptual_2": 0.0, "mean@k": 0.25, "pass@k": 2 / 3})
    assert math.isnan(group_1)  # no sample in that group: NaN, not a 0 that reads as all wrong


@pytest.mark.parametrize("with_old", [True, False])
def test_the_update_measures_the_gap_between_recorded_and_recomputed_log_probs_once_per_token(with_old):
    s = scored(["p0", "p1"], [1, 0, 0, 1], width=2)  # recorded while sampling: row r's tokens at -(r + 1)
    s.rollout.completion_mask[3, 1] = 0  # a completion that ended after one token
    shift = torch.tensor([[0.1, -0.2], [0.0, 0.3], [-0.5, 0.0], [0.05, 9.0]])  # the padded 9.0 must not count
    recomputed = s.rollout.sampled_logprobs + shift
    weight = torch.zeros(1, requires_grad=True)
    logprobs = lambda rows: recomputed[rows] + weight  # noqa: E731  (the policy's forward, with a gradient)

    def step() -> None:
        weight.grad = None

    old = recomputed.clone() if with_old else None
    stats = ppo_update(UpdateBatch(s.rollout, torch.ones(4), G, old), logprobs, PolicyLossConfig(), 1 if with_old else 2,
                       4, 3 if with_old else 1, lambda loss, last: loss.backward(), step)
    # the 7 real tokens once each (not once per epoch): |0.1| + |-0.2| + 0 + 0.3 + 0.5 + 0 + 0.05 = 1.15
    assert stats.gap_tokens == 7 and stats.gap_sum == pytest.approx(1.15, abs=1e-6)
    assert stats.gap_max == pytest.approx(0.5)


def test_the_update_weights_its_loss_by_the_recorded_log_probs_when_the_correction_is_on():
    s = scored(["p0", "p1"], [1, 0, 0, 1], width=2)
    advantages = torch.tensor([1.0, -1.0, 0.5, 2.0])

    def loss(shift: float, correction: str) -> float:
        recomputed = s.rollout.sampled_logprobs + shift  # the training forward, off by a constant
        config = PolicyLossConfig(aggregation="token-mean", rollout_correction=correction)
        return ppo_update(UpdateBatch(s.rollout, advantages, G), lambda rows: recomputed[rows].clone(), config, 2, 4, 1,
                          lambda loss, last: None, lambda: None).loss

    # ratio 1, so each token's surrogate is -A; with the correction weighted by min(exp(shift), 2)
    assert loss(0.3, "none") == pytest.approx(-advantages.mean().item())
    assert loss(0.3, "token") == pytest.approx(-advantages.mean().item() * math.exp(0.3), rel=1e-6)
    assert loss(0.0, "token") == loss(0.0, "none")
