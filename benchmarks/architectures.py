"""Every explanation method on every torchvision family (CNNs, ViT, Swin), through the serving code: runs? how long?

For each torchvision classification family (:data:`FAMILIES`) the model is built with random,
seeded weights (``torch.manual_seed(0)``, 1000 classes, the builder's own defaults, so GoogLeNet and
Inception v3 keep their auxiliary heads), its batch norms calibrated on random images (running statistics
reset, then one train-mode forward of 4 seeded images; biases and shifts kept, so it is an ordinary model,
not the zero-bias one the LRP tests use), saved as a state_dict and exported exactly as a user would:
:func:`export.exporter.export_model` with ``weights=``, ``eager=True`` and the default layer
(:func:`export.models.find_default_layer`), verified through the serving backend. The export folder is then
loaded by :meth:`handlers.service.LafamService.from_folder`, the worker's own start (eager model rebuilt by
:func:`handlers.eager.load_eager`, :class:`handlers.methods.Engines` built once: LRP traced and tried on a
blank image, Grad-CAM's closed form decided), and every method the registry serves on ``/explanations``
(:func:`handlers.methods.registry.served`), once per base for methods with bases, is requested with
:meth:`LafamService.predict` on one JPEG, with the method's default options, as a TorchServe worker answers
it. Each cell is therefore the real method code on the real request path; nothing is re-implemented here.

Graph backend: TorchScript by default (``--backend onnx`` to change). Measured here on 2 cores with one
thread, export + verification takes 0.7-20 s per model with TorchScript (ResNet-50 6 s, all 18 models about
95 s) against 9 s (ResNet-50) and 18 s (EfficientNet-V2-S) with ONNX; and with these calibrated random
weights the ONNX graph of ResNet-50 misses the default verification tolerance by a hair (batch-norm folding:
1.1e-4 of the activations' magnitude against 1e-4), as does its frozen TorchScript graph, which the exporter
then re-exports unfrozen (exact). Only the ``lafam`` column reads the graph (the activation it outputs);
every backward method runs on the eager model, which is the same for both backends, so the choice does not
change what the table shows.

A cell is the server's own figure: the seconds its ``lafam_explanation_seconds`` histogram records for the
request (the method, the resize to the input size, the PNG encoding and the drift statistics), read back
from :mod:`handlers.metrics`: the median of 3 requests after one warm-up (``--quick``: one request). The
``forward`` column is one plain eager forward of the same decoded image under ``torch.no_grad()``, timed the
same way, so that ratios can be read. A request that fails shows its HTTP status and error code, with the
error message listed under the table; an answer whose maps are all zero (a valid answer: nothing passes a
distribution's threshold) is marked ∅.

Run::

    python -m benchmarks.architectures [--write benchmarks/RESULTS.md] [--threads 1] [--backend torchscript]
    python -m benchmarks.architectures --quick     # smoke test: 3 families at 64x64, one request per cell
    python -m benchmarks.architectures --families resnet50,convnext_tiny   # a subset

One torch thread by default: on a shared 2-core machine two threads per process oversubscribe the cores and
make the explainers far slower than the forward (see :mod:`benchmarks.explain_speed`).
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from benchmarks._models import calibrate_batch_norms
from benchmarks._report import cpu_name, package_version, section, write_section
from export.exporter import export_model
from handlers import metrics
from handlers.eager import build_architecture
from handlers.images import decode
from handlers.methods import Need, registry
from handlers.service import LafamService, Reply, Request

START_MARKER = "<!-- architectures:start -->"
END_MARKER = "<!-- architectures:end -->"

FAMILIES: dict[str, int] = {
    # torchvision builder: input side in pixels
    "alexnet": 224,
    "vgg16_bn": 224,
    "resnet50": 224,
    "resnext50_32x4d": 224,
    "wide_resnet50_2": 224,
    "squeezenet1_1": 224,
    "googlenet": 224,
    "inception_v3": 299,
    "densenet121": 224,
    "mobilenet_v2": 224,
    "mobilenet_v3_large": 224,
    "mnasnet1_0": 224,
    "shufflenet_v2_x1_0": 224,
    "efficientnet_b0": 224,
    "efficientnet_v2_s": 224,
    "regnet_x_400mf": 224,
    "regnet_y_400mf": 224,
    "convnext_tiny": 224,
    "vit_b_16": 224,
    "swin_t": 224,
}
"""One model per torchvision classification family (convolutional, then transformers), with its input side."""

QUICK_FAMILIES: tuple[str, ...] = ("resnet50", "mobilenet_v3_large", "shufflenet_v2_x1_0")
"""``--quick``: residual sums; Hardswish and squeeze-excitation gates; channel split and shuffle."""
QUICK_SIDE = 64
NUM_CLASSES = 1000
ZERO = "∅"
"""Marks a cell whose answer was a valid explanation with every map zero."""
IMAGE_SIZE = (256, 256)
"""The posted JPEG's (width, height); the service resizes it to the model's input."""


@dataclass(frozen=True)
class Column:
    """One method (over one base) as a client requests it on ``/explanations``."""

    method: str
    base: str | None = None

    @property
    def title(self) -> str:
        """``method`` or ``method (base)``."""
        return f"{self.method} ({self.base})" if self.base else self.method

    @property
    def headers(self) -> dict[str, str]:
        """The request headers that select it."""
        headers = {"x-lafam-method": self.method}
        if self.base is not None:
            headers["x-lafam-base"] = self.base
        return headers


def columns() -> tuple[Column, ...]:
    """Every method the registry serves on ``/explanations``, once per base, in the registry's order."""
    served = set(registry.served())
    found = []
    for method in registry.methods():
        if method.name in served:
            found += [Column(method.name, base) for base in method.bases] or [Column(method.name)]
    return tuple(found)


