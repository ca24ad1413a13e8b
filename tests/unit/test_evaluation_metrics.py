"""Unit tests of evaluation.metrics: hand-made maps with exact expected values, edge cases and bad arguments.

Tolerances: exact values are compared with ``pytest.approx`` at its default (relative 1e-6); identities that
hold up to float64 rounding (SSIM(a, a), symmetry) use ``abs=1e-12``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evaluation import metrics
from evaluation.metrics import (
    METRICS,
    auc,
    pointing_game,
    quadrant_masks,
    region_attribution,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    sparseness,
    spearman,
    ssim,
    thresholded_iou,
    top_k_intersection,
)

RAMP = np.arange(16, dtype=np.float64).reshape(4, 4)  # 0..15, row-major: the bottom row holds the top 4 values


def _mask(*cells: tuple[int, int], shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for cell in cells:
        mask[cell] = True
    return mask


TOP_LEFT_2X2 = _mask((0, 0), (0, 1), (1, 0), (1, 1))
BOTTOM_ROW = _mask((3, 0), (3, 1), (3, 2), (3, 3))
TOP_ROW = _mask((0, 0), (0, 1), (0, 2), (0, 3))


# ----------------------------------------------------------------------------------------------- pointing


def test_pointing_game_hit_and_miss() -> None:
    assert pointing_game(RAMP, BOTTOM_ROW) == 1.0
    assert pointing_game(RAMP, TOP_ROW) == 0.0


def test_pointing_game_any_tied_maximum_counts() -> None:
    saliency = np.zeros((4, 4))
    saliency[0, 3] = saliency[3, 0] = 2.0
    assert pointing_game(saliency, _mask((3, 0))) == 1.0
    assert pointing_game(saliency, _mask((0, 3))) == 1.0
    assert pointing_game(saliency, _mask((1, 1))) == 0.0
    assert pointing_game(np.ones((4, 4)), _mask((2, 2))) == 0.0  # a flat (e.g. empty) map points nowhere
    assert pointing_game(np.zeros((4, 4)), np.ones((4, 4), dtype=bool)) == 0.0


def test_pointing_game_tolerance_is_a_euclidean_disk() -> None:
    saliency = np.zeros((8, 8))
    saliency[0, 0] = 1.0
    straight = _mask((0, 2), shape=(8, 8))  # distance 2
    diagonal = _mask((1, 1), shape=(8, 8))  # distance √2
    assert pointing_game(saliency, straight, tolerance=1) == 0.0
    assert pointing_game(saliency, straight, tolerance=2) == 1.0
    assert pointing_game(saliency, diagonal, tolerance=1) == 0.0
    assert pointing_game(saliency, diagonal, tolerance=2) == 1.0


# ------------------------------------------------------------------------------------------------ top-k


def test_top_k_intersection_exact() -> None:
    assert top_k_intersection(RAMP, BOTTOM_ROW, 4) == 1.0
    assert top_k_intersection(RAMP, TOP_ROW, 4) == 0.0
    assert top_k_intersection(RAMP, BOTTOM_ROW, 8) == pytest.approx(0.5)
    assert top_k_intersection(RAMP, _mask((3, 3), (0, 0)), 2) == pytest.approx(0.5)
    assert top_k_intersection(RAMP, TOP_ROW, 16) == pytest.approx(0.25)


def test_top_k_ties_at_the_cut_count_fractionally() -> None:
    saliency = np.zeros((4, 4))
    saliency[0, 0] = 3.0
    saliency[1, 1] = saliency[2, 2] = saliency[3, 3] = 2.0
    mask = _mask((0, 0), (1, 1))
    # (0, 0) is taken; one place left for three tied pixels, one of them in the mask: (1 + 1/3) / 2.
    assert top_k_intersection(saliency, mask, 2) == pytest.approx(2 / 3)
    # The same number is the mean over every order of the tied pixels (Quantus's argsort picks one of them).
    tied = [(1, 1), (2, 2), (3, 3)]
    picks = [float(mask[order[0]]) for order in itertools.permutations(tied)]
    assert top_k_intersection(saliency, mask, 2) == pytest.approx((1 + np.mean(picks)) / 2)


def test_top_k_constant_map_scores_the_mask_share() -> None:
    assert top_k_intersection(np.ones((4, 4)), TOP_LEFT_2X2, 5) == pytest.approx(0.25)


def _slow_top_hits(saliency: np.ndarray, mask: np.ndarray, k: int) -> float:
    """Quantus's definition written out: first k pixels of a descending argsort (no ties in these maps)."""
    order = sorted(range(saliency.size), key=lambda i: -saliency.flat[i])
    return sum(bool(mask.flat[i]) for i in order[:k]) / k


