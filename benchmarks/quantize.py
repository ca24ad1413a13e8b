"""INT8 against FP32 on ONNX Runtime: speed side by side, and how closely the INT8 graph follows (``--quantize int8``).

Two models, each exported once with ``export_model(quantize="int8")`` (:mod:`export.quantize`: QDQ, per-channel
QInt8 weights in 7 bits, QUInt8 activations, MinMax calibration), which leaves the float ``model.onnx`` beside
the served ``model.int8.onnx``:

- the demo CNN (shipped weights, 128×128), calibrated on generated demo scenes;
- ResNet-50 (random seeded weights, batch norms set on random images as the other benchmarks do, 1000 classes,
  224×224), calibrated on the same kind of scenes, 128-pixel, resized to 224 by the serving preprocessing.

Agreement (from the export's own check, on the held-out quarter of the scenes): top-1 agreement of INT8 with
FP32, and the Spearman rank correlation of the LaFAM maps per image at native resolution (median, min). The
export is run with its thresholds off so that every figure is reported; the table says whether the default
thresholds (0.99, 0.95) would pass. A random-weight ResNet-50's top-1 is a near tie among 1000 classes: its
agreement is a stress test, not an accuracy figure.

Speed: both graphs loaded by the serving backend (:func:`handlers.backends.load_backend`, ONNX Runtime's
default threads), at batch 1 and 8, in alternating rounds (FP32 then INT8, the order flipped each round, each
round ``--runs`` calls of each); speed-up = median over rounds of FP32 time / INT8 time.

Run: ``python -m benchmarks.quantize [--quick] [--write benchmarks/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import psutil
import torch
import torchvision

from benchmarks._models import calibrate_batch_norms
from benchmarks._report import cpu_name, package_version, section, write_section
from cli.main import calibration_scenes
from demo.run import EXPORT_OPTIONS, SPEC
from export.exporter import export_model
from export.quantize import MIN_MAP_SPEARMAN, MIN_TOP1_AGREEMENT
from handlers.backends import Backend, load_backend
from handlers.manifest import Manifest

MARKER = "<!-- benchmarks.quantize -->"
BATCHES: tuple[int, ...] = (1, 8)
SCENE_SIDE = 128
SEED = 90_000
FLOAT_TOLERANCE = 1e-3
"""The float graph's verification tolerance for the random ResNet-50, whose batch-norm folding misses the default
1e-4 by a hair (1.01e-4 of the magnitude; see :mod:`benchmarks.architectures`)."""


@dataclasses.dataclass
class Case:
    """One model's export and figures."""

    name: str
    side: int
    manifest: Manifest
    folder: Path
    float_mb: float = 0.0
    int8_mb: float = 0.0
    speed: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)


def export_demo(work: Path, scenes: list[bytes], source: str) -> Path:
    """The demo CNN as ``lafam-serve demo`` exports it, plus ``quantize="int8"``."""
    options = {**EXPORT_OPTIONS, "eager": False}
    return export_model(
        SPEC, work / "demo", name="shapes", quantize="int8", calibration=scenes, calibration_source=source,
        int8_min_agreement=0.0, int8_min_spearman=-1.0, log=lambda _: None, **options,
    )["onnx"]  # fmt: skip


def export_resnet50(work: Path, scenes: list[bytes], source: str) -> Path:
    """ResNet-50 at random seeded weights (batch norms calibrated), 224×224, ``quantize="int8"``."""
    torch.manual_seed(0)
    model = calibrate_batch_norms(torchvision.models.resnet50(weights=None), 224)
    weights = work / "resnet50.pt"
    torch.save(model.state_dict(), weights)
    return export_model(
        "resnet50", work / "resnet50", weights=weights, input_size=(224, 224), quantize="int8",
        calibration=scenes, calibration_source=source, int8_min_agreement=0.0, int8_min_spearman=-1.0,
        tolerance=FLOAT_TOLERANCE, log=lambda _: None,
    )["onnx"]  # fmt: skip


def backends(case: Case) -> tuple[Backend, Backend]:
    """The float and the INT8 graph, each loaded as the server loads it."""
    assert case.manifest.quantization is not None
    float_manifest = dataclasses.replace(
        case.manifest, model_file=case.manifest.quantization.float_model["file"], quantization=None
    )
    return load_backend(float_manifest, case.folder), load_backend(case.manifest, case.folder)


def paired(run_float: Callable[[], object], run_int8: Callable[[], object], rounds: int, runs: int) -> dict[str, float]:
    """Alternate the two (order flipped each round); median ms per call of each and median per-round speed-up."""
    for _ in range(2):
        run_float()
        run_int8()
    times: dict[str, list[float]] = {"float": [], "int8": []}
    ratios = []
    for index in range(rounds):
        order = (("float", run_float), ("int8", run_int8))
        elapsed = {}
        for name, run in order if index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(runs):
                run()
            elapsed[name] = (time.perf_counter() - start) / runs
            times[name].append(elapsed[name])
        ratios.append(elapsed["float"] / elapsed["int8"])
    return {
        "float_ms": 1000 * statistics.median(times["float"]),
        "int8_ms": 1000 * statistics.median(times["int8"]),
        "speedup": statistics.median(ratios),
    }


