"""Does the fast attribution distribution keep the exact one's quality? Measured on two-object demo scenes.

On generated scenes with two objects of different classes (exact masks, :mod:`scenes.synthetic`) and the
shipped demo model, each scene's two classes compete together with the least likely class (K = 3, the
paper's set-up with the true classes instead of the top two). For the first object's class (the target)
we compare, per base (LRP, input × gradient):

- the base attribution alone (no competition),
- the exact attribution distribution (:func:`handlers.explain.distribution.explain`: K base maps, the
  classes compete per pixel), with the served default ``normalize="max"`` and with the reference ``none``,
- the fast variant (:func:`~handlers.explain.distribution.fast_lrp` /
  :func:`~handlers.explain.distribution.fast_input_x_gradient`: the classes compete at ``block3``, one
  pass to the pixels), at the served default ``normalize="max"`` (the layer-level Grad-CAM maps compete).

Per map, over positive attribution: the share on the target object, the share on the OTHER object
(what a class-specific map should drop), and target / (target + other). Also the Pearson correlation of
the fast map with the exact one. Means over scenes (scenes where a map has no positive mass count as 0).

Run: ``python -m benchmarks.distribution_quality [--scenes 100] [--write benchmarks/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks._report import section, write_section
from demo import model as demo_model
from demo.run import WEIGHTS
from handlers.explain.distribution import explain, fast_input_x_gradient, fast_lrp
from handlers.explain.gradients import InputXGradient
from handlers.explain.lrp import LRP
from scenes.synthetic import generate_scene

START_MARKER = "<!-- distribution_quality:start -->"
END_MARKER = "<!-- distribution_quality:end -->"
LAYER = demo_model.LAST_CONV_STAGE
SEED = 30_000


def _shares(relevance: torch.Tensor, target: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    positive = relevance.clamp_min(0).numpy()
    total = float(positive.sum())
    if total <= 0:
        return 0.0, 0.0
    return float(positive[target].sum()) / total, float(positive[other].sum()) / total


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _maps(
    model: torch.nn.Module, lrp: LRP, ixg: InputXGradient, x: torch.Tensor, classes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The target class's map for every variant."""
    return {
        "LRP alone": lrp.for_classes(x, classes[:, 0])[0],
        "LRP distribution, exact": explain(model, x, lrp.for_classes, classes=classes, normalize="max").maps[0, 0],
        "LRP distribution, exact, normalize=none (reference)": explain(model, x, lrp.for_classes, classes=classes).maps[
            0, 0
        ],
        "LRP distribution, fast": fast_lrp(model, lrp, x, LAYER, classes=classes, normalize="max").maps[0, 0],
        "input×gradient alone": ixg(x, classes[:, :1])[0, 0].detach(),
        "input×gradient distribution, exact": explain(model, x, ixg, classes=classes, normalize="max")
        .maps[0, 0]
        .detach(),
        "input×gradient distribution, exact, normalize=none (reference)": explain(model, x, ixg, classes=classes)
        .maps[0, 0]
        .detach(),
        "input×gradient distribution, fast": fast_input_x_gradient(model, x, LAYER, classes=classes, normalize="max")
        .maps[0, 0]
        .detach(),
    }


def run(scenes: int) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[float]]]:
    """Per variant, the (target, other) shares of every scene; per base, the fast-vs-exact correlations."""
    model = demo_model.shapes_cnn()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    model.eval()
    lrp = LRP(model, mean=demo_model.MEAN, std=demo_model.STD)
    ixg = InputXGradient(model)
    mean = torch.tensor(demo_model.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(demo_model.STD).view(1, 3, 1, 1)
    rng = np.random.default_rng(SEED)
    shares: dict[str, list[tuple[float, float]]] = {}
    correlations: dict[str, list[float]] = {"LRP": [], "input×gradient": []}
    for _ in range(scenes):
        scene = generate_scene(rng, demo_model.INPUT_SIZE[0], 2)
        x = (torch.from_numpy(np.array(scene.image)).permute(2, 0, 1)[None].float() / 255 - mean) / std
        with torch.no_grad():
            least = int(model(x).argmin())
        pair = [scene.labels[0], scene.labels[1]]
        classes = torch.tensor([pair + ([least] if least not in pair else [c for c in range(6) if c not in pair][:1])])
        target, other = scene.masks[0], scene.masks[1]
        maps = _maps(model, lrp, ixg, x, classes)
        for name, relevance in maps.items():
            shares.setdefault(name, []).append(_shares(relevance, target, other))
        for base, values in correlations.items():
            values.append(_correlation(maps[f"{base} distribution, fast"], maps[f"{base} distribution, exact"]))
    return shares, correlations


def table(shares: dict[str, list[tuple[float, float]]], correlations: dict[str, list[float]], scenes: int) -> str:
    """The results as a markdown section body."""
    lines = [
        f"## Fast vs exact attribution distributions on {scenes} two-object demo scenes",
        "",
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} with the shipped demo model (`{LAYER}`, K = 3: both "
        "objects' classes + the least likely); target = the first object's class. Shares of the positive "
        "attribution, means over scenes. Regenerate with `python -m benchmarks.distribution_quality --write "
        "benchmarks/RESULTS.md`.",
        "",
        "| map of the target class | on the target object | on the other object | target / (target + other) |"
        " corr. with exact |",
        "|---|---|---|---|---|",
    ]
    for name, values in shares.items():
        on_target = statistics.fmean(v[0] for v in values)
        on_other = statistics.fmean(v[1] for v in values)
        ratio = statistics.fmean(t / (t + o) if t + o > 0 else 0.0 for t, o in values)
        base = name.split(" distribution")[0]
        corr = correlations.get(base) if name.endswith("fast") else None
        shown = f"{np.nanmean(corr):.3f}" if corr else ""
        lines.append(f"| {name} | {on_target:.1%} | {on_other:.1%} | {ratio:.1%} | {shown} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison, print the table, optionally write it into a results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100, help="two-object scenes (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--write", type=Path, help="update this markdown file's distribution_quality section")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shares, correlations = run(args.scenes)
    body = table(shares, correlations, args.scenes)
    print(body)
    if args.write:
        write_section(args.write, section(body, START_MARKER, END_MARKER), START_MARKER, END_MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
