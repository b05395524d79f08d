"""Advantage estimators against numbers worked out by hand, their defining properties, and bad input."""

import math

import pytest
import torch

from durian_lightning.core.advantages import (
    ESTIMATORS,
    Advantages,
    AdvantageSettings,
    DifficultyScores,
    batch_std_advantages,
    consecutive_prompt_index,
    dr_grpo_advantages,
    durian_advantages,
    effective_alphas,
    get_estimator,
    group_std,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)

EPS = 1e-6

# 3 prompts x 4 rollouts.
#   P0: 1 1 1 0  mean 3/4  unbiased var (3*(1/4)^2 + (3/4)^2)/3 = 1/4   -> std 1/2
#   P1: 1 0 0 0  mean 1/4  same spread                                  -> std 1/2
#   P2: 1 1 0 0  mean 1/2  var 4*(1/2)^2/3 = 1/3                        -> std sqrt(1/3)
REWARDS = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 0])
PROMPT = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
CENTRED = [1 / 4, 1 / 4, 1 / 4, -3 / 4, 3 / 4, -1 / 4, -1 / 4, -1 / 4, 1 / 2, 1 / 2, -1 / 2, -1 / 2]


def expected(std_per_rollout):
    return torch.tensor([c / (s + EPS) for c, s in zip(CENTRED, std_per_rollout)])


def test_grpo_by_hand():
    stds = [0.5] * 8 + [math.sqrt(1 / 3)] * 4
    torch.testing.assert_close(grpo_advantages(REWARDS, PROMPT), expected(stds))
    # without eps the values are the familiar ones
    torch.testing.assert_close(grpo_advantages(REWARDS, PROMPT)[:4], torch.tensor([0.5, 0.5, 0.5, -1.5]), atol=1e-5, rtol=0)


def test_dr_grpo_by_hand():
    torch.testing.assert_close(dr_grpo_advantages(REWARDS, PROMPT), torch.tensor(CENTRED))


def test_batch_std_by_hand():
    # 6 ones, 6 zeros: mean 1/2, var = 12 * (1/2)^2 / 11 = 3/11
    std = math.sqrt(3 / 11)
    torch.testing.assert_close(batch_std_advantages(REWARDS, PROMPT), expected([std] * 12))


def test_durian_by_hand():
    # Entropy (1, 1, 3): q25 = 1, q75 = 2 -> P0, P1 in group 0 (H <= q25), P2 in group 2 (H >= q75).
    #   group {P0, P1}: rewards 1 1 1 0 1 0 0 0, mean 1/2, var 8*(1/4)/7 = 2/7
    #   group {P2}: its own std sqrt(1/3)
    # Confidence (-5, -1, -3), b = 2: ranks P0 < P2 < P1 -> groups floor(r*2/3) = 0, 0, 1
    #   group {P0, P2}: rewards 1 1 1 0 1 1 0 0, mean 5/8, var (5*(3/8)^2 + 3*(5/8)^2)/7 = 120/448
    #   group {P1}: std 1/2
    out = durian_advantages(
        REWARDS,
        PROMPT,
        visual_entropy=torch.tensor([1.0, 1.0, 3.0]),
        confidence=torch.tensor([-5.0, -1.0, -3.0]),
        alphas=(0.1, 0.2, 0.7),
        num_reasoning_groups=2,
    )
    s_grpo = [0.5] * 8 + [math.sqrt(1 / 3)] * 4
    s_percep = [math.sqrt(2 / 7)] * 8 + [math.sqrt(1 / 3)] * 4
    s_reason = [math.sqrt(120 / 448)] * 4 + [0.5] * 4 + [math.sqrt(120 / 448)] * 4
    torch.testing.assert_close(out.terms["grpo"], expected(s_grpo))
    torch.testing.assert_close(out.terms["perceptual"], expected(s_percep))
    torch.testing.assert_close(out.terms["reasoning"], expected(s_reason))
    torch.testing.assert_close(out.group_stds["perceptual"], torch.tensor(s_percep))
    torch.testing.assert_close(out.group_stds["reasoning"], torch.tensor(s_reason))
    combined = 0.1 * expected(s_grpo) + 0.2 * expected(s_percep) + 0.7 * expected(s_reason)
    torch.testing.assert_close(out.advantages, combined)
    # first rollout: 0.1*0.5 + 0.2*0.25/sqrt(2/7) + 0.7*0.25/sqrt(120/448), written out
    assert out.advantages[0].item() == pytest.approx(0.05 + 0.0935414 + 0.3381321, abs=1e-6)
    assert out.groups["perceptual"].tolist() == [0] * 8 + [2] * 4
    assert out.groups["reasoning"].tolist() == [0] * 4 + [1] * 4 + [0] * 4
    assert out.alphas == (0.1, 0.2, 0.7)