@pytest.mark.parametrize("seed", range(5))
def test_top_k_and_rank_accuracy_match_the_argsort_definition_without_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    saliency = rng.normal(size=(9, 7))
    mask = rng.random((9, 7)) < 0.3
    for k in (1, 5, 20, 63):
        assert top_k_intersection(saliency, mask, k) == pytest.approx(_slow_top_hits(saliency, mask, k))
    assert relevance_rank_accuracy(saliency, mask) == pytest.approx(_slow_top_hits(saliency, mask, int(mask.sum())))


# ------------------------------------------------------------------------------------------------- mass/rank


def test_relevance_mass_accuracy_exact() -> None:
    saliency = np.zeros((4, 4))
    saliency[0, 0], saliency[1, 1], saliency[3, 3] = 2.0, 1.0, 1.0
    assert relevance_mass_accuracy(saliency, TOP_LEFT_2X2) == pytest.approx(0.75)
    assert relevance_mass_accuracy(RAMP, BOTTOM_ROW) == pytest.approx(54 / 120)
    assert relevance_mass_accuracy(np.ones((4, 4)), TOP_LEFT_2X2) == pytest.approx(0.25)
    assert relevance_mass_accuracy(np.zeros((4, 4)), TOP_LEFT_2X2) == 0.0


def test_relevance_mass_accuracy_sums_signed_values_as_quantus() -> None:
    saliency = np.zeros((4, 4))
    saliency[0, 0], saliency[3, 3] = 3.0, -1.0
    assert relevance_mass_accuracy(saliency, TOP_LEFT_2X2) == pytest.approx(1.5)
    assert relevance_mass_accuracy(np.clip(saliency, 0, None), TOP_LEFT_2X2) == pytest.approx(1.0)


def test_relevance_rank_accuracy_exact() -> None:
    assert relevance_rank_accuracy(RAMP, BOTTOM_ROW) == 1.0
    assert relevance_rank_accuracy(RAMP, TOP_ROW) == 0.0
    assert relevance_rank_accuracy(RAMP, _mask((3, 3), (3, 2), (0, 0), (0, 1))) == pytest.approx(0.5)
    assert relevance_rank_accuracy(np.ones((4, 4)), TOP_LEFT_2X2) == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------ sparseness


def test_sparseness_exact() -> None:
    single = np.zeros((4, 4))
    single[2, 1] = 5.0
    assert sparseness(single) == pytest.approx(15 / 16)
    assert sparseness(np.array([[0.0, 0.0], [1.0, 1.0]])) == pytest.approx(0.5)  # (−3·0 − 1·0 + 1 + 3) / (4·2)
    assert sparseness(np.array([[0.0, 0.0], [-1.0, 1.0]])) == pytest.approx(0.5)  # |a|
    assert sparseness(np.full((4, 4), 7.0)) == pytest.approx(0.0)
    assert sparseness(np.zeros((4, 4))) == 0.0
    assert sparseness(RAMP) == pytest.approx(sparseness(3.0 * RAMP))


# ------------------------------------------------------------------------------------------------------ AUC


def test_auc_exact() -> None:
    saliency = np.zeros((4, 4))
    saliency[1, 1] = 1.0
    # Ranks: 15 zeros share rank 8, the peak has 16: U = 16 + 3·8 − 4·5/2 = 30, AUC = 30 / (4·12).
    assert auc(saliency, TOP_LEFT_2X2) == pytest.approx(0.625)
    assert auc(RAMP, BOTTOM_ROW) == 1.0
    assert auc(RAMP, TOP_ROW) == 0.0
    assert auc(np.ones((4, 4)), TOP_LEFT_2X2) == 0.5
    assert auc(RAMP, _mask((3, 3), (0, 0))) == pytest.approx(0.5)  # one pair order: 14/28 wins, 14/28 losses


def test_auc_full_mask_raises() -> None:
    with pytest.raises(ValueError, match="mask"):
        auc(RAMP, np.ones((4, 4), dtype=bool))


