"""A private local Ray cluster on loopback for the tests and the engine benchmark: ``ray start --head``, stopped by pid.

Every process of the cluster carries a marker in its environment (or descends from one that does), so
stopping ends exactly those: ``ray stop --force`` would end every Ray process of the machine, another
session's cluster too. Ray's temp dir is a short private folder (its AF_UNIX socket paths must stay short)
and every port is a free loopback one; the dashboard is off and usage stats are not sent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from .torchserve import free_port

MARK_ENV = "LAFAM_RAY_CLUSTER"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Cluster:
    """A running cluster.

    Attributes:
        address: ``host:port`` of its GCS, for ``ray.init(address=...)`` and ``--ray-address``.
        marker: the value of :data:`MARK_ENV` its processes carry.
        env: the environment to run a driver in (the marker, no usage stats, the checkout on the path).
    """

    address: str
    marker: str
    env: dict[str, str]


def processes(marker: str) -> list[psutil.Process]:
    """The cluster's processes: those started with the marker, and their descendants (Ray rewrites theirs)."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.pid != os.getpid() and process.environ().get(MARK_ENV) == marker:
                found[process.pid] = process
    for process in list(found.values()):
        with contextlib.suppress(psutil.Error):
            found.update({child.pid: child for child in process.children(recursive=True)})
    return list(found.values())


def alive(process: psutil.Process) -> bool:
    """Whether a process runs (a zombie does not)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(marker: str) -> None:
    """SIGTERM every process of the cluster, then SIGKILL what is left."""
    for attempt in range(3):
        running = [p for p in processes(marker) if alive(p)]
        if not running:
            return
        for process in running:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGTERM if attempt == 0 else signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in running) and time.monotonic() < deadline:
            time.sleep(0.2)


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2, object_store_mb: int = 100) -> Iterator[Cluster]:
    """Run ``ray start --head`` on loopback for the duration of a ``with`` block (always stopped).

    Raises:
        RuntimeError: ``ray start`` failed (its output is in the message).
    """
    temp = Path(tempfile.mkdtemp(prefix="lray", dir="/tmp"))
    marker = uuid.uuid4().hex
    env = {
        **os.environ,
        MARK_ENV: marker,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head",
        "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", str(num_cpus),
        "--include-dashboard", "false", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
        "--object-store-memory", str(object_store_mb * 1024 * 1024), "--disable-usage-stats",
        "--temp-dir", str(temp),
    ]  # fmt: skip
    try:
        started = subprocess.run(  # noqa: S603 - fixed command, no shell
            command, env=env, capture_output=True, text=True, timeout=180, check=False
        )
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{started.stdout[-3000:]}{started.stderr[-3000:]}")
        yield Cluster(f"127.0.0.1:{port}", marker, env)
    finally:
        stop(marker)
        shutil.rmtree(temp, ignore_errors=True)