@dataclass(frozen=True)
class Cell:
    """One method on one model: the median seconds, or the error the server answered.

    Attributes:
        seconds: median explanation seconds (the server's histogram), ``None`` on failure.
        error: ``"<status> <code>"`` of a failed request, or a failed check of the answer.
        message: the error's full message.
        zero: every map of the answer is zero (a valid answer: e.g. no location passes a distribution's τ).
    """

    seconds: float | None = None
    error: str | None = None
    message: str | None = None
    zero: bool = False

    @property
    def ok(self) -> bool:
        """Whether every request was answered with a usable map."""
        return self.error is None and self.seconds is not None


@dataclass
class Row:
    """One family: its model, where LaFAM looks, the plain forward and one cell per column."""

    family: str
    side: int
    layer: str = "—"
    forward_seconds: float | None = None
    cells: dict[Column, Cell] = field(default_factory=dict)
    setup_error: str | None = None


def build(family: str, side: int) -> nn.Module:
    """The family's model, random seeded weights, 1000 classes, built as the worker builds it, calibrated."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # GoogLeNet/Inception: "the default weight initialization will change"
        warnings.simplefilter("ignore", (UserWarning, FutureWarning))
        model = build_architecture(family, NUM_CLASSES)
    for module in model.modules():  # torchvision's ViT head starts at zero: no gradient would reach the image
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)
    return calibrate_batch_norms(model, side)


def jpeg(seed: int = 0) -> bytes:
    """A seeded JPEG: smooth colour blobs plus noise, so that maps are not flat."""
    rng = np.random.default_rng(seed)
    width, height = IMAGE_SIZE
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _explanation_seconds(model: str, method: str) -> float:
    """The server's running total of ``lafam_explanation_seconds`` for ``model`` and ``method``."""
    value = metrics.registry().get_sample_value("lafam_explanation_seconds_sum", {"model": model, "method": method})
    return value or 0.0


def _check(reply: Reply) -> tuple[str, str] | None:
    """``(error, message)`` when ``reply`` is not a 200 with finite maps, else ``None``."""
    if reply.status != 200:
        error = reply.body.get("error", {})
        return f"{reply.status} {error.get('code', '?')}", str(error.get("message", reply.body))
    explanation = reply.body.get("explanation")
    if not explanation:
        return "no map", f"the answer has no explanation: {reply.body}"
    entries = explanation.get("classes") or [explanation]
    scales = [entry["max_abs"] for entry in entries if "max_abs" in entry]
    if not all(math.isfinite(scale) for scale in scales):
        return "non-finite map", f"max_abs {scales}"
    if any(not entry.get("data") for entry in entries):
        return "no map", f"an entry without data: {explanation}"
    return None


def _all_zero(reply: Reply) -> bool:
    """Whether every signed map of a 200 answer is zero (its ``max_abs``); LaFAM maps are never flagged."""
    explanation = reply.body["explanation"]
    scales = [entry.get("max_abs") for entry in explanation.get("classes") or [explanation]]
    return all(scale == 0 for scale in scales)