# ------------------------------------------------------------------------------------------------- METRICS


def test_metrics_registry_names_and_signature() -> None:
    assert list(METRICS) == [
        "pointing_game",
        "top_k_intersection",
        "relevance_mass_accuracy",
        "relevance_rank_accuracy",
        "sparseness",
        "auc",
    ]
    assert metrics.TOP_K == 1000


def test_metrics_perfect_and_inverted_maps() -> None:
    mask = np.zeros((64, 64), dtype=bool)
    mask[2:38, 2:38] = True  # 1296 pixels, more than k = 1000, fewer than the 2800 background ones
    perfect = mask.astype(np.float64)
    inverted = 1.0 - perfect
    for name in ("pointing_game", "top_k_intersection", "relevance_mass_accuracy", "relevance_rank_accuracy", "auc"):
        assert METRICS[name](perfect, mask) == 1.0, name
        assert METRICS[name](inverted, mask) == 0.0, name
    assert METRICS["sparseness"](perfect, mask) == pytest.approx(sparseness(perfect))


def test_metrics_top_k_is_capped_by_small_maps() -> None:
    assert METRICS["top_k_intersection"](RAMP, TOP_LEFT_2X2) == pytest.approx(0.25)  # k = 16: every pixel


# ---------------------------------------------------------------------------------------------------- grid


def test_quadrant_masks_partition_even_and_odd() -> None:
    top_left, top_right, bottom_left, bottom_right = quadrant_masks(4, 4)
    np.testing.assert_array_equal(top_left, TOP_LEFT_2X2)
    np.testing.assert_array_equal(top_right, TOP_LEFT_2X2[:, ::-1])
    np.testing.assert_array_equal(bottom_left, TOP_LEFT_2X2[::-1, :])
    np.testing.assert_array_equal(bottom_right, TOP_LEFT_2X2[::-1, ::-1])
    for height, width in ((4, 4), (5, 3), (2, 2)):
        stack = np.stack(quadrant_masks(height, width)).astype(int)
        np.testing.assert_array_equal(stack.sum(axis=0), np.ones((height, width), dtype=int))
    assert [int(q.sum()) for q in quadrant_masks(5, 3)] == [2, 4, 3, 6]


@pytest.mark.parametrize(("height", "width", "name"), [(1, 4, "height"), (4, 0, "width"), (4.0, 4, "height")])
def test_quadrant_masks_bad_sides(height: object, width: object, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        quadrant_masks(height, width)  # type: ignore[arg-type]


def test_region_attribution_counts_only_positive_mass() -> None:
    saliency = np.zeros((4, 4))
    saliency[0, 0], saliency[0, 3], saliency[3, 3] = 3.0, 1.0, -5.0
    quadrants = quadrant_masks(4, 4)
    assert [region_attribution(saliency, q) for q in quadrants] == pytest.approx([0.75, 0.25, 0.0, 0.0])
    assert region_attribution(-np.ones((4, 4)), quadrants[0]) == 0.0
    assert region_attribution(np.zeros((4, 4)), quadrants[0]) == 0.0


def test_thresholded_iou_exact() -> None:
    top_left, _, bottom_left, bottom_right = quadrant_masks(4, 4)
    # Q_0.75(0..15) = 11.25: the bottom row is selected; it shares 2 pixels with each bottom quadrant, union 6.
    assert thresholded_iou(RAMP, bottom_right) == pytest.approx(1 / 3)
    assert thresholded_iou(RAMP, bottom_left) == pytest.approx(1 / 3)
    assert thresholded_iou(RAMP, top_left) == 0.0
    assert thresholded_iou(TOP_LEFT_2X2.astype(float), top_left) == 1.0  # ties at the cut are all kept (0s are not)
    assert thresholded_iou(RAMP, bottom_right, quantile=0.0) == pytest.approx(4 / 15)  # every positive pixel
    assert thresholded_iou(np.zeros((4, 4)), top_left) == 0.0
    assert thresholded_iou(np.ones((4, 4)), top_left) == pytest.approx(0.25)


@pytest.mark.parametrize("quantile", [-0.1, 1.0, 2, True, "0.5"])
def test_thresholded_iou_bad_quantile(quantile: object) -> None:
    with pytest.raises(ValueError, match="quantile"):
        thresholded_iou(RAMP, TOP_LEFT_2X2, quantile=quantile)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- sanity


def test_spearman_monotone_transform_is_one() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 16))
    assert spearman(a, np.exp(3 * a) + 1) == pytest.approx(1.0)
    assert spearman(a, -(a**3)) == pytest.approx(-1.0)


