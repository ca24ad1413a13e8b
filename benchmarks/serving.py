"""Served throughput and latency: lafam-serve (prediction + LaFAM map) vs TorchServe's stock image classifier.

One TorchServe serves four archives of the same weights, built in a temporary folder:

- ``ours-onnx``: ``export_and_archive(backend="onnx")`` (export + archive); every response carries a LaFAM map
  (PNG, upsampled to the input size) besides the top-k predictions.
- ``ours-torchscript``: the same with the TorchScript backend.
- ``stock-eager``: TorchServe's ``image_classifier`` handler the stock way: ``torch-model-archiver
  --model-file <module with one nn.Module class> --serialized-file <state_dict> --handler image_classifier``
  with an ``index_to_name.json``; no map.
- ``stock-torchscript``: the stock handler on a traced TorchScript file of the plain model.

Every archive has the same model config (batch size, max batch delay, one worker). Each model is driven in
turn by locust (headless, closed loop: ``--users`` clients each sending the next request as soon as the
last is answered) for ``--duration`` seconds with the same JPEG images and the inference token. Latencies
are recorded per request inside locust (end time and exact milliseconds, not locust's rounded
percentiles); throughput is requests over the span from the first start to the last end.

A second table compares the runtimes at library level: the same batch through ONNX Runtime and TorchScript
(``handlers.backends.load_backend``, the graphs with their activation outputs) and the eager model under
``torch.no_grad()``, rotating the order each round, as medians of per-round ratios to eager.

Run: ``python -m benchmarks.serving [--model resnet50|shapes] [--duration 30] [--users 8]
[--write benchmarks/RESULTS.md] [--quick]``. Needs the ``bench`` extra (locust) and Java.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from benchmarks._report import cpu_name, package_version, section, write_section
from export.archive import model_config
from export.models import resolve_model
from export.pipeline import export_and_archive
from handlers.backends import load_backend
from handlers.manifest import IMAGENET_MEAN, IMAGENET_STD, Manifest
from serving.torchserve import TorchServe, port_open

START_MARKER = "<!-- serving:start -->"
END_MARKER = "<!-- serving:end -->"
STOCK_DIR = Path(__file__).resolve().parent / "stock"

BATCH_SIZE = 8
MAX_BATCH_DELAY_MS = 10
WORKERS = 1
IMAGES = 16
BASELINE = "stock-eager"

LOCUST_DIR = Path(__file__).resolve().parent / "locust"
"""The locustfiles (``predictions.py`` here, ``mixed.py`` for the soak), loaded by path by locust."""


@dataclass(frozen=True)
class ModelChoice:
    """What differs between the two benchmark models."""

    spec: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stock_model_file: Path
    stock_handler: str
    image_size: tuple[int, int]
    note: str


MODELS: dict[str, ModelChoice] = {
    "resnet50": ModelChoice(
        spec="resnet50",
        input_size=(224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stock_model_file=STOCK_DIR / "resnet50_model.py",
        stock_handler="image_classifier",
        image_size=(320, 240),
        note=(
            "ResNet-50, random init (seed 0), 224x224. Stock handler unmodified: resize 256 + centre crop 224; "
            "ours resizes the whole image to 224x224."
        ),
    ),
    "shapes": ModelChoice(
        spec="demo.model:shapes_cnn",
        input_size=(128, 128),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        stock_model_file=STOCK_DIR / "shapes_model.py",
        stock_handler=str(STOCK_DIR / "shapes_handler.py"),
        image_size=(160, 120),
        note=(
            "demo ShapesCNN with its shipped weights, 128x128. Stock handler = ImageClassifier with only its "
            "transform swapped for the model's (whole-image resize to 128x128, mean = std = 0.5), as ours."
        ),
    ),
}


@dataclass
class Built:
    """The archives and what the library-level comparison needs."""

    store: Path
    kinds: dict[str, str]
    folders: dict[str, Path]
    eager: nn.Module


def _labels(model: str) -> list[str]:
    if model == "shapes":
        from scenes.synthetic import CLASSES

        return list(CLASSES)
    from torchvision.models import ResNet50_Weights

    return [str(c) for c in ResNet50_Weights.IMAGENET1K_V2.meta["categories"]]


def _weights(model: str, folder: Path) -> Path:
    if model == "shapes":
        from demo.run import WEIGHTS

        return WEIGHTS
    torch.manual_seed(0)
    path = folder / "resnet50_random.pt"
    torch.save(resolve_model("resnet50").state_dict(), path)
    return path


def _stock_archive(
    name: str, choice: ModelChoice, serialized: Path, *, labels: Sequence[str], store: Path, work: Path, eager: bool
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    index = work / "index_to_name.json"
    index.write_text(json.dumps({str(i): label for i, label in enumerate(labels)}))
    config = work / "model-config.yaml"
    config.write_text(json.dumps(_config()))  # JSON is YAML
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    command = [str(archiver), "--model-name", name, "--version", "1.0", "--serialized-file", str(serialized)]
    if eager:
        command += ["--model-file", str(choice.stock_model_file)]
    command += ["--handler", choice.stock_handler, "--extra-files", str(index), "--config-file", str(config)]
    command += ["--export-path", str(store), "--force"]
    subprocess.run(command, check=True, capture_output=True)


def _config() -> dict[str, Any]:
    return model_config(
        batch_size=BATCH_SIZE, max_batch_delay_ms=MAX_BATCH_DELAY_MS, min_workers=WORKERS, max_workers=WORKERS
    )


def build_archives(model: str, root: Path, log: Callable[[str], None]) -> Built:
    """Export the model to both backends, archive ours twice and the stock handler's twice, same weights."""
    choice = MODELS[model]
    store = root / "model_store"
    labels = _labels(model)
    weights = _weights(model, root)
    log(f"exporting {choice.spec} (ONNX + TorchScript) ...")
    folders: dict[str, Path] = {}
    for backend in ("onnx", "torchscript"):
        export_and_archive(
            choice.spec,
            root / "export",
            store,
            backend=backend,
            name=model,
            archive_name=f"ours-{backend}",
            config=_config(),
            log=lambda _: None,
            weights=weights,
            labels=labels,
            input_size=choice.input_size,
            mean=choice.mean,
            std=choice.std,
        )
        folders[backend] = root / "export" / backend  # export_model's layout: <out_dir>/<backend>/
    eager = resolve_model(choice.spec, weights=weights).eval()
    _stock_archive("stock-eager", choice, weights, labels=labels, store=store, work=root / "stock-eager", eager=True)
    traced_path = root / "stock-torchscript" / "model.pt"
    traced_path.parent.mkdir(parents=True)
    with torch.no_grad(), warnings.catch_warnings():  # TorchScript is deprecated upstream; stock still takes it
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(eager, torch.zeros(1, 3, *choice.input_size))
        torch.jit.save(traced, str(traced_path))
    _stock_archive(
        "stock-torchscript",
        choice,
        traced_path,
        labels=labels,
        store=store,
        work=root / "stock-torchscript",
        eager=False,
    )
    kinds = {
        "ours-onnx": "lafam-serve, ONNX Runtime, LaFAM PNG",
        "ours-torchscript": "lafam-serve, TorchScript, LaFAM PNG",
        "stock-eager": "stock image_classifier, eager state_dict",
        "stock-torchscript": "stock image_classifier, TorchScript",
    }
    return Built(store=store, kinds=kinds, folders=folders, eager=eager)


