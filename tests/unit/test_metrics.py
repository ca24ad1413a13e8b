"""Metrics: declared once, recorded without ever failing a request, served by one competing exporter."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from handlers import metrics

ROOT = Path(__file__).resolve().parents[2]


def scrape() -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(metrics.render().decode())}


def sample(name: str, **labels: str) -> float:
    """The value of one sample in the rendered text, 0.0 when absent."""
    for family in text_string_to_metric_families(metrics.render().decode()):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return 0.0


def unique_model() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# parse_address


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        (" 0.0.0.0:8083 ", ("0.0.0.0", 8083)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:9000", ("::1", 9000)),
        (":9000", ("127.0.0.1", 9000)),
        ("host:65535", ("host", 65535)),
        ("off", None),
        ("OFF", None),
        ("none", None),
        ("false", None),
        ("0", None),
        ("", None),
        ("   ", None),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int] | None) -> None:
    assert metrics.parse_address(address) == expected


@pytest.mark.parametrize(
    "address", ["localhost", "9000x", "host:", "host:0", "host:65536", "host:http", "[::1]", "h:-1"]
)
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError, match="LAFAM_METRICS_ADDRESS must be host:port or 'off'"):
        metrics.parse_address(address)


# declarations


def test_latency_buckets_resolve_sub_millisecond_and_reach_ten_seconds() -> None:
    buckets = metrics.LATENCY_BUCKETS
    assert list(buckets) == sorted(buckets)
    assert buckets[0] <= 0.0001
    assert sum(bound < 0.001 for bound in buckets) >= 3
    assert buckets[-1] == 10.0


def test_every_metric_is_declared_once_and_in_no_default_registry() -> None:
    declared = [value for value in vars(metrics).values() if isinstance(value, Histogram | Counter)]
    assert sorted(map(id, metrics.DECLARED)) == sorted(map(id, declared))
    names = {family.name for family in REGISTRY.collect()}
    assert not {family.name for metric in declared for family in metric.describe()} & names


def test_histograms_use_the_latency_buckets() -> None:
    model = unique_model()
    metrics.observe(metrics.EXPLANATION_SECONDS, 0.00003, model=model, method="lafam")
    family = scrape()["lafam_explanation_seconds"]
    bounds = {
        found.labels["le"]
        for found in family.samples
        if found.name.endswith("_bucket") and found.labels.get("model") == model
    }
    assert bounds == {str(bound) for bound in metrics.LATENCY_BUCKETS} | {"+Inf"}
    assert sample("lafam_explanation_seconds_bucket", model=model, method="lafam", le="5e-05") == 1.0


def test_render_parses_and_declares_every_metric() -> None:
    model = unique_model()
    metrics.observe(metrics.EXPLANATION_SECONDS, 0.0002, model=model, method="lafam")
    metrics.observe(metrics.INFERENCE_SECONDS, 0.01, model=model, backend="onnx")
    metrics.observe(metrics.PREPROCESS_SECONDS, 0.001, model=model)
    metrics.observe(metrics.BATCH_SIZE, 3, model=model)
    metrics.count(metrics.REQUESTS, model=model, status="2xx")
    metrics.count(metrics.EXPLANATIONS, model=model, method="lafam")
    metrics.count(metrics.ERRORS, model=model, code="invalid_image")
    families = scrape()
    for name in (
        "lafam_explanation_seconds",
        "lafam_inference_seconds",
        "lafam_preprocess_seconds",
        "lafam_batch_size",
    ):
        assert families[name].type == "histogram", name
    for name in ("lafam_requests", "lafam_explanations", "lafam_errors"):
        assert families[name].type == "counter", name
    assert sample("lafam_explanation_seconds_count", model=model, method="lafam") == 1.0
    assert sample("lafam_explanation_seconds_sum", model=model, method="lafam") == pytest.approx(0.0002, abs=1e-12)
    assert sample("lafam_errors_total", model=model, code="invalid_image") == 1.0


# recording never raises


def test_observe_and_count_with_wrong_labels_log_instead_of_raising(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="handlers.metrics"):
        metrics.observe(metrics.EXPLANATION_SECONDS, 0.1, model="m")  # method missing
        metrics.observe(metrics.EXPLANATION_SECONDS, 0.1, model="m", method="lafam", extra="x")
        metrics.observe(metrics.EXPLANATION_SECONDS, "slow", model="m", method="lafam")  # type: ignore[arg-type]
        metrics.count(metrics.ERRORS, model="m", bogus="x")
        metrics.count(metrics.ERRORS, -1.0, model="m", code="x")  # counters only go up
    failures = [record for record in caplog.records if record.getMessage().startswith("could not record")]
    assert len(failures) == 5
    assert all(record.exc_info for record in failures)


def test_count_adds_the_amount() -> None:
    model = unique_model()
    metrics.count(metrics.EXPLANATIONS, model=model, method="lafam")
    metrics.count(metrics.EXPLANATIONS, 2, model=model, method="lafam")
    assert sample("lafam_explanations_total", model=model, method="lafam") == 3.0


def test_timed_records_the_block() -> None:
    model = unique_model()
    with metrics.timed(metrics.PREPROCESS_SECONDS, model=model):
        time.sleep(0.01)
    assert sample("lafam_preprocess_seconds_count", model=model) == 1.0
    assert 0.01 <= sample("lafam_preprocess_seconds_sum", model=model) < 5.0  # generous: a shared CPU


def test_timed_records_even_when_the_block_raises() -> None:
    model = unique_model()
    with pytest.raises(RuntimeError, match="boom"), metrics.timed(metrics.EXPLANATION_SECONDS, model=model, method="x"):
        raise RuntimeError("boom")
    assert sample("lafam_explanation_seconds_count", model=model, method="x") == 1.0


def test_timed_with_wrong_labels_does_not_mask_the_block(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="handlers.metrics"), metrics.timed(metrics.PREPROCESS_SECONDS):
        result = 1 + 1
    assert result == 2
    assert any("could not record" in record.getMessage() for record in caplog.records)


def test_metrics_go_to_the_configured_folder(metrics_folder: metrics.Configuration) -> None:
    assert metrics.configuration() == metrics_folder
    assert str(metrics_folder.directory) == os.environ["PROMETHEUS_MULTIPROC_DIR"]
    metrics.count(metrics.ERRORS, model=unique_model(), code="x")
    assert list(metrics_folder.directory.glob("counter_*.db"))


# configure


def test_configure_again_keeps_the_configuration(metrics_folder: metrics.Configuration) -> None:
    assert metrics.configure() == metrics_folder  # what a handler's initialize does in every test
    assert metrics.configure(metrics_folder.directory, address="off") == metrics_folder
    assert metrics.configure(str(metrics_folder.directory)) == metrics_folder
    assert metrics.configure(address="none") == metrics_folder  # another spelling of off


def test_configure_refuses_to_move(metrics_folder: metrics.Configuration, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already configured"):
        metrics.configure(tmp_path)
    with pytest.raises(ValueError, match="already configured"):
        metrics.configure(address="127.0.0.1:9")
    with pytest.raises(ValueError, match="LAFAM_METRICS_ADDRESS must be host:port"):
        metrics.configure(address="nonsense")
    assert metrics.configuration() == metrics_folder


def fresh_environment(temp: Path, **env: str) -> dict[str, str]:
    """This process's environment without the metrics variables, ``temp`` as temp dir, plus ``env``."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("LAFAM_METRICS_", "PROMETHEUS_MULTIPROC_DIR"))}
    return {**kept, "TMPDIR": str(temp), **env}


