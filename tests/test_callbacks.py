"""The callbacks' statistics against hand-counted examples."""

import pytest
import torch

from durian_lightning.callbacks import draw_error_chart, error_by_difficulty, error_table, rollout_statistics
from durian_lightning.core.advantages import Advantages, dr_grpo_advantages, durian_advantages


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
    # perceptual-only Durian: entropy 1..5, q25 = 2, q75 = 4 -> groups 0: {P0, P1}, 1: {P2}, 2: {P3, P4}
    advantages = durian_advantages(rewards, prompt, visual_entropy=torch.tensor([1.0, 2, 3, 4, 5]), alphas=(0, 1, 0))
    stats = rollout_statistics(rewards, g, advantages)
    assert stats["difficulty/all_equal_ratio"] == pytest.approx(1 / 5)
    assert stats["difficulty/extreme_ratio"] == pytest.approx(2 / 5)
    # GRPO on 1-vs-3: (1 - 3/4) / sqrt(1/4) -> the lone answer gets 1.5 (2 vs 2: 0.5 / sqrt(1/3) = 0.87;
    # P4: 0.625 / 0.479 = 1.31)
    assert stats["difficulty/max_abs_advantage_grpo"] == pytest.approx(1.5, abs=1e-4)
    # group 0 rewards 1 1 1 1 1 1 1 0: mean 7/8, unbiased var (7*(1/8)^2 + (7/8)^2)/7 = 1/8; P1's lone 0 is 3/4 below
    # its prompt's mean: |A| = 0.75 / sqrt(1/8) = 2.12, above group 1 (P2 alone: 0.75 / 0.5 = 1.5) and group 2
    # (rewards 1 1 0 0 0.5 1 0 0: std 0.496; largest centred reward 0.625 -> 1.26)
    assert stats["difficulty/max_abs_advantage"] == pytest.approx(0.75 / (1 / 8) ** 0.5, rel=1e-5)
    # mean |A| over the 20 rollouts: group 0: P1 (0.25 * 3 + 0.75) / sqrt(1/8); group 1: P2 (0.25 * 3 + 0.75) / 0.5;
    # group 2: P3 (0.5 * 4) / s2, P4 (0.125 + 0.625 + 0.375 * 2) / s2 with s2^2 = (3 * 0.5625^2 + 4 * 0.4375^2 + 0.0625^2) / 7
    s2 = ((3 * 0.5625**2 + 4 * 0.4375**2 + 0.0625**2) / 7) ** 0.5
    mean_abs = (1.5 / (1 / 8) ** 0.5 + 1.5 / 0.5 + 2.0 / s2 + 1.5 / s2) / 20
    assert stats["difficulty/mean_abs_advantage"] == pytest.approx(mean_abs, rel=1e-5)
    assert stats["difficulty/perceptual_0/prompts"] == 2 and stats["difficulty/perceptual_1/prompts"] == 1
    assert stats["difficulty/perceptual_0/reward_mean"] == pytest.approx(7 / 8)
    assert stats["difficulty/perceptual_0/shared_std"] == pytest.approx((1 / 8) ** 0.5, rel=1e-5)
    assert stats["difficulty/perceptual_2/shared_std"] == pytest.approx(s2, rel=1e-5)
    assert stats["difficulty/perceptual_1/mean_abs_advantage"] == pytest.approx(1.5 / 0.5 / 4, rel=1e-5)
    assert not any("reasoning" in key for key in stats)  # the estimator grouped on one axis only


def test_rollout_statistics_of_an_estimator_without_groups():
    rewards = torch.tensor([1.0, 0, 0, 0])
    stats = rollout_statistics(rewards, 4, Advantages(dr_grpo_advantages(rewards, torch.zeros(4, dtype=torch.long))))
    # Dr. GRPO: r - mean = (0.75, -0.25, -0.25, -0.25); GRPO divides by std 0.5
    assert stats["difficulty/max_abs_advantage"] == pytest.approx(0.75)
    assert stats["difficulty/max_abs_advantage_grpo"] == pytest.approx(1.5, abs=1e-5)
    assert not any(key.count("/") > 1 for key in stats)


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


def test_error_table_by_hand_with_bins_large_enough_to_read():
    # the 20 samples above: correct on every even one and on the 5 most confident
    records = [{"correct": float(i % 2 == 0 or i < 5), "visual_entropy": float(i), "confidence": float(-i)} for i in range(20)]
    table = error_table(records, min_per_bin=5)  # 20 samples -> 4 bins of 5
    (perceptual, confidence) = table.values()
    assert perceptual == [("H0", 0.0, 5), ("H1", pytest.approx(0.5), 10), ("H2", pytest.approx(0.6), 5)]
    # least confident first: 19..15 (15, 17, 19 wrong), 14..10 (13, 11), 9..5 (9, 7, 5), 4..0 (none)
    assert confidence == [("c0", pytest.approx(0.6), 5), ("c1", pytest.approx(0.4), 5), ("c2", pytest.approx(0.6), 5),
                          ("c3", 0.0, 5)]
    assert list(error_table(records).values())[1] == [("c0", pytest.approx(0.4), 20)]  # 20 per bin: one bin
    assert error_table([]) == {}


def test_error_chart_is_a_png_with_a_panel_per_axis(tmp_path):
    from PIL import Image

    panels = {"perceptual": [("H0", 0.2, 5), ("H1", 0.9, 10)], "confidence": [("c0", 1.0, 7)]}
    draw_error_chart(panels, tmp_path / "chart.png", "title")
    image = Image.open(tmp_path / "chart.png")
    assert image.format == "PNG" and image.width > 300
