"""``lafam-serve eval``: how faithful each served explanation is, on images with exact object masks.

For every sample, every method is requested from the source (a running server or a local archive) as a
``format=array`` map, upsampled to the image with the method's mode, and scored against the object mask
with the localisation metrics of :mod:`evaluation.metrics`. Two baselines that look at no model at all
keep the table honest: a centred Gaussian (localisation metrics reward centre bias, and generated objects
sit anywhere, so it should score low but not zero) and a uniform random map.

Class methods explain the sample's true class when it is known (else the predicted one). Distributions
compete as in the paper: when the target is the top-1 prediction the server picks the top two plus the
least likely class; otherwise the target competes with the top-1.

The grid pointing game (:func:`grid_game`) and the sanity check (:mod:`evaluation.sanity`) complete it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from handlers.explain.lafam import resize_maps
from handlers.methods import Need, contract, registry
from handlers.methods.bases import BASES

from . import metrics
from .data import Grid, Sample
from .sources import Source, SourceError


@dataclass(frozen=True)
class Method:
    """One explanation method as the evaluation requests it.

    Attributes:
        name: the name in the results.
        options: request options (``method``, ``base``...).
        upsample: how the native map is brought to the image (``nearest`` as in LaFAM's paper, ``bilinear``).
    """

    name: str
    options: dict[str, Any]
    upsample: str = "nearest"

    @property
    def entry(self) -> contract.Method | None:
        """The registered method requested (``None`` for a method this server version does not know)."""
        return registry.find(self.options["method"])

    @property
    def per_class(self) -> bool:
        """The method explains a class (the map of the target class is scored)."""
        return self.entry is not None and Need.CLASSES in self.entry.needs

    @property
    def competes(self) -> bool:
        """Whether classes compete (attribution distributions)."""
        return self.entry is not None and self.entry.competes

    @property
    def target_only(self) -> bool:
        """Only the first requested class (the target) gets a map."""
        return self.entry is not None and self.entry.target_only


@dataclass(frozen=True)
class Variant:
    """An evaluation-only variant of a registered method: its base and how its map is upsampled."""

    base: str | None = None
    upsample: str | None = None


VARIANTS: dict[str, tuple[Variant, ...]] = {
    "lafam": (Variant(upsample="nearest"), Variant(upsample="bilinear")),
    "distribution_fast": (Variant(base="lrp"),),
}
"""The evaluation-only variants, declared here once. A registered method not listed is evaluated once per
base it declares (or once), upsampled ``nearest``; an ``upsample`` given here is named in the results."""


def variants(methods: tuple[contract.Method, ...] | None = None) -> tuple[Method, ...]:
    """The evaluated methods: every registered method (or those given) with its :data:`VARIANTS`."""
    out = []
    for entry in registry.methods() if methods is None else methods:
        declared = VARIANTS.get(entry.name) or tuple(Variant(base=b) for b in entry.bases) or (Variant(),)
        for variant in declared:
            name, options = entry.title, {"method": entry.name}
            if variant.base is not None:
                name, options = f"{name} · {BASES[variant.base].title}", {**options, "base": variant.base}
            if variant.upsample is not None:
                name = f"{name} ({variant.upsample})"
            out.append(Method(name, options, variant.upsample or "nearest"))
    return tuple(out)


def grid_pairs(methods: tuple[Method, ...]) -> tuple[tuple[str, str], ...]:
    """(base method, its attribution distribution) pairs for the grid pointing game.

    Each competing variant is paired with the registered method that computes its base alone
    (:attr:`~handlers.methods.bases.BaseAttribution.method`), when both are evaluated.
    """
    by_options = {(m.options["method"], m.options.get("base")): m.name for m in methods}
    pairs = []
    for method in methods:
        base = method.options.get("base")
        alone = BASES[base].method if method.competes and base in BASES else None
        if alone is not None and (alone, None) in by_options:
            pairs.append((by_options[(alone, None)], method.name))
    return tuple(pairs)


METHODS: tuple[Method, ...] = variants()
"""The served methods, in table order (derived from the registry and :data:`VARIANTS`)."""

GRID_PAIRS: tuple[tuple[str, str], ...] = grid_pairs(METHODS)
"""(base method, its attribution distribution) compared side by side in the grid pointing game."""


def centred_gaussian(shape: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """A Gaussian bump at the image centre, ``sigma`` in units of each side: the centre-bias baseline."""
    ys = (np.arange(shape[0]) + 0.5) / shape[0] - 0.5
    xs = (np.arange(shape[1]) + 0.5) / shape[1] - 0.5
    return np.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))


BASELINES: dict[str, Callable[[tuple[int, int], np.random.Generator], np.ndarray]] = {
    "baseline: centred Gaussian": lambda shape, _: centred_gaussian(shape),
    "baseline: uniform random": lambda shape, rng: rng.random(shape),
}


@dataclass
class Results:
    """Per method, per metric, the score of every sample (``NaN`` where a method failed)."""

    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    maps: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    accuracy: float | None = None

    def add(self, method: str, values: dict[str, float]) -> None:
        """Record one sample's metrics for ``method``."""
        for metric, value in values.items():
            self.scores.setdefault(method, {}).setdefault(metric, []).append(value)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Mean and standard error per method and metric."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for method, by_metric in self.scores.items():
            for metric, values in by_metric.items():
                finite = [v for v in values if math.isfinite(v)]
                mean = statistics.fmean(finite) if finite else math.nan
                sem = statistics.stdev(finite) / math.sqrt(len(finite)) if len(finite) > 1 else math.nan
                out.setdefault(method, {})[metric] = {"mean": mean, "sem": sem, "n": len(finite)}
        return out


def map_of(body: dict[str, Any], target: int | None, shape: tuple[int, int], upsample: str) -> np.ndarray:
    """The explanation map of ``target`` (or the label-free map) from a response, at ``shape``."""
    explanation = body["explanation"]
    if "classes" in explanation:
        entry = next((c for c in explanation["classes"] if c["index"] == target), explanation["classes"][0])
        data = entry["data"]
    else:
        data = explanation["data"]
    native = torch.tensor(data, dtype=torch.float32)
    return resize_maps(native[None], shape, upsample)[0].numpy().astype(np.float64)


def score(saliency: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Every localisation metric of one map.

    Relevance mass accuracy counts positive attribution only (Arras et al. 2021): for signed maps (LRP,
    Grad-CAM, distributions) negative evidence must not cancel positive mass outside the object.
    """
    positive = np.clip(saliency, 0, None)
    return {
        name: fn(positive if name == "relevance_mass_accuracy" else saliency, mask)
        for name, fn in metrics.METRICS.items()
    }


def class_options(method: Method, target: int, ranking: Sequence[int]) -> dict[str, Any]:
    """The class options of a request explaining ``target`` (see the module docstring)."""
    if not method.competes:
        return {"classes": [target]}
    if ranking and ranking[0] == target:
        return {"top_classes": 2, "least_likely": True}
    return {"classes": [target, ranking[0]]}


def evaluate(
    source: Source,
    samples: Sequence[Sample],
    methods: Sequence[Method] = METHODS,
    *,
    keep_maps: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> Results:
    """Score every method on every sample.

    Args:
        source: where the explanations come from.
        samples: images with masks.
        methods: the methods to request.
        keep_maps: keep the maps of this many first samples (for the montage).
        seed: seed of the random baseline.
        progress: show a progress bar on stderr.

    Returns:
        The per-sample scores; methods the model does not offer are listed in ``unavailable``.
    """
    results = Results()
    rng = np.random.default_rng(seed)
    correct = 0
    for position, sample in enumerate(tqdm(samples, desc="eval", unit="image", disable=not progress)):
        shape = sample.mask.shape
        first = source.explain(sample.image, {"method": "lafam", "format": "none"})
        ranking = [p["index"] for p in first.get("predictions", [])]
        correct += bool(ranking) and sample.label is not None and ranking[0] == sample.label
        target = sample.label if sample.label is not None else (ranking[0] if ranking else None)
        for method in methods:
            if method.name in results.unavailable:
                continue
            options = {**method.options, "format": "array", "upsample": method.upsample}
            if method.per_class:
                if target is None:
                    results.unavailable[method.name] = "the model has no classes"
                    continue
                options.update(class_options(method, target, ranking))
            try:
                body = source.explain(sample.image, options)
            except SourceError as exc:
                results.unavailable[method.name] = str(exc)
                continue
            saliency = map_of(body, target, shape, method.upsample)
            results.add(method.name, score(saliency, sample.mask))
            if position < keep_maps:
                results.maps.setdefault(sample.name, {})[method.name] = saliency
        for name, make in BASELINES.items():
            saliency = make(shape, rng)
            results.add(name, score(saliency, sample.mask))
            if position < keep_maps:
                results.maps.setdefault(sample.name, {})[name] = saliency
    labelled = [s for s in samples if s.label is not None]
    results.accuracy = correct / len(labelled) if labelled else None
    return results


GRID_METRICS: dict[str, str] = {
    "region": "RA",
    "empty": "empty",
    "region_nonempty": "RA non-empty",
    "auc": "quadrant AUC",
    "iou": "IoU top 25 %",
}
"""The grid game's figures per method (column titles). ``region``: region attribution (the share of a class
map's positive mass in its own quadrant, 0 for an empty map; 0.25 is chance); ``empty``: the share of maps
with no nonzero value; ``region_nonempty``: RA over the non-empty maps only; ``auc``: the quadrant's ROC AUC,
threshold-free (:func:`evaluation.metrics.auc`: the probability that a pixel of the class's quadrant outscores
a pixel of the other three, 0.5 for an empty map); ``iou``: IoU of the map's top 25 % with the quadrant,
which caps a sparse map (its positive pixels are fewer than a quarter of the image)."""


@dataclass
class GridResults:
    """Per method, one record per explained class map, and how the grids were served.

    Attributes:
        resize: the ``resize`` option the grids were served with (``none``: at the posted size).
        note: why the grids were not served at their own scale, if they were not.
        grids: number of grids.
        top4: per grid, whether its four labels are the model's four most likely classes.
        records: per method, ``(grid index, {metric: value})`` for each class map.
    """

    resize: str
    note: str = ""
    grids: int = 0
    top4: list[bool] = field(default_factory=list)
    records: dict[str, list[tuple[int, dict[str, float]]]] = field(default_factory=dict)

    def summary(self, subset: str = "all") -> dict[str, dict[str, float]]:
        """Per method, the mean of each :data:`GRID_METRICS` figure over ``all`` grids or the ``top4`` ones."""
        out: dict[str, dict[str, float]] = {}
        for method, records in self.records.items():
            kept = [values for index, values in records if subset == "all" or self.top4[index]]
            nonempty = [v["region"] for v in kept if not v["empty"]]
            out[method] = {
                "region": _mean([v["region"] for v in kept]),
                "empty": _mean([v["empty"] for v in kept]),
                "region_nonempty": _mean(nonempty),
                "auc": _mean([v["auc"] for v in kept]),
                "iou": _mean([v["iou"] for v in kept]),
                "maps": float(len(kept)),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        """Both summaries and the settings, for ``results.json``."""
        return {
            "resize": self.resize,
            "note": self.note,
            "grids": self.grids,
            "top4_grids": sum(self.top4),
            "all": self.summary("all"),
            "top4": self.summary("top4"),
        }


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def grid_game(
    source: Source,
    grids: Sequence[Grid],
    methods: Sequence[Method] = METHODS,
    *,
    resize: str = "none",
    progress: bool = True,
) -> GridResults:
    """The grid pointing game of the attribution-distribution paper (Walter et al., arXiv:2503.07346).

    Each 2×2 grid holds four scenes of four classes at the model's scale; it is served with ``resize`` (by
    default at its own size, which a model exported with dynamic height and width allows; a model with a
    fixed input size gets the grid resized to it, which the result notes). The four quadrant labels compete:
    they are the explicit ``classes`` of every request, so also the competitors of the distributions. Class
    c's map is scored against c's quadrant with every :data:`GRID_METRICS` figure. ``distribution_fast``
    returns only its target's map (``target_only``), so it is asked once per quadrant with that quadrant's
    class first. The grids whose four labels are the model's top-4 logits are marked (``top4``).
    """
    wanted = {name for pair in GRID_PAIRS for name in pair}
    chosen = [m for m in methods if m.name in wanted]
    results = GridResults(resize=resize, grids=len(grids), records={m.name: [] for m in chosen})
    for index, grid in enumerate(tqdm(grids, desc="grids", unit="grid", disable=not progress)):
        shape = grid.image.shape[:2]
        quadrants = metrics.quadrant_masks(*shape)
        ranking = _grid_ranking(source, grid, results)
        results.top4.append(set(ranking[:4]) == set(grid.labels))
        for method in chosen:
            if method.name not in results.records:
                continue
            orders = (
                [[c, *(o for o in grid.labels if o != c)] for c in grid.labels]
                if method.target_only
                else [list(grid.labels)]
            )
            options = {**method.options, "format": "array", "resize": results.resize}
            try:
                bodies = [source.explain(grid.image, {**options, "classes": order}) for order in orders]
            except SourceError:
                results.records.pop(method.name, None)
                continue
            for label, quadrant in zip(grid.labels, quadrants, strict=True):
                body = bodies[0] if len(bodies) == 1 else bodies[grid.labels.index(label)]
                saliency = map_of(body, label, shape, method.upsample)
                values = {
                    "region": metrics.region_attribution(saliency, quadrant),
                    "empty": float(not np.any(saliency)),
                    "auc": metrics.auc(saliency, quadrant),
                    "iou": metrics.thresholded_iou(saliency, quadrant),
                }
                results.records[method.name].append((index, values))
    return results


def _grid_ranking(source: Source, grid: Grid, results: GridResults) -> list[int]:
    """The model's classes for ``grid``, most likely first; falls back to ``resize=model`` once if refused."""
    options = {"method": "lafam", "format": "none", "top_k": 4}
    try:
        body = source.explain(grid.image, {**options, "resize": results.resize})
    except SourceError as exc:
        if results.resize == "model":
            raise
        results.note = f"served at the model's input size: resize={results.resize} was refused ({exc})"
        results.resize = "model"
        body = source.explain(grid.image, {**options, "resize": "model"})
    return [p["index"] for p in body.get("predictions", [])]
