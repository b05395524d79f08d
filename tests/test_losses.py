"""Policy loss pieces against hand computations."""

import math

import pytest
import torch

from durian_lightning.core.losses import (
    PolicyLossConfig,
    aggregate_loss,
    aggregation_denominator,
    clipped_surrogate,
    importance_log_ratio,
    kl_penalty,
    policy_loss,
    sapo_surrogate,
)

# two sequences of different lengths: 3 real tokens and 1 real token, padded to T = 4
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
TOKEN_LOSS = torch.tensor([[1.0, 2.0, 6.0, 100.0], [4.0, 100.0, 100.0, 100.0]])


def test_aggregation_modes_by_hand():
    # token-mean: (1 + 2 + 6 + 4) / 4 real tokens
    assert aggregate_loss(TOKEN_LOSS, MASK, "token-mean").item() == pytest.approx(13 / 4)
    # seq-mean-token-mean: mean of (9 / 3, 4 / 1)
    assert aggregate_loss(TOKEN_LOSS, MASK, "seq-mean-token-mean").item() == pytest.approx((3 + 4) / 2)
    # seq-mean-token-sum with the default normalizer T = 4: mean of (9 / 4, 4 / 4)
    assert aggregate_loss(TOKEN_LOSS, MASK, "seq-mean-token-sum").item() == pytest.approx((9 / 4 + 4 / 4) / 2)
    assert aggregate_loss(TOKEN_LOSS, MASK, "seq-mean-token-sum", normalizer=10).item() == pytest.approx((0.9 + 0.4) / 2)


def test_aggregation_ignores_non_finite_padding_and_empty_sequences():
    loss = TOKEN_LOSS.clone()
    loss[0, 3] = float("inf")
    loss[1, 1] = float("nan")
    assert aggregate_loss(loss, MASK, "token-mean").item() == pytest.approx(13 / 4)
    with_empty = torch.cat([TOKEN_LOSS, torch.full((1, 4), 7.0)])
    mask = torch.cat([MASK, torch.zeros(1, 4, dtype=MASK.dtype)])
    # the empty sequence has no token mean and is left out of the sequence mean
    assert aggregate_loss(with_empty, mask, "seq-mean-token-mean").item() == pytest.approx(3.5)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # advantages (1, -2) on every token; loss = -A per token when the ratio is 1
        ("token-mean", -(3 * 1 + 1 * -2) / 4),
        ("seq-mean-token-mean", -(1 + -2) / 2),
        ("seq-mean-token-sum", -(3 * 1 / 4 + -2 / 4) / 2),
    ],
)
def test_ratio_one_without_kl_is_minus_the_aggregated_advantage(mode, expected):
    logprobs = torch.randn(2, 4)
    out = policy_loss(logprobs, logprobs.clone(), torch.tensor([1.0, -2.0]), MASK, config=PolicyLossConfig(aggregation=mode))
    assert out.loss.item() == pytest.approx(expected)
    assert out.policy_loss.item() == pytest.approx(expected)
    assert out.clip_fraction.item() == 0.0


@pytest.mark.parametrize(
    "ratio, advantage, eps_high, gradient_flows",
    [
        (1.5, 1.0, 0.2, False),  # above 1 + eps with A > 0: clipped, no gradient
        (1.1, 1.0, 0.2, True),  # inside the range
        (0.5, -1.0, 0.2, False),  # below 1 - eps with A < 0: clipped, no gradient
        (0.5, 1.0, 0.2, True),  # below the range but A > 0: the unclipped (smaller) term is used
        (1.5, -1.0, 0.2, True),  # above the range but A < 0: the unclipped term is used
        (1.25, 1.0, 0.28, True),  # DAPO's clip-higher lets this one through ...
        (1.25, 1.0, 0.2, False),  # ... which symmetric PPO clips
    ],
)
def test_clipping_stops_the_gradient_outside_the_clip_range(ratio, advantage, eps_high, gradient_flows):
    old = torch.tensor([[-1.0]])
    logprobs = (old + math.log(ratio)).requires_grad_()
    loss = clipped_surrogate(logprobs, old, torch.tensor([advantage]), eps_low=0.2, eps_high=eps_high)
    loss.sum().backward()
    if gradient_flows:
        # d/dlogp of -ratio * A = -ratio * A
        assert logprobs.grad.item() == pytest.approx(-ratio * advantage)
    else:
        assert logprobs.grad.item() == 0.0
        clipped_ratio = 1 + eps_high if ratio > 1 else 1 - 0.2
        assert loss.item() == pytest.approx(-clipped_ratio * advantage)


