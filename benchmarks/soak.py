"""Soak: mixed load on a real TorchServe for minutes; errors, latency percentiles and worker memory growth.

The demo model (``build_demo_archive``, ONNX backend, eager model packed for the backward methods) is served
by one TorchServe on free loopback ports and driven by locust (headless, closed loop: ``--users`` clients
each sending the next request as soon as the last is answered, no wait) with a fixed mix of requests:

- ``predict``: ``POST /predictions/shapes``, prediction + LaFAM map (expects 200 with an explanation);
- ``gradcam``: ``POST /explanations/shapes`` with ``X-LaFAM-Method: gradcam`` (expects 200);
- ``lrp``: ``POST /explanations/shapes`` with ``X-LaFAM-Method: lrp`` (expects 200);
- ``junk``: junk bytes to ``/predictions/shapes`` (expects 400 ``invalid_image``).

An *unexpected* response is any other status (or a 200 without an explanation). Latency percentiles are
of the expected responses, from every request's exact time recorded inside locust.

Every few seconds the resident memory (RSS) of the model's Python workers (the ``model_service_worker``
children of TorchServe's Java frontend, see :meth:`serving.torchserve.TorchServe.worker_processes`) and of the
frontend is sampled with psutil. Growth = median of the last minute / median of the first minute after the
warm-up − 1 (target < 10 %).

The locust runner here (:func:`start_load` / :func:`finish_load`) is also what the load and fault tests use.

Run: ``python -m benchmarks.soak [--minutes 10] [--users 8] [--write benchmarks/RESULTS.md]``. Needs the
``bench`` extra (locust) and Java.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks._report import cpu_name, package_version, section, write_section
from benchmarks.serving import locust_command, make_images, warm_up
from serving.torchserve import TorchServe, port_open

START_MARKER = "<!-- soak:start -->"
END_MARKER = "<!-- soak:end -->"
MODEL = "shapes"
IMAGES = 16
IMAGE_SIZE = (160, 120)
MIX = {"predict": 6, "gradcam": 2, "lrp": 1, "junk": 1}
"""Relative weights of the request kinds (locust task weights)."""
KINDS = tuple(MIX)
RSS_GROWTH_TARGET = 0.10


@dataclass
class Load:
    """A locust run in the background (see :func:`start_load`)."""

    process: subprocess.Popen[str]
    times_file: Path
    duration: float
    started: float


def start_load(
    server: TorchServe,
    images_dir: Path,
    *,
    users: int,
    duration: float,
    work: Path,
    model: str = MODEL,
    max_requests: int = 0,
    mix: dict[str, int] | None = None,
) -> Load:
    """Start locust (headless, ``benchmarks/locust/mixed.py``) on ``model``; it stops by itself after ``duration`` s.

    Args:
        server: a started TorchServe.
        images_dir: folder of ``*.jpg`` request images.
        users: concurrent closed-loop users (all spawned at once).
        duration: seconds of load.
        work: folder for locust's CSV, its log and the recorded requests.
        model: the model to drive.
        max_requests: stop earlier after this many requests (0: no limit).
        mix: task weights by kind (default :data:`MIX`); every kind of :data:`MIX` must be present.
    """
    command, env, times_file = locust_command(
        "mixed.py",
        server,
        images_dir,
        model,
        users=users,
        duration=duration,
        stop_timeout=30,
        work=work,
        mix=json.dumps(mix or MIX),
        max_requests=str(max_requests),
    )
    log = open(work / "locust.log", "w")  # noqa: SIM115 - handed to the child, closed with the file object
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()
    return Load(process=process, times_file=times_file, duration=duration, started=time.time())


def finish_load(load: Load) -> list[list[Any]]:
    """Wait for locust to stop by itself; return its records ``[end time, ms, kind, status, unexpected]``.

    Raises:
        RuntimeError: locust failed, hung, or recorded nothing.
    """
    try:
        load.process.wait(timeout=load.duration + 90)
    except subprocess.TimeoutExpired:
        load.process.kill()
        load.process.wait()
        raise RuntimeError(f"locust did not stop by itself:\n{_log(load)}") from None
    if load.process.returncode != 0 or not load.times_file.exists():
        raise RuntimeError(f"locust failed (exit {load.process.returncode}):\n{_log(load)}")
    records = json.loads(load.times_file.read_text())
    if not records:
        raise RuntimeError(f"locust sent no request:\n{_log(load)}")
    return records


def _log(load: Load) -> str:
    path = load.times_file.with_name("locust.log")
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def summarize(records: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Counts, unexpected responses and latency percentiles (ms, expected responses only), overall and by kind."""

    def stats(rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
        ok = np.array([row[1] for row in rows if not row[4]], dtype=np.float64)
        p50, p95, p99 = np.percentile(ok, [50, 95, 99]) if ok.size else (float("nan"),) * 3
        statuses: dict[str, int] = {}
        for row in rows:
            statuses[str(row[3])] = statuses.get(str(row[3]), 0) + 1
        return {
            "requests": len(rows),
            "unexpected": sum(1 for row in rows if row[4]),
            "statuses": statuses,
            "p50": float(p50),
            "p95": float(p95),
            "p99": float(p99),
        }

    first = min(row[0] - row[1] / 1e3 for row in records)
    window = max(row[0] for row in records) - first
    summary = stats(records) | {"rps": len(records) / window if window > 0 else float("nan"), "seconds": window}
    summary["kinds"] = {kind: stats([row for row in records if row[2] == kind]) for kind in KINDS}
    summary["unexpected_examples"] = [row for row in records if row[4]][:10]
    return summary


@dataclass
class RssSampler:
    """Samples the RSS of TorchServe's workers and frontend every ``interval`` seconds in a thread."""

    server: TorchServe
    interval: float = 5.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> dict[str, Any]:
        """Take one sample: ``{"t": unix time, "workers": {pid: bytes}, "frontend": bytes}``."""
        workers = {}
        for process in self.server.worker_processes():
            try:
                workers[process.pid] = process.memory_info().rss
            except psutil.Error:
                continue
        frontend = self.server.frontend_process()
        try:
            frontend_rss = frontend.memory_info().rss if frontend is not None else 0
        except psutil.Error:
            frontend_rss = 0
        return {"t": time.time(), "workers": workers, "frontend": frontend_rss}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)