# RLOO: r_i minus the mean of the other three of its prompt, = 4/3 * (r - mean(prompt)):
#   P0 1 1 1 0: 1 - 2/3 = 1/3 (x3), 0 - 1 = -1;  P1 1 0 0 0: 1 - 0 = 1, 0 - 1/3 = -1/3 (x3);  P2: +-(1 - 1/3) = +-2/3
LOO = [1 / 3, 1 / 3, 1 / 3, -1, 1, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3]
# REINFORCE++: 6 ones, 6 zeros: mean 1/2, std sqrt(3/11) (as the batch estimator's)
WHITE = [r - 0.5 for r in REWARDS.tolist()]
# REINFORCE++-baseline: b = r - mean(prompt) (CENTRED), sum of squares 3/4 + 3/4 + 1 = 5/2 over 11: std sqrt(5/22)
# Durian's groups as in test_durian_by_hand: perceptual {P0, P1} {P2}, reasoning {P0, P2} {P1}; the rewards' stds:
S_PERCEP = [math.sqrt(2 / 7)] * 8 + [math.sqrt(1 / 3)] * 4
S_REASON = [math.sqrt(120 / 448)] * 4 + [0.5] * 4 + [math.sqrt(120 / 448)] * 4
# and b's stds: {P0, P1} sum of squares 3/2 over 7; {P2} 1 over 3; {P0, P2} 7/4 over 7; {P1} 3/4 over 3
B_PERCEP = [math.sqrt(3 / 14)] * 8 + [math.sqrt(1 / 3)] * 4
B_REASON = [0.5] * 12


def _over(numerator, stds):
    return torch.tensor([n / (s + EPS) for n, s in zip(numerator, stds)])


def test_rloo_by_hand():
    torch.testing.assert_close(rloo_advantages(REWARDS, PROMPT), torch.tensor(LOO))
    # a prompt with one rollout has no other rollout to compare with: 0
    assert rloo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1])).tolist() == [1.0, -1.0, 0.0]


def test_reinforce_pp_by_hand():
    torch.testing.assert_close(reinforce_pp_advantages(REWARDS, PROMPT), _over(WHITE, [math.sqrt(3 / 11)] * 12))
    # no baseline per prompt: an all-correct prompt is rewarded when others fail; a constant batch gives exactly 0
    mixed = reinforce_pp_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    assert mixed[0] > 0 and mixed[2] < 0
    assert reinforce_pp_advantages(torch.full((4,), 0.3), torch.tensor([0, 0, 1, 1])).tolist() == [0.0] * 4


def test_reinforce_pp_baseline_by_hand():
    torch.testing.assert_close(reinforce_pp_baseline_advantages(REWARDS, PROMPT),
                               _over(CENTRED, [math.sqrt(5 / 22)] * 12))
    # first rollout written out: 0.25 / sqrt(5/22) = 0.524404
    assert reinforce_pp_baseline_advantages(REWARDS, PROMPT)[0].item() == pytest.approx(0.5244044, abs=1e-5)


@pytest.mark.parametrize("baseline, own, numerator, s_percep, s_reason", [
    ("rloo", torch.tensor(LOO), LOO, S_PERCEP, S_REASON),
    ("reinforce_pp", _over(WHITE, [math.sqrt(3 / 11)] * 12), WHITE, S_PERCEP, S_REASON),
    ("reinforce_pp_baseline", _over(CENTRED, [math.sqrt(5 / 22)] * 12), CENTRED, B_PERCEP, B_REASON),
])
def test_durian_over_each_estimator_by_hand(baseline, own, numerator, s_percep, s_reason):
    """The estimator's own advantage, then its numerator over its spread's std within each difficulty group."""
    out = durian_advantages(REWARDS, PROMPT, visual_entropy=torch.tensor([1.0, 1.0, 3.0]),
                            confidence=torch.tensor([-5.0, -1.0, -3.0]), num_reasoning_groups=2, baseline=baseline)
    torch.testing.assert_close(out.terms[baseline], own)
    torch.testing.assert_close(out.terms["perceptual"], _over(numerator, s_percep))
    torch.testing.assert_close(out.terms["reasoning"], _over(numerator, s_reason))
    torch.testing.assert_close(out.group_stds["perceptual"], torch.tensor(s_percep))
    torch.testing.assert_close(out.advantages, 0.1 * own + 0.2 * _over(numerator, s_percep)
                               + 0.7 * _over(numerator, s_reason))


