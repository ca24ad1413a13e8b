"""Choosing an engine: the same archive, the same load, on TorchServe, KServe's model server and Ray Serve.

Each engine is started as a user starts it (``lafam-serve serve ARCHIVE --engine E``, :mod:`serving.engines`),
warmed up, then driven by the serving benchmark's locust run (:func:`benchmarks.serving.run_locust`: headless,
closed loop, ``--users`` clients, ``--duration`` seconds, the same JPEGs, the engine's token, every 200 must
carry a LaFAM map), one engine after the other on the same machine. Ray Serve runs on a private local
cluster (``ray start --head`` on loopback, :mod:`serving.ray_cluster`) with ``--replicas`` replicas.

Figures: requests per second (over the span from the first request's start to the last one's end) and the
p50 / p95 / p99 latency of the answered requests, in ms. Every engine batches with the archive's
``batchSize`` / ``maxBatchDelay`` (TorchServe's frontend, KServe here in the process, Ray with
``@serve.batch``). The load generator shares the 2 cores with the engine, so the engine's own CPU time per
request is reported too (the tree of the serve command; for Ray every process of its cluster).

Run: ``python -m benchmarks.engines [--duration 30] [--users 8] [--replicas 1 2] [--write benchmarks/RESULTS.md]``.
Needs Java, the ``bench`` extra (locust) and the ``kserve`` and ``ray`` extras.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks._report import cpu_name, package_version, section, write_section
from benchmarks.serving import make_images, run_locust, warm_up
from demo.run import build_demo_archive
from serving.engines import ENGINES, EngineServer
from serving.ray_cluster import MARK_ENV, local_cluster
from serving.ray_cluster import processes as ray_processes

MARKER = "<!-- benchmarks.engines -->"


@contextlib.contextmanager
def started(engine: str, archive: Path, workdir: Path, replicas: int) -> Iterator[tuple[EngineServer, str | None]]:
    """One engine serving ``archive`` (Ray on its own private cluster), stopped afterwards; its cluster marker."""
    if engine != "ray":
        with EngineServer(engine, [archive], workdir) as server:
            yield server, None
        return
    with local_cluster() as cluster:
        extra = ["--ray-address", cluster.address, "--replicas", str(replicas)]
        env = {key: cluster.env[key] for key in (MARK_ENV, "RAY_USAGE_STATS_ENABLED", "PYTHONPATH")}
        with EngineServer(engine, [archive], workdir, extra, env) as server:
            yield server, cluster.marker


def engine_cpu_seconds(server: EngineServer, marker: str | None) -> float:
    """User + system CPU seconds so far of the engine's processes: the command's process tree, and for Ray
    every process of its cluster (proxy, controller, replicas, raylet, GCS)."""
    assert server.process is not None
    found = {p.pid: p for p in [psutil.Process(server.process.pid)]}
    found |= {p.pid: p for p in found[server.process.pid].children(recursive=True)}
    if marker is not None:
        found |= {p.pid: p for p in ray_processes(marker)}
    total = 0.0
    for process in found.values():
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def measure(
    engine: str, archive: Path, images: Path, work: Path, *, users: int, duration: int, replicas: int
) -> dict[str, Any]:
    """Start one engine, warm it up, drive it with locust; its figures."""
    with started(engine, archive, work / f"{engine}-{replicas}", replicas) as (server, marker):
        warm_up(server, "shapes", [p.read_bytes() for p in sorted(images.glob("*.jpg"))], users)  # type: ignore[arg-type]
        before = engine_cpu_seconds(server, marker)
        figures = run_locust(
            server,  # type: ignore[arg-type]
            "shapes",
            images,
            users=users,
            duration=duration,
            work=work / f"{engine}-{replicas}-locust",
            expect='"explanation"',
        )
        used = engine_cpu_seconds(server, marker) - before
    name = f"ray, {replicas} replica{'s' if replicas > 1 else ''}" if engine == "ray" else engine
    return {"engine": name, **figures, "cpu_ms_per_request": 1000 * used / max(1, figures["requests"])}


def render(rows: list[dict[str, Any]], *, users: int, duration: int) -> str:
    """The Markdown section."""
    lines = [
        f"Run {datetime.now(UTC):%Y-%m-%d} on {cpu_name()} ({psutil.cpu_count()} cores), torch "
        f"{package_version('torch')}, torchserve {package_version('torchserve')}, kserve "
        f"{package_version('kserve')}, ray {package_version('ray')}, locust {package_version('locust')}. "
        f"The demo CNN (ONNX Runtime, 128×128, prediction + LaFAM PNG per response), the archive's batching "
        f"(batch 8, 10 ms); locust: {users} closed-loop users for {duration} s per engine on the same "
        f"machine; Ray on a private local cluster. Latency of answered requests, ms. Engine CPU: "
        "user + system CPU time of the engine's processes over the run (Ray: every process of its cluster) per "
        "request.",
        "",
        "| engine | req/s | p50 ms | p95 ms | p99 ms | errors | req/s vs TorchServe | engine CPU ms / request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = next((row["rps"] for row in rows if row["engine"] == "torchserve"), None)
    for row in rows:
        ratio = f"{row['rps'] / base:.2f}×" if base else "-"
        lines.append(
            f"| {row['engine']} | {row['rps']:.1f} | {row['p50']:.0f} | {row['p95']:.0f} | {row['p99']:.0f} | "
            f"{row['errors']} of {row['requests']} | {ratio} | {row['cpu_ms_per_request']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; print (and write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=30)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="Ray: one row per replica count")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--write", type=Path, help="update this RESULTS.md section")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lafam-engines-") as folder:
        work = Path(folder)
        archive = build_demo_archive(work, work / "model_store", backend="onnx", name="shapes", log=lambda _: None)
        images = make_images(work / "images", 16, (128, 128))
        runs = [(engine, n) for engine in args.engines for n in (args.replicas if engine == "ray" else [1])]
        rows = [
            measure(engine, archive, images, work, users=args.users, duration=args.duration, replicas=n)
            for engine, n in runs
        ]
    text = "## Choosing an engine: the same load on every engine\n\n" + render(
        rows, users=args.users, duration=args.duration
    )
    print(text)
    if args.write:
        write_section(args.write, section(text, MARKER), MARKER)
    return rows


if __name__ == "__main__":
    main()