def test_kl_estimators_by_hand():
    logprobs, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -2.0]])
    # d = ref - logp = (-1, 0)
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k1"), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k2"), torch.tensor([[0.5, 0.0]]))
    k3 = torch.tensor([[math.exp(-1) + 1 - 1, 0.0]])
    torch.testing.assert_close(kl_penalty(logprobs, ref, "k3"), k3)
    torch.testing.assert_close(kl_penalty(logprobs, ref, "low_var_kl"), k3)
    # k3 stays finite for a token the reference finds wildly more likely (d clamped at 20)
    huge = kl_penalty(torch.tensor([[-100.0]]), torch.tensor([[0.0]]), "k3")
    assert huge.item() == pytest.approx(math.exp(20) - 21)
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logprobs, ref, "k4")


def test_policy_loss_adds_the_kl_term_by_hand():
    logprobs = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0]])
    config = PolicyLossConfig(kl_coef=0.1, kl_estimator="k3", aggregation="token-mean")
    out = policy_loss(logprobs, logprobs.clone(), torch.tensor([2.0]), torch.ones(1, 2), ref, config)
    kl = (math.exp(-1) + 1 - 1 + 0.0) / 2
    assert out.kl.item() == pytest.approx(kl)
    assert out.loss.item() == pytest.approx(-2.0 + 0.1 * kl)


def test_clip_fraction_by_hand():
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 1.0, 0.5, 1.1]]))
    out = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 4), config=PolicyLossConfig())
    assert out.clip_fraction.item() == pytest.approx(1 / 4)  # only the 1.5 token is clipped with A > 0
    assert (out.clip_fraction_low.item(), out.clip_fraction_high.item()) == pytest.approx((0.0, 1 / 4))
    # with A < 0 the 0.5 token (below 0.8) is the clipped one, at the low end
    negative = policy_loss(logprobs, old, torch.tensor([-1.0]), torch.ones(1, 4), config=PolicyLossConfig())
    assert (negative.clip_fraction_low.item(), negative.clip_fraction_high.item()) == pytest.approx((1 / 4, 0.0))


def test_presets():
    grpo = PolicyLossConfig.preset("grpo")
    assert (grpo.eps_low, grpo.eps_high, grpo.kl_coef, grpo.kl_estimator, grpo.aggregation) == (
        0.2, 0.2, 0.01, "k3", "seq-mean-token-mean")
    dapo = PolicyLossConfig.preset("dapo", kl_coef=0.001)
    assert (dapo.eps_low, dapo.eps_high, dapo.kl_coef, dapo.aggregation) == (0.2, 0.28, 0.001, "token-mean")
    with pytest.raises(ValueError, match="unknown loss preset"):
        PolicyLossConfig.preset("ppo")


