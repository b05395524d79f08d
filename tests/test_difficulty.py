"""Difficulty scores and groupings against hand computations and NumPy."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from durian_lightning.core.difficulty import (
    percentile_thresholds,
    perceptual_groups,
    pixel_entropy,
    reasoning_groups,
    sequence_confidence,
    sequence_logprob,
    spectral_entropy,
)


def numpy_spectral_entropy(features: np.ndarray) -> float:
    """The definition, literally: float64 covariance over patches, its eigenvalues, their Shannon entropy."""
    cov = np.cov(features.astype(np.float64), rowvar=False)  # centres over patches, divides by P - 1
    lam = np.clip(np.linalg.eigvalsh(cov), 0, None)
    p = lam / lam.sum()
    p = p[p > 1e-12]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("route", ["auto", "gram", "covariance", "svd"])
@pytest.mark.parametrize("shape", [(3, 20, 8), (3, 8, 20)])  # more patches than dims, and fewer
def test_spectral_entropy_equals_numpy_eigendecomposition(route, shape):
    rng = np.random.default_rng(0)
    features = rng.normal(size=shape) * rng.uniform(0.1, 3.0, size=shape[-1])  # anisotropic spectrum
    ours = spectral_entropy(torch.from_numpy(features).float(), route=route)
    reference = [numpy_spectral_entropy(f) for f in features]
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-6)


def test_spectral_entropy_survives_a_large_common_offset():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(16, 6)) + 1e4  # float32 centring would cancel most digits here
    ours = spectral_entropy(torch.from_numpy(features))
    assert ours.item() == pytest.approx(numpy_spectral_entropy(features), rel=1e-9)


def test_rank_one_features_have_zero_entropy():
    direction = torch.randn(32)
    features = torch.randn(50, 1) * direction  # every patch on one line
    assert spectral_entropy(features).item() == 0.0
    assert spectral_entropy(features.T.contiguous().T, route="svd").item() == 0.0


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_k_equal_orthogonal_directions_give_log_k(k):
    # patches +e_i and -e_i for i < k: mean 0, covariance (2 / (2k - 1)) * I_k in the first k dims
    eye = torch.eye(16)[:k]
    features = torch.cat([eye, -eye]) * 3.0
    assert spectral_entropy(features).item() == pytest.approx(math.log(k), abs=1e-12)


def test_spectral_entropy_is_invariant_to_patch_order():
    features = torch.randn(2, 30, 12)
    shuffled = features[:, torch.randperm(30)]
    torch.testing.assert_close(spectral_entropy(shuffled), spectral_entropy(features))


def test_padding_mask_gives_the_unpadded_value():
    a, b = torch.randn(10, 6), torch.randn(25, 6)
    padded = torch.zeros(2, 25, 6)
    padded[0, :10], padded[1] = a, b
    padded[0, 10:] = 99.0  # garbage in the padding must not matter
    mask = torch.zeros(2, 25, dtype=torch.bool)
    mask[0, :10], mask[1] = True, True
    batched = spectral_entropy(padded, mask)
    torch.testing.assert_close(batched, torch.stack([spectral_entropy(a), spectral_entropy(b)]))


def test_identical_patches_have_zero_entropy():
    assert spectral_entropy(torch.ones(5, 4)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patches_that_differ_only_by_rounding_are_flat(dtype):
    # a flat image's features, as an encoder's batched and lone calls round them: a common vector and, in two
    # patches, single rounding steps in different entries (two directions: without the rule, entropy ~log 2)
    base = torch.tensor([0.5, -0.25, 0.125, 1.0], dtype=dtype).repeat(4, 1)
    eps = torch.finfo(dtype).eps
    noisy = base.clone()
    noisy[0, 0], noisy[1, 1] = 0.5 * (1 + eps), -0.25 * (1 + 2 * eps)
    assert (noisy != base).sum() == 2  # the steps are representable: the test is not of identical patches
    assert spectral_entropy(noisy).item() == 0.0
    # 64 steps (4x FLAT_ULPS) at the rms magnitude is a spread: one direction of variance, entropy 0 by rank, and
    # a second, orthogonal one gives two equal eigenvalues -> log 2 (computed in float64 from the dtype's values)
    rms = float(base.double().square().mean().sqrt())
    spread = base.clone()
    spread[0, 0] += 64 * eps * rms
    spread[1, 1] += 64 * eps * rms
    expected = spectral_entropy(spread.double())
    assert expected.item() > 0.1
    assert spectral_entropy(spread).item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize(
    "features, mask, message",
    [
        (torch.randn(1, 4), None, "image 0 has 1 real patch"),
        (torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]]), "image 1 has 1 real patch"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 2.0]]), None, "image 0, patch 1, dim 0 is nan"),
        (torch.randn(2, 3, 4), torch.ones(2, 4), "mask must have shape"),
        (torch.randn(4), None, "must be \\(B, P, d\\)"),
    ],
)
def test_spectral_entropy_bad_input(features, mask, message):
    with pytest.raises(ValueError, match=message):
        spectral_entropy(features, mask)


def test_spectral_entropy_unknown_route():
    with pytest.raises(ValueError, match="route must be"):
        spectral_entropy(torch.randn(4, 3), route="eig")


# ---------------------------------------------------------------- pixel entropy


def test_pixel_entropy_by_hand():
    constant = np.full((8, 8), 7, dtype=np.uint8)
    assert pixel_entropy(constant) == 0.0
    halves = np.zeros((8, 8), dtype=np.uint8)
    halves[:, 4:] = 255
    assert pixel_entropy(halves) == pytest.approx(math.log(2))
    quarters = np.repeat(np.array([0, 60, 120, 250], dtype=np.uint8), 16).reshape(8, 8)
    assert pixel_entropy(quarters) == pytest.approx(math.log(4))
    # 3/4 black, 1/4 white: -(3/4 ln 3/4 + 1/4 ln 1/4)
    skew = np.zeros((4, 4), dtype=np.uint8)
    skew[0] = 255
    assert pixel_entropy(skew) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_pixel_entropy_accepts_every_image_mode():
    halves = np.zeros((8, 8), dtype=np.uint8)
    halves[:, 4:] = 255
    rgb = np.stack([halves] * 3, axis=-1)
    expected = math.log(2)
    images = {
        "L": Image.fromarray(halves),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, np.full((8, 8), 128, np.uint8)])),
        "LA": Image.fromarray(halves).convert("LA"),
        "P": Image.fromarray(rgb).convert("P"),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "1": Image.fromarray(halves).convert("1"),
        "I;16": Image.fromarray((halves.astype(np.uint16) * 257)),
        "I": Image.fromarray(halves.astype(np.int32) * 1000),
        "F": Image.fromarray(halves.astype(np.float32) / 255),
    }
    for mode, image in images.items():
        assert image.mode == mode
        assert pixel_entropy(image) == pytest.approx(expected), mode
    assert pixel_entropy(torch.from_numpy(rgb).permute(2, 0, 1)) == pytest.approx(expected)
    assert pixel_entropy(rgb) == pytest.approx(expected)


def test_pixel_entropy_one_pixel_and_bad_input():
    assert pixel_entropy(Image.new("RGB", (1, 1), "red")) == 0.0
    with pytest.raises(ValueError, match="uint8"):
        pixel_entropy(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="at least one pixel"):
        pixel_entropy(np.zeros((0, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="PIL image"):
        pixel_entropy("image.png")


# ---------------------------------------------------------------- confidence


LOGPROBS = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, float("-inf")], [-4.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])


def test_sequence_logprob_sum_and_mean_by_hand():
    assert sequence_logprob(LOGPROBS, MASK, "sum").tolist() == [-6.0, -1.0, -4.0]
    assert sequence_logprob(LOGPROBS, MASK, "mean").tolist() == [-2.0, -0.5, -4.0]
    empty = sequence_logprob(torch.zeros(1, 2), torch.zeros(1, 2), "mean")
    assert empty.tolist() == [0.0]


def test_sequence_confidence_is_the_mean_over_a_prompts_rollouts():
    prompt = torch.tensor([1, 0, 1])
    assert sequence_confidence(LOGPROBS, MASK, prompt, "sum").tolist() == [-1.0, -5.0]  # P1: (-6 - 4) / 2
    assert sequence_confidence(LOGPROBS, MASK, prompt, "mean").tolist() == [-0.5, -3.0]  # P1: (-2 - 4) / 2


def test_sequence_confidence_bad_input():
    with pytest.raises(ValueError, match="must both be"):
        sequence_confidence(LOGPROBS, MASK[:, :2], torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        sequence_confidence(LOGPROBS, MASK, torch.tensor([0, 0, 1]), "max")
    with pytest.raises(ValueError, match="sequence log-prob"):
        sequence_confidence(LOGPROBS, torch.ones(3, 3), torch.tensor([0, 0, 1]))  # the -inf is a real token here


# ---------------------------------------------------------------- groups


def test_percentile_thresholds_match_numpy():
    values = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    expected = np.percentile(values.numpy(), [25, 75])
    np.testing.assert_allclose(percentile_thresholds(values).numpy(), expected)
    # by hand: sorted 1 1 2 3 4 5 6 9; q25 at position 1.75 -> 1 + 0.75 * (2 - 1) = 1.75
    assert percentile_thresholds(values)[0].item() == pytest.approx(1.75)


def test_perceptual_groups_by_hand():
    # q25 = 2, q75 = 4: H <= 2 -> 0, 2 < H < 4 -> 1, H >= 4 -> 2
    assert perceptual_groups(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).tolist() == [0, 0, 1, 2, 2]
    assert perceptual_groups(torch.tensor([1.0, 2.5, 3.5]), thresholds=(2.0, 3.0)).tolist() == [0, 1, 2]
    # all equal: q25 == q75 == H, the first rule (group 0) wins
    assert perceptual_groups(torch.full((4,), 2.0)).tolist() == [0, 0, 0, 0]
    assert perceptual_groups(torch.zeros(0)).tolist() == []


def test_perceptual_groups_bad_thresholds():
    with pytest.raises(ValueError, match="low <= high"):
        perceptual_groups(torch.ones(3), thresholds=(3.0, 1.0))
    with pytest.raises(ValueError, match=r"entropy\[0\] = nan"):
        perceptual_groups(torch.tensor([float("nan"), 1.0]))


def test_reasoning_groups_by_hand():
    confidence = torch.tensor([0.5, -1.0, 2.0, -1.0, 0.0])
    # ascending, ties by position: idx1 (-1), idx3 (-1), idx4 (0), idx0 (0.5), idx2 (2) -> ranks 0..4
    # group = floor(rank * 2 / 5): ranks 0, 1, 2 -> 0; ranks 3, 4 -> 1
    assert reasoning_groups(confidence, 2).tolist() == [1, 0, 1, 0, 0]
    # as many groups as prompts, or more: each prompt its own group, numbered by rank
    assert reasoning_groups(confidence, 5).tolist() == [3, 0, 4, 1, 2]
    assert reasoning_groups(confidence, 12).tolist() == [3, 0, 4, 1, 2]


def test_reasoning_groups_are_equal_frequency():
    groups = reasoning_groups(torch.randn(100), 12)
    sizes = torch.bincount(groups, minlength=12)
    assert sizes.sum() == 100 and sizes.max() - sizes.min() <= 1
    # monotone: a higher-confidence prompt never lands in a lower group
    confidence = torch.randn(50)
    groups = reasoning_groups(confidence, 7)
    order = confidence.argsort()
    assert bool((groups[order].diff() >= 0).all())


@pytest.mark.parametrize("scale", [1e160, 1e-160, 1e-3])
def test_spectral_entropy_does_not_depend_on_the_features_scale(scale):
    # p_k = lambda_k / sum(lambda) is scale-free; products of features near 1e160 used to overflow float64
    features = torch.randn(3, 12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(spectral_entropy(features * scale), spectral_entropy(features), rtol=1e-9, atol=1e-12)
    assert spectral_entropy(features.half()).dtype == torch.float64  # half-precision features are read too
