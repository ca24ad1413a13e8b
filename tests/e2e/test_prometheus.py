"""End to end: a real Prometheus scrapes a real TorchServe serving the demo archive and answers PromQL.

The scrape config is the shipped ``deploy/prometheus/prometheus.yml`` (with its alert rules) with the
test's free ports and a 1 s interval. Both are always stopped.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from PIL import Image

from demo.run import build_demo_archive
from handlers.metrics import LATENCY_BUCKETS
from serving.torchserve import TorchServe, free_port, port_open, running

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's frontend needs Java 11+"),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs the prometheus binary (Debian: prometheus)"),
]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MODEL = "shapes"
P95 = "histogram_quantile(0.95, sum by (le, model, method) (rate(lafam_explanation_seconds_bucket[1m])))"


def token_lifetime() -> str:
    config_map = yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())
    lines = config_map["data"]["config.properties"].splitlines()
    return next(line.split("=", 1)[1] for line in lines if line.startswith("token_expiration_min="))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    root = tmp_path_factory.mktemp("prometheus-e2e")
    store = root / "model_store"
    build_demo_archive(root, store, backend="onnx", name=MODEL, log=lambda _: None)
    # TorchServe.start points the workers' LAFAM_METRICS_ADDRESS at ports["lafam_metrics"] (a free port) and
    # LAFAM_METRICS_DIR into its workdir; each worker's initialize configures its metrics from them.
    # The Kubernetes ConfigMap's token lifetime, so that the probe test below runs against it.
    config = {"token_expiration_min": token_lifetime()}
    with running(store, [MODEL], workdir=root / "ts", config=config) as instance:
        yield instance


def scrape_config(server: TorchServe, folder: Path) -> Path:
    """deploy/prometheus/prometheus.yml with the server's ports and a 1 s interval, next to its rules."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    ports = {"lafam": server.ports["lafam_metrics"], "torchserve": server.ports["metrics"]}
    for job in config["scrape_configs"]:
        job["static_configs"][0]["targets"] = [f"127.0.0.1:{ports[job['job_name']]}"]
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", folder / "alerts.yml")
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def prometheus(config: Path, folder: Path) -> Iterator[str]:
    """Run Prometheus on a free loopback port; yield its base URL; always kill it."""
    port = free_port()
    command = [
        shutil.which("prometheus") or "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(folder / "prometheus.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    assert not port_open(port)


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:  # loopback
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_for(condition: Callable[[], object], timeout: float, what: str, log: Path) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError, KeyError):
            result = condition()
            if result:
                return result
        time.sleep(0.5)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""
    pytest.fail(f"{what} not within {timeout:.0f} s; Prometheus log:\n{tail}")


def png() -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (128, 128), (240, 240, 240))
    image.paste((200, 30, 30), (30, 30, 90, 90))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def post(server: TorchServe, path: str, data: bytes, **headers: str) -> int:
    request = urllib.request.Request(
        server.url() + path,
        data=data,
        method="POST",
        headers={"Authorization": f"Bearer {server.token()}", "Content-Type": "image/png", **headers},
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # loopback
        return response.status


def send_traffic(server: TorchServe) -> None:
    data = png()
    for _ in range(3):
        assert post(server, f"/predictions/{MODEL}", data) == 200
    assert post(server, f"/explanations/{MODEL}", data, **{"X-LaFAM-Method": "gradcam"}) == 200


def test_prometheus_scrapes_the_server_and_answers_the_explanation_p95(server: TorchServe, tmp_path: Path) -> None:
    log = tmp_path / "prometheus.log"
    with prometheus(scrape_config(server, tmp_path), tmp_path) as base:

        def targets_up() -> bool:
            active = api(base, "/api/v1/targets")["activeTargets"]
            return {t["labels"]["job"] for t in active if t["health"] == "up"} == {"lafam", "torchserve"}

        wait_for(targets_up, 20, "both scrape targets up", log)

        def p95() -> float | None:
            # rate() needs counts that grow between two scrapes of an existing series: keep sending.
            send_traffic(server)
            series = api(base, "/api/v1/query", query=P95)["result"]
            values = {(s["metric"]["model"], s["metric"]["method"]): float(s["value"][1]) for s in series}
            value = values.get((MODEL, "lafam"))
            # Both methods' series, each scraped at least twice; lafam's quantile finite and positive.
            ready = value is not None and math.isfinite(value) and value > 0 and (MODEL, "gradcam") in values
            return value if ready else None

        value = wait_for(p95, 20, "a finite explanation p95 for shapes/lafam (and a gradcam series)", log)
        assert 0 < value <= LATENCY_BUCKETS[-1]  # a quantile lies within the histogram's finite buckets
        # The series the HPA's adapter rule reads (TorchServe's own metrics, no token on 8082).
        for series in ("ts_queue_latency_microseconds", "ts_inference_requests_total"):
            assert api(base, "/api/v1/query", query=f'{series}{{model_name="{MODEL}"}}')["result"], series
        # The shipped alert rules load in a real Prometheus.
        groups = {group["name"] for group in api(base, "/api/v1/rules")["groups"]}
        assert "lafam-serve" in groups


def test_kubernetes_probe_command_pings_with_the_pods_key(server: TorchServe) -> None:
    """The Deployment's exec probe (token from key_file.json, GET /ping) passes against a running server."""
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text())
    command = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    code = (
        command[2].replace("/home/model-server", str(server.workdir)).replace(":8080", f":{server.ports['inference']}")
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    unauthenticated = urllib.request.Request(server.url() + "/ping")
    with pytest.raises(urllib.error.HTTPError):  # why the probe cannot be a plain httpGet
        urllib.request.urlopen(unauthenticated, timeout=5)
