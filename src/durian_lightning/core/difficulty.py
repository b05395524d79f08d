"""Difficulty scores of Durian and the grouping of prompts by them.

Two axes (docs/method.md):

* perceptual difficulty = the spectral entropy of an image's patch features, computed once per image;
* reasoning difficulty = the policy's confidence in its own rollouts, computed every step.

Prompts are then grouped by each score: three perceptual groups split at two percentiles of the entropy,
and ``b`` equal-frequency reasoning groups by rank of confidence. Group ids grow with the score, so
perceptual group 0 holds the *simplest* images and reasoning group 0 the *least confident* (hardest) prompts.

All functions here are plain tensor functions: no model, no Lightning. Statistics "over the batch" are over
whatever is passed in; in distributed training the caller gathers the global batch first.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from durian_lightning._imaging import high_depth_to_uint8
from durian_lightning._validation import check_finite, check_prompt_index, check_vector

EigenRoute = Literal["auto", "gram", "covariance", "svd"]
Reduction = Literal["sum", "mean"]


FLAT_ULPS = 16  # see spectral_entropy: a spread this many rounding steps of the features' dtype is no variance


def spectral_entropy(
    features: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    route: EigenRoute = "auto",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Visual entropy ``H = -sum_k p_k log p_k`` of the eigenvalue spectrum of each image's patch covariance.

    ``features`` is ``(B, P, d)`` (or one ``(P, d)`` image): ``P`` patch features of dimension ``d``. ``mask``
    (``(B, P)``, True = real patch) lets images with different patch counts share one padded batch. Per image,
    the features are centred over its real patches, ``C = Fc^T Fc / (n - 1)``, and ``p_k = lambda_k / sum(lambda)``.

    The non-zero eigenvalues of ``Fc^T Fc`` (d x d) equal those of the Gram matrix ``Fc Fc^T`` (P x P), so
    ``route="auto"`` decomposes whichever is smaller; ``"svd"`` uses squared singular values of ``Fc`` instead.
    Centring and decomposition run in ``dtype`` (float64 by default): features with a large common offset lose
    their small eigenvalues to cancellation in float32. Eigenvalues below ``max(lambda) * max(P, d) * machine
    epsilon`` are rounding noise and are treated as zero, so rank-one features have entropy exactly 0.
    An image whose real patches are all identical has no variance and gets entropy 0, and so does one whose patches
    differ from their mean by no more than :data:`FLAT_ULPS` rounding steps of the input's dtype at the features'
    root-mean-square magnitude (a flat image, whose encoder output differs only by rounding). Returns ``(B,)`` in ``dtype``
    (a 0-d tensor for a single image).
    """
    if not isinstance(features, torch.Tensor):
        features = torch.as_tensor(features)
    single = features.dim() == 2
    if single:
        features = features.unsqueeze(0)
        mask = None if mask is None else torch.as_tensor(mask).unsqueeze(0)
    if features.dim() != 3:
        raise ValueError(f"features must be (B, P, d) or (P, d), got shape {tuple(features.shape)}")
    batch, patches, dim = features.shape
    bad = ~torch.isfinite(features)
    if bool(bad.any()):
        b, p, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"features must be finite, but image {b}, patch {p}, dim {k} is {features[b, p, k].item()}")
    if mask is None:
        mask = torch.ones(batch, patches, dtype=torch.bool, device=features.device)
    else:
        mask = torch.as_tensor(mask, device=features.device)
        if tuple(mask.shape) != (batch, patches):
            raise ValueError(f"mask must have shape {(batch, patches)} to match features, got {tuple(mask.shape)}")
        mask = mask.bool()
    counts = mask.sum(dim=1)
    if batch and bool((counts < 2).any()):
        image = int((counts < 2).nonzero()[0])
        raise ValueError(
            f"image {image} has {int(counts[image])} real patch(es); a patch covariance needs at least 2"
        )

    weights = mask.to(dtype).unsqueeze(-1)
    x = features.to(dtype)
    n = counts.to(dtype).view(batch, 1, 1)
    centred = (x - (x * weights).sum(dim=1, keepdim=True) / n) * weights  # padded rows stay exactly zero
    # H depends only on the eigenvalues' proportions: dividing each image by its largest entry changes nothing but keeps
    # the products below from overflowing (features ~1e160) or underflowing (~1e-160)
    scale = centred.abs().amax(dim=(1, 2), keepdim=True)
    centred = centred / torch.where(scale > 0, scale, torch.ones_like(scale))
    # The features are only as exact as their dtype: an image whose every patch lies within FLAT_ULPS rounding steps of
    # the patches' mean, at the features' root-mean-square magnitude, has no variance to measure (a flat image; a
    # batched and a lone encoder call round it differently), so its entropy is 0, not that of the rounding noise
    precision = torch.finfo(features.dtype).eps if features.is_floating_point() else 0.0
    largest = (x.abs() * weights).amax(dim=(1, 2)).clamp_min(torch.finfo(dtype).tiny)  # squares of 1e160 would overflow
    rms = largest * (((x / largest.view(batch, 1, 1)).square() * weights).sum(dim=(1, 2)) / (n.view(batch) * dim)).sqrt()
    flat = scale.view(batch) <= FLAT_ULPS * precision * rms

    if route == "auto":
        route = "gram" if patches <= dim else "covariance"
    if route == "gram":
        eigenvalues = torch.linalg.eigvalsh(centred @ centred.transpose(1, 2))
    elif route == "covariance":
        eigenvalues = torch.linalg.eigvalsh(centred.transpose(1, 2) @ centred)
    elif route == "svd":
        eigenvalues = torch.linalg.svdvals(centred).square()
    else:
        raise ValueError(f"route must be 'auto', 'gram', 'covariance' or 'svd', got {route!r}")
    eigenvalues = eigenvalues / (n.view(batch, 1) - 1)
    entropy = _entropy_of_spectrum(eigenvalues, tolerance=max(patches, dim) * torch.finfo(dtype).eps)
    entropy = torch.where(flat, torch.zeros_like(entropy), entropy)
    return entropy.squeeze(0) if single else entropy