def measure(case: Case, rounds: int, runs: int, log: Callable[[str], None]) -> None:
    """Fill the case's file sizes and speed at every batch size."""
    assert case.manifest.quantization is not None
    case.float_mb = (case.folder / case.manifest.quantization.float_model["file"]).stat().st_size / 1e6
    case.int8_mb = (case.folder / case.manifest.model_file).stat().st_size / 1e6
    float_backend, int8_backend = backends(case)
    generator = torch.Generator().manual_seed(0)
    for batch_size in BATCHES:
        batch = torch.randn(batch_size, 3, case.side, case.side, generator=generator)
        case.speed[batch_size] = paired(
            lambda b=batch: float_backend.run(b), lambda b=batch: int8_backend.run(b), rounds, runs
        )
        figures = case.speed[batch_size]
        log(
            f"{case.name} batch {batch_size}: FP32 {figures['float_ms']:.2f} ms, INT8 {figures['int8_ms']:.2f} ms, "
            f"{figures['speedup']:.2f}x"
        )


def render(cases: Sequence[Case], *, rounds: int, runs: int, scenes: int) -> str:
    """The Markdown section."""
    held_out = next(iter(cases)).manifest.quantization.calibration["held_out"]  # type: ignore[union-attr]
    lines = [
        "## INT8 (`--quantize int8`) against FP32 on ONNX Runtime",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d} on {cpu_name()} ({psutil.cpu_count()} logical cores; "
        f"{_vnni()}), onnxruntime {package_version('onnxruntime')}, torch {package_version('torch')}. ONNX Runtime "
        "static quantisation, QDQ, per-channel QInt8 weights in 7 bits (`reduce_range`), QUInt8 activations, "
        f"MinMax calibration on {scenes - held_out} generated demo scenes ({SCENE_SIDE}-pixel, resized to the "
        f"input by the serving preprocessing); agreement on the {held_out} held-out scenes. Speed: both graphs "
        f"through the serving backend (ONNX Runtime's default threads), {rounds} alternating rounds of {runs} "
        "calls each; speed-up = median of the per-round FP32 / INT8 time ratios.",
        "",
        "| model | input | batch | FP32 ms | INT8 ms | speed-up | top-1 agreement | LaFAM map Spearman, median (min) "
        "| default thresholds | graph MB FP32 → INT8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for case in cases:
        q = case.manifest.quantization
        assert q is not None
        (figure,) = q.maps.values()
        agreement = q.agreement["value"]
        passes = agreement >= MIN_TOP1_AGREEMENT and figure["median"] >= MIN_MAP_SPEARMAN
        verdict = "pass" if passes else "miss"
        for batch_size, figures in case.speed.items():
            lines.append(
                f"| {case.name} (`{figure['layer']}`) | {case.side}×{case.side} | {batch_size} | "
                f"{figures['float_ms']:.2f} | {figures['int8_ms']:.2f} | {figures['speedup']:.2f}× | "
                f"{agreement:.3f} ({round(agreement * q.agreement['images'])}/{q.agreement['images']}) | "
                f"{figure['median']:.3f} ({figure['min']:.3f}) | {verdict} | {case.float_mb:.1f} → {case.int8_mb:.1f} |"
            )
    lines += [
        "",
        f"Default thresholds: top-1 agreement ≥ {MIN_TOP1_AGREEMENT}, median map Spearman ≥ {MIN_MAP_SPEARMAN} "
        "(`export.quantize`); below them `lafam-serve export --quantize int8` fails. ResNet-50 has random weights: "
        "its top-1 is a near tie among 1000 classes, so its agreement is a stress test, not a trained model's.",
    ]
    return "\n".join(lines)


def _vnni() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "CPU flags unknown"
    found = [flag for flag in ("avx2", "avx512_vnni", "avx_vnni", "amx_int8") if f" {flag}" in flags]
    return ", ".join(found) or "no AVX2"


def main(argv: Sequence[str] | None = None) -> list[Case]:
    """Run the benchmark; print (and write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 scenes, 6 rounds of 3 calls")
    parser.add_argument("--scenes", type=int, help="calibration + held-out scenes (default 128; --quick 32)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 20; --quick 6)")
    parser.add_argument("--runs", type=int, help="calls of each graph per round (default 5; --quick 3)")
    parser.add_argument("--models", nargs="+", choices=("demo", "resnet50"), default=["demo", "resnet50"])
    parser.add_argument("--write", type=Path, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    count = args.scenes or (32 if args.quick else 128)
    rounds = args.rounds or (6 if args.quick else 20)
    runs = args.runs or (3 if args.quick else 5)
    scenes = calibration_scenes((SCENE_SIDE, SCENE_SIDE), count, SEED)
    source = f"{count} generated demo scenes ({SCENE_SIDE}-pixel, seed {SEED})"
    exporters: dict[str, tuple[str, int, Callable[[Path, list[bytes], str], Path]]] = {
        "demo": ("demo CNN", 128, export_demo),
        "resnet50": ("ResNet-50, random weights", 224, export_resnet50),
    }
    cases = []
    with tempfile.TemporaryDirectory(prefix="lafam-quantize-") as tmp:
        for key in args.models:
            name, side, export = exporters[key]
            start = time.perf_counter()
            folder = export(Path(tmp), scenes, source)
            print(f"{name}: exported and checked in {time.perf_counter() - start:.0f} s")
            case = Case(name, side, Manifest.load(folder), folder)
            measure(case, rounds, runs, print)
            cases.append(case)
    text = render(cases, rounds=rounds, runs=runs, scenes=count)
    print(text)
    if args.write:
        write_section(args.write, section(text, MARKER), MARKER)
    return cases


if __name__ == "__main__":
    main()