def run_fresh(code: str, tmp_path: Path, **env: str) -> Any:
    """Run ``code`` in a fresh interpreter with :func:`fresh_environment` and an empty temp dir; return its
    last printed line, parsed as JSON."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=fresh_environment(temp, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


UNCONFIGURED = """
    import json, os, tempfile
    import prometheus_client
    from prometheus_client import values
    environ, storage = dict(os.environ), values.ValueClass
    from handlers import metrics

    def total():
        return metrics.registry().get_sample_value("lafam_errors_total", {"model": "m", "code": "x"})

    metrics.count(metrics.ERRORS, model="m", code="x")
    with metrics.timed(metrics.EXPLANATION_SECONDS, model="m", method="lafam"):
        pass
    before = {
        "total": total(),
        "rendered": b'lafam_errors_total{code="x",model="m"} 1.0' in metrics.render(),
        "environ": dict(os.environ) == environ,
        "storage": values.ValueClass is storage is values.MutexValue,
        "default_registry": [m.name for m in prometheus_client.REGISTRY.collect() if m.name.startswith("lafam")],
        "temp": os.listdir(tempfile.gettempdir()),
        "configuration": metrics.configuration(),
    }
    folder = os.path.join(tempfile.gettempdir(), "metrics")
    configured = metrics.configure(folder, address="off")
    after_first = total()
    metrics.count(metrics.ERRORS, model="m", code="x")
    print(json.dumps({
        "before": before,
        "after_first": after_first,
        "after_second": total(),
        "again": metrics.configure() == configured,
        "environ": os.environ["PROMETHEUS_MULTIPROC_DIR"] == folder == str(configured.directory),
        "files": sorted(name.split("_")[0] for name in os.listdir(folder)),
        "exporter_started": metrics.start_exporter(),
    }))