def _entropy_of_spectrum(eigenvalues: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Shannon entropy (nats) of each row of eigenvalues, normalised to a distribution; noise-level values -> 0."""
    if eigenvalues.shape[-1] == 0:
        return eigenvalues.new_zeros(eigenvalues.shape[:-1])
    largest = eigenvalues.amax(dim=-1, keepdim=True)
    eigenvalues = torch.where(eigenvalues > largest * tolerance, eigenvalues, torch.zeros_like(eigenvalues))
    total = eigenvalues.sum(dim=-1, keepdim=True)
    p = eigenvalues / torch.where(total > 0, total, torch.ones_like(total))
    return -torch.xlogy(p, p).sum(dim=-1)  # xlogy(0, 0) = 0, so empty directions add nothing


def pixel_entropy(image: Image.Image | np.ndarray | torch.Tensor) -> float:
    """Shannon entropy (nats) of the 256-bin grayscale histogram: a cheap, model-free stand-in for visual entropy.

    Not the paper's metric (it sees intensity spread, not structure). Grayscale follows PIL's ``convert("L")``
    (ITU-R 601 luma; alpha is ignored, palettes are applied, CMYK goes through RGB). 16-bit images (``I;16``) keep
    their top 8 bits; 32-bit ``I`` and float ``F`` images are rescaled linearly from their own min..max.
    Arrays and tensors must be uint8, ``(H, W)`` or ``(H, W, C)`` with C in 1, 3, 4 (tensors may be ``(C, H, W)``).
    """
    gray = _grayscale_uint8(image)
    if gray.size == 0:
        raise ValueError("pixel_entropy needs an image with at least one pixel, got an empty one")
    p = np.bincount(gray.ravel(), minlength=256).astype(np.float64) / gray.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def _grayscale_uint8(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
        image = array
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"pixel_entropy expects a uint8 array, got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim == 2:
            return image
        if image.ndim == 3 and image.shape[-1] in (3, 4):
            image = Image.fromarray(image)
        else:
            raise ValueError(f"pixel_entropy expects an array of shape (H, W) or (H, W, 1|3|4), got {image.shape}")
    if not isinstance(image, Image.Image):
        raise ValueError(f"pixel_entropy expects a PIL image, a uint8 array or a tensor, got {type(image).__name__}")
    deep = high_depth_to_uint8(image)
    return deep if deep is not None else np.asarray(image.convert("L"))


def sequence_logprob(token_logprobs: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "sum") -> torch.Tensor:
    """Log-probability of each sequence from its token log-probs ``(N, T)`` and completion mask ``(N, T)``.

    ``"sum"`` is the joint log-probability ``log pi(y|x)``; ``"mean"`` divides by the number of completion
    tokens, so long answers are not "less confident" just for being long. An empty completion has log-prob 0
    under both (the empty product is 1).
    """
    if token_logprobs.dim() != 2 or tuple(mask.shape) != tuple(token_logprobs.shape):
        raise ValueError(
            f"token_logprobs and mask must both be (N, T); got {tuple(token_logprobs.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.to(token_logprobs.dtype)
    # where() rather than multiply: a padded position may hold -inf, and -inf * 0 is NaN
    total = torch.where(mask > 0, token_logprobs, torch.zeros_like(token_logprobs)).sum(dim=1)
    check_finite("sequence log-prob", total)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(dim=1).clamp_min(1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def sequence_confidence(
    token_logprobs: torch.Tensor,
    mask: torch.Tensor,
    prompt_index: torch.Tensor,
    reduction: Reduction = "sum",
    num_prompts: int | None = None,
) -> torch.Tensor:
    """Per-prompt confidence: the mean over a prompt's rollouts of their sequence log-probabilities.

    Lower confidence = harder prompt. The default ``"sum"`` follows the paper's formula literally
    (``L_i = sum_t log pi(y_t)``); ``"mean"`` (per-token) is the length-normalised reading. Returns ``(num_prompts,)``.
    """
    sequence = sequence_logprob(token_logprobs, mask, reduction)
    prompt_index, num_prompts = check_prompt_index(prompt_index, sequence.numel(), num_prompts)
    prompt_index = prompt_index.to(sequence.device)
    totals = sequence.new_zeros(num_prompts).index_add_(0, prompt_index, sequence)
    return totals / torch.bincount(prompt_index, minlength=num_prompts).to(sequence.dtype)


def percentile_thresholds(values: torch.Tensor, percentiles: Sequence[float] = (0.25, 0.75)) -> torch.Tensor:
    """The two percentile thresholds ``(q_low, q_high)`` of ``values`` (linear interpolation, as NumPy's default).

    Use it on a batch's entropies (the paper) or once on the whole dataset's cached entropies (stable when
    batches are small), then pass the result to :func:`perceptual_groups`.
    """
    low, high = _check_percentiles(percentiles)
    values = check_vector("values", torch.as_tensor(values))
    if values.numel() == 0:
        raise ValueError("percentile_thresholds needs at least one value, got an empty tensor")
    check_finite("values", values)
    q = torch.tensor([low, high], dtype=torch.float64, device=values.device)
    return torch.quantile(values.to(torch.float64), q)


def _check_percentiles(percentiles: Sequence[float]) -> tuple[float, float]:
    if len(percentiles) != 2:
        raise ValueError(f"percentiles must be a pair (low, high), got {tuple(percentiles)}")
    low, high = float(percentiles[0]), float(percentiles[1])
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"percentiles must satisfy 0 <= low <= high <= 1, got ({low}, {high})")
    return low, high


def perceptual_groups(
    entropy: torch.Tensor,
    percentiles: Sequence[float] = (0.25, 0.75),
    thresholds: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Three perceptual groups per prompt: 0 if ``H <= q_low``, 2 if ``H >= q_high`` (and not 0), else 1.

    The thresholds are the batch's percentiles unless ``thresholds=(q_low, q_high)`` is given (for example the
    dataset's). The paper's rule keeps the middle group open on both sides; when ``q_low == q_high`` (heavy ties)
    a value equal to both goes to group 0, the first rule.
    """
    entropy = check_vector("entropy", torch.as_tensor(entropy))
    check_finite("entropy", entropy)
    if thresholds is None:
        if entropy.numel() == 0:
            return torch.zeros(0, dtype=torch.long, device=entropy.device)
        thresholds = percentile_thresholds(entropy, percentiles)
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64, device=entropy.device)
    if thresholds.shape != (2,) or not bool(thresholds[0] <= thresholds[1]):
        raise ValueError(f"thresholds must be (low, high) with low <= high, got {thresholds.tolist()}")
    h = entropy.to(torch.float64)
    groups = torch.ones_like(h, dtype=torch.long)
    groups[h >= thresholds[1]] = 2
    groups[h <= thresholds[0]] = 0
    return groups


def reasoning_groups(confidence: torch.Tensor, num_groups: int = 12) -> torch.Tensor:
    """``num_groups`` equal-frequency groups of prompts by rank of confidence (group 0 = least confident).

    The prompt of rank ``r`` (0-based, ascending confidence) among ``n`` goes to group ``floor(r * b / n)``, so group
    sizes differ by at most one. Ties are ordered by prompt position (a stable sort), which keeps the sizes equal
    and the result deterministic; equal confidences can therefore straddle two neighbouring groups. With
    ``n <= b`` every prompt is its own group (group id = rank).
    """
    confidence = check_vector("confidence", torch.as_tensor(confidence))
    check_finite("confidence", confidence)
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    n = confidence.numel()
    order = torch.sort(confidence, stable=True).indices
    rank_group = torch.arange(n, device=confidence.device)
    if n > num_groups:
        rank_group = rank_group * num_groups // n
    groups = torch.empty(n, dtype=torch.long, device=confidence.device)
    groups[order] = rank_group
    return groups