def test_spearman_exact_with_ties() -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[1.0, 1.0], [2.0, 3.0]])
    # Ranks (1, 2, 3, 4) and (1.5, 1.5, 3, 4): centred (−1.5, −.5, .5, 1.5)·(−1, −1, .5, 1.5) = 4.5,
    # squared norms 5 and 4.5.
    assert spearman(a, b) == pytest.approx(4.5 / np.sqrt(5 * 4.5))


def test_spearman_constant_map_is_zero() -> None:
    assert spearman(np.ones((4, 4)), RAMP) == 0.0
    assert spearman(RAMP, np.zeros((4, 4))) == 0.0


def test_ssim_identity_symmetry_and_normalisation() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((24, 20))
    b = a + 0.5 * rng.random((24, 20))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert ssim(a, b) < 0.99
    assert ssim(a, 5 * a - 2) == pytest.approx(1.0, abs=1e-12)  # min-max normalised first
    assert ssim(np.ones((12, 12)), np.zeros((12, 12))) == pytest.approx(1.0)  # both normalise to zeros


def test_ssim_of_unrelated_maps_is_low() -> None:
    rng = np.random.default_rng(2)
    assert abs(ssim(rng.random((32, 32)), rng.random((32, 32)))) < 0.2


# ------------------------------------------------------------------------------------------- bad arguments

MASKED = [
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    auc,
    region_attribution,
    thresholded_iou,
    *METRICS.values(),
]


@pytest.mark.parametrize("fn", MASKED)
def test_bad_saliency_shape_names_saliency(fn: object) -> None:
    with pytest.raises(ValueError, match="saliency"):
        fn(np.zeros((1, 4, 4)), TOP_LEFT_2X2)  # type: ignore[operator]
    with pytest.raises(ValueError, match="saliency"):
        fn(np.full((4, 4), np.nan), TOP_LEFT_2X2)  # type: ignore[operator]


@pytest.mark.parametrize("fn", MASKED)
def test_mask_of_another_shape_names_the_mask(fn: object) -> None:
    name = "region" if fn in (region_attribution, thresholded_iou) else "mask"
    with pytest.raises(ValueError, match=name):
        fn(RAMP, np.ones((4, 3), dtype=bool))  # type: ignore[operator]
    with pytest.raises(ValueError, match=name):
        fn(RAMP, np.full((4, 4), 2))  # type: ignore[operator]


@pytest.mark.parametrize("fn", [f for f in MASKED if f is not METRICS["sparseness"]])
def test_empty_mask_raises(fn: object) -> None:
    with pytest.raises(ValueError, match="empty"):
        fn(RAMP, np.zeros((4, 4), dtype=bool))  # type: ignore[operator]


def test_integer_masks_are_accepted() -> None:
    assert auc(RAMP, BOTTOM_ROW.astype(np.uint8)) == 1.0


@pytest.mark.parametrize("k", [0, 17, -1, 2.0, True])
def test_top_k_bad_k(k: object) -> None:
    with pytest.raises(ValueError, match="k must"):
        top_k_intersection(RAMP, TOP_LEFT_2X2, k)  # type: ignore[arg-type]


@pytest.mark.parametrize("tolerance", [-1, 1.5])
def test_pointing_game_bad_tolerance(tolerance: object) -> None:
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(RAMP, TOP_LEFT_2X2, tolerance=tolerance)  # type: ignore[arg-type]


def test_sparseness_bad_saliency() -> None:
    with pytest.raises(ValueError, match="saliency"):
        sparseness(np.zeros(16))


@pytest.mark.parametrize("fn", [spearman, ssim])
def test_similarity_bad_arguments(fn: object) -> None:
    a = np.zeros((12, 12))
    with pytest.raises(ValueError, match="b must"):
        fn(a, np.zeros((12, 11)))  # type: ignore[operator]
    with pytest.raises(ValueError, match="a must"):
        fn(np.zeros((2, 12, 12)), a)  # type: ignore[operator]


def test_ssim_needs_the_window() -> None:
    with pytest.raises(ValueError, match="11"):
        ssim(np.zeros((10, 12)), np.zeros((10, 12)))
