"""Start and stop a real TorchServe for the demo, the end-to-end tests and the benchmarks.

TorchServe is started in the foreground in its own process group with a config derived from the
shipped ``config.properties`` (same secure settings, chosen ports), so stopping it is a signal to the
whole group followed by a wait until every port is closed (``torchserve --stop`` returns before the JVM
has exited).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.properties"
PORT_KEYS = {
    "inference_address": "inference",
    "management_address": "management",
    "metrics_address": "metrics",
    "grpc_inference_port": "grpc_inference",
    "grpc_management_port": "grpc_management",
}


class ServerError(RuntimeError):
    """TorchServe did not start, or did not stop, in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Return whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def read_properties(path: str | Path) -> dict[str, str]:
    """Parse a Java properties file of ``key=value`` lines (comments and blank lines skipped)."""
    properties = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            properties[key.strip()] = value.strip()
    return properties


@dataclass
class TorchServe:
    """A TorchServe process on loopback.

    Attributes:
        model_store: folder of ``.mar`` archives.
        models: archive names to load (``name`` for ``name.mar``); all archives when empty.
        workdir: where TorchServe runs (its logs, ``key_file.json`` and the metrics folder go there).
        ports: ``inference``, ``management``, ``metrics``, ``grpc_*`` and ``lafam_metrics``; free ones
            are picked when empty, the shipped config's otherwise.
        config: properties overriding the shipped ``config.properties``.
        env: extra environment for the server and its workers (each server gets a private ``TMPDIR``
            unless this sets one).
    """

    model_store: Path
    models: Sequence[str] = ()
    workdir: Path = field(default_factory=lambda: Path("out/torchserve"))
    ports: dict[str, int] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.model_store = Path(self.model_store).resolve()
        self.workdir = Path(self.workdir).resolve()
        if not self.ports:
            self.ports = {name: free_port() for name in [*PORT_KEYS.values(), "lafam_metrics"]}

    @staticmethod
    def configured_ports(config: str | Path = REPO_CONFIG, lafam_metrics: int = 8083) -> dict[str, int]:
        """Return the ports a properties file assigns (what ``torchserve --ts-config`` would use)."""
        properties = read_properties(config)
        return {api: int(properties[key].rsplit(":", 1)[-1]) for key, api in PORT_KEYS.items()} | {
            "lafam_metrics": lafam_metrics
        }

    def url(self, api: str = "inference") -> str:
        """Return the base URL of an API (``inference``, ``management``, ``metrics``, ``lafam_metrics``)."""
        return f"http://127.0.0.1:{self.ports[api]}"

    def _write_config(self) -> Path:
        properties = read_properties(REPO_CONFIG)
        for key, api in PORT_KEYS.items():
            port = self.ports[api]
            properties[key] = str(port) if key.startswith("grpc") else f"http://127.0.0.1:{port}"
        properties["model_store"] = str(self.model_store)
        properties["load_models"] = ",".join(f"{m}={m}.mar" for m in self.models) if self.models else "all"
        properties.update(self.config)
        path = self.workdir / "config.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
        return path

    def start(self, timeout: float = 180.0) -> TorchServe:
        """Start TorchServe and wait until every model has a ready worker.

        Raises:
            ServerError: when it is not ready within ``timeout`` seconds (the log tail is in the message).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "key_file.json").unlink(missing_ok=True)  # readiness waits for a fresh one
        config = self._write_config()
        env = dict(os.environ)
        env.update(
            {
                "LAFAM_METRICS_ADDRESS": f"127.0.0.1:{self.ports['lafam_metrics']}",
                "LAFAM_METRICS_DIR": str(self.workdir / "lafam-metrics"),
                "LOG_LOCATION": str(self.workdir / "logs"),
                "METRICS_LOCATION": str(self.workdir / "logs"),
            }
        )
        # TorchServe keeps its PID file (a second server refuses to start while one runs) and its workers'
        # sockets (the same names in every server) in the temp folder: each server gets its own, short
        # (a Unix socket path has at most 107 bytes). TEMP reaches the JVM as -Djava.io.tmpdir.
        self._tmp = tempfile.mkdtemp(prefix="lafam-ts-")
        env.update({"TMPDIR": self._tmp, "TEMP": self._tmp})
        env.update(self.env)
        metrics_dir = Path(env["LAFAM_METRICS_DIR"])
        if metrics_dir.exists():  # a fresh server starts from zero
            for stale_file in metrics_dir.glob("*.db"):
                stale_file.unlink()
        torchserve = Path(sys.executable).with_name("torchserve")
        command = [str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(config)]
        command += ["--model-store", str(self.model_store)]
        log = open(self.workdir / "torchserve.log", "wb")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.process = subprocess.Popen(  # noqa: S603 - fixed command, no shell
            command, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"TorchServe exited with {self.process.returncode}:\n{self.log_tail()}")
            if (self.workdir / "key_file.json").exists() and self._models_ready():
                return
            time.sleep(0.5)
        raise ServerError(f"TorchServe not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def _models_ready(self) -> bool:
        try:
            listing = self.get_json(self.url("management") + "/models", api="management")
        except (OSError, urllib.error.URLError, ValueError):
            return False
        names = [model["modelName"] for model in listing.get("models", [])]
        if not names or (self.models and set(self.models) - set(names)):
            return False
        for name in names:
            try:
                described = self.get_json(self.url("management") + f"/models/{name}", api="management")
            except (OSError, urllib.error.URLError, ValueError):
                return False
            workers = described[0].get("workers", [])
            if not any(worker.get("status") == "READY" for worker in workers):
                return False
        return True

    def keys(self) -> dict[str, str]:
        """Return the tokens TorchServe generated: ``{"inference": ..., "management": ..., "API": ...}``."""
        data = json.loads((self.workdir / "key_file.json").read_text())
        return {api: value["key"] for api, value in data.items()}

    def token(self, api: str = "inference") -> str:
        """Return the bearer token of an API."""
        return self.keys()[api]

    def get_json(self, url: str, api: str | None = None) -> object:
        """GET a JSON document, with the token of ``api`` when given."""
        request = urllib.request.Request(url)  # noqa: S310 - loopback URLs built here
        if api is not None:
            request.add_header("Authorization", f"Bearer {self.token(api)}")
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return json.loads(response.read())

    def frontend_process(self) -> psutil.Process | None:
        """Return the Java frontend (the ``java`` child of the ``torchserve`` launcher), or ``None``."""
        if self.process is None:
            return None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "java" in child.name():
                        return child
        return None

    def worker_processes(self) -> list[psutil.Process]:
        """Return the live Python workers: descendants of the launcher running ``model_service_worker``."""
        if self.process is None:
            return []
        workers = []
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if any("model_service_worker" in part for part in child.cmdline()):
                        workers.append(child)
        return workers

    def worker_pids(self, model: str, status: str = "READY") -> list[int]:
        """Return the PIDs of ``model``'s workers in ``status``, as the management API describes them."""
        described = self.get_json(self.url("management") + f"/models/{model}", api="management")
        workers = described[0].get("workers", [])  # type: ignore[index]
        return [int(w["pid"]) for w in workers if w.get("status") == status and w.get("pid") not in (None, -1)]

    def log_tail(self, lines: int = 60) -> str:
        """Return the last lines of TorchServe's console log."""
        path = self.workdir / "torchserve.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the whole process group, wait until its processes have exited and every port is closed.

        Raises:
            ServerError: when ports are still open after ``timeout`` seconds even after SIGKILL.
        """
        descendants: list[psutil.Process] = []
        if self.process is not None:
            with contextlib.suppress(psutil.Error):
                descendants = psutil.Process(self.process.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout / 2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            self.process = None
        # The JVM can outlive the launcher and its ports; the next start refuses while it runs.
        _, alive = psutil.wait_procs(descendants, timeout=timeout / 2)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=10)
        deadline = time.monotonic() + timeout / 2
        while any(port_open(port) for port in self.ports.values()):
            if time.monotonic() > deadline:
                raise ServerError(f"ports still open after stopping TorchServe: {self.ports}")
            time.sleep(0.2)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if getattr(self, "_tmp", None):
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(model_store: str | Path, models: Sequence[str] = (), **kwargs: object) -> Iterator[TorchServe]:
    """Run TorchServe for the duration of a ``with`` block (always stopped, even on error)."""
    server = TorchServe(Path(model_store), models, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()
