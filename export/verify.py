"""Check an exported graph against its eager model, through the backend code that serves it.

Tolerance rule, per output: ``max |eager - exported| <= tolerance * max |eager| + ABSOLUTE_FLOOR``, a bound
relative to the output's own magnitude. Measured over resnet, vgg, densenet, mobilenet, efficientnet and
convnext, fp32 ONNX Runtime and TorchScript (with batch norms folded into convolutions) differ from eager
PyTorch by 1e-7 to 4e-6 of that magnitude, whether it is 1e2 (resnet50 at random init) or 1e-13 (an
efficientnet whose random-init signal vanishes). The default 1e-4 leaves a 25x margin for other CPUs, while
any wrong output (another layer, a pre/post-activation mix-up, a batch-size bug) differs by the order of
the magnitude itself. An absolute bound such as 1e-4 would wave through any output smaller than that; the
floor, float32's smallest normal number, is there only so that an all-zero output matches an all-zero one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.models import ActivationModel
from handlers.backends import load_backend, output_names
from handlers.manifest import Manifest

DEFAULT_TOLERANCE = 1e-4
ABSOLUTE_FLOOR = float(torch.finfo(torch.float32).tiny)
TOLERANCE_RULE = "max|eager - exported| <= tolerance * max|eager| + 1.2e-38, per output"


class VerificationError(RuntimeError):
    """An exported graph's outputs differ from the eager model's beyond the tolerance."""


def allowed_difference(reference_scale: float, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Return the largest accepted difference for an output whose largest magnitude is ``reference_scale``."""
    return tolerance * reference_scale + ABSOLUTE_FLOOR


def _max_difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    difference = (expected - actual).abs()
    # Equal infinities and NaNs in the same places agree; any other non-finite value fails.
    difference = torch.where((expected == actual) | (expected.isnan() & actual.isnan()), 0.0, difference)
    value = float(difference.max()) if difference.numel() else 0.0
    return math.inf if math.isnan(value) else value


