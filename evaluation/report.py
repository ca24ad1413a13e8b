"""Evaluation outputs: ``results.json``, ``results.md`` (tables a person reads) and ``montage.png``."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from scenes.overlay import overlay

from .data import Sample
from .metrics import METRICS
from .runner import GRID_METRICS, GRID_PAIRS, GridResults, Results
from .sanity import FLAG_THRESHOLD, SanityResult

METRIC_TITLES = {
    "pointing_game": "pointing game",
    "top_k_intersection": "top-k ∩",
    "relevance_mass_accuracy": "mass acc.",
    "relevance_rank_accuracy": "rank acc.",
    "sparseness": "Gini",
    "auc": "AUC",
}


def _cell(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{value:.3f}"


def markdown(
    header: dict[str, Any],
    results: Results,
    grid: GridResults | None,
    sanity: SanityResult | None,
) -> str:
    """The results as markdown tables."""
    summary = results.summary()
    lines = [
        f"# Evaluation of `{header['model']}`",
        "",
        f"{header['date']} · {header['machine']} · source: {header['source']} · {header['samples']} images"
        + (f" · model top-1 accuracy {results.accuracy:.1%}" if results.accuracy is not None else ""),
        "",
        "## Localisation against the object masks (mean ± s.e.m.; higher is better except Gini, which "
        "measures how concentrated a map is)",
        "",
        "| method | " + " | ".join(METRIC_TITLES.get(m, m) for m in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for method, by_metric in summary.items():
        cells = [f"{_cell(by_metric[m]['mean'])} ± {_cell(by_metric[m]['sem'])}" for m in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for method, why in results.unavailable.items():
        lines.append(f"| {method} | not available: {why} |" + " |" * (len(METRICS) - 1))
    if grid:
        lines += grid_tables(grid)
    if sanity:
        lines += [
            "",
            "## Sanity check: cascading randomisation (Spearman / SSIM with the trained model's map)",
            "",
            "| method | " + " | ".join(f"−{s}" for s in sanity.steps) + " | verdict |",
            "|---|" + "---|" * (len(sanity.steps) + 1),
        ]
        for method in sanity.spearman:
            cells = [f"{r:.2f} / {s:.2f}" for r, s in zip(sanity.spearman[method], sanity.ssim[method], strict=True)]
            verdict = f"**flagged**: {sanity.flagged[method]}" if method in sanity.flagged else "changes with the model"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {verdict} |")
        lines.append("")
        lines.append(
            f"Columns: stages randomised cumulatively from the output down. Flagged: Spearman still "
            f"≥ {FLAG_THRESHOLD} with every stage random (the map follows the image, not the model). A map that "
            "turns empty scores 0 / high SSIM: it does depend on the model."
        )
    return "\n".join(lines) + "\n"


def grid_tables(grid: GridResults) -> list[str]:
    """The grid game as markdown: every (base, distribution) pair on all grids, then on the top-4 grids."""
    served = "at its own size" if grid.resize == "none" else f"with resize={grid.resize}"
    lines = [
        "",
        "## Grid pointing game (2×2 grids of four classes; each class's map vs its quadrant)",
        "",
        f"{grid.grids} grids, each served {served}; the four quadrant labels compete."
        + (f" Note: {grid.note}." if grid.note else ""),
    ]
    titles = list(GRID_METRICS.values())
    for subset, title in (("all", "all grids"), ("top4", "grids whose four labels are the model's top-4")):
        summary = grid.summary(subset)
        count = grid.grids if subset == "all" else sum(grid.top4)
        lines += [
            "",
            f"**{title}** ({count})",
            "",
            "| method | " + " | ".join(titles) + " | RA gain |",
            "|---|" + "---|" * (len(titles) + 1),
        ]
        for base, dist in GRID_PAIRS:
            if base not in summary or dist not in summary:
                continue
            for name in (base, dist):
                values = summary[name]
                cells = [_cell(values[metric]) for metric in GRID_METRICS]
                gain = values["region"] - summary[base]["region"]
                lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if name == base else f'{gain:+.3f}'} |")
    lines += [
        "",
        "RA: region attribution, the share of a class map's positive mass in its own quadrant (0 for an empty "
        "map; 0.25 is chance). Empty: share of maps with no nonzero value. Quadrant AUC: threshold-free, the "
        "probability that a pixel of the class's quadrant outscores one of the other three (0.5 for an empty "
        "map). IoU top 25 %: IoU of the map's top quarter of pixels with the quadrant, which caps sparse maps.",
    ]
    return lines


def montage(samples: list[Sample], results: Results, path: Path, tile: int = 128) -> None:
    """Images (rows) × methods (columns), each map's positive part overlaid (scaled to its 99th percentile)."""
    names = [s for s in samples if s.name in results.maps]
    if not names:
        return
    methods = list(results.maps[names[0].name])
    label_height = 28
    width = (len(methods) + 1) * tile
    canvas = Image.new("RGB", (width, label_height + len(names) * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(["image", *methods]):
        words = title.replace("baseline: ", "").replace("×", " x ").split(" ")
        draw.text((column * tile + 3, 2), " ".join(words[:2]), fill="black")
        draw.text((column * tile + 3, 14), " ".join(words[2:]), fill="black")
    for row, sample in enumerate(names):
        picture = Image.fromarray(sample.image).resize((tile, tile))
        top = label_height + row * tile
        canvas.paste(picture, (0, top))
        for column, method in enumerate(methods, start=1):
            saliency = np.clip(results.maps[sample.name][method], 0, None)
            # pixel-level maps are sparse: scale by a high percentile so that more than a few pixels show
            peak = float(np.percentile(saliency[saliency > 0], 99)) if (saliency > 0).any() else 0.0
            heat = np.clip(saliency / peak, 0, 1) if peak > 0 else saliency
            blended = overlay(picture, heat)
            canvas.paste(blended.crop((tile, 0, 2 * tile, tile)), (column * tile, top))
    canvas.save(path)


def write(
    out: Path,
    *,
    header: dict[str, Any],
    samples: list[Sample],
    results: Results,
    grid: GridResults | None,
    sanity: SanityResult | None,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``montage.png`` into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    data = {
        **header,
        "accuracy": results.accuracy,
        "localisation": results.summary(),
        "unavailable": results.unavailable,
        "grid": None if grid is None else grid.to_json(),
        "sanity": None
        if sanity is None
        else {"steps": sanity.steps, "spearman": sanity.spearman, "ssim": sanity.ssim, "flagged": sanity.flagged},
    }
    paths = {"json": out / "results.json", "markdown": out / "results.md", "montage": out / "montage.png"}
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    paths["markdown"].write_text(markdown(header, results, grid, sanity))
    montage(samples, results, paths["montage"])
    return paths


def header(model: str, source: str, samples: int) -> dict[str, Any]:
    """Provenance of a run."""
    return {
        "model": model,
        "source": source,
        "samples": samples,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.system()}",
    }