def test_durian_rloo_first_rollout_written_out():
    # 0.1 * 1/3 + 0.2 * (1/3) / sqrt(2/7) + 0.7 * (1/3) / sqrt(120/448)
    out = durian_advantages(REWARDS, PROMPT, visual_entropy=torch.tensor([1.0, 1.0, 3.0]),
                            confidence=torch.tensor([-5.0, -1.0, -3.0]), num_reasoning_groups=2, baseline="rloo")
    assert out.advantages[0].item() == pytest.approx(0.0333333 + 0.1247219 + 0.4508428, abs=1e-5)


def test_durian_over_an_unknown_estimator_names_the_known_ones():
    with pytest.raises(ValueError, match="reinforce_pp_baseline"):
        durian_advantages(REWARDS, PROMPT, visual_entropy=torch.tensor([1.0, 1.0, 3.0]), baseline="ppo")


def test_durian_with_one_group_per_prompt_equals_grpo():
    entropy = torch.tensor([0.3, 2.0, 5.0])  # q25 = 1.15, q75 = 3.5: each prompt alone
    confidence = torch.tensor([-1.0, -2.0, -3.0])
    out = durian_advantages(REWARDS, PROMPT, visual_entropy=entropy, confidence=confidence, num_reasoning_groups=12)
    grpo = grpo_advantages(REWARDS, PROMPT)
    torch.testing.assert_close(out.terms["perceptual"], grpo)
    torch.testing.assert_close(out.terms["reasoning"], grpo)
    torch.testing.assert_close(out.advantages, grpo)


def test_durian_with_one_group_for_the_batch_equals_batch_std():
    torch.manual_seed(0)
    rewards = torch.rand(40)
    prompt = torch.arange(10).repeat_interleave(4)
    batch = batch_std_advantages(rewards, prompt)
    one_reasoning_group = durian_advantages(rewards, prompt, confidence=torch.randn(10), alphas=(0, 0, 1), num_reasoning_groups=1)
    torch.testing.assert_close(one_reasoning_group.advantages, batch)
    one_perceptual_group = durian_advantages(
        rewards, prompt, visual_entropy=torch.rand(10) + 1, alphas=(0, 1, 0), entropy_thresholds=(0.0, 5.0)
    )
    assert one_perceptual_group.groups["perceptual"].unique().tolist() == [1]
    torch.testing.assert_close(one_perceptual_group.advantages, batch)
    # and by the formula: (r - prompt mean) / (one unbiased std over all rewards + eps)
    centred = rewards - rewards.view(10, 4).mean(1).repeat_interleave(4)
    torch.testing.assert_close(batch, centred / (rewards.std() + EPS))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_adding_a_constant_to_all_rewards_changes_nothing(name):
    torch.manual_seed(1)
    rewards = torch.randint(0, 2, (48,)).double()
    prompt = torch.arange(6).repeat_interleave(8)
    kwargs = dict(visual_entropy=torch.rand(6), confidence=torch.randn(6), num_reasoning_groups=3)

    def run(r):
        scores = DifficultyScores(visual_entropy=kwargs["visual_entropy"], confidence=kwargs["confidence"])
        return get_estimator(name)(r, prompt, scores, AdvantageSettings(estimator=name, num_reasoning_groups=3)).advantages

    torch.testing.assert_close(run(rewards + 3.7), run(rewards))


def test_seven_right_one_wrong_gets_a_smaller_advantage_in_a_mixed_group():
    # P0 is the paper's 7:1 case; P1 (4:4) shares its reasoning group (b = 2, ranks 0 and 1), P2 (1:7) does not.
    rewards = torch.tensor([1.0] * 7 + [0.0] + [1.0] * 4 + [0.0] * 4 + [1.0] + [0.0] * 7)
    prompt = torch.arange(3).repeat_interleave(8)
    grpo = grpo_advantages(rewards, prompt)
    out = durian_advantages(rewards, prompt, confidence=torch.tensor([-9.0, -5.0, -1.0]), alphas=(0, 0, 1), num_reasoning_groups=2)
    assert out.groups["reasoning"].view(3, 8)[:, 0].tolist() == [0, 0, 1]
    # GRPO: the lone wrong answer gets (0 - 7/8) / sqrt(1/8) = -2.47; the shared std shrinks it
    assert grpo[7].item() == pytest.approx(-0.875 / math.sqrt(1 / 8), abs=1e-4)
    assert abs(out.advantages[7]) < abs(grpo[7])
    # shared std over 11 ones and 5 zeros: var = (11*(5/16)^2 + 5*(11/16)^2)/15 = 880/3840
    assert out.advantages[7].item() == pytest.approx(-0.875 / math.sqrt(880 / 3840), abs=1e-4)