def test_gspo_clips_the_sequences_length_normalised_ratio_by_hand():
    # sequence 0: token log-ratios 1e-4, -3e-4 -> s = exp(-1e-4) = 0.99990, inside [1 - 3e-4, 1 + 4e-4]; A = 2
    # sequence 1: 3e-4, 5e-4 and a padded position -> s = exp(4e-4) = 1.00040008 > 1 + 4e-4: clipped, A = 1
    # (token by token, 3e-4 would not be clipped: the sequence decides for all its tokens)
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.5, -0.5, 0.0]], dtype=torch.float64)  # float64: ratios this close to 1
    logprobs = (old + torch.tensor([[1e-4, -3e-4, 0.0], [3e-4, 5e-4, 0.0]], dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    out = policy_loss(logprobs, old, torch.tensor([2.0, 1.0], dtype=torch.float64), mask,
                      config=PolicyLossConfig.preset("gspo"))
    # mean over the 2 sequences of -s * A: (-2 exp(-1e-4) - 1.0004) / 2
    assert out.loss.item() == pytest.approx(-1.5001000050, abs=1e-9)
    out.loss.backward()
    # d/dlogp_t of sequence 0's -2 s, averaged over its 2 tokens and the 2 sequences: -2 s / 4 = -s / 2 per token;
    # sequence 1 is clipped: no gradient
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-math.exp(-1e-4) / 2] * 2 + [0.0], [0.0, 0.0, 0.0]],
                                                           dtype=torch.float64))
    assert (out.clip_fraction_low.item(), out.clip_fraction_high.item()) == pytest.approx((0.0, 0.5))


def test_sequence_ratio_ignores_padding_even_if_it_is_not_finite():
    logprobs = torch.tensor([[-1.0, float("nan")]])
    ratio = importance_log_ratio(logprobs, torch.tensor([[-1.5, float("-inf")]]), torch.tensor([[1.0, 0.0]]), "sequence")
    assert ratio.tolist() == [[0.5, 0.0]]


def test_cispo_weights_every_token_with_its_clipped_ratio_by_hand():
    # ratios 1.5, 0.5, 1.1 on log-probs -1 with A = 1: weights clip(r, 0, 1.28) = 1.28, 0.5, 1.1
    logprobs = torch.full((1, 3), -1.0, requires_grad=True)
    old = logprobs.detach() - torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    out = policy_loss(logprobs, old, torch.tensor([1.0]), torch.ones(1, 3), config=PolicyLossConfig.preset("cispo"))
    # token mean of -w * A * log pi = (1.28 + 0.5 + 1.1) / 3
    assert out.loss.item() == pytest.approx(0.96)
    out.loss.backward()
    # every token keeps a gradient, -w * A / 3, the clipped one included (PPO's clip would give it none)
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.28 / 3, -0.5 / 3, -1.1 / 3]]))
    assert (out.clip_fraction_low.item(), out.clip_fraction_high.item()) == pytest.approx((0.0, 1 / 3))


def test_sapo_soft_gate_by_hand():
    # sequence 0: r = 1.5, A = 1, tau 1: f = 4 sigmoid(0.5) = 2.4898373, d f / d log pi = 4 s (1 - s) r = 1.4100223
    # sequence 1: r = 0.5, A = -1, tau 1.05: f = 4 / 1.05 sigmoid(-0.525) = 1.4159383, d f / d log pi = 0.4670699
    old = torch.tensor([[-1.0], [-2.0]])
    logprobs = (old + torch.log(torch.tensor([[1.5], [0.5]]))).requires_grad_()
    out = policy_loss(logprobs, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), config=PolicyLossConfig.preset("sapo"))
    assert out.loss.item() == pytest.approx((-2.4898373 + 1.4159383) / 2, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.4100223 / 2], [0.4670699 / 2]]))
    assert out.clip_fraction.item() == 0.0
    # on-policy (r = 1) it is the plain policy gradient: -A per token
    on = torch.tensor([[-1.0]], requires_grad=True)
    sapo_surrogate(on - on.detach(), torch.tensor([3.0]), 1.0, 1.05).sum().backward()
    assert on.grad.item() == pytest.approx(-3.0)


