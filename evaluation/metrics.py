"""Localisation, grid and sanity-check metrics for explanation maps, in plain numpy (float64 inside).

Every map is an ``(H, W)`` float array at the image's resolution (signed values are allowed) and every mask
an ``(H, W)`` boolean array of the same shape. The localisation metrics follow the definitions of Quantus
0.6.0 (Hedström et al., JMLR 2023), the reference they are cross-checked against in
``tests/integration/test_quantus.py``; where a definition leaves a case open (ties, zero mass) the choice made
here is stated in the function's docstring.

Example:
    >>> import numpy as np
    >>> saliency = np.zeros((4, 4))
    >>> saliency[1, 1] = 1.0
    >>> mask = np.zeros((4, 4), dtype=bool)
    >>> mask[:2, :2] = True
    >>> pointing_game(saliency, mask), auc(saliency, mask)
    (1.0, 0.625)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

__all__ = [
    "METRICS",
    "SSIM_C1",
    "SSIM_C2",
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "THRESHOLD_QUANTILE",
    "TOP_K",
    "auc",
    "pointing_game",
    "quadrant_masks",
    "region_attribution",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "sparseness",
    "spearman",
    "ssim",
    "thresholded_iou",
    "top_k_intersection",
]

ArrayLike = npt.ArrayLike
Metric = Callable[[ArrayLike, ArrayLike], float]

TOP_K = 1000
"""``k`` of :func:`top_k_intersection` in :data:`METRICS`: Quantus's fixed default (not scaled to the image)."""

THRESHOLD_QUANTILE = 0.75
"""Default quantile of :func:`thresholded_iou`: the map's top 25 % of pixels form the binary explanation."""

SSIM_SIGMA = 1.5
"""Standard deviation of the Gaussian window of :func:`ssim`, in pixels (Wang et al. 2004)."""

SSIM_WINDOW = 11
"""Side of the Gaussian window of :func:`ssim`: ``2 * int(3.5 * sigma + 0.5) + 1``, as scikit-image."""

SSIM_C1 = 0.01**2
"""Luminance stabiliser ``(K1 L)²`` of :func:`ssim` with ``K1 = 0.01`` and data range ``L = 1``."""

SSIM_C2 = 0.03**2
"""Contrast stabiliser ``(K2 L)²`` of :func:`ssim` with ``K2 = 0.03`` and data range ``L = 1``."""


# --------------------------------------------------------------------------------------------------- checks


def _as_map(value: ArrayLike, name: str) -> np.ndarray:
    """Return ``value`` as a finite float64 ``(H, W)`` array, or raise naming the argument."""
    array = np.asarray(value)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D (H, W) map, got shape {array.shape}; squeeze batch/channel axes first"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(array)).sum())} NaN/inf values")
    return array


def _as_mask(value: ArrayLike, shape: tuple[int, ...], name: str = "mask", *, allow_empty: bool = False) -> np.ndarray:
    """Return ``value`` as a bool array of ``shape`` (0/1 integers are accepted), or raise naming the argument."""
    array = np.asarray(value)
    if array.shape != shape:
        raise ValueError(f"{name} must have the saliency map's shape {shape}, got {array.shape}")
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1), got dtype {array.dtype} with other values")
        array = array.astype(bool)
    if not allow_empty and not array.any():
        raise ValueError(f"{name} must select at least one pixel, got an empty mask")
    return array


