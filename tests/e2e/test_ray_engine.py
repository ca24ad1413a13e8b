"""End to end: the demo archive served by the Ray engine on a real local Ray cluster, two replicas.

One cluster for the module (:func:`serving.ray_cluster.local_cluster`: ``ray start --head`` on loopback in a
private temp dir, always stopped, by pid), one ``python -m engines.ray_engine`` (the ``serve_forever`` that
``lafam-serve serve --engine ray`` calls) with two replicas, the token from ``LAFAM_TOKEN`` and the metrics
exporter on a free port. The routes and the bad-input corpus are checked on every engine in
``test_engines.py``; here what is Ray's own: a body over 10 MiB sent chunked; metrics of both replicas reach the one
scrape target; a replica SIGKILLed under load fails only the requests in flight at it, Serve replaces it,
and the exporter moves to a surviving replica; SIGTERM deletes the application and leaves the cluster running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from demo.run import build_demo_archive
from scenes.synthetic import save_samples
from serving.ray_cluster import Cluster, alive, local_cluster, processes
from serving.torchserve import free_port

ray = pytest.importorskip("ray")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    # ray.serve's own config models, at import (ray 2.60.0 with pydantic 2.14)
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "ray-engine-e2e-token-0123456789"
REPLICA_TITLE = "ServeReplica:lafam:LafamDeployment"  # ray::ServeReplica:<app>:<deployment>[.<method>]
THREADS = 4
GRACE_S = 0.5
"""After the kill, how long a request may still have been routed to the dead replica: the kill's own latency."""


@dataclass
class Server:
    url: str
    metrics_port: int
    metrics_dir: Path
    process: subprocess.Popen
    log: Path
    cluster: Cluster
    samples: list[dict] = field(default_factory=list)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


def replica_pids(marker: str) -> set[int]:
    pids = set()
    for process in processes(marker):
        with contextlib.suppress(psutil.Error):
            if alive(process) and REPLICA_TITLE in " ".join(process.cmdline()):
                pids.add(process.pid)
    return pids


def exporter_pid(port: int, pids: set[int]) -> int | None:
    """Which replica listens on the metrics port."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            connections = getattr(process, "net_connections", None) or process.connections  # psutil < 6
            for connection in connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                    return pid
    return None


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with local_cluster(num_cpus=2, object_store_mb=100) as running:  # always stopped, by pid
        yield running


@pytest.fixture(scope="module")
def server(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ray-engine")
    archive = build_demo_archive(root, root / "model_store", backend="onnx", name="shapes", log=lambda _: None)
    index = json.loads(save_samples(root / "samples", 6, seed=11).read_text())
    samples = [{"path": root / "samples" / s["image"], "labels": s["labels"]} for s in index["samples"]]
    port, metrics_port = free_port(), free_port()
    metrics_dir = root / "metrics"
    env = {**cluster.env, "LAFAM_TOKEN": TOKEN, "LAFAM_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"}
    command = [
        sys.executable, "-m", "engines.ray_engine", str(archive), "--replicas", "2", "--host", "127.0.0.1",
        "--port", str(port), "--ray-address", cluster.address, "--metrics-dir", str(metrics_dir),
    ]  # fmt: skip
    log = root / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    instance = Server(f"http://127.0.0.1:{port}", metrics_port, metrics_dir, process, log, cluster, samples)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, f"the Ray engine exited with {process.returncode}:\n{instance.log_tail()}"
            assert time.monotonic() < deadline, f"the Ray engine did not become ready:\n{instance.log_tail()}"
            ready = get(instance, "/v2/health/ready")[0] == 200 and predict(instance, samples[0]["path"])[0] == 200
            if ready and "with Ray Serve on http://" in log.read_text(errors="replace"):  # serve.run returned
                break
            time.sleep(1)
        yield instance
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def call(
    server: Server,
    path: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: str | None = TOKEN,
    method: str = "POST",
    timeout: float = 60,
) -> tuple[int, dict]:
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(server.url + path, data=data, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        raw = error.read()
        try:
            return error.code, json.loads(raw or b"{}")
        except ValueError:
            return error.code, {"text": raw.decode(errors="replace")}
    except (OSError, ValueError) as error:  # refused, reset, timed out, truncated
        return -1, {"exception": repr(error)}


def get(server: Server, path: str) -> tuple[int, dict]:
    return call(server, path, method="GET", token=None, timeout=10)


def predict(server: Server, image: Path, **headers: str) -> tuple[int, dict]:
    return call(server, "/predictions/shapes", image.read_bytes(), {"Content-Type": "image/png", **headers})


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()
    except OSError:
        return None


def requests_total(text: str) -> float:
    """Sum of ``lafam_requests_total`` over its status classes, for the model ``shapes``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "lafam_requests_total" and sample.labels.get("model") == "shapes"
    )