def measure_cell(service: LafamService, column: Column, image: bytes, runs: int, warmup: int) -> Cell:
    """Request ``column`` ``warmup + runs`` times; the median explanation seconds of the timed runs."""
    request = Request(
        parameters={"body": image}, headers=column.headers, content_types={"body": "image/jpeg"}, explain=True
    )
    name = service.manifest.name
    times = []
    zero = False
    for index in range(warmup + runs):
        before = _explanation_seconds(name, column.method)
        (reply,) = service.predict([request])
        failed = _check(reply)
        if failed is not None:
            return Cell(error=failed[0], message=failed[1])
        zero = zero or _all_zero(reply)
        if index >= warmup:
            times.append(_explanation_seconds(name, column.method) - before)
    return Cell(seconds=statistics.median(times), zero=zero)


def time_forward(model: nn.Module, x: torch.Tensor, runs: int, warmup: int) -> float:
    """Median seconds of a plain ``torch.no_grad()`` forward of ``x``."""
    times = []
    with torch.no_grad():
        for index in range(warmup + runs):
            start = time.perf_counter()
            model(x)
            if index >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_family(
    family: str,
    side: int,
    cols: Sequence[Column],
    *,
    backend: str,
    runs: int,
    warmup: int,
    log: Callable[[str], None],
) -> Row:
    """Build, export, start the service and request every column for one family."""
    row = Row(family, side)
    image = jpeg()
    with tempfile.TemporaryDirectory(prefix=f"lafam-arch-{family}-") as tmp:
        start = time.perf_counter()
        try:
            weights = Path(tmp) / "weights.pt"
            torch.save(build(family, side).state_dict(), weights)
            folder = export_model(
                family,
                Path(tmp) / "export",
                backends=(backend,),
                weights=weights,
                num_classes=NUM_CLASSES,
                input_size=(side, side),
                eager=True,
                log=lambda _: None,
            )[backend]
            exported = time.perf_counter()
            service = LafamService.from_folder(folder)
        except Exception as exc:  # noqa: BLE001 - one family failing must not stop the others
            row.setup_error = f"{type(exc).__name__}: {exc}"
            log(f"{family}: setup failed: {row.setup_error}")
            return row
        started = time.perf_counter()
        manifest = service.manifest
        row.layer = manifest.layers[0].name
        log(
            f"{family} ({side}px, layer {row.layer}): export {exported - start:.1f} s, worker start "
            f"{started - exported:.1f} s"
        )
        if service.engines is None:  # export --eager always ships it; guard the type for what follows
            row.setup_error = "the export has no eager model"
            return row
        x = decode(image, manifest.input_size, manifest.mean, manifest.std, manifest.max_pixels).tensor[None]
        row.forward_seconds = time_forward(service.engines.model, x, runs, warmup)
        log(f"  forward: {row.forward_seconds * 1e3:.1f} ms")
        offered = set(service.explain_methods)
        for column in cols:
            if column.method not in offered:
                cell = Cell(error="not offered", message=f"{column.method!r} is not served for this model")
            else:
                cell = measure_cell(service, column, image, runs, warmup)
            row.cells[column] = cell
            shown = f"{cell.seconds * 1e3:.1f} ms" if cell.ok else f"FAILED {cell.error}: {cell.message}"
            shown += " (every map zero)" if cell.zero else ""
            log(f"  {column.title}: {shown}")
        del service
    gc.collect()
    return row


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2g}" if ms < 1 else f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def defaults_note(cols: Sequence[Column]) -> str:
    """The classes each method explains by default, from the registry (``gradcam``: top 1 class; ...)."""
    parts = []
    for name in dict.fromkeys(column.method for column in cols):
        method = registry.get(name)
        if Need.CLASSES not in method.needs:
            continue
        count = method.default_classes
        classes = f"`{name}`: top {count} class{'es' if count > 1 else ''}"
        if method.competes:
            classes += " + the least likely one competing"
        if method.target_only:
            classes += ", map of the top class only"
        parts.append(classes)
    return "; ".join(parts)


def _title(column: Column) -> str:
    return f"`{column.method}`" + (f" ({column.base})" if column.base else "")


def render_cell(cell: Cell, note: int | None = None) -> str:
    """``✓ 212 ms``, ``✓ 212 ms ∅`` (every map zero) or ``✗ 400 invalid_option [1]``."""
    if cell.ok and cell.seconds is not None:
        return f"✓ {_ms(cell.seconds)} ms" + (f" {ZERO}" if cell.zero else "")
    return f"✗ {cell.error}" + (f" [{note}]" if note is not None else "")


