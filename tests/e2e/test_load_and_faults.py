"""Load and faults on a real TorchServe: saturation with a mixed load, a worker killed mid-load, a restart.

One server for the module (demo archive, ONNX backend, one worker), driven by locust through
:mod:`benchmarks.soak` (headless, bounded in time and count, stops by itself). The measured numbers
(percentiles, recovery time, lost requests) are printed (``pytest -s``) and attached as user properties
(``--junitxml``), not compared with targets: speed is the benchmarks' business (``benchmarks.soak``). The
restart test runs last: it stops the module's server.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from serving.torchserve import TorchServe, port_open, running

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's frontend needs Java 11+"),
    pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs the 'bench' extra (locust)"),
]

MODEL = "shapes"
USERS = 8
SATURATION_SECONDS = 15
RECOVERY_DEADLINE_S = 60.0
"""How long the test polls for a successful request after the kill before it fails (a deadline, not a target)."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from demo.run import build_demo_archive

    root = tmp_path_factory.mktemp("load")
    build_demo_archive(root, root / "model_store", backend="onnx", name=MODEL, log=lambda _: None)
    return root / "model_store"


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.serving import make_images
    from benchmarks.soak import IMAGE_SIZE

    return make_images(tmp_path_factory.mktemp("images"), 8, IMAGE_SIZE)


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:

    workdir = tmp_path_factory.mktemp("ts")
    with running(store, [MODEL], workdir=workdir) as instance:  # stop() checks every port closed
        yield instance


def post(
    server: TorchServe, data: bytes, *, endpoint: str = "predictions", timeout: float = 30, **headers: str
) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{server.url()}/{endpoint}/{MODEL}",
        data=data,
        method="POST",
        headers={"Authorization": f"Bearer {server.token()}", "Content-Type": "image/jpeg", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:  # connection reset or timed out: no answer
        return 0, b""


def images(folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(folder.glob("*.jpg"))]


def test_saturation_mixed_load_has_no_unexpected_errors(
    server: TorchServe, images_dir: Path, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    from benchmarks.serving import warm_up
    from benchmarks.soak import KINDS, finish_load, start_load, summarize

    warm_up(server, MODEL, images(images_dir), USERS)
    load = start_load(server, images_dir, users=USERS, duration=SATURATION_SECONDS, work=tmp_path, max_requests=20000)
    summary = summarize(finish_load(load))  # locust stopped by itself

    report = ", ".join(
        f"{kind} n={row['requests']} p50={row['p50']:.1f} p95={row['p95']:.1f}"
        for kind, row in summary["kinds"].items()
    )
    print(
        f"\nsaturation: {summary['requests']} requests in {summary['seconds']:.1f} s ({summary['rps']:.1f} req/s), "
        f"{summary['unexpected']} unexpected, p50 {summary['p50']:.1f} ms, p95 {summary['p95']:.1f} ms; "
        f"by kind (ms): {report}"
    )
    record_property("saturation_p50_ms", round(summary["p50"], 1))
    record_property("saturation_p95_ms", round(summary["p95"], 1))
    assert summary["unexpected"] == 0, summary["unexpected_examples"]
    for kind in KINDS:
        assert summary["kinds"][kind]["requests"] > 0, kind
    assert summary["kinds"]["junk"]["statuses"] == {"400": summary["kinds"]["junk"]["requests"]}
    assert all(set(summary["kinds"][kind]["statuses"]) == {"200"} for kind in ("predict", "gradcam", "lrp"))
    assert summary["requests"] == sum(row["requests"] for row in summary["kinds"].values())
    assert 0 < summary["p50"] <= summary["p95"]


def test_killed_worker_is_replaced_and_few_requests_are_lost(
    server: TorchServe, images_dir: Path, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    from benchmarks.soak import finish_load, start_load, summarize

    [old_pid] = server.worker_pids(MODEL)
    worker = psutil.Process(old_pid)
    assert any("model_service_worker" in part for part in worker.cmdline())
    assert worker in server.worker_processes()
    image = images(images_dir)[0]

    load = start_load(server, images_dir, users=USERS, duration=25, work=tmp_path, max_requests=20000)
    time.sleep(6)  # mid-load: every user has requests going
    assert load.process.poll() is None
    killed_at = time.time()
    os.kill(old_pid, signal.SIGKILL)
    while True:  # fast request loop: the time until a request succeeds again
        status, _ = post(server, image, timeout=RECOVERY_DEADLINE_S / 2)
        if status == 200:
            break
        if time.time() - killed_at > RECOVERY_DEADLINE_S:
            pytest.fail(f"no successful request {RECOVERY_DEADLINE_S:.0f} s after the kill:\n{server.log_tail()}")
        time.sleep(0.05)
    recovery = time.time() - killed_at
    summary = summarize(finish_load(load))

    lost = summary["unexpected_examples"]
    lost_count = summary["unexpected"]
    new_pids = server.worker_pids(MODEL)
    print(
        f"\nworker kill: recovered in {recovery:.2f} s, {lost_count} of {summary['requests']} requests lost "
        f"(statuses {summary['statuses']}), worker PID {old_pid} -> {new_pids}"
    )
    record_property("recovery_s", round(recovery, 2))
    record_property("lost_requests", lost_count)
    assert lost_count <= USERS, lost  # only requests in flight at the kill may fail
    assert all(row[0] >= killed_at for row in lost)  # nothing failed before the kill
    assert len(new_pids) == 1
    assert new_pids[0] != old_pid
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    assert [p.pid for p in server.worker_processes()] == new_pids


def test_restart_serves_the_same_archives(server: TorchServe, store: Path, images_dir: Path) -> None:
    image = images(images_dir)[1]
    requests = [("predictions", {}), ("explanations", {"X-LaFAM-Method": "gradcam"})]
    before = [post(server, image, endpoint=endpoint, **headers) for endpoint, headers in requests]
    assert [status for status, _ in before] == [200, 200]

    server.stop()
    assert not any(port_open(port) for port in server.ports.values())
    restarted = TorchServe(store, [MODEL], workdir=server.workdir, ports=server.ports, env=server.env)
    restarted.start(timeout=240)
    try:
        after = [post(restarted, image, endpoint=endpoint, **headers) for endpoint, headers in requests]
    finally:
        restarted.stop()
    # The same prediction and the same map bytes: bodies are deterministic JSON.
    assert after == before
