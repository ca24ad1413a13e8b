"""Cross-check of evaluation.metrics against Quantus 0.6.0 (the reference) on generated demo scenes.

Quantus is installed by the ``eval`` extra (part of ``dev``); without it these tests are skipped.

Inputs, as Quantus 0.6 wants them: ``x_batch`` ``(N, 3, H, W)`` float images in [0, 1], ``y_batch`` the labels,
``a_batch`` ``(N, 1, H, W)`` maps and ``s_batch`` ``(N, 1, H, W)`` masks, both at input resolution, with
``channel_first=True`` and ``model=None`` (no localisation or complexity metric calls the model). Settings:

- localisation metrics: ``normalise=False`` and ``abs=False``, so Quantus scores the maps exactly as ours do
  (its default ``normalise_by_max`` would not change these scores for non-negative maps anyway);
  ``PointingGame(weighted=False)``, ``TopKIntersection(k=1000, concept_influence=False)``, the defaults;
- ``Sparseness``: its defaults ``abs=True``, ``normalise=True`` (Gini ignores the scale; ours takes ``|a|``);
- ``disable_warnings=True`` everywhere, and ``a_batch`` is copied per call (``Sparseness`` adds 1e-7 in place).

Maps: LaFAM of the demo model (``block3`` channel mean, min-max, nearest upsample 8×8 → 128×128, the runner's
default: many tied values, so top-k and rank accuracy differ per image by how ties are broken: Quantus takes
argsort order, ours the expectation) and two model-free families with no ties (a Gaussian blob near the object
plus noise, and uniform noise), on which the two agree to float rounding per image.

Tolerance: means over the scenes agree within 0.01 (one point on the [0, 1] scale); tie-free maps also per
image within 1e-6 (sparseness: 1e-5, Quantus's +1e-7 offset).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from demo.model import preprocess, shapes_cnn
from evaluation import metrics
from scenes.synthetic import generate_scene

quantus = pytest.importorskip("quantus", reason="quantus is in the eval extra: pip install -e '.[eval]'")

pytestmark = pytest.mark.slow

SIZE = 128
SEEDS = range(24)
WEIGHTS = Path(__file__).resolve().parents[2] / "demo" / "weights" / "shapes_cnn.pt"
MEAN_TOLERANCE = 0.01


def _quantus_metrics() -> dict[str, Callable[..., object]]:
    common = {"normalise": False, "abs": False, "disable_warnings": True}
    return {
        "pointing_game": quantus.PointingGame(weighted=False, **common),
        "top_k_intersection": quantus.TopKIntersection(k=metrics.TOP_K, concept_influence=False, **common),
        "relevance_mass_accuracy": quantus.RelevanceMassAccuracy(**common),
        "relevance_rank_accuracy": quantus.RelevanceRankAccuracy(**common),
        "sparseness": quantus.Sparseness(disable_warnings=True),
        "auc": quantus.AUC(**common),
    }


@pytest.fixture(scope="module")
def scenes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``images (N, H, W, 3) uint8``, ``labels (N,)``, ``masks (N, H, W) bool`` of one-object scenes."""
    generated = [generate_scene(np.random.default_rng(seed), SIZE, 1) for seed in SEEDS]
    images = np.stack([scene.image for scene in generated])
    labels = np.array([scene.labels[0] for scene in generated])
    masks = np.stack([scene.masks[0] for scene in generated])
    return images, labels, masks


def _lafam(images: np.ndarray) -> np.ndarray:
    model = shapes_cnn()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu"))
    model.eval()
    captured: list[torch.Tensor] = []
    handle = model.block3.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        with torch.no_grad():
            model(preprocess(images))
    finally:
        handle.remove()
    cam = captured[0].mean(dim=1, keepdim=True)
    low, high = cam.amin(dim=(2, 3), keepdim=True), cam.amax(dim=(2, 3), keepdim=True)
    cam = (cam - low) / (high - low).clamp_min(1e-12)
    return torch.nn.functional.interpolate(cam, size=(SIZE, SIZE), mode="nearest")[:, 0].double().numpy()


def _blobs(masks: np.ndarray) -> np.ndarray:
    """A Gaussian blob centred 10 px from each object's centroid, plus noise; continuous, so no ties."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    maps = []
    for mask in masks:
        cy, cx = np.argwhere(mask).mean(axis=0) + rng.normal(0.0, 10.0 / np.sqrt(2), size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 15.0**2))
        maps.append(blob + 0.1 * rng.random((SIZE, SIZE)))
    return np.stack(maps)


def _noise(masks: np.ndarray) -> np.ndarray:
    return np.random.default_rng(99).random(masks.shape)


def _compare(maps: np.ndarray, images: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> dict[str, tuple]:
    """Per metric: (our scores, Quantus's scores), each ``(N,)``."""
    x_batch = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    s_batch = masks[:, None].astype(np.float32)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, reference in _quantus_metrics().items():
            theirs = reference(
                model=None,
                x_batch=x_batch,
                y_batch=labels,
                a_batch=maps[:, None].copy(),
                s_batch=s_batch.copy(),
                channel_first=True,
            )
            ours = [metrics.METRICS[name](saliency, mask) for saliency, mask in zip(maps, masks, strict=True)]
            out[name] = (np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64))
    return out


def test_registry_is_what_we_compare() -> None:
    assert set(metrics.METRICS) == set(_quantus_metrics())


@pytest.mark.parametrize("family", ["lafam", "blob", "noise"])
def test_means_agree_with_quantus(family: str, scenes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    images, labels, masks = scenes
    maps = {"lafam": _lafam, "blob": lambda _images: _blobs(masks), "noise": lambda _images: _noise(masks)}[family](
        images
    )
    results = _compare(maps, images, labels, masks)
    for name, (ours, theirs) in results.items():
        assert np.isfinite(theirs).all(), name
        assert abs(ours.mean() - theirs.mean()) <= MEAN_TOLERANCE, (name, ours.mean(), theirs.mean())
        if family != "lafam":
            per_image = 1e-5 if name == "sparseness" else 1e-6
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=per_image, err_msg=name)


def test_similarities_match_scipy_and_skimage(scenes: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    stats = pytest.importorskip("scipy.stats")
    skimage_metrics = pytest.importorskip("skimage.metrics")
    _, _, masks = scenes
    blobs, noise = _blobs(masks[:4]), _noise(masks[:4])
    for a, b in zip(blobs, noise + blobs, strict=True):
        assert metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
        a01 = (a - a.min()) / np.ptp(a)
        b01 = (b - b.min()) / np.ptp(b)
        expected = skimage_metrics.structural_similarity(
            a01, b01, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-12)