def report(rows: Sequence[Row], cols: Sequence[Column], settings: argparse.Namespace, elapsed: float) -> str:
    """The markdown section (without markers): header, table, notes and every failure's message."""
    versions = f"torch {torch.__version__}, torchvision {torchvision.__version__}"
    if settings.backend == "onnx":
        versions += f", onnxruntime {package_version('onnxruntime')}"
    runs = "one request per cell" if settings.quick else "median of 3 requests after one warm-up"
    lines = [
        "## Every method on every torchvision family (random weights, through the serving code)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {cpu_name()} ({platform.machine()}), "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, no GPU; {versions}; "
        f"{settings.backend} graphs; {runs}; whole run {elapsed / 60:.1f} min. Regenerate with "
        f"`python -m benchmarks.architectures --write benchmarks/RESULTS.md`.",
        "",
        "| model | px | LaFAM layer | forward | " + " | ".join(_title(c) for c in cols) + " |",
        "|---|---|---|---|" + "---|" * len(cols),
    ]
    failures: list[str] = []
    for row in rows:
        if row.setup_error is not None:
            failures.append(f"{row.family}: {row.setup_error}")
            cells = [f"✗ setup [{len(failures)}]"] * (len(cols) + 1)
        else:
            cells = [f"{_ms(row.forward_seconds)} ms" if row.forward_seconds is not None else "—"]
            for column in cols:
                cell = row.cells.get(column, Cell(error="not run"))
                note = None
                if not cell.ok:
                    failures.append(f"{row.family}, `{column.title}`: {cell.error}: {cell.message}")
                    note = len(failures)
                cells.append(render_cell(cell, note))
        lines.append(f"| {row.family} | {row.side} | {row.layer} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each model: torchvision builder, random seeded weights, 1000 classes, batch norms calibrated on random "
        "images (biases kept), exported with `lafam-serve export --eager` semantics (default LaFAM layer, "
        "verified) and served in process by `LafamService` on `/explanations`, one 256x256 JPEG per request, "
        f"each method with its default options ({defaults_note(cols)}). A cell is the explanation time the "
        "server records in `lafam_explanation_seconds` (method + resize + PNG encoding + drift statistics); "
        "`forward` is a plain eager `torch.no_grad()` forward of the same image, for ratios. Timings with random "
        "weights: what runs and how it scales, not figures for a trained model's maps.",
    ]
    if any(cell.zero for row in rows for cell in row.cells.values()):
        lines += [
            "",
            f"{ZERO}: answered, but every map is zero. A distribution keeps a location only where "
            "`softmax_k(T·|A_k|/s)` beats the uniform share 1/K by τ (the paper's T = 10, τ = 0.01). With "
            "`normalize=max` (the default) the attribution's scale no longer matters; what empties a map here is "
            "that a random model's competing classes (the top two, with near-equal logits, and the least likely) "
            "get nearly the same LRP map (z⁺ relevance takes the same paths whatever the class), so no class "
            "beats 1/K by τ anywhere: there is no class-specific evidence to show.",
        ]
    if failures:
        lines += ["", "Failures (the server's error message):", ""]
        lines += [f"{index}. {text}" for index, text in enumerate(failures, 1)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line; ``--quick`` picks 3 families at 64x64 and one request per cell."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    parser.add_argument("--backend", choices=("torchscript", "onnx"), default="torchscript", help="graph backend")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    parser.add_argument("--write", type=Path, help="update this markdown file's architectures section")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke test: {', '.join(QUICK_FAMILIES)} at {QUICK_SIDE}x{QUICK_SIDE}"
    )
    args = parser.parse_args(argv)
    chosen = args.families.split(",") if args.families else list(QUICK_FAMILIES if args.quick else FAMILIES)
    unknown = [name for name in chosen if name not in FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    args.chosen = {name: QUICK_SIDE if args.quick else FAMILIES[name] for name in chosen}
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the section and optionally write it; 0 when every cell ran, else 1."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runs, warmup = (1, 0) if args.quick else (3, 1)
    cols = columns()
    start = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {line}", flush=True)

    rows = [
        measure_family(family, side, cols, backend=args.backend, runs=runs, warmup=warmup, log=log)
        for family, side in args.chosen.items()
    ]
    marked = section(report(rows, cols, args, time.perf_counter() - start), START_MARKER, END_MARKER)
    print(marked)
    if args.write:
        write_section(args.write, marked, START_MARKER, END_MARKER)
    ok = all(row.setup_error is None and all(cell.ok for cell in row.cells.values()) for row in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