def scrape_total(port: int, deadline_s: float = 30) -> float:
    """Scrape the exporter, waiting (polling) while no replica holds the address."""
    deadline = time.monotonic() + deadline_s
    while (text := scrape(port)) is None:
        assert time.monotonic() < deadline, f"nothing serves the metrics on 127.0.0.1:{port}"
        time.sleep(0.5)
    return requests_total(text)


def per_replica_totals(folder: Path, pids: set[int], scratch: Path) -> dict[int, float]:
    """Each replica's own ``lafam_requests_total``, read from its own file in the shared folder."""
    totals = {}
    for pid in pids:
        alone = scratch / str(pid)
        alone.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / f"counter_{pid}.db", alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        totals[pid] = sum(s.value for f in registry.collect() for s in f.samples if s.name == "lafam_requests_total")
    return totals


@dataclass(frozen=True)
class Record:
    start: float
    end: float
    status: int
    detail: str


class Load:
    """``THREADS`` clients sending predictions back to back, each request's start, end and status recorded."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(THREADS)]

    def _run(self, index: int) -> None:
        images = [s["path"] for s in self.server.samples]
        n = index
        while not self._stop.is_set():
            start = time.monotonic()
            status, body = predict(self.server, images[n % len(images)])
            end = time.monotonic()
            detail = "" if status == 200 else json.dumps(body)[:200]
            with self._lock:
                self.records.append(Record(start, end, status, detail))
            n += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)


@pytest.fixture(scope="module")
def ray_driver(cluster: Cluster) -> Iterator[None]:
    """This process connected to the cluster, to read Serve's replica states."""
    handler = signal.getsignal(signal.SIGTERM)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    signal.signal(signal.SIGTERM, handler)  # ray.init replaces it
    try:
        yield
    finally:
        ray.shutdown()


def running_replicas() -> int:
    from ray import serve

    application = serve.status().applications.get("lafam")
    if application is None:
        return 0
    deployment = application.deployments.get("LafamDeployment")
    return int(deployment.replica_states.get("RUNNING", 0)) if deployment else 0


# The HTTP contract, as on TorchServe