"""


def test_before_configure_metrics_stay_in_memory_then_go_to_the_folder(tmp_path: Path) -> None:
    found = run_fresh(UNCONFIGURED, tmp_path)
    before = found["before"]
    assert before["total"] == 1.0  # recorded and rendered in process memory ...
    assert before["rendered"]
    assert before["environ"]  # ... with no variable set, no storage switched, no registry touched, no file
    assert before["storage"]
    assert before["default_registry"] == []
    assert before["temp"] == []
    assert before["configuration"] is None
    assert found["after_first"] is None  # configure drops what was recorded in memory ...
    assert found["after_second"] == 1.0  # ... and records into the folder from then on
    assert found["again"]
    assert found["environ"]
    assert found["files"] == ["counter"]  # the histogram's only value was recorded before
    assert found["exporter_started"] is False  # address "off"


def test_configure_reads_the_environment_once(tmp_path: Path) -> None:
    code = """
        import json, os
        from handlers import metrics
        first = metrics.configure()
        os.environ["LAFAM_METRICS_DIR"] = os.environ["LAFAM_METRICS_ADDRESS"] = "ignored"
        print(json.dumps({"first": [str(first.directory), first.exporter], "again": metrics.configure() == first}))
    """
    folder = tmp_path / "from-env"
    found = run_fresh(code, tmp_path, LAFAM_METRICS_DIR=str(folder), LAFAM_METRICS_ADDRESS="127.0.0.1:9")
    assert found == {"first": [str(folder), ["127.0.0.1", 9]], "again": True}
    assert folder.is_dir()


def test_configure_defaults_to_a_folder_per_frontend_in_the_temp_dir(tmp_path: Path) -> None:
    code = """
        import json, os, tempfile
        from handlers import metrics
        configured = metrics.configure()
        expected = os.path.join(tempfile.gettempdir(), f"lafam-serve-metrics-{os.getppid()}")
        print(json.dumps({"folder": str(configured.directory) == expected, "exporter": configured.exporter}))
    """
    assert run_fresh(code, tmp_path) == {"folder": True, "exporter": ["127.0.0.1", 8083]}


# exporter


@pytest.fixture
def servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Record every exporter server started, and shut them all down after the test."""
    started: list[Any] = []
    real = metrics.start_http_server

    def recording(*args: Any, **kwargs: Any) -> Any:
        server, thread = real(*args, **kwargs)
        started.append(server)
        return server, thread

    monkeypatch.setattr(metrics, "start_http_server", recording)
    yield started
    for server in started:
        server.shutdown()
        server.server_close()


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def serve_in_thread(port: int, retry_seconds: float) -> threading.Thread:
    thread = threading.Thread(target=metrics._serve_when_free, args=(("127.0.0.1", port), retry_seconds), daemon=True)
    thread.start()
    return thread


def test_exporter_serves_every_metric_over_http(servers: list[Any]) -> None:
    model = unique_model()
    metrics.count(metrics.ERRORS, model=model, code="empty_body")
    port = free_port()
    thread = serve_in_thread(port, retry_seconds=0.05)
    thread.join(timeout=5)
    assert not thread.is_alive()  # bound at once, then returned; the server runs in its own thread
    text = get(port)
    assert "# TYPE lafam_explanation_seconds histogram" in text
    assert f'lafam_errors_total{{code="empty_body",model="{model}"}} 1.0' in text