def test_new_presets_leave_grpo_and_dapo_as_they_were():
    assert PolicyLossConfig.preset("grpo") == PolicyLossConfig(eps_low=0.2, eps_high=0.2, kl_coef=0.01,
                                                                aggregation="seq-mean-token-mean")
    assert PolicyLossConfig.preset("dapo") == PolicyLossConfig(eps_low=0.2, eps_high=0.28, aggregation="token-mean")
    gspo, cispo, sapo = (PolicyLossConfig.preset(name) for name in ("gspo", "cispo", "sapo"))
    assert (gspo.ratio_level, gspo.eps_low, gspo.eps_high, gspo.aggregation) == ("sequence", 3e-4, 4e-4,
                                                                                 "seq-mean-token-mean")
    assert (cispo.objective, cispo.eps_low, cispo.eps_high) == ("cispo", 1.0, 0.28)
    assert (sapo.objective, sapo.sapo_tau_pos, sapo.sapo_tau_neg) == ("sapo", 1.0, 1.05)


def test_bad_input():
    with pytest.raises(ValueError, match="no real token"):
        aggregate_loss(torch.ones(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mode must be"):
        aggregate_loss(torch.ones(2, 3), torch.ones(2, 3), "sum")
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), config=PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="advantages must be"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="clip range"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), eps_low=1.5)
    with pytest.raises(ValueError, match="normalizer"):
        aggregate_loss(torch.ones(1, 2), torch.ones(1, 2), "seq-mean-token-sum", normalizer=0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batch_losses_with_the_batch_denominator_add_up_to_the_batch_loss(mode):
    torch.manual_seed(0)
    logprobs, old, ref = -torch.rand(6, 5), -torch.rand(6, 5), -torch.rand(6, 5)
    advantages = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).long()
    mask[:, 0] = 1
    config = PolicyLossConfig(kl_coef=0.1, aggregation=mode)
    whole = policy_loss(logprobs, old, advantages, mask, ref, config)
    denominator = aggregation_denominator(mask, mode)
    parts = [policy_loss(logprobs[c], old[c], advantages[c], mask[c], ref[c], config, denominator)
             for c in torch.arange(6).split(4)]
    for field in ("loss", "policy_loss", "kl"):
        assert sum(float(getattr(p, field)) for p in parts) == pytest.approx(float(getattr(whole, field)), rel=1e-6)


def test_dr_grpo_divides_by_a_constant_not_by_the_batch_width():
    from durian_lightning.settings import LossSettings

    config = LossSettings(preset="grpo", aggregation="seq-mean-token-sum", kl_coef=0.0).resolve(max_new_tokens=64)
    assert config.normalizer == 64.0
    assert LossSettings(aggregation="seq-mean-token-sum", normalizer=10).resolve(64).normalizer == 10.0

    def loss_at_width(width: int) -> float:
        # one sequence of 3 real tokens, ratio 1, advantage 1: token losses -1, summed -3, over the constant 64
        logprobs = torch.zeros(1, width)
        mask = torch.zeros(1, width)
        mask[0, :3] = 1
        return float(policy_loss(logprobs, logprobs, torch.ones(1), mask, config=config).loss)

    assert loss_at_width(3) == loss_at_width(50) == pytest.approx(-3 / 64)
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        LossSettings(normalizer=0)