@dataclass(frozen=True)
class VerificationReport:
    """What a passed verification measured, as recorded in the manifest.

    Attributes:
        backend: the backend that ran the graph.
        max_abs_diff: largest ``|eager - exported|`` over all batches, per output name.
        max_abs_reference: largest ``|eager|`` over all batches, per output name (the scale of the rule).
        tolerance: the tolerance of the rule.
        batch_sizes: the batch sizes run.
        seed: seed of the random inputs.
        input_sizes: the ``(H, W)`` input sizes run (each at every batch size).
    """

    backend: str
    max_abs_diff: dict[str, float]
    max_abs_reference: dict[str, float]
    tolerance: float
    batch_sizes: tuple[int, ...]
    seed: int
    input_sizes: tuple[tuple[int, int], ...] = ()

    def allowed(self, name: str) -> float:
        """Return the largest difference the rule accepts for output ``name``."""
        return allowed_difference(self.max_abs_reference[name], self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest's ``verification`` entry."""
        return {
            "max_abs_diff": dict(self.max_abs_diff),
            "max_abs_reference": dict(self.max_abs_reference),
            "tolerance": self.tolerance,
            "rule": TOLERANCE_RULE,
            "batch_sizes": list(self.batch_sizes),
            "input_sizes": [list(size) for size in self.input_sizes],
            "seed": self.seed,
            "device": "cpu",
        }


def verify_report(
    reference: ActivationModel,
    folder: str | Path,
    manifest: Manifest,
    *,
    batch_sizes: Sequence[int] = (1, 3),
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    input_sizes: Sequence[tuple[int, int]] | None = None,
) -> VerificationReport:
    """Compare the graph in ``folder`` with the eager ``reference`` on seeded random inputs.

    The graph is loaded with :func:`handlers.backends.load_backend` on the CPU, the code that serves it.
    Inputs are standard normal noise of shape ``(n, 3, H, W)`` for each ``(H, W)`` in ``input_sizes`` and
    each ``n`` in ``batch_sizes``, drawn from a generator seeded with ``seed``.

    Args:
        reference: the eager model the graph was exported from.
        folder: the folder holding the graph file named by ``manifest.model_file``.
        manifest: the manifest describing the graph (it need not be written to disk yet).
        batch_sizes: batch sizes to run; more than one checks the dynamic batch dimension.
        input_sizes: input sizes to run; ``None`` runs ``manifest.input_size`` only. More than one checks
            dynamic height and width (``export --dynamic-size``).
        tolerance: see the module docstring for the rule.
        seed: seed of the random inputs.

    Returns:
        The measured differences and scales.

    Raises:
        ValueError: for an empty ``batch_sizes`` or a non-positive ``tolerance``.
        VerificationError: when the graph fails to run, or an output is missing, has the wrong shape, or
            differs beyond the tolerance.
    """
    if not batch_sizes or any(n < 1 for n in batch_sizes):
        raise ValueError(f"batch_sizes={tuple(batch_sizes)!r} must list positive batch sizes, e.g. (1, 3)")
    sizes = [tuple(manifest.input_size)] if input_sizes is None else [tuple(size) for size in input_sizes]
    if not sizes or any(len(size) != 2 or min(size) < 1 for size in sizes):
        raise ValueError(f"input_sizes={input_sizes!r} must list (H, W) sizes with positive sides")
    if not tolerance > 0:
        raise ValueError(f"tolerance={tolerance!r} must be positive, e.g. {DEFAULT_TOLERANCE}")
    names = output_names(manifest)
    where = f"{manifest.backend} graph {Path(folder) / manifest.model_file}"
    if len(names) != 1 + len(reference.layers):
        raise VerificationError(
            f"{where}: the manifest lists {len(names)} outputs but the reference model has "
            f"{1 + len(reference.layers)}; export and verify the same layers"
        )
    backend = load_backend(manifest, folder, "cpu")
    generator = torch.Generator().manual_seed(seed)
    differences = dict.fromkeys(names, 0.0)
    scales = dict.fromkeys(names, 0.0)
    worst_at: dict[str, str] = {}
    reference.eval()
    for height, width in sizes:
        at = f"{height}x{width}"
        for batch_size in batch_sizes:
            batch = torch.randn(batch_size, 3, height, width, generator=generator)
            with torch.no_grad():
                expected_outputs = reference(batch)
            try:
                actual_outputs = backend.run(batch)
            except Exception as exc:
                raise VerificationError(f"{where}: running batch {batch_size} at {at} failed: {exc}") from exc
            for name, expected in zip(names, expected_outputs, strict=True):
                actual = actual_outputs.get(name)
                if actual is None:
                    raise VerificationError(f"{where}: output {name!r} is missing (got {sorted(actual_outputs)})")
                actual = actual.detach().to("cpu", torch.float32)
                if actual.shape != expected.shape:
                    raise VerificationError(
                        f"{where}: output {name!r} has shape {tuple(actual.shape)} at batch {batch_size}, "
                        f"input {at}, expected {tuple(expected.shape)}"
                    )
                difference = _max_difference(expected, actual)
                if difference > differences[name] or name not in worst_at:
                    worst_at[name] = at
                differences[name] = max(differences[name], difference)
                scales[name] = max(scales[name], float(expected.abs().max()) if expected.numel() else 0.0)
    located = len(sizes) > 1
    failures = [
        f"{name}: max|diff| {differences[name]:.3g}{f' (at {worst_at[name]})' if located else ''} > allowed "
        f"{allowed_difference(scales[name], tolerance):.3g} (max|eager| {scales[name]:.3g})"
        for name in names
        if not differences[name] <= allowed_difference(scales[name], tolerance)
    ]
    if failures:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes)
        raise VerificationError(
            f"{where} does not match the eager model (tolerance {tolerance:g}, rule {TOLERANCE_RULE}; batch "
            f"sizes {tuple(batch_sizes)}, input sizes {shown}, seed {seed}): " + "; ".join(failures)
        )
    return VerificationReport(
        backend=manifest.backend,
        max_abs_diff=differences,
        max_abs_reference=scales,
        tolerance=tolerance,
        batch_sizes=tuple(batch_sizes),
        seed=seed,
        input_sizes=tuple((int(h), int(w)) for h, w in sizes),
    )
