"""Start any engine the way a user does, ``lafam-serve serve ARCHIVE... --engine E``, and talk to it over HTTP.

For the end-to-end tests and the engine benchmark (``benchmarks.engines``). Imports nothing of the project
but :mod:`serving.torchserve`: the command is run as a subprocess (``python -m cli serve``).

One :class:`EngineServer` per engine: a subprocess in its own process group on free loopback ports, with the
exporter of the ``lafam_*`` metrics on its own free port, stopped by SIGTERM (then SIGKILL) and waited for.
The token is the one a client would use: TorchServe's generated inference key, or the shared
``LAFAM_TOKEN`` of the KServe and Ray engines.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .torchserve import free_port, port_open

TOKEN = "e2e-shared-token-0123456789abcdef"  # noqa: S105 - the tests' token
ENGINES = ("torchserve", "kserve", "ray")


@dataclass
class EngineServer:
    """``lafam-serve serve`` running one engine.

    Attributes:
        engine: ``torchserve``, ``kserve`` or ``ray``.
        archives: the archives served.
        workdir: the server's folder (logs, TorchServe's key file).
        extra: more command-line arguments (``--replicas 2``, ``--ray-address ...``).
        env: more environment.
    """

    engine: str
    archives: list[Path]
    workdir: Path
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        """The server's output."""
        return self.workdir / "serve.log"

    def start(self, timeout: float = 240.0) -> EngineServer:
        """Start the server and wait until ``/ping`` answers and every archive serves a request."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "cli", "serve", *map(str, self.archives), "--engine", self.engine,
                   "--port", str(self.port), "--workdir", str(self.workdir), *self.extra]  # fmt: skip
        env = {**os.environ, "LAFAM_METRICS_ADDRESS": f"127.0.0.1:{self.metrics_port}", **self.env}
        if self.engine != "torchserve":
            env.setdefault("LAFAM_TOKEN", TOKEN)
        root = Path(__file__).resolve().parents[1]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 - fixed command, no shell
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.engine} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.engine} not ready after {timeout} s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        if not port_open(self.port):
            return False
        try:
            if self.engine == "torchserve":  # its /ping needs the token too
                key_file = self.workdir / "torchserve" / "key_file.json"
                return key_file.exists() and self.call("GET", "/ping")[0] == 200
            if self.call("GET", "/ping", token=False)[0] != 200:
                return False
            return all(self.call("GET", f"/v1/models/{name}", token=False)[0] == 200 for name in self.names())
        except (OSError, http.client.HTTPException, ValueError):
            return False

    def url(self) -> str:
        """The base URL of the inference routes."""
        return f"http://127.0.0.1:{self.port}"

    def names(self) -> list[str]:
        """The served models' names (the archives' stems)."""
        return [Path(a).stem for a in self.archives]

    def token(self) -> str:
        """The bearer token a client sends."""
        if self.engine == "torchserve":
            keys = json.loads((self.workdir / "torchserve" / "key_file.json").read_text())
            return keys["inference"]["key"]
        return TOKEN

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        token: bool | str = True,
        timeout: float = 120.0,
    ) -> tuple[int, Any]:
        """Send one request (no header added but the token); return the status and the parsed JSON body.

        A connection the server drops gives status 0 (TorchServe resets an over-size body).
        """
        all_headers = dict(headers or {})
        if token:
            all_headers["Authorization"] = f"Bearer {token if isinstance(token, str) else self.token()}"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            data = response.read()
        except (ConnectionError, http.client.HTTPException):
            return 0, {}
        finally:
            connection.close()
        try:
            return response.status, json.loads(data) if data else {}
        except ValueError:
            return response.status, {"raw": data[:200].decode("latin-1")}

    def metrics(self) -> str:
        """The text of the ``lafam_*`` exporter."""
        connection = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            connection.request("GET", "/metrics")
            return connection.getresponse().read().decode()
        finally:
            connection.close()

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the server's output."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM the process group, wait, SIGKILL what is left; wait until the port is closed."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + timeout
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.process = None

    def __enter__(self) -> EngineServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
