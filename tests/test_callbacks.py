"""The callbacks' statistics against hand-counted examples."""

import pytest
import torch

from durian_lightning.advantages import durian_advantages, grpo_advantages
from durian_lightning.callbacks import draw_bar_chart, error_by_difficulty, rollout_statistics


def test_rollout_statistics_by_hand():
    g = 4
    rewards = torch.tensor([
        1.0, 1, 1, 1,  # all equal
        1, 1, 1, 0,  # 1 vs 3: extreme
        0, 0, 0, 1,  # 1 vs 3: extreme
        1, 1, 0, 0,  # 2 vs 2
        0.5, 1, 0, 0,  # three distinct values: not "1 vs G-1"
    ])
    prompt = torch.arange(5).repeat_interleave(g)
    details = durian_advantages(rewards, prompt, visual_entropy=torch.tensor([1.0, 2, 3, 4, 5]),
                                confidence=torch.tensor([-1.0, -2, -3, -4, -5]), num_reasoning_groups=2)
    grpo = grpo_advantages(rewards, prompt)
    stats = rollout_statistics({"rewards": rewards, "num_generations": g, "advantages": details.advantages,
                                "grpo_advantages": grpo, "durian": details})
    assert stats["difficulty/all_equal_ratio"] == pytest.approx(1 / 5)
    assert stats["difficulty/extreme_ratio"] == pytest.approx(2 / 5)
    # GRPO on 1-vs-3: (1 - 3/4) / sqrt(1/4) -> the lone answer gets 1.5
    assert stats["difficulty/max_abs_advantage_grpo"] == pytest.approx(1.5, abs=1e-4)
    assert stats["difficulty/max_abs_advantage"] == pytest.approx(float(details.advantages.abs().max()))
    # entropy 1..5: q25 = 2, q75 = 4 -> groups 0: {P0, P1}, 1: {P2}, 2: {P3, P4}
    assert stats["difficulty/perceptual_0/prompts"] == 2 and stats["difficulty/perceptual_1/prompts"] == 1
    assert stats["difficulty/perceptual_0/reward_mean"] == pytest.approx(7 / 8)
    # group 0 rewards 1 1 1 1 1 1 1 0: mean 7/8, unbiased var (7*(1/8)^2 + (7/8)^2)/7 = 1/8
    assert stats["difficulty/perceptual_0/shared_std"] == pytest.approx((1 / 8) ** 0.5, rel=1e-5)
    assert stats["difficulty/reasoning_0/prompts"] + stats["difficulty/reasoning_1/prompts"] == 5


def test_error_by_difficulty_by_hand():
    # 20 samples: entropy 0..19, confidence = -entropy, correct on every even sample and on the 5 most confident
    records = [{"correct": float(i % 2 == 0 or i < 5), "visual_entropy": float(i), "confidence": float(-i)} for i in range(20)]
    stats = error_by_difficulty(records)
    # q25 = 4.75, q75 = 14.25: group 0 = 0..4 (all correct), group 1 = 5..14 (odd ones wrong: 5), group 2 = 15..19
    assert stats["error/entropy_group_0"] == 0.0
    assert stats["error/entropy_group_1"] == pytest.approx(5 / 10)
    assert stats["error/entropy_group_2"] == pytest.approx(3 / 5)  # 15, 17, 19 wrong
    # deciles of confidence, least confident first: decile 0 = samples 19, 18 -> one wrong
    assert stats["error/confidence_decile_0"] == pytest.approx(1 / 2)
    assert stats["error/confidence_decile_9"] == 0.0  # samples 1 and 0, both correct
    assert error_by_difficulty([]) == {}


def test_bar_chart_is_a_png(tmp_path):
    from PIL import Image

    draw_bar_chart({"error/a_0": 0.2, "error/a_1": 0.9}, tmp_path / "chart.png", "title")
    assert Image.open(tmp_path / "chart.png").format == "PNG"