def test_truncated_importance_weights_by_hand():
    from durian_lightning.core.losses import truncated_importance_weights

    proximal = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    behaviour = torch.tensor([[-1.5, -1.0, -0.5], [-1.2, -0.9, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    token = truncated_importance_weights(proximal, behaviour, mask, "token", cap=1.5)
    # exp(0.5) = 1.6487 is capped at 1.5; exp(-1) = 0.3679; exp(0) = 1; exp(0.2) = 1.2214, exp(-0.1) = 0.9048; padding 0
    torch.testing.assert_close(token, torch.tensor([[1.5, 0.36788, 1.0], [1.22140, 0.90484, 0.0]]), atol=1e-5, rtol=0)
    sequence = truncated_importance_weights(proximal, behaviour, mask, "sequence", cap=1.5)
    # row 0: exp(0.5 - 1 + 0) = exp(-0.5) = 0.6065 on each token; row 1: exp(0.2 - 0.1) = exp(0.1) = 1.1052
    torch.testing.assert_close(sequence, torch.tensor([[0.60653, 0.60653, 0.60653], [1.10517, 1.10517, 0.0]]),
                               atol=1e-5, rtol=0)


def test_masked_importance_weights_by_hand():
    from durian_lightning.core.losses import truncated_importance_weights
    from durian_lightning.settings import LossSettings

    proximal = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    behaviour = torch.tensor([[-1.5, -1.0, -0.5], [-1.2, -0.9, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # token ratios: exp(0.5) = 1.6487, exp(-1) = 0.3679, 1 | exp(0.2) = 1.2214, exp(-0.1) = 0.9048, padding
    # bounds [1/1.5, 1.5] = [0.6667, 1.5]: 1.6487 and 0.3679 are outside, so zero; the others keep their ratio
    token = truncated_importance_weights(proximal, behaviour, mask, "token", cap=1.5, mode="mask")
    torch.testing.assert_close(token, torch.tensor([[0.0, 0.0, 1.0], [1.22140, 0.90484, 0.0]]), atol=1e-5, rtol=0)
    # an explicit lower bound 0.3 keeps exp(-1) = 0.3679
    low = truncated_importance_weights(proximal, behaviour, mask, "token", cap=1.5, mode="mask", low=0.3)
    torch.testing.assert_close(low, torch.tensor([[0.0, 0.36788, 1.0], [1.22140, 0.90484, 0.0]]), atol=1e-5, rtol=0)
    # sequences: exp(-0.5) = 0.6065 is under 1/1.5, so row 0 leaves the loss; row 1 keeps exp(0.1) = 1.1052
    sequence = truncated_importance_weights(proximal, behaviour, mask, "sequence", cap=1.5, mode="mask")
    torch.testing.assert_close(sequence, torch.tensor([[0.0, 0.0, 0.0], [1.10517, 1.10517, 0.0]]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="mask mode only"):
        LossSettings(rollout_correction="token", rollout_correction_low=0.5)
    with pytest.raises(ValueError, match=r"in \(0, rollout_correction_cap=2.0\]"):
        LossSettings(rollout_correction="token", rollout_correction_mode="mask", rollout_correction_low=3.0)
    config = LossSettings(rollout_correction="token", rollout_correction_mode="mask", rollout_correction_low=0.5).resolve(8)
    assert (config.rollout_correction_mode, config.rollout_correction_low) == ("mask", 0.5)


def test_the_rollout_correction_weights_each_tokens_surrogate_and_is_the_identity_when_the_log_probs_agree():
    from durian_lightning.core.losses import PolicyLossConfig, policy_loss

    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    recorded = torch.tensor([[-1.5, -1.0], [-1.0, -1.0]])
    advantages, mask = torch.tensor([1.0, -2.0]), torch.ones(2, 2)
    config = PolicyLossConfig(aggregation="token-mean", rollout_correction="token", rollout_correction_cap=2.0)
    loss = policy_loss(old.clone(), old, advantages, mask, config=config, behaviour_logprobs=recorded).loss
    # ratio 1, so each token's surrogate is -A: (-1 x exp(0.5) - 1 x exp(-1) + 2 x 1 + 2 x 1) / 4 tokens
    assert float(loss) == pytest.approx((-1.64872 - 0.36788 + 2 + 2) / 4, abs=1e-5)
    plain = policy_loss(old.clone(), old, advantages, mask, config=PolicyLossConfig(aggregation="token-mean")).loss
    same = policy_loss(old.clone(), old, advantages, mask, config=config, behaviour_logprobs=old.clone()).loss
    assert float(same) == float(plain) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="recorded while sampling"):
        policy_loss(old.clone(), old, advantages, mask, config=config)