def _loop_reference(rewards, prompt, entropy, confidence, alphas, b, eps=EPS):
    """A straightforward per-prompt implementation of the same definitions, to compare with the vectorized one."""
    rewards, prompt = rewards.double().tolist(), prompt.tolist()
    n_prompts = len(entropy)
    by_prompt = {p: [r for r, q in zip(rewards, prompt) if q == p] for p in range(n_prompts)}

    def std(values):
        if len(values) < 2:
            return 0.0
        m = sum(values) / len(values)
        return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))

    q_lo, q_hi = torch.quantile(torch.tensor(entropy, dtype=torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    percep = {p: 0 if entropy[p] <= q_lo else 2 if entropy[p] >= q_hi else 1 for p in range(n_prompts)}
    order = sorted(range(n_prompts), key=lambda p: (confidence[p], p))
    reason = {p: (rank if n_prompts <= b else rank * b // n_prompts) for rank, p in enumerate(order)}
    out = []
    for r, p in zip(rewards, prompt):
        values = by_prompt[p]
        centred = 0.0 if max(values) == min(values) else r - sum(values) / len(values)
        pooled_p = [v for q in range(n_prompts) if percep[q] == percep[p] for v in by_prompt[q]]
        pooled_r = [v for q in range(n_prompts) if reason[q] == reason[p] for v in by_prompt[q]]
        out.append(
            alphas[0] * centred / (std(values) + eps)
            + alphas[1] * centred / (std(pooled_p) + eps)
            + alphas[2] * centred / (std(pooled_r) + eps)
        )
    return torch.tensor(out)


@pytest.mark.parametrize("seed", range(5))
def test_durian_matches_a_per_prompt_loop_with_uneven_group_sizes(seed):
    gen = torch.Generator().manual_seed(seed)
    n_prompts = int(torch.randint(2, 30, (1,), generator=gen))
    sizes = torch.randint(1, 9, (n_prompts,), generator=gen)
    prompt = torch.arange(n_prompts).repeat_interleave(sizes)
    prompt = prompt[torch.randperm(prompt.numel(), generator=gen)]  # rollouts need not be contiguous
    rewards = (torch.rand(prompt.numel(), generator=gen) < 0.5).double() * 0.9 + 0.1 * torch.randint(0, 2, (prompt.numel(),), generator=gen)
    entropy = torch.rand(n_prompts, generator=gen).round(decimals=1)  # ties on purpose
    confidence = torch.randn(n_prompts, generator=gen).round(decimals=0)
    alphas = (0.2, 0.3, 0.5)
    out = durian_advantages(rewards, prompt, visual_entropy=entropy, confidence=confidence, alphas=alphas, num_reasoning_groups=4)
    ref = _loop_reference(rewards, prompt, entropy.tolist(), confidence.tolist(), alphas, 4)
    torch.testing.assert_close(out.advantages, ref.to(out.advantages.dtype))


def test_all_equal_rewards_give_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0])
    prompt = torch.tensor([0, 0, 0, 1, 1, 1])
    for fn in (grpo_advantages, dr_grpo_advantages, batch_std_advantages):
        assert fn(rewards, prompt)[:3].tolist() == [0.0, 0.0, 0.0]
    out = durian_advantages(rewards, prompt, visual_entropy=torch.tensor([1.0, 2.0]), confidence=torch.tensor([0.0, 1.0]))
    assert out.advantages[:3].tolist() == [0.0, 0.0, 0.0]
    # a whole batch of constant prompts: every std is 0 and every advantage exactly 0
    assert grpo_advantages(torch.ones(8), torch.arange(2).repeat_interleave(4)).abs().sum().item() == 0.0


def test_a_prompt_with_one_rollout_gets_zero_and_its_std_is_zero():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.7])
    prompt = torch.tensor([0, 0, 0, 1])
    assert grpo_advantages(rewards, prompt)[3].item() == 0.0
    assert group_std(torch.tensor([5.0, 1.0, 3.0], dtype=torch.float64), torch.tensor([0, 1, 1]), 2).tolist() == pytest.approx([0.0, math.sqrt(2.0)])