def _raw_response(server: Server, head: bytes, body_chunks: Iterator[bytes]) -> bytes:
    """Send a request on a raw socket (the body from a thread) and read the answer, which may come early."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:

        def send() -> None:
            with contextlib.suppress(OSError):  # the server may answer and close before the body is sent
                connection.sendall(head)
                for chunk in body_chunks:
                    connection.sendall(chunk)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        with contextlib.suppress(OSError):
            while b"}}" not in answer and (data := connection.recv(65536)):
                answer += data
        sender.join(timeout=30)
        return answer


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_body_over_10_mib_is_413(server: Server, declared: bool) -> None:
    size = 11 * 1024 * 1024
    framing = f"Content-Length: {size}" if declared else "Transfer-Encoding: chunked"
    head = (
        f"POST /predictions/shapes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: image/png\r\n{framing}\r\n\r\n"
    ).encode()
    chunk = b"x" * (1024 * 1024)
    chunks = (chunk for _ in range(11)) if declared else (b"100000\r\n" + chunk + b"\r\n" for _ in range(11))
    answer = _raw_response(server, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b'"code":"payload_too_large"' in answer


# Metrics: every replica records into one folder, one of them serves the sum


def test_metrics_of_both_replicas_reach_one_scrape_target(server: Server, tmp_path: Path) -> None:
    pids = replica_pids(server.cluster.marker)
    assert len(pids) == 2, pids
    assert exporter_pid(server.metrics_port, pids) in pids  # one replica serves the exporter
    before = scrape_total(server.metrics_port)
    with Load(server) as load:
        deadline = time.monotonic() + 60
        while not all((server.metrics_dir / f"counter_{pid}.db").exists() for pid in pids) or len(load.records) < 40:
            assert time.monotonic() < deadline, "requests did not reach both replicas"
            time.sleep(0.5)
    assert [r for r in load.records if r.status != 200] == []
    after = scrape_total(server.metrics_port)
    assert after - before == len(load.records)  # every answered request, from whichever replica, is counted
    totals = per_replica_totals(server.metrics_dir, pids, tmp_path)
    assert all(total > 0 for total in totals.values()), totals  # both replicas answered and recorded
    assert sum(totals.values()) == after  # the scrape is the sum of the replicas' own files


# Faults: a replica killed under load


def test_replica_killed_under_load(server: Server, ray_driver: None) -> None:
    marker = server.cluster.marker
    original = replica_pids(marker)
    assert len(original) == 2, original
    victim = exporter_pid(server.metrics_port, original)  # the replica serving the metrics: the harder case
    assert victim is not None
    before = scrape_total(server.metrics_port)
    with Load(server) as load:
        time.sleep(4)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        replaced_after = spawned_after = None
        deadline = killed_at + 180
        while replaced_after is None:
            assert time.monotonic() < deadline, f"Serve did not replace the replica; live: {replica_pids(marker)}"
            time.sleep(0.5)
            live = replica_pids(marker)
            new = live - original
            if new and spawned_after is None:
                spawned_after = time.monotonic() - killed_at
            served = [pid for pid in new if (server.metrics_dir / f"counter_{pid}.db").exists()]
            if victim not in live and len(live) == 2 and served and running_replicas() == 2:
                replaced_after = time.monotonic() - killed_at
        time.sleep(2)  # the new replica takes its share of the load
    records = sorted(load.records, key=lambda r: r.start)
    failed = [r for r in records if r.status != 200]
    late = [r for r in records if r.start >= killed_at + GRACE_S]
    summary = (
        f"{len(records)} requests, {len(failed)} failed, {len(late)} started after the kill + {GRACE_S} s, "
        f"new replica process after {spawned_after:.1f} s, running and answering after {replaced_after:.1f} s; "
        "failures (start, end relative to the kill, status): "
        f"{[(round(r.start - killed_at, 3), round(r.end - killed_at, 3), r.status, r.detail) for r in failed]}"
    )
    print(summary)
    # Only the requests in flight at the dead replica may fail: started before the kill, ended after it.
    assert all(r.start < killed_at + GRACE_S and r.end > killed_at for r in failed), summary
    assert len(failed) <= THREADS, summary
    assert late, summary
    assert all(r.status == 200 for r in late), summary
    assert len(live) == 2
    # The exporter: a surviving replica takes the address over, and the counts of the dead one stay in the sum.
    deadline = time.monotonic() + 30
    while (holder := exporter_pid(server.metrics_port, replica_pids(marker))) is None:
        assert time.monotonic() < deadline, "no replica took the metrics exporter over"
        time.sleep(0.5)
    assert holder != victim
    answered = sum(r.status == 200 for r in records)
    delta = scrape_total(server.metrics_port) - before
    # A request counted by the dead replica just before it died is a failure the scrape still counts.
    assert answered <= delta <= answered + len(failed), summary


def test_sigterm_deletes_the_application_and_leaves_the_cluster(server: Server) -> None:
    marker = server.cluster.marker
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=90) == 0, server.log_tail()
    started = re.search(
        r"serving shapes\.mar with Ray Serve on http://127\.0\.0\.1:\d+ \(2 replicas\)", server.log.read_text()
    )
    assert started, server.log_tail()
    deadline = time.monotonic() + 60
    while replica_pids(marker) or get(server, "/ping")[0] != -1:
        assert time.monotonic() < deadline, f"replicas {replica_pids(marker)} or the proxy outlived the app"
        time.sleep(0.5)
    titles = []
    for process in processes(marker):
        with contextlib.suppress(psutil.Error):
            titles.append(" ".join(process.cmdline()))
    assert any("gcs_server" in title for title in titles), titles  # the cluster keeps running
    assert any(server.metrics_dir.glob("counter_*.db"))  # a folder it was given is left in place


def test_autoscaling_adds_a_replica_under_load(server: Server, tmp_path: Path) -> None:
    """``--replicas 1 --max-replicas 2``: sustained load (4 clients, target 2 ongoing requests per replica) makes
    Serve start a second replica; every request is answered meanwhile. Runs after the SIGTERM test freed the
    application name, on the same cluster."""
    port = free_port()
    archive = server.metrics_dir.parent / "model_store" / "shapes.mar"
    env = {**server.cluster.env, "LAFAM_TOKEN": TOKEN, "LAFAM_METRICS_ADDRESS": "off"}
    command = [
        sys.executable, "-m", "engines.ray_engine", str(archive), "--replicas", "1", "--max-replicas", "2",
        "--host", "127.0.0.1", "--port", str(port), "--ray-address", server.cluster.address,
    ]  # fmt: skip
    log = tmp_path / "autoscale.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    scaled = Server(f"http://127.0.0.1:{port}", 0, tmp_path, process, log, server.cluster, server.samples)
    try:
        deadline = time.monotonic() + 240
        while predict(scaled, scaled.samples[0]["path"])[0] != 200:
            assert process.poll() is None, scaled.log_tail()
            assert time.monotonic() < deadline, scaled.log_tail()
            time.sleep(1)
        marker = server.cluster.marker  # replica processes, counted by pid: Serve restarted its controller
        assert len(replica_pids(marker)) == 1
        with Load(scaled) as load:
            deadline = time.monotonic() + 180  # Serve's upscale delay is 30 s, then a replica starts
            while len(replica_pids(marker)) < 2:
                assert time.monotonic() < deadline, f"no second replica; {len(load.records)} requests sent"
                time.sleep(1)
        statuses = [record.status for record in load.records]
        assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
        assert "(1 to 2 replicas, autoscaling)" in log.read_text(errors="replace")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


# The application builder of a Serve config file / KubeRay RayService (no cluster needed)


def test_build_passes_the_token_digest_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engines import auth, ray_engine

    for name in (auth.TOKEN_ENV, auth.TOKEN_FILE_ENV):
        monkeypatch.delenv(name, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    app = ray_engine.build({"archives": ["model_store/x.mar"], "token_file": str(token_file), "metrics_dir": "/m"})
    archives, digest, metrics_dir, metrics_address = app._bound_deployment.init_args
    assert archives == [str(Path("model_store/x.mar").absolute())]
    assert digest == auth.digest(TOKEN)
    assert TOKEN not in repr(app._bound_deployment.init_args)
    assert (metrics_dir, metrics_address) == ("/m", None)
    assert ray_engine.build({"archives": ["a.mar"], "no_auth": True})._bound_deployment.init_args[1] is None
    with pytest.raises(auth.AuthError, match="needs a token"):
        ray_engine.build({"archives": ["a.mar"]})
    with pytest.raises(auth.AuthError, match="both given"):
        ray_engine.build({"archives": ["a.mar"], "token_file": str(token_file), "no_auth": True})
    with pytest.raises(ValueError, match="true or false"):
        ray_engine.build({"archives": ["a.mar"], "token_file": str(token_file), "no_auth": "false"})
    with pytest.raises(ValueError, match="unknown args"):
        ray_engine.build({"archives": ["a.mar"], "replicas": 2})
    with pytest.raises(ValueError, match="at least one"):
        ray_engine.build({"archives": [], "no_auth": True})


def test_application_replicas_or_autoscaling() -> None:
    from engines import ray_engine

    fixed = ray_engine.application(["/a.mar"], None, "/m", "off", replicas=3)._bound_deployment
    assert (fixed.num_replicas, fixed._deployment_config.autoscaling_config) == (3, None)
    assert fixed.ray_actor_options["num_cpus"] * 2 <= 2  # two replicas fit a 2-CPU node
    scaled = ray_engine.application(["/a.mar"], None, "/m", "off", replicas=2, max_replicas=4)._bound_deployment
    config = scaled._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (2, 4, 2.0)
    assert scaled._deployment_config.max_ongoing_requests == ray_engine.MAX_ONGOING_REQUESTS


def test_serve_forever_refuses_bad_arguments_before_connecting(tmp_path: Path) -> None:
    from engines import ray_engine
    from engines.archives import ArchiveError
    from engines.auth import TokenCheck

    not_an_archive = tmp_path / "x.mar"
    not_an_archive.write_text("not a zip")
    check = TokenCheck(None)
    with pytest.raises(FileNotFoundError):
        ray_engine.serve_forever([str(tmp_path / "missing.mar")], host="127.0.0.1", port=1, auth=check)
    with pytest.raises(ArchiveError):
        ray_engine.serve_forever([str(not_an_archive)], host="127.0.0.1", port=1, auth=check)
    with pytest.raises(ValueError, match="replicas"):
        ray_engine.serve_forever([str(tmp_path)], host="127.0.0.1", port=1, auth=check, replicas=2, max_replicas=1)