def make_images(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """Write ``count`` generated demo scenes as JPEGs of ``size`` (W, H); return the folder."""
    from scenes.synthetic import save_samples

    scenes = folder / "scenes"
    index = json.loads(save_samples(scenes, count, seed=2026, size=256).read_text())
    jpegs = folder / "jpeg"
    jpegs.mkdir(parents=True)
    for i, sample in enumerate(index["samples"]):
        image = Image.open(scenes / sample["image"]).convert("RGB").resize(size, Image.Resampling.BILINEAR)
        image.save(jpegs / f"image_{i:03d}.jpg", format="JPEG", quality=90)
    return jpegs


def _post(server: TorchServe, model: str, data: bytes) -> int:
    request = urllib.request.Request(
        f"{server.url()}/predictions/{model}",
        data=data,
        method="POST",
        headers={"Authorization": f"Bearer {server.token()}", "Content-Type": "image/jpeg"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def warm_up(server: TorchServe, model: str, images: list[bytes], users: int) -> None:
    """Send two rounds of concurrent requests (fills batches, warms the runtime); fail on any non-200."""
    with ThreadPoolExecutor(max_workers=users) as pool:
        statuses = list(pool.map(lambda i: _post(server, model, images[i % len(images)]), range(2 * users)))
    if any(status != 200 for status in statuses):
        raise RuntimeError(f"warm-up of {model} failed: HTTP {statuses}\n{server.log_tail()}")


def locust_command(
    locustfile: str,
    server: TorchServe,
    images_dir: Path,
    model: str,
    *,
    users: int,
    duration: float,
    stop_timeout: int,
    work: Path,
    **settings: str,
) -> tuple[list[str], dict[str, str], Path]:
    """The command line and environment of a headless locust run, and the file its records will be in.

    Args:
        locustfile: a file of :data:`LOCUST_DIR`.
        server: a started TorchServe (its URL and inference token).
        images_dir: folder of ``*.jpg`` request images.
        model: the model to drive.
        users: closed-loop users, all spawned at once.
        duration: seconds of load; locust stops by itself.
        stop_timeout: seconds locust waits for the requests in flight when it stops.
        work: folder for locust's CSV and the records (created).
        settings: the locustfile's own settings, passed as ``LAFAM_LOAD_<NAME>`` variables.
    """
    work.mkdir(parents=True, exist_ok=True)
    records = work / "times.json"
    records.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "LAFAM_LOAD_IMAGES": str(images_dir),
            "LAFAM_LOAD_MODEL": model,
            "LAFAM_LOAD_TOKEN": server.token(),
            "LAFAM_LOAD_RECORDS": str(records),
        }
    )
    env.update({f"LAFAM_LOAD_{name.upper()}": value for name, value in settings.items()})
    command = [sys.executable, "-m", "locust", "-f", str(LOCUST_DIR / locustfile), "--headless", "-u", str(users)]
    command += ["-r", str(users), "--run-time", f"{round(duration)}s", "--stop-timeout", str(stop_timeout)]
    command += ["--host", server.url(), "--csv", str(work / "locust"), "--only-summary", "--loglevel", "WARNING"]
    command += ["--exit-code-on-error", "0"]
    return command, env, records


def run_locust(
    server: TorchServe, model: str, images_dir: Path, *, users: int, duration: int, work: Path, expect: str
) -> dict[str, float]:
    """Drive one model with locust for ``duration`` seconds; return requests, errors, req/s and percentiles."""
    command, env, times_file = locust_command(
        "predictions.py",
        server,
        images_dir,
        model,
        users=users,
        duration=duration,
        stop_timeout=60,
        work=work,
        expect=expect,
    )
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration + 180, check=False)
    if result.returncode != 0 or not times_file.exists():
        raise RuntimeError(f"locust failed on {model} (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    with open(work / "locust_stats.csv", newline="") as handle:
        aggregated = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    records = json.loads(times_file.read_text())
    if not records:
        raise RuntimeError(f"locust sent no request to {model}:\n{result.stdout}\n{result.stderr}")
    ok = np.array([ms for _, ms, failed in records if not failed], dtype=np.float64)
    errors = sum(1 for *_, failed in records if failed)
    window = max(end for end, _, _ in records) - min(end - ms / 1e3 for end, ms, _ in records)
    p50, p95, p99 = np.percentile(ok, [50, 95, 99]) if ok.size else (float("nan"),) * 3
    return {
        "requests": len(records),
        "errors": errors,
        "rps": len(records) / window,
        "locust_requests": int(aggregated["Request Count"]),
        "locust_failures": int(aggregated["Failure Count"]),
        "locust_rps": float(aggregated["Requests/s"]),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
    }


def backend_comparison(built: Built, input_size: tuple[int, int], batches: Sequence[int], rounds: int) -> list[dict]:
    """Median ms per batch of ONNX Runtime, TorchScript and eager, and the median per-round ratio to eager."""
    runners: dict[str, Callable[[torch.Tensor], object]] = {}
    for backend, folder in built.folders.items():
        runners[backend] = load_backend(Manifest.load(folder), folder).run

    def eager(batch: torch.Tensor) -> object:
        with torch.no_grad():
            return built.eager(batch)

    runners["eager"] = eager
    names = list(runners)
    rows = []
    for batch_size in batches:
        batch = torch.randn(batch_size, 3, *input_size, generator=torch.Generator().manual_seed(batch_size))
        for run in runners.values():
            run(batch)
            run(batch)
        times: dict[str, list[float]] = {name: [] for name in names}
        ratios: dict[str, list[float]] = {name: [] for name in names}
        for index in range(rounds):
            order = names[index % len(names) :] + names[: index % len(names)]
            took = {}
            for name in order:
                start = time.perf_counter()
                runners[name](batch)
                took[name] = time.perf_counter() - start
            for name in names:
                times[name].append(took[name])
                ratios[name].append(took[name] / took["eager"])
        for name in names:
            rows.append(
                {
                    "runtime": name,
                    "batch": batch_size,
                    "ms": statistics.median(times[name]) * 1e3,
                    "ratio": statistics.median(ratios[name]),
                }
            )
    return rows


def render(
    args: argparse.Namespace, choice: ModelChoice, built: Built, served: dict[str, dict], library: list[dict]
) -> str:
    """The markdown section (without markers)."""
    base = served[BASELINE]
    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    lines = [
        f"## Served throughput and latency: lafam-serve vs TorchServe's stock handler ({args.model})",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores ({cpu_name()}), {gpu}; "
        f"torch {torch.__version__}, onnxruntime {package_version('onnxruntime')}, "
        f"torchserve {package_version('torchserve')}, locust {package_version('locust')}. "
        f"`python -m benchmarks.serving --model {args.model} --duration {args.duration} --users {args.users}`.",
        "",
        f"{choice.note} One TorchServe, every archive with batchSize {BATCH_SIZE}, maxBatchDelay "
        f"{MAX_BATCH_DELAY_MS} ms, {WORKERS} worker; models driven one after another by locust (headless, "
        f"{args.users} closed-loop users, no wait, {args.duration} s each after a warm-up) with the same {IMAGES} "
        f"JPEG scenes of {choice.image_size[0]}x{choice.image_size[1]} and the inference token. The load "
        "generator runs on the same machine. Every request is recorded inside locust (end time, exact "
        "latency); req/s = requests / (last end − first start). Ratios are to `stock-eager` (throughput: "
        "higher is better; latency: lower is better).",
        "",
        "| model | what | requests | errors | req/s | p50 ms | p95 ms | p99 ms | req/s ÷ stock | p50 ÷ stock |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in served.items():
        lines.append(
            f"| {name} | {built.kinds[name]} | {row['requests']} | {row['errors']} | {row['rps']:.2f} | "
            f"{row['p50']:.1f} | {row['p95']:.1f} | {row['p99']:.1f} | {row['rps'] / base['rps']:.2f} | "
            f"{row['p50'] / base['p50']:.2f} |"
        )
    lines += [
        "",
        f"Backend comparison, library level (same input batch, no HTTP, no decoding; ONNX Runtime and TorchScript "
        f"graphs include the activation output; eager under `torch.no_grad()`), median of {args.rounds} rounds "
        "with the order rotated each round; × eager = median per-round ratio:",
        "",
        "| runtime | batch | median ms | × eager |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['runtime']} | {r['batch']} | {r['ms']:.1f} | {r['ratio']:.2f} |" for r in library]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; ``--quick`` sets shapes, 5 s, 2 users, 5 rounds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--duration", type=int, default=30, help="seconds of load per model")
    parser.add_argument("--users", type=int, default=8, help="concurrent locust users")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the library-level backend comparison")
    parser.add_argument("--write", type=Path, help="update this markdown file's serving section")
    parser.add_argument("--quick", action="store_true", help="smoke test: --model shapes --duration 5 --users 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.duration, args.users, args.rounds = "shapes", 5, 2, 5
    if args.duration < 1 or args.users < 1 or args.rounds < 1:
        parser.error("--duration, --users and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build, serve, load, report. Returns ``{"served": {model: stats}, "library": rows, "markdown": text}``."""
    args = parse_args(argv)
    choice = MODELS[args.model]
    log = lambda message: print(message, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="lafam-serving-bench-") as tmp:
        root = Path(tmp)
        built = build_archives(args.model, root, log)
        images_dir = make_images(root / "images", IMAGES, choice.image_size)
        images = [path.read_bytes() for path in sorted(images_dir.glob("*.jpg"))]
        log("library-level backend comparison ...")
        library = backend_comparison(built, choice.input_size, (1, BATCH_SIZE), args.rounds)
        server = TorchServe(built.store, list(built.kinds), workdir=root / "ts")
        log("starting TorchServe with every archive ...")
        served: dict[str, dict] = {}
        try:
            server.start(timeout=300)
            for name in built.kinds:
                warm_up(server, name, images, args.users)
                expect = '"explanation"' if name.startswith("ours") else ""
                served[name] = run_locust(
                    server, name, images_dir, users=args.users, duration=args.duration, work=root / name, expect=expect
                )
                row = served[name]
                log(
                    f"{name}: {row['requests']} requests, {row['errors']} errors, {row['rps']:.2f} req/s, "
                    f"p50 {row['p50']:.1f} ms, p95 {row['p95']:.1f} ms, p99 {row['p99']:.1f} ms"
                )
        finally:
            server.stop()
            if any(port_open(port) for port in server.ports.values()):
                raise RuntimeError(f"TorchServe ports still open: {server.ports}")
    markdown = render(args, choice, built, served, library)
    print(section(markdown, START_MARKER, END_MARKER))
    if args.write:
        write_section(args.write, section(markdown, START_MARKER, END_MARKER), START_MARKER, END_MARKER)
    return {"served": served, "library": library, "markdown": markdown}


if __name__ == "__main__":
    main()