def test_empty_batch_gives_empty_results():
    empty, index = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    assert grpo_advantages(empty, index).shape == (0,)
    out = durian_advantages(empty, index, visual_entropy=torch.zeros(0), confidence=torch.zeros(0))
    assert out.advantages.shape == (0,)


def test_integer_rewards_give_float32_and_dtype_is_kept():
    prompt = torch.tensor([0, 0, 1, 1])
    assert grpo_advantages(torch.tensor([1, 0, 1, 1]), prompt).dtype == torch.float32
    assert grpo_advantages(torch.tensor([1.0, 0, 1, 1], dtype=torch.float64), prompt).dtype == torch.float64


def test_effective_alphas_drop_an_absent_term_and_rescale():
    assert effective_alphas((0.1, 0.2, 0.7), True, True) == (0.1, 0.2, 0.7)
    a = effective_alphas((0.1, 0.2, 0.7), True, False)
    assert a == pytest.approx((1 / 3, 2 / 3, 0.0))
    a = effective_alphas((0.6, 0.2, 0.2), False, True)
    assert a == pytest.approx((0.75, 0.0, 0.25))


def test_reasoning_only_ablation_by_passing_only_confidence():
    confidence = torch.tensor([-5.0, -1.0, -3.0])
    only = durian_advantages(REWARDS, PROMPT, confidence=confidence, num_reasoning_groups=2)
    assert "perceptual" not in only.terms and "perceptual" not in only.groups and "perceptual" not in only.group_stds
    assert only.alphas == pytest.approx((0.125, 0.0, 0.875))
    torch.testing.assert_close(only.advantages, 0.125 * only.terms["grpo"] + 0.875 * only.terms["reasoning"])
    zero_alpha = durian_advantages(REWARDS, PROMPT, visual_entropy=torch.ones(3), confidence=confidence, alphas=(0.125, 0, 0.875), num_reasoning_groups=2)
    torch.testing.assert_close(zero_alpha.advantages, only.advantages)


@pytest.mark.parametrize(
    "rewards, prompt, kwargs, message",
    [
        (torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), {}, r"rewards\[1\] = nan"),
        (torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]), {}, r"rewards\[1\] = inf"),
        (torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0]), {}, "prompt_index must have 3 entries"),
        (torch.tensor([1.0, 0.0]), torch.tensor([0, -1]), {}, "must be >= 0"),
        (torch.tensor([1.0, 0.0]), torch.tensor([0, 2]), {"num_prompts": 2}, "must be < num_prompts=2"),
        (torch.tensor([1.0, 0.0]), torch.tensor([0, 2]), {}, r"prompts \[1\] have none"),
        (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), {}, "must hold integers"),
        (torch.ones(2, 2), torch.tensor([0, 0]), {}, "rewards must be 1-D"),
        (torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), {"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_bad_input_raises_a_clear_error(rewards, prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        grpo_advantages(rewards, prompt, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"visual_entropy": torch.ones(2)}, "visual_entropy must have 3 entries"),
        ({"confidence": torch.tensor([0.0, float("nan"), 1.0])}, r"confidence\[1\] = nan"),
        ({"alphas": (0.5, -0.1, 0.6)}, "alphas must be finite and >= 0"),
        ({"alphas": (math.inf, 0.2, 0.7)}, "alphas must be finite and >= 0"),
        ({"alphas": (0.0, 0.0, 0.0)}, "must not all be 0"),
        ({"alphas": (0.0, 1.0, 0.0)}, "put all weight on terms whose scores were not given"),
        ({"alphas": (0.5, 0.5)}, r"alphas must be \(alpha_ori"),
        ({"confidence": torch.ones(3), "num_reasoning_groups": 0}, "num_groups must be >= 1"),
        ({"visual_entropy": torch.ones(3), "percentiles": (0.8, 0.2)}, "0 <= low <= high <= 1"),
    ],
)
def test_durian_bad_input_raises_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        durian_advantages(REWARDS, PROMPT, **kwargs)


SCORES = DifficultyScores(visual_entropy=torch.tensor([1.0, 1.0, 3.0]), confidence=torch.tensor([-5.0, -1.0, -3.0]))