# -------------------------------------------------------------------------------------------------- helpers


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Return the 1-based ranks of a flat array, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts).astype(np.float64)
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def _expected_top_hits(saliency: np.ndarray, mask: np.ndarray, k: int) -> float:
    """Expected number of mask pixels among the ``k`` highest pixels, ties at the cut broken uniformly at random.

    Pixels strictly above the ``k``-th highest value ``v`` are all taken; the remaining ``r`` places go to the
    ``t`` pixels equal to ``v``, of which ``m`` lie in the mask, contributing ``r m / t`` in expectation.
    """
    flat = saliency.reshape(-1)
    inside = mask.reshape(-1)
    cut = np.partition(flat, flat.size - k)[flat.size - k]
    above = flat > cut
    tied = flat == cut
    remaining = k - int(above.sum())
    tied_inside = int((tied & inside).sum())
    return float((above & inside).sum()) + remaining * tied_inside / int(tied.sum())


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate ``mask`` by a Euclidean disk of ``radius`` pixels (pixels within ``radius`` of the mask)."""
    if radius == 0:
        return mask
    height, width = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        span = int(np.floor(np.sqrt(radius * radius - dy * dy)))
        for dx in range(-span, span + 1):
            out |= padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]
    return out


def _min_max(array: np.ndarray) -> np.ndarray:
    """Scale ``array`` to [0, 1]; a constant array becomes all zeros."""
    low, high = array.min(), array.max()
    if high == low:
        return np.zeros_like(array)
    return (array - low) / (high - low)


def _gaussian_blur(array: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable Gaussian filter with half-sample symmetric borders (scipy's ``mode="reflect"``)."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    height, width = array.shape
    padded = np.pad(array, radius, mode="symmetric")
    rows = sum(w * padded[i : i + height, :] for i, w in enumerate(weights))
    return sum(w * rows[:, i : i + width] for i, w in enumerate(weights))


# ------------------------------------------------------------------------------------- localisation metrics


def pointing_game(saliency: ArrayLike, mask: ArrayLike, tolerance: int = 0) -> float:
    """Pointing game: does the map's maximum fall on the object?

    ``hit = 1`` if some pixel ``p`` with ``a_p = max a`` lies in the mask dilated by a disk of ``tolerance``
    pixels, else ``0`` (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016, who use a
    15 px tolerance). As in Quantus's ``PointingGame`` (``weighted=False``), when several pixels share the
    maximum, any one of them inside the mask is a hit; Quantus has no tolerance, so ``tolerance=0`` is its
    definition. One departure: a flat map (every pixel equal, e.g. an empty class map) points nowhere and is a
    miss, where Quantus counts its maximum as lying everywhere (a hit on any mask).

    Args:
        saliency: ``(H, W)`` map.
        mask: ``(H, W)`` boolean object mask, not empty.
        tolerance: dilation radius of the mask in pixels, ``>= 0``.

    Returns:
        1.0 for a hit, 0.0 for a miss.

    Raises:
        ValueError: ``saliency`` or ``mask`` malformed, ``mask`` empty, or ``tolerance`` negative.
    """
    a = _as_map(saliency, "saliency")
    m = _as_mask(mask, a.shape)
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | np.integer) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative integer number of pixels, got {tolerance!r}")
    if a.max() == a.min():
        return 0.0
    peaks = a == a.max()
    return float((peaks & _dilate(m, int(tolerance))).any())


def top_k_intersection(saliency: ArrayLike, mask: ArrayLike, k: int) -> float:
    """Top-k intersection: the share of the ``k`` highest-valued pixels that lie in the mask.

    ``TKI = |top_k(a) ∩ M| / k`` (Theiner et al., "Interpretable Semantic Photo Geolocation", WACV 2022 —
    arXiv 2021), as Quantus's ``TopKIntersection`` with ``concept_influence=False``. Quantus takes the first
    ``k`` of an ``argsort``, which breaks ties at the cut arbitrarily; here tied pixels at the cut count
    fractionally, i.e. the expected value over a uniformly random tie break (identical when there is no tie).

    Args:
        saliency: ``(H, W)`` map.
        mask: ``(H, W)`` boolean object mask, not empty.
        k: number of top pixels, ``1 <= k <= H * W``.

    Returns:
        The share in [0, 1].

    Raises:
        ValueError: ``saliency`` or ``mask`` malformed, ``mask`` empty, or ``k`` out of range.
    """
    a = _as_map(saliency, "saliency")
    m = _as_mask(mask, a.shape)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= a.size:
        raise ValueError(f"k must be an integer in [1, {a.size}] (the number of pixels), got {k!r}")
    return _expected_top_hits(a, m, int(k)) / int(k)


def relevance_mass_accuracy(saliency: ArrayLike, mask: ArrayLike) -> float:
    """Relevance mass accuracy: the share of the map's total mass that lies in the mask.

    ``RMA = Σ_{p ∈ M} a_p / Σ_p a_p`` (Arras et al., "CLEVR-XAI", Information Fusion 2022 — arXiv 2020/2021).
    Arras et al. keep only positive relevance; Quantus's ``RelevanceMassAccuracy`` (with ``abs=False``) sums
    the values as given, and so does this function: pass ``np.clip(a, 0, None)`` (or ``abs(a)``) for a signed
    map whose negative part should not count, otherwise the ratio can leave [0, 1]. A map whose total is
    exactly 0 scores 0.0 (Quantus returns NaN there).

    Args:
        saliency: ``(H, W)`` map; for a score in [0, 1], non-negative.
        mask: ``(H, W)`` boolean object mask, not empty.

    Returns:
        The mass share, in [0, 1] for a non-negative map.

    Raises:
        ValueError: ``saliency`` or ``mask`` malformed, or ``mask`` empty.
    """
    a = _as_map(saliency, "saliency")
    m = _as_mask(mask, a.shape)
    total = a.sum()
    if total == 0.0:
        return 0.0
    return float(a[m].sum() / total)


def relevance_rank_accuracy(saliency: ArrayLike, mask: ArrayLike) -> float:
    """Relevance rank accuracy: of the ``|M|`` highest-valued pixels, the share inside the mask.

    ``RRA = |top_{|M|}(a) ∩ M| / |M|`` (Arras et al., "CLEVR-XAI", Information Fusion 2022), as Quantus's
    ``RelevanceRankAccuracy``; ties at the cut count fractionally as in :func:`top_k_intersection`.

    Args:
        saliency: ``(H, W)`` map.
        mask: ``(H, W)`` boolean object mask, not empty.

    Returns:
        The share in [0, 1].

    Raises:
        ValueError: ``saliency`` or ``mask`` malformed, or ``mask`` empty.
    """
    a = _as_map(saliency, "saliency")
    m = _as_mask(mask, a.shape)
    size = int(m.sum())
    return _expected_top_hits(a, m, size) / size


def sparseness(saliency: ArrayLike) -> float:
    """Sparseness: the Gini index of the absolute attributions.

    With ``x = sort(|a|)`` ascending over ``n`` pixels,
    ``G = Σ_i (2i − n − 1) x_i / (n Σ_i x_i)`` (Chalasani et al., "Concise Explanations of Neural Networks
    using Adversarial Training", ICML 2020), as Quantus's ``Sparseness`` (``abs=True``). Quantus also divides
    by ``max |a|`` (which ``G`` ignores) and adds ``1e-7`` to every value to avoid 0/0; here an all-zero map
    scores 0.0 instead (what Quantus gives for it) and other maps differ from Quantus by ``O(1e-7)``.

    Args:
        saliency: ``(H, W)`` map.

    Returns:
        ``G`` in [0, 1 − 1/n]: 0 for a uniform map, near 1 for a single non-zero pixel.

    Raises:
        ValueError: ``saliency`` malformed.
    """
    x = np.sort(np.abs(_as_map(saliency, "saliency")).reshape(-1))
    total = x.sum()
    if total == 0.0:
        return 0.0
    n = x.size
    weights = 2.0 * np.arange(1, n + 1, dtype=np.float64) - n - 1
    return float((weights * x).sum() / (n * total))


def auc(saliency: ArrayLike, mask: ArrayLike) -> float:
    """ROC AUC of the map as a score for mask membership.

    Mann–Whitney form with average ranks for ties: with ``R`` the ranks of all pixels' values,
    ``AUC = (Σ_{p ∈ M} R_p − n₁(n₁ + 1)/2) / (n₁ n₀)``, ``n₁ = |M|``, ``n₀ = HW − |M|`` — the probability
    that an object pixel outscores a background pixel, ties counting one half. This equals the trapezoidal
    ROC AUC that Quantus's ``AUC`` takes from scikit-learn (``roc_curve`` + ``auc``); see Fawcett, "An
    introduction to ROC analysis", Pattern Recognition Letters 2006.

    Args:
        saliency: ``(H, W)`` map.
        mask: ``(H, W)`` boolean object mask with at least one pixel inside and one outside.

    Returns:
        The AUC in [0, 1]; 0.5 for a constant map.

    Raises:
        ValueError: ``saliency`` or ``mask`` malformed, or ``mask`` empty or full.
    """
    a = _as_map(saliency, "saliency")
    m = _as_mask(mask, a.shape)
    positives = int(m.sum())
    negatives = m.size - positives
    if negatives == 0:
        raise ValueError("mask must leave at least one background pixel for the AUC, got a full mask")
    ranks = _average_ranks(a.reshape(-1))
    u = ranks[m.reshape(-1)].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def _top_k_default(saliency: ArrayLike, mask: ArrayLike) -> float:
    """:func:`top_k_intersection` with ``k = min(TOP_K, H * W)``."""
    shape = np.shape(saliency)
    size = int(np.prod(shape)) if len(shape) == 2 else 0
    return top_k_intersection(saliency, mask, min(TOP_K, size) if size else TOP_K)


def _sparseness_of_map(saliency: ArrayLike, mask: ArrayLike) -> float:
    """:func:`sparseness` of ``saliency``; ``mask`` is checked and otherwise unused."""
    _as_mask(mask, np.shape(saliency), allow_empty=True)
    return sparseness(saliency)


METRICS: dict[str, Metric] = {
    "pointing_game": pointing_game,
    "top_k_intersection": _top_k_default,
    "relevance_mass_accuracy": relevance_mass_accuracy,
    "relevance_rank_accuracy": relevance_rank_accuracy,
    "sparseness": _sparseness_of_map,
    "auc": auc,
}
"""The localisation metrics by name, each ``(saliency, mask) -> float``.

``pointing_game`` has no tolerance; ``top_k_intersection`` uses ``k = TOP_K = 1000`` (Quantus's default,
a fixed count, 6.1 % of a 128×128 image), lowered to ``H * W`` for smaller maps; ``sparseness`` ignores the
mask beyond checking its shape.
"""


# ------------------------------------------------------------------------------------------- grid metrics


def quadrant_masks(height: int, width: int) -> list[np.ndarray]:
    """The four quadrants of a 2×2 grid image as boolean masks.

    The top and left halves get ``height // 2`` rows and ``width // 2`` columns; for odd sides the bottom
    and right halves get the extra row or column.

    Args:
        height: image height, ``>= 2``.
        width: image width, ``>= 2``.

    Returns:
        ``[top_left, top_right, bottom_left, bottom_right]``, each ``(height, width)``; they partition the image.

    Raises:
        ValueError: ``height`` or ``width`` below 2.
    """
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int | np.integer) or side < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {side!r}")
    rows = np.arange(height)[:, None] < height // 2
    cols = np.arange(width)[None, :] < width // 2
    return [rows & cols, rows & ~cols, ~rows & cols, ~rows & ~cols]


def region_attribution(saliency: ArrayLike, region: ArrayLike) -> float:
    """Share of the map's positive attribution that falls in ``region``.

    ``Σ_{p ∈ R} max(a_p, 0) / Σ_p max(a_p, 0)``, the grid ("pointing") score of Böhle et al., "Convolutional
    Dynamic Alignment Networks", CVPR 2021: with the target class in one cell of a 2×2 grid, a faithful map
    puts its positive mass in that cell.

    Args:
        saliency: ``(H, W)`` map.
        region: ``(H, W)`` boolean mask, not empty.

    Returns:
        The share in [0, 1]; 0.0 when the map has no positive value.

    Raises:
        ValueError: ``saliency`` or ``region`` malformed, or ``region`` empty.
    """
    a = _as_map(saliency, "saliency")
    r = _as_mask(region, a.shape, "region")
    positive = np.clip(a, 0.0, None)
    total = positive.sum()
    if total == 0.0:
        return 0.0
    return float(positive[r].sum() / total)


def thresholded_iou(saliency: ArrayLike, region: ArrayLike, quantile: float = THRESHOLD_QUANTILE) -> float:
    """IoU of the map's top pixels with ``region``.

    The binary explanation is ``B = {p : a_p >= Q_q(a) and a_p > 0}``, with ``Q_q`` numpy's (linear) quantile:
    the default ``q = 0.75`` keeps the top 25 % of pixels (more when values tie at the cut), and only positive
    ones. ``IoU = |B ∩ R| / |B ∪ R|``, the usual box/mask IoU of weakly supervised localisation (Zhou et al.,
    "Learning Deep Features for Discriminative Localization", CVPR 2016, threshold the map similarly).

    Args:
        saliency: ``(H, W)`` map.
        region: ``(H, W)`` boolean mask, not empty.
        quantile: the threshold's quantile, ``0 <= quantile < 1``.

    Returns:
        The IoU in [0, 1]; 0.0 when the map has no positive value (``B`` is empty).

    Raises:
        ValueError: ``saliency`` or ``region`` malformed, ``region`` empty, or ``quantile`` out of range.
    """
    a = _as_map(saliency, "saliency")
    r = _as_mask(region, a.shape, "region")
    if isinstance(quantile, bool) or not isinstance(quantile, int | float | np.floating) or not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be a number in [0, 1), got {quantile!r}")
    selected = (a >= np.quantile(a, quantile)) & (a > 0.0)
    return float((selected & r).sum() / (selected | r).sum())


# ------------------------------------------------------------------------------------ sanity similarities


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation between two maps over their pixels.

    ``ρ = pearson(R(a), R(b))`` with average ranks ``R`` for ties (Spearman 1904), as used by the model
    randomisation sanity check of Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018.
    A constant map has no ranking, so ``ρ`` is undefined (NaN in scipy); this function returns 0.0 then.

    Args:
        a: ``(H, W)`` map.
        b: ``(H, W)`` map of the same shape.

    Returns:
        ``ρ`` in [−1, 1]; 0.0 when either map is constant.

    Raises:
        ValueError: ``a`` or ``b`` malformed, or their shapes differ.
    """
    x = _as_map(a, "a")
    y = _as_map(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"b must have the shape of a {x.shape}, got {y.shape}")
    rx = _average_ranks(x.reshape(-1))
    ry = _average_ranks(y.reshape(-1))
    rx -= rx.mean()
    ry -= ry.mean()
    norm = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    if norm == 0.0:
        return 0.0
    return float(np.clip((rx * ry).sum() / norm, -1.0, 1.0))


def ssim(a: ArrayLike, b: ArrayLike) -> float:
    """Mean structural similarity of two maps, each min-max normalised to [0, 1] first.

    With Gaussian-weighted local means ``μ``, variances ``σ²`` and covariance ``σ_ab`` (window 11×11, σ = 1.5,
    population — not sample — covariance),
    ``SSIM = (2 μ_a μ_b + C1)(2 σ_ab + C2) / ((μ_a² + μ_b² + C1)(σ_a² + σ_b² + C2))``, ``C1 = 0.01²``,
    ``C2 = 0.03²`` (data range 1), averaged over the pixels at least 5 px from the border (Wang et al.,
    "Image Quality Assessment: From Error Visibility to Structural Similarity", IEEE TIP 2004). This is
    scikit-image's ``structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``; the filter uses half-sample symmetric borders as scipy's ``reflect``.
    A constant map normalises to all zeros.

    Args:
        a: ``(H, W)`` map, ``H, W >= 11``.
        b: ``(H, W)`` map of the same shape.

    Returns:
        The mean SSIM in [−1, 1]; 1.0 for identical maps (and for two constant maps).

    Raises:
        ValueError: ``a`` or ``b`` malformed, their shapes differ, or a side is below 11.
    """
    x = _as_map(a, "a")
    y = _as_map(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"b must have the shape of a {x.shape}, got {y.shape}")
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"a must be at least {SSIM_WINDOW}×{SSIM_WINDOW} for the SSIM window, got {x.shape}")
    x, y = _min_max(x), _min_max(y)
    radius = SSIM_WINDOW // 2

    def blur(array: np.ndarray) -> np.ndarray:
        return _gaussian_blur(array, SSIM_SIGMA, radius)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2.0 * mu_x * mu_y + SSIM_C1) * (2.0 * cov + SSIM_C2)
    denominator = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return float((numerator / denominator)[radius:-radius, radius:-radius].mean())