def test_a_competitor_waits_without_raising_and_takes_over(servers: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    crashes: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    port = free_port()
    serve_in_thread(port, retry_seconds=0.05).join(timeout=5)
    assert len(servers) == 1

    competitor = serve_in_thread(port, retry_seconds=0.05)
    time.sleep(0.3)  # several failed binds
    assert competitor.is_alive()
    assert crashes == []
    assert len(servers) == 1
    get(port)

    servers[0].shutdown()  # the serving worker goes away ...
    servers[0].server_close()
    competitor.join(timeout=5)  # ... and the competitor binds within a retry
    assert not competitor.is_alive()
    assert crashes == []
    assert len(servers) == 2
    assert "lafam_explanation_seconds" in get(port)


def test_start_exporter_is_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(metrics, "_exporter_threads", [])
    monkeypatch.setattr(metrics, "_serve_when_free", lambda *args: calls.append(args))
    assert metrics.start_exporter("127.0.0.1:9") is True
    metrics._exporter_threads[0].join(timeout=5)
    assert metrics.start_exporter("127.0.0.1:9") is False
    assert calls == [(("127.0.0.1", 9), metrics.RETRY_SECONDS)]


def test_start_exporter_uses_the_configured_address(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(metrics, "_exporter_threads", [])
    monkeypatch.setattr(metrics, "_serve_when_free", lambda *args: calls.append(args))
    monkeypatch.setenv("LAFAM_METRICS_ADDRESS", "127.0.0.1:9")  # not read once configured
    assert metrics.start_exporter() is False  # the suite's configuration: off
    monkeypatch.setattr(metrics, "_configured", [metrics.Configuration(Path("unused"), ("127.0.0.1", 10))])
    assert metrics.start_exporter(retry_seconds=0.1) is True
    metrics._exporter_threads[0].join(timeout=5)
    assert calls == [(("127.0.0.1", 10), 0.1)]


def test_start_exporter_off_and_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_exporter_threads", [])
    monkeypatch.setattr(metrics, "_serve_when_free", lambda *args: None)
    monkeypatch.setattr(metrics, "_configured", [])  # not configured: the environment decides
    assert metrics.start_exporter("off") is False
    monkeypatch.setenv("LAFAM_METRICS_ADDRESS", "off")
    assert metrics.start_exporter() is False
    assert metrics._exporter_threads == []
    monkeypatch.setenv("LAFAM_METRICS_ADDRESS", "nonsense")
    with pytest.raises(ValueError, match="LAFAM_METRICS_ADDRESS must be host:port"):
        metrics.start_exporter()


def test_later_runs_in_order_on_one_thread_and_settle_waits_for_it(caplog: pytest.LogCaptureFixture) -> None:
    """What a request hands to metrics.later runs after it, in order, off the caller's thread; failures are logged."""
    ran: list[tuple[int, str]] = []
    release = threading.Event()
    metrics.later(release.wait, 10)  # hold the thread: nothing below may run on the caller's
    for index in range(50):
        metrics.later(lambda i: ran.append((i, threading.current_thread().name)), index)

    def broken() -> None:
        raise RuntimeError("recording broke")

    with caplog.at_level(logging.ERROR, logger="handlers.metrics"):
        metrics.later(broken)
        metrics.later(ran.append, (50, "after the failure"))
        assert ran == []  # the caller did not wait
        release.set()
        assert metrics.settle()
    assert [index for index, _ in ran] == list(range(51))
    assert {name for _, name in ran[:50]} == {"lafam-metrics-writer"}
    assert any(record.getMessage() == "deferred metrics recording failed" for record in caplog.records)


def test_render_shows_what_was_handed_to_later() -> None:
    model = unique_model()
    metrics.later(lambda: metrics.count(metrics.EXPLANATIONS, model=model, method="lafam"))
    assert sample("lafam_explanations_total", model=model, method="lafam") == 1.0


def test_what_is_handed_to_later_runs_before_the_process_exits() -> None:
    """At exit the metrics thread runs its queue and ends before the interpreter is torn down under it (a daemon
    thread caught inside a torch call aborted the process: "terminate called without an active exception")."""
    code = textwrap.dedent(
        """
        import time
        import torch
        from handlers import metrics
        metrics.later(lambda: (time.sleep(0.3), torch.ones(64, 64).double().sum(), print("recorded", flush=True)))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "recorded"