@pytest.mark.parametrize("name, plain", [
    ("grpo", lambda: grpo_advantages(REWARDS, PROMPT)),
    ("dr_grpo", lambda: dr_grpo_advantages(REWARDS, PROMPT)),
    ("batch", lambda: batch_std_advantages(REWARDS, PROMPT)),
    ("durian", lambda: durian_advantages(REWARDS, PROMPT, visual_entropy=SCORES.visual_entropy,
                                         confidence=SCORES.confidence, num_reasoning_groups=2).advantages),
    ("rloo", lambda: rloo_advantages(REWARDS, PROMPT)),
    ("reinforce_pp", lambda: reinforce_pp_advantages(REWARDS, PROMPT)),
    ("reinforce_pp_baseline", lambda: reinforce_pp_baseline_advantages(REWARDS, PROMPT)),
    *[(f"durian_{b}", lambda b=b: durian_advantages(REWARDS, PROMPT, visual_entropy=SCORES.visual_entropy,
                                                    confidence=SCORES.confidence, num_reasoning_groups=2,
                                                    baseline=b).advantages)
      for b in ("rloo", "reinforce_pp", "reinforce_pp_baseline")],
])
def test_every_table_entry_is_its_estimator(name, plain):
    out = get_estimator(name)(REWARDS, PROMPT, SCORES, AdvantageSettings(estimator=name, num_reasoning_groups=2))
    assert isinstance(out, Advantages)
    torch.testing.assert_close(out.advantages, plain())
    # only Durian groups; each grouping comes with its shared stds
    assert set(out.groups) == ({"perceptual", "reasoning"} if name.startswith("durian") else set())
    assert set(out.group_stds) == set(out.groups)


def test_table_settings_reach_the_estimator():
    # perceptual-only Durian from settings alone: entropy (1, 1, 3) -> q25 = 1, q75 = 2 -> groups (0, 0, 2);
    # group 0 = P0 + P1 rewards 1 1 1 0 1 0 0 0: mean 1/2, var 8 * (1/4) / 7 = 2/7; P2 alone: std sqrt(1/3)
    settings = AdvantageSettings(alphas=(0.0, 1.0, 0.0), eps=1e-3)
    out = get_estimator("durian")(REWARDS, PROMPT, SCORES, settings)
    stds = [math.sqrt(2 / 7)] * 8 + [math.sqrt(1 / 3)] * 4
    torch.testing.assert_close(out.advantages, torch.tensor([c / (s + 1e-3) for c, s in zip(CENTRED, stds)]))
    fixed = DifficultyScores(visual_entropy=SCORES.visual_entropy, entropy_thresholds=torch.tensor([0.5, 0.9]))
    assert get_estimator("durian")(REWARDS, PROMPT, fixed, settings).groups["perceptual"].unique().tolist() == [2]


def test_unknown_estimator_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown estimator 'ppo'; registered: batch, dr_grpo, durian, durian_reinforce_pp, durian_reinforce_pp_baseline, durian_rloo, grpo, reinforce_pp"):
        get_estimator("ppo")


def std_floor(rewards, prompt_index, scores, settings):
    """The README's example: GRPO whose per-prompt std never falls below 0.1 (another cure for 7:1 prompts)."""
    centred = dr_grpo_advantages(rewards, prompt_index)
    std = group_std(rewards.double(), prompt_index, int(prompt_index.max()) + 1)[prompt_index]
    return Advantages(centred / std.clamp_min(0.1).to(centred.dtype))


def test_a_registered_estimator_is_found_by_name(monkeypatch):
    monkeypatch.setitem(ESTIMATORS, "std_floor", std_floor)
    # P0: 1 1 1 0 (std 1/2, above the floor); P1: 0.5 0.5 0.5 0.6: mean 0.525, std 0.05 -> floored to 0.1
    rewards = torch.tensor([1.0, 1, 1, 0, 0.5, 0.5, 0.5, 0.6])
    out = get_estimator("std_floor")(rewards, torch.arange(2).repeat_interleave(4), DifficultyScores(), AdvantageSettings())
    torch.testing.assert_close(out.advantages, torch.tensor([0.5, 0.5, 0.5, -1.5, -0.25, -0.25, -0.25, 0.75]))


def test_consecutive_prompt_index():
    assert consecutive_prompt_index(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert consecutive_prompt_index(0, 4).tolist() == []
