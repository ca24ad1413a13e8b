"""Served throughput and latency: lafam-serve (prediction + LaFAM map) vs TorchServe's stock image classifier.

One TorchServe serves four archives of the same weights, built in a temporary folder:

- ``ours-onnx``: ``export_and_archive(backend="onnx")`` (export + archive); every response carries a LaFAM map
  (PNG, upsampled to the input size) besides the top-k predictions.
- ``ours-torchscript``: the same with the TorchScript backend.
- ``stock-eager``: TorchServe's ``image_classifier`` handler the stock way: ``torch-model-archiver
  --model-file <module with one nn.Module class> --serialized-file <state_dict> --handler image_classifier``
  with an ``index_to_name.json``; no map.
- ``stock-torchscript``: the stock handler on a traced TorchScript file of the plain model.

Every archive has the same model config (batch size, max batch delay, ``--workers`` workers of ``--threads``
threads). Each model is driven in turn by locust (headless, closed loop: ``--users`` clients each sending the
next request as soon as the last is answered) for ``--duration`` seconds with the same JPEG images and the
inference token. Latencies are recorded per request inside locust (end time and exact milliseconds, not
locust's rounded percentiles); throughput is requests over the span from the first start to the last end.

Each served model is set beside its forward bound: the images per second of the runtime it runs on at
``BATCH_SIZE``, library level (below), the faster of one session on the runtime's default threads and
``--workers`` single-threaded sessions side by side: what the workers would serve doing nothing but
full-batch forward passes. While locust runs, a sampler thread reads with psutil the CPU seconds of locust's process
tree, TorchServe's JVM, the model workers and the whole machine, and reports each as a share of the
machine's capacity over the load window (the load generator shares the machine with the server). For
lafam-serve's archives, the handler's own stage histograms (read from its metrics exporter before and after
each run) say how the worker's time splits into preprocessing, forward passes, LaFAM maps and the rest.

A second table compares the runtimes at library level: the same batch through ONNX Runtime and TorchScript
(``handlers.backends.load_backend``, the graphs with their activation outputs) and the eager model under
``torch.no_grad()``, rotating the order each round, as medians of per-round ratios to eager.

Run: ``python -m benchmarks.serving [--model resnet50|shapes] [--duration 30] [--users 24]
[--write benchmarks/RESULTS.md] [--quick]``. Needs the ``bench`` extra (locust) and Java.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
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
WORKERS = 2
THREADS = 1
"""Workers per model and compute threads per worker (``lafam: {threads}``, and ``OMP_NUM_THREADS`` for every
worker, the stock ones too). Chosen from a measurement here: two single-threaded ONNX Runtime sessions side by
side ran ResNet-50 at batch 8 1.0-1.5x as fast as one session on both cores (ONNX Runtime's second thread
gains 1.3-2x depending on the machine), and a second worker prepares its batch while the other computes."""
IMAGES = 16
BASELINE = "stock-eager"
BOUND_RUNTIME = {
    "ours-onnx": "onnx",
    "ours-torchscript": "torchscript",
    "stock-eager": "eager",
    "stock-torchscript": "torchscript",
}
"""The library-level runtime whose forward time at batch :data:`BATCH_SIZE` bounds each served model."""
SAMPLE_SECONDS = 0.5
"""Interval of the CPU sampler during a locust run."""
CPU_GROUPS = ("loadgen", "frontend", "workers")
"""Process groups whose CPU is sampled: locust's tree, TorchServe's JVM, the model workers."""
LAFAM_STAGES = ("preprocess", "inference", "explanation")
"""The handler's timed stages (``lafam_<stage>_seconds`` histograms), sequential on the worker's thread."""

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
    name: str,
    choice: ModelChoice,
    serialized: Path,
    *,
    labels: Sequence[str],
    store: Path,
    work: Path,
    eager: bool,
    config: dict[str, Any],
) -> None:
    work.mkdir(parents=True, exist_ok=True)
    index = work / "index_to_name.json"
    index.write_text(json.dumps({str(i): label for i, label in enumerate(labels)}))
    config_file = work / "model-config.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    command = [str(archiver), "--model-name", name, "--version", "1.0", "--serialized-file", str(serialized)]
    if eager:
        command += ["--model-file", str(choice.stock_model_file)]
    command += ["--handler", choice.stock_handler, "--extra-files", str(index), "--config-file", str(config_file)]
    command += ["--export-path", str(store), "--force"]
    subprocess.run(command, check=True, capture_output=True)


def _config(workers: int = WORKERS, threads: int = THREADS) -> dict[str, Any]:
    return model_config(
        batch_size=BATCH_SIZE,
        max_batch_delay_ms=MAX_BATCH_DELAY_MS,
        min_workers=workers,
        max_workers=workers,
        lafam={"threads": threads},
    )


def build_archives(
    model: str, root: Path, log: Callable[[str], None], workers: int = WORKERS, threads: int = THREADS
) -> Built:
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
            config=_config(workers, threads),
            log=lambda _: None,
            weights=weights,
            labels=labels,
            input_size=choice.input_size,
            mean=choice.mean,
            std=choice.std,
        )
        folders[backend] = root / "export" / backend  # export_model's layout: <out_dir>/<backend>/
    eager = resolve_model(choice.spec, weights=weights).eval()
    config = _config(workers, threads)  # the stock handler ignores the lafam section; TorchServe reads the rest
    _stock_archive(
        "stock-eager", choice, weights, labels=labels, store=store, work=root / "stock-eager", eager=True, config=config
    )
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
        config=config,
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


def busy_seconds(times: Any) -> float:
    """CPU seconds the machine spent busy, from a ``psutil.cpu_times()`` tuple (fields vary by platform).

    Busy = user + nice + system + irq + softirq (Linux; ``interrupt`` and ``dpc`` on Windows). Idle, iowait
    and steal (time the hypervisor gave to other guests) are not busy; ``guest`` is already inside ``user``.
    """
    fields = ("user", "nice", "system", "irq", "softirq", "interrupt", "dpc")
    return float(sum(getattr(times, name, 0.0) or 0.0 for name in fields))


def process_seconds(process: psutil.Process, *, children: bool = False) -> float | None:
    """User + system CPU seconds of one process (plus its reaped children's when asked); ``None`` if gone."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    total = float(getattr(times, "user", 0.0) or 0.0) + float(getattr(times, "system", 0.0) or 0.0)
    if children:
        total += float(getattr(times, "children_user", 0.0) or 0.0)
        total += float(getattr(times, "children_system", 0.0) or 0.0)
    return total


ProcessKey = tuple[int, float]
"""A process as (pid, create time): a reused pid is another process."""


@dataclass(frozen=True)
class CpuSample:
    """One look at the machine: when (unix time), its busy CPU seconds, each group's processes' CPU seconds."""

    at: float
    machine: float
    groups: dict[str, dict[ProcessKey, float]]


def _key(process: psutil.Process) -> ProcessKey | None:
    try:
        return process.pid, float(process.create_time())
    except psutil.Error:
        return None


@dataclass
class CpuSampler:
    """Sample the CPU seconds of locust's tree, TorchServe's JVM and its model workers every ``interval`` s.

    A background thread of this process; each look scans the server's and locust's processes once (about
    2 ms of CPU): the frontend and workers as :meth:`TorchServe.frontend_process` and
    :meth:`TorchServe.worker_processes` find them (a server without those methods has neither), locust's whole
    process tree, counted with its reaped children. A worker between fork and exec is found on a later look;
    the launcher and anything else it spawned (TorchServe's metric collector) are left to "other".
    """

    server: TorchServe
    loadgen_pid: int
    interval: float = SAMPLE_SECONDS
    samples: list[CpuSample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)
        self._processes: dict[ProcessKey, tuple[str, psutil.Process]] = {}

    def _discover(self) -> None:
        found: dict[str, list[psutil.Process]] = {"loadgen": []}
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(self.loadgen_pid)
            found["loadgen"] = [parent, *parent.children(recursive=True)]
        frontend = getattr(self.server, "frontend_process", None)
        workers = getattr(self.server, "worker_processes", None)
        if frontend is not None and workers is not None:
            found["frontend"] = [process for process in [frontend()] if process is not None]
            found["workers"] = workers()
        for group, processes in found.items():
            for process in processes:
                key = _key(process)
                if key is not None:
                    self._processes.setdefault(key, (group, process))

    def sample(self) -> CpuSample:
        """Take one look now (and remember it)."""
        self._discover()
        groups: dict[str, dict[ProcessKey, float]] = {group: {} for group in CPU_GROUPS}
        for key, (group, process) in self._processes.items():
            seconds = process_seconds(process, children=group == "loadgen")
            if seconds is not None:
                groups[group][key] = seconds
        taken = CpuSample(at=time.time(), machine=busy_seconds(psutil.cpu_times()), groups=groups)
        self.samples.append(taken)
        return taken

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> CpuSampler:
        """Take a first look and start sampling in the background."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> list[CpuSample]:
        """Stop sampling, take a last look; return every sample."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.samples


def group_seconds(samples: Sequence[CpuSample], group: str) -> float:
    """CPU seconds ``group`` used between the first and the last of ``samples`` (in time order).

    A process counts from its value in the first sample to its value in the last sample that saw it (a
    process that exited in between keeps what it had used by its last sample; the rest is lost to "other").
    A process first seen later counts from zero when it was created after the first sample (its whole life
    is inside), else from its first value.
    """
    if len(samples) < 2:
        return float("nan")
    first, last_seen, start = {}, {}, samples[0].at
    for taken in samples:
        for key, seconds in taken.groups.get(group, {}).items():
            if key not in first:
                first[key] = 0.0 if taken is not samples[0] and key[1] >= start else seconds
            last_seen[key] = seconds
    return sum(last_seen[key] - first[key] for key in last_seen)


def cpu_accounting(
    samples: Sequence[CpuSample], first_start: float, last_end: float, ends: Sequence[float], cpus: int
) -> dict[str, float]:
    """Each group's CPU as a share (%) of the machine's capacity over the load window, and worker ms / request.

    The window runs from the first sample at or after the first request's start to the last sample at or
    before the last request's end, so every group is measured over the same span of full load (locust's
    start-up and stop fall outside). Capacity = window wall seconds × ``cpus``; "other" = the machine's busy
    seconds minus the three groups (this process and its sampler, the TorchServe launcher and anything else
    that ran on the machine). NaN when fewer than two samples fall inside the request window.

    Args:
        samples: the sampler's looks, in time order.
        first_start: unix time the first request started.
        last_end: unix time the last request ended.
        ends: every request's end time (unix), to count the requests finished inside the window.
        cpus: CPUs of the machine.
    """
    inside = [taken for taken in samples if first_start <= taken.at <= last_end]
    keys = ("cpu_window_s", "cpu_loadgen", "cpu_frontend", "cpu_workers", "cpu_other", "worker_cpu_ms_per_request")
    if len(inside) < 2 or inside[-1].at <= inside[0].at:
        return dict.fromkeys(keys, float("nan"))
    wall = inside[-1].at - inside[0].at
    capacity = wall * cpus
    used = {group: group_seconds(inside, group) for group in CPU_GROUPS}
    machine = inside[-1].machine - inside[0].machine
    finished = sum(1 for end in ends if inside[0].at < end <= inside[-1].at)
    return {
        "cpu_window_s": wall,
        "cpu_loadgen": 100 * used["loadgen"] / capacity,
        "cpu_frontend": 100 * used["frontend"] / capacity,
        "cpu_workers": 100 * used["workers"] / capacity,
        "cpu_other": 100 * (machine - sum(used.values())) / capacity,
        "worker_cpu_ms_per_request": 1e3 * used["workers"] / finished if finished else float("nan"),
    }


def parse_lafam_totals(text: str) -> dict[str, float]:
    """Sum the ``_sum`` and ``_count`` of the handler's stage and batch-size histograms over all labels."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {f"lafam_{stage}_seconds" for stage in LAFAM_STAGES} | {"lafam_batch_size"}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return totals


def scrape_lafam(server: TorchServe) -> dict[str, float]:
    """The handler's totals from lafam-serve's exporter (``{}`` when it does not answer, or not a TorchServe)."""
    if not isinstance(server, TorchServe):  # benchmarks.engines drives other engines through run_locust
        return {}
    try:
        with urllib.request.urlopen(server.url("lafam_metrics") + "/metrics", timeout=10) as response:
            return parse_lafam_totals(response.read().decode())
    except (OSError, urllib.error.URLError, ValueError):
        return {}


def time_breakdown(
    before: dict[str, float], after: dict[str, float], window: float, workers: int = 1
) -> dict[str, float]:
    """Where the single worker's wall time went during a run, from the handler's histograms.

    The stages run one after another on the worker's thread, so each stage's summed time over the request
    window is its share of that thread's time; the rest is outside the handler's stages (TorchServe's
    envelope, serialisation, the IPC to the frontend, waiting for the next batch). Empty when the handler
    recorded nothing (the stock handler has no such histograms).
    """
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    batches = delta.get("lafam_batch_size_count", 0.0)
    if batches <= 0 or window <= 0:
        return {}
    capacity = window * workers  # every worker's thread over the window (the histograms sum over the workers)
    shares = {stage: 100 * delta.get(f"lafam_{stage}_seconds_sum", 0.0) / capacity for stage in LAFAM_STAGES}
    forward_passes = delta.get("lafam_inference_seconds_count", 0.0)
    return {
        "batches": batches,
        "mean_batch": delta.get("lafam_batch_size_sum", 0.0) / batches,
        "forward_ms_per_batch": (
            1e3 * delta.get("lafam_inference_seconds_sum", 0.0) / forward_passes if forward_passes else float("nan")
        ),
        **{f"{stage}_share": share for stage, share in shares.items()},
        "rest_share": 100 - sum(shares.values()),
    }


def run_locust(
    server: TorchServe,
    model: str,
    images_dir: Path,
    *,
    users: int,
    duration: int,
    work: Path,
    expect: str,
    workers: int = 1,
) -> dict[str, float]:
    """Drive one model with locust for ``duration`` seconds; return requests, errors, req/s, percentiles, CPU.

    While locust runs, :class:`CpuSampler` samples the CPU of locust, the frontend and the workers (see
    :func:`cpu_accounting`); the handler's histograms are read before and after (see :func:`time_breakdown`).
    ``loadgen_cpu_s`` is locust's whole life (start-up and stop included), from ``RUSAGE_CHILDREN``.
    """
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
    handler_before = scrape_lafam(server)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched = time.time()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = CpuSampler(server, process.pid).start()
    try:
        stdout, stderr = process.communicate(timeout=duration + 180)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    finally:
        samples = sampler.stop()
    lifetime = time.time() - launched
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    handler_after = scrape_lafam(server)
    if process.returncode != 0 or not times_file.exists():
        raise RuntimeError(f"locust failed on {model} (exit {process.returncode}):\n{stdout}\n{stderr}")
    with open(work / "locust_stats.csv", newline="") as handle:
        aggregated = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    records = json.loads(times_file.read_text())
    if not records:
        raise RuntimeError(f"locust sent no request to {model}:\n{stdout}\n{stderr}")
    ok = np.array([ms for _, ms, failed in records if not failed], dtype=np.float64)
    errors = sum(1 for *_, failed in records if failed)
    first_start = min(end - ms / 1e3 for end, ms, _ in records)
    last_end = max(end for end, _, _ in records)
    window = last_end - first_start
    p50, p95, p99 = np.percentile(ok, [50, 95, 99]) if ok.size else (float("nan"),) * 3
    loadgen_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
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
        **cpu_accounting(samples, first_start, last_end, [end for end, _, _ in records], os.cpu_count() or 1),
        "cpu_samples": len(samples),
        "loadgen_cpu_s": loadgen_cpu,
        "loadgen_lifetime_s": lifetime,
        "breakdown": time_breakdown(handler_before, handler_after, window, workers),
    }


def forward_bounds(library: Sequence[dict], batch: int = BATCH_SIZE) -> dict[str, float]:
    """Requests per second each runtime's forward pass alone allows at ``batch``: images / median seconds.

    A runtime measured both alone (default threads) and as several single-threaded sessions side by side
    (:func:`concurrent_forward`, rows with a ``backend``) is bounded by the faster of the two.
    """
    bounds: dict[str, float] = {}
    for row in library:
        if row["batch"] == batch and row["ms"] > 0:
            name = row.get("backend", row["runtime"])
            bounds[name] = max(bounds.get(name, 0.0), row.get("images", batch) / (row["ms"] / 1e3))
    return bounds


def bound_fields(
    name: str, rps: float, bounds: dict[str, float], alone: dict[str, float] | None = None
) -> dict[str, float]:
    """A served model's forward bound (req/s, of :data:`BOUND_RUNTIME`'s runtime) and its share of it (%).

    ``alone``: the bounds of one session on the runtime's default threads only (``alone_share``, the issue's
    definition: served req/s against 1 / per-image forward time at the served batch size).
    """
    runtime = BOUND_RUNTIME.get(name, "")
    bound = bounds.get(runtime, float("nan"))
    one = (alone or {}).get(runtime, float("nan"))
    return {
        "bound_rps": bound,
        "bound_share": 100 * rps / bound if bound > 0 else float("nan"),
        "alone_share": 100 * rps / one if one > 0 else float("nan"),
    }


def concurrent_forward(
    built: Built, input_size: tuple[int, int], batch_size: int, *, rounds: int, workers: int, threads: int
) -> list[dict]:
    """Median ms for ``workers`` sessions of ``threads`` threads each to run one batch each, side by side.

    What ``workers`` served workers of ``threads`` threads can reach at most: one row per graph backend, with
    ``images`` = ``workers * batch_size`` done in ``ms``. TorchScript's threads are torch's (process-wide), set
    for the measurement and restored.
    """
    batch = torch.randn(batch_size, 3, *input_size, generator=torch.Generator().manual_seed(batch_size))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for backend, folder in built.folders.items():
            manifest = Manifest.load(folder)
            sessions = [load_backend(manifest, folder, threads=threads).run for _ in range(workers)]
            with ThreadPoolExecutor(max_workers=workers) as pool:
                took = [_side_by_side(pool, sessions, batch) for _ in range(rounds + 1)][1:]  # first: warm-up
            rows.append(
                {
                    "runtime": f"{backend} ×{workers} side by side, {threads} thread(s) each",
                    "backend": backend,
                    "batch": batch_size,
                    "images": workers * batch_size,
                    "ms": statistics.median(took) * 1e3,
                    "ratio": float("nan"),
                }
            )
    finally:
        torch.set_num_threads(before)
    return rows


def _side_by_side(pool: ThreadPoolExecutor, sessions: Sequence[Callable], batch: torch.Tensor) -> float:
    start = time.perf_counter()
    list(pool.map(lambda run: run(batch), sessions))
    return time.perf_counter() - start


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


def _number(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``n/a`` when missing or not finite."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


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
        f"{MAX_BATCH_DELAY_MS} ms, {args.workers} worker(s) of {args.threads} compute thread(s) each (our "
        f"`lafam: {{threads: {args.threads}}}`; `OMP_NUM_THREADS={args.threads}` for every worker, the stock ones "
        "too); models driven one after another by locust (headless, "
        f"{args.users} closed-loop users, no wait, {args.duration} s each after a warm-up) with the same {IMAGES} "
        f"JPEG scenes of {choice.image_size[0]}x{choice.image_size[1]} and the inference token. The load "
        "generator runs on the same machine. Every request is recorded inside locust (end time, exact "
        "latency); req/s = requests / (last end − first start). Ratios are to `stock-eager` (throughput: "
        "higher is better; latency: lower is better).",
        "",
        "| model | what | requests | errors | req/s | p50 ms | p95 ms | p99 ms | req/s ÷ stock | p50 ÷ stock "
        "| forward bound req/s | % of forward bound | % of one-session bound | CPU: load gen % | CPU: frontend % "
        "| CPU: workers % | CPU: other % | worker CPU ms / req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in served.items():
        lines.append(
            f"| {name} | {built.kinds[name]} | {row['requests']} | {row['errors']} | {row['rps']:.2f} | "
            f"{row['p50']:.1f} | {row['p95']:.1f} | {row['p99']:.1f} | {row['rps'] / base['rps']:.2f} | "
            f"{row['p50'] / base['p50']:.2f} | {_number(row.get('bound_rps'), '.1f')} | "
            f"{_number(row.get('bound_share'), '.1f')} | {_number(row.get('alone_share'), '.1f')} | "
            f"{_number(row.get('cpu_loadgen'), '.0f')} | "
            f"{_number(row.get('cpu_frontend'), '.0f')} | {_number(row.get('cpu_workers'), '.0f')} | "
            f"{_number(row.get('cpu_other'), '.0f')} | {_number(row.get('worker_cpu_ms_per_request'), '.1f')} |"
        )
    cpus = os.cpu_count() or 1
    lines += [
        "",
        f"Forward bound = images / (median library-level forward time at batch {BATCH_SIZE} of the runtime the "
        "model is served on, table below: ONNX Runtime for `ours-onnx`, TorchScript for `ours-torchscript` and "
        "`stock-torchscript`, eager for `stock-eager`), the faster of one session on the runtime's default "
        "threads and the served number of single-threaded sessions side by side: the req/s the workers would "
        "reach if they did nothing but full-batch forward passes; '% of one-session bound' compares with one "
        "session on the default threads alone, the issue's definition (1 / per-image forward time at the served "
        "batch size). Measured in the benchmark process before "
        "TorchServe starts (no server, no load generator; a busy 'other' below means something else shared the "
        "cores). It is only reachable "
        f"with full batches ({args.users} users for {args.workers} worker(s) × batchSize {BATCH_SIZE}: only with "
        "more users than that product does a worker that finishes find its next full batch waiting). CPU columns: "
        "CPU seconds "
        "(user + system) used during the load window, as a "
        f"share of the machine's capacity over it (window wall seconds × {cpus} CPUs; 100 % = every core busy), "
        f"sampled with psutil every {SAMPLE_SECONDS} s between the first sample after the first request's start "
        "and the last sample before the last request's end. Load gen = locust's process tree (the generator "
        "shares the machine with the server); frontend = TorchServe's JVM; workers = the model worker "
        "processes (per request: worker CPU seconds / requests finished in the window, all of its threads); "
        "other = the machine's busy time (user, nice, system, irq, softirq from psutil.cpu_times) minus those "
        "three: this benchmark process and its sampler, the TorchServe launcher, TorchServe's metric "
        "collector and anything else running on the machine meanwhile.",
    ]
    breakdowns = {name: row["breakdown"] for name, row in served.items() if row.get("breakdown")}
    if breakdowns:
        lines += [
            "",
            "Where the worker's time goes (lafam-serve only: from the handler's own histograms, read before and "
            "after each run; the stock handler records none). The stages run one after another on the worker's "
            "thread, so each stage's summed time over the request window, divided by the workers, is its share of "
            "the workers' time; "
            "rest = outside the handler's stages (TorchServe's Python envelope, serialising the response, the "
            "socket to the frontend, waiting for the next batch), not split further here:",
            "",
            "| model | batches | mean batch | forward ms / batch | preprocess % | forward % | map % | rest % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {b['batches']:.0f} | {b['mean_batch']:.2f} | {_number(b['forward_ms_per_batch'], '.1f')} | "
            f"{b['preprocess_share']:.0f} | {b['inference_share']:.0f} | {b['explanation_share']:.0f} | "
            f"{b['rest_share']:.0f} |"
            for name, b in breakdowns.items()
        ]
    lines += [
        "",
        f"Backend comparison, library level (same input batch, no HTTP, no decoding; ONNX Runtime and TorchScript "
        f"graphs include the activation output; eager under `torch.no_grad()`), median of {args.rounds} rounds "
        "with the order rotated each round; × eager = median per-round ratio:",
        "",
        "| runtime | batch | median ms | × eager |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['runtime']} | {r['batch']} | {r['ms']:.1f} | {_number(r['ratio'], '.2f')} |" for r in library]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line; ``--quick`` sets shapes, 5 s, 2 users, 5 rounds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--duration", type=int, default=30, help="seconds of load per model")
    parser.add_argument(
        "--users",
        type=int,
        help="concurrent locust users (default: 1.5 x workers x batch size, a full batch waiting for each worker)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the library-level backend comparison")
    parser.add_argument("--workers", type=int, default=WORKERS, help="workers per model (every archive)")
    parser.add_argument("--threads", type=int, default=THREADS, help="compute threads per worker (every archive)")
    parser.add_argument("--write", type=Path, help="update this markdown file's serving section")
    parser.add_argument("--quick", action="store_true", help="smoke test: --model shapes --duration 5 --users 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.duration, args.users, args.rounds = "shapes", 5, 2, 5
    if args.users is None:  # a worker that finishes finds its next full batch queued, not in flight
        args.users = args.workers * BATCH_SIZE * 3 // 2
    if min(args.duration, args.users, args.rounds, args.workers, args.threads) < 1:
        parser.error("--duration, --users, --rounds, --workers and --threads must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build, serve, load, report. Returns ``{"served": {model: stats}, "library": rows, "markdown": text}``.

    Each model's stats: ``requests``, ``errors``, ``rps``, ``p50``/``p95``/``p99`` (ms), locust's own counts,
    ``bound_rps`` and ``bound_share`` (% of the forward bound), ``cpu_loadgen``/``cpu_frontend``/
    ``cpu_workers``/``cpu_other`` (% of the machine over ``cpu_window_s``), ``worker_cpu_ms_per_request``,
    ``loadgen_cpu_s`` over ``loadgen_lifetime_s`` (locust's whole life) and ``breakdown`` (see
    :func:`time_breakdown`; empty for the stock handler).
    """
    args = parse_args(argv)
    choice = MODELS[args.model]
    log = lambda message: print(message, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="lafam-serving-bench-") as tmp:
        root = Path(tmp)
        built = build_archives(args.model, root, log, args.workers, args.threads)
        images_dir = make_images(root / "images", IMAGES, choice.image_size)
        images = [path.read_bytes() for path in sorted(images_dir.glob("*.jpg"))]
        log("library-level backend comparison ...")
        library = backend_comparison(built, choice.input_size, (1, BATCH_SIZE), args.rounds)
        if args.workers > 1:
            library += concurrent_forward(
                built, choice.input_size, BATCH_SIZE, rounds=args.rounds, workers=args.workers, threads=args.threads
            )
        bounds = forward_bounds(library)
        alone = forward_bounds([row for row in library if "backend" not in row])
        threads_env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        server = TorchServe(built.store, list(built.kinds), workdir=root / "ts", env=threads_env)
        log("starting TorchServe with every archive ...")
        served: dict[str, dict] = {}
        try:
            server.start(timeout=300)
            for name in built.kinds:
                warm_up(server, name, images, args.users)
                expect = '"explanation"' if name.startswith("ours") else ""
                served[name] = run_locust(
                    server,
                    name,
                    images_dir,
                    users=args.users,
                    duration=args.duration,
                    work=root / name,
                    expect=expect,
                    workers=args.workers,
                )
                row = served[name]
                row.update(bound_fields(name, row["rps"], bounds, alone))
                log(
                    f"{name}: {row['requests']} requests, {row['errors']} errors, {row['rps']:.2f} req/s "
                    f"({_number(row['bound_share'], '.0f')} % of the forward bound), p50 {row['p50']:.1f} ms, "
                    f"p95 {row['p95']:.1f} ms, p99 {row['p99']:.1f} ms; CPU load gen "
                    f"{_number(row['cpu_loadgen'], '.0f')} %, frontend {_number(row['cpu_frontend'], '.0f')} %, "
                    f"workers {_number(row['cpu_workers'], '.0f')} %, other {_number(row['cpu_other'], '.0f')} %"
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