def rss_growth(samples: Sequence[dict[str, Any]], start: float, end: float, warmup: float, window: float) -> dict:
    """Median worker (sum over workers) and frontend RSS in the first window after ``warmup`` and the last window.

    Args:
        samples: :class:`RssSampler` samples.
        start: unix time the load started.
        end: unix time the load ended.
        warmup: seconds after ``start`` not counted.
        window: seconds of each compared window.

    Returns:
        ``{"workers": {"first": MiB, "last": MiB, "growth": fraction}, "frontend": {...}, "pids": [...],
        "samples": n}``.
    """
    first = [s for s in samples if start + warmup <= s["t"] < start + warmup + window]
    last = [s for s in samples if end - window <= s["t"] <= end]
    result: dict[str, Any] = {"samples": len(samples), "pids": sorted({pid for s in samples for pid in s["workers"]})}
    for name, value in (("workers", lambda s: sum(s["workers"].values())), ("frontend", lambda s: s["frontend"])):
        before = statistics.median(value(s) for s in first) / 2**20 if first else float("nan")
        after = statistics.median(value(s) for s in last) / 2**20 if last else float("nan")
        result[name] = {"first": before, "last": after, "growth": after / before - 1 if before else float("nan")}
    return result


def render(args: argparse.Namespace, summary: dict[str, Any], memory: dict[str, Any], windows: tuple) -> str:
    """The markdown section (without markers)."""
    warmup, window = windows
    growth = memory["workers"]["growth"]
    verdict = "pass" if summary["unexpected"] == 0 and growth < RSS_GROWTH_TARGET else "FAIL"
    lines = [
        f"## Soak: mixed load for {args.minutes:g} min ({verdict})",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores ({cpu_name()}), "
        f"load average before the run {args.load_before:.2f}; torchserve {package_version('torchserve')}, "
        f"onnxruntime {package_version('onnxruntime')}, locust {package_version('locust')}. "
        f"`python -m benchmarks.soak --minutes {args.minutes:g} --users {args.users}`.",
        "",
        f"Demo model (ONNX archive, batchSize 8, maxBatchDelay 10 ms, 1 worker) on one TorchServe on loopback; "
        f"locust headless, {args.users} closed-loop users, no wait, request mix by weight "
        + ", ".join(f"{kind} {weight}" for kind, weight in MIX.items())
        + " (predict = `/predictions` + LaFAM PNG; gradcam / lrp = `/explanations` with `X-LaFAM-Method`; "
        "junk = junk bytes, expected 400 `invalid_image`). Unexpected = any other status, or a 200 without its "
        "explanation. Latencies (ms) are of expected responses, recorded per request inside locust. The load "
        "generator runs on the same machine.",
        "",
        "| requests | req/s | unexpected (target 0) | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|",
        f"| {summary['requests']} | {summary['rps']:.1f} | {summary['unexpected']} | {summary['p50']:.1f} | "
        f"{summary['p95']:.1f} | {summary['p99']:.1f} |",
        "",
        "| kind | requests | statuses | unexpected | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, row in summary["kinds"].items():
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(row["statuses"].items()))
        lines.append(
            f"| {kind} | {row['requests']} | {statuses} | {row['unexpected']} | {row['p50']:.1f} | "
            f"{row['p95']:.1f} | {row['p99']:.1f} |"
        )
    lines += [
        "",
        f"Resident memory sampled with psutil every {args.interval:g} s ({memory['samples']} samples; worker PIDs "
        f"seen: {len(memory['pids'])}). Growth = median of the last {window:.0f} s / median of the first "
        f"{window:.0f} s after a {warmup:.0f} s warm-up − 1 (target < {RSS_GROWTH_TARGET:.0%} for the workers):",
        "",
        "| process | first MiB | last MiB | growth |",
        "|---|---|---|---|",
    ]
    for name in ("workers", "frontend"):
        row = memory[name]
        label = "Python workers (sum)" if name == "workers" else "Java frontend"
        lines.append(f"| {label} | {row['first']:.1f} | {row['last']:.1f} | {row['growth']:+.1%} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of load (default 10)")
    parser.add_argument("--users", type=int, default=8, help="concurrent locust users")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--write", type=Path, help="update this markdown file's soak section")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.users < 1 or args.interval <= 0:
        parser.error("--minutes, --users and --interval must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build, serve, soak, report. Returns ``{"summary": ..., "memory": ..., "markdown": text}``."""
    from demo.run import build_demo_archive

    args = parse_args(argv)
    args.load_before = os.getloadavg()[0]
    duration = args.minutes * 60
    warmup = min(60.0, duration * 0.2)
    window = min(60.0, (duration - warmup) / 2)
    log = lambda message: print(message, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="lafam-soak-") as tmp:
        root = Path(tmp)
        log("exporting and archiving the demo model (ONNX) ...")
        build_demo_archive(root, root / "model_store", backend="onnx", name=MODEL, log=lambda _: None)
        images_dir = make_images(root / "images", IMAGES, IMAGE_SIZE)
        images = [path.read_bytes() for path in sorted(images_dir.glob("*.jpg"))]
        server = TorchServe(root / "model_store", [MODEL], workdir=root / "ts")
        log("starting TorchServe ...")
        try:
            server.start(timeout=300)
            warm_up(server, MODEL, images, args.users)
            log(f"soaking for {args.minutes:g} min with {args.users} users ...")
            with RssSampler(server, interval=args.interval) as sampler:
                load = start_load(server, images_dir, users=args.users, duration=duration, work=root / "locust")
                records = finish_load(load)
            end = max(row[0] for row in records)
        finally:
            server.stop()
            if any(port_open(port) for port in server.ports.values()):
                raise RuntimeError(f"TorchServe ports still open: {server.ports}")
    summary = summarize(records)
    memory = rss_growth(sampler.samples, load.started, end, warmup, window)
    markdown = render(args, summary, memory, (warmup, window))
    print(section(markdown, START_MARKER, END_MARKER))
    if summary["unexpected"]:
        print("unexpected responses (first 10):", json.dumps(summary["unexpected_examples"]))
    if args.write:
        write_section(args.write, section(markdown, START_MARKER, END_MARKER), START_MARKER, END_MARKER)
    return {"summary": summary, "memory": memory, "markdown": markdown}


if __name__ == "__main__":
    main()
