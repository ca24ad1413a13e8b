"""Explanation drift: three cheap statistics of every served map, so dashboards show where a model looks.

A model that starts looking somewhere else (a shortcut, a new camera, a watermark, a crop change) still
answers with confident predictions; its maps are what move. For each served map (the first class's map
for class methods) the positive evidence ``p = max(map, 0)``, normalised to sum 1, gives:

* **entropy**: ``−Σ p log p / log(h·w)`` in [0, 1]: 0 when one location holds all the evidence, 1 when it
  is spread evenly (a sudden rise means the model no longer finds one object);
* **border share**: the share of evidence on the map's outer ring, an eighth of the side wide (at least
  one location: the outermost row and column of LaFAM's 7×7); watermarks, frame edges and letterboxing
  live there;
* **peak offset**: the distance of the strongest location from the map's centre, divided by the
  half-diagonal, in [0, 1] (a camera or crop change shifts it).

They are computed at the map's native resolution (7×7 for LaFAM on ResNet-50) and recorded as histograms
per model and method (:mod:`handlers.metrics`), by the service on the worker's metrics thread once the
request has its answer. A map with no positive evidence records nothing. Maps of at most :data:`SMALL_MAP`
locations, the usual LaFAM grids, are summed in plain Python floats (:func:`grid_statistics`): right after a
forward pass every torch or numpy call runs from cold caches (about 0.6 ms for the fifteen torch operations of
:func:`_tensor_statistics`, against 0.05–0.14 ms for the loop), and the float64 arithmetic is the same.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .explain.lafam import lafam

SMALL_MAP = 256
"""Largest ``h * w`` whose statistics :func:`map_statistics` computes in plain Python (:func:`grid_statistics`)."""


class MapStatistics(NamedTuple):
    """The drift statistics of one map (see the module docstring)."""

    entropy: float
    border_share: float
    peak_offset: float


def map_statistics(native: torch.Tensor) -> MapStatistics | None:
    """Statistics of one ``(h, w)`` map; ``None`` when it has no positive evidence.

    Raises:
        ValueError: ``native`` is not 2-D.
    """
    if native.dim() != 2:
        raise ValueError(f"map must be (h, w), got shape {tuple(native.shape)}")
    h, w = native.shape
    if h * w <= SMALL_MAP:
        return grid_statistics(native.detach().double().flatten().tolist(), h, w)
    return _tensor_statistics(native)


def mean_statistics(means: torch.Tensor) -> MapStatistics | None:
    """:func:`map_statistics` of the LaFAM map of one ``(h, w)`` channel mean (the runtime's fused output).

    The map is the reference's (:func:`~handlers.explain.lafam.lafam`: non-finite values clamped, min-max in
    float64, rounded to float32); for a grid of at most :data:`SMALL_MAP` locations in Python floats, float32
    rounding included (an ``array("f")``), so the figures are those of the map the client got.
    """
    h, w = means.shape[-2:]
    if h * w > SMALL_MAP:
        return map_statistics(lafam(means.reshape(1, 1, h, w))[0])
    limit = 3.4028234663852886e38  # float32 max, as the reference clamps
    values = [0.0 if math.isnan(v) else min(max(v, -limit), limit) for v in means.detach().double().flatten().tolist()]
    low = min(values)
    span = max(values) - low
    if not span > 0:
        return None  # a constant map is all zeros: no positive evidence
    return grid_statistics(array("f", [(v - low) / span for v in values]).tolist(), h, w)


def grid_statistics(values: Sequence[float], height: int, width: int) -> MapStatistics | None:
    """:func:`map_statistics` of a map given as its ``height * width`` values, row-major, in Python floats."""
    positive = values if min(values) >= 0.0 else [v if not v <= 0.0 else 0.0 for v in values]  # NaN kept
    total = sum(positive)
    if not total > 0 or not math.isfinite(total):  # also NaN anywhere
        return None
    count = height * width
    # Σ p log p with p = v / total is Σ v log v / total - log total
    entropy = (
        (math.log(total) - sum(v * math.log(v) for v in positive if v > 0.0) / total) / math.log(count)
        if count > 1
        else 0.0
    )
    ring = max(1, min(height, width) // 8)
    inner = 0.0
    if height > 2 * ring and width > 2 * ring:
        inner = sum(sum(positive[row * width + ring : (row + 1) * width - ring]) for row in range(ring, height - ring))
        inner /= total
    peak = positive.index(max(positive))  # the first of equal maxima, as torch.argmax
    return _statistics(entropy, inner, divmod(peak, width), height, width)


def _statistics(entropy: float, inner: float, peak: tuple[int, int], h: int, w: int) -> MapStatistics:
    row, column = peak
    half_diagonal = math.hypot((h - 1) / 2, (w - 1) / 2)
    offset = math.hypot(row - (h - 1) / 2, column - (w - 1) / 2) / half_diagonal if half_diagonal > 0 else 0.0
    return MapStatistics(min(max(entropy, 0.0), 1.0), float(1.0 - inner), offset)


def _tensor_statistics(native: torch.Tensor) -> MapStatistics | None:
    """:func:`grid_statistics` in torch, for maps larger than :data:`SMALL_MAP`."""
    positive = native.detach().double().clamp_min(0)
    total = float(positive.sum())
    if not total > 0 or not math.isfinite(total):
        return None
    h, w = positive.shape
    p = positive / total
    nonzero = p[p > 0]
    entropy = float(-(nonzero * nonzero.log()).sum()) / math.log(h * w) if h * w > 1 else 0.0
    ring = max(1, min(h, w) // 8)
    inner = float(p[ring : h - ring, ring : w - ring].sum()) if h > 2 * ring and w > 2 * ring else 0.0
    return _statistics(entropy, inner, divmod(int(torch.argmax(p)), w), h, w)
