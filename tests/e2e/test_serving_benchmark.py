"""Smoke test of the served benchmark: ``python -m benchmarks.serving --quick`` end to end.

Builds the four archives of the demo model, serves them from one TorchServe, drives each with locust for
5 s and checks the report: every row present, no errors, positive throughput, the section written
between its markers. Speed targets are not checked here (benchmarks report them; timed tests flake).

The pure parts (forward bound, CPU accounting, the handler's stage split, the report) are unit-tested here too,
on made-up numbers, without Java or locust.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import psutil
import pytest
from torch import nn

from benchmarks import serving
from benchmarks.serving import CpuSample

MODELS = ("ours-onnx", "ours-torchscript", "stock-eager", "stock-torchscript")
CPU_KEYS = ("cpu_loadgen", "cpu_frontend", "cpu_workers", "cpu_other")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's frontend needs Java 11+")
@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs the 'bench' extra (locust)")
def test_quick_run_reports_every_model(tmp_path: Path) -> None:
    from benchmarks.serving import END_MARKER, START_MARKER, main

    results_file = tmp_path / "RESULTS.md"
    results_file.write_text("# Benchmark results\n\nkept as it is\n")
    results = main(["--quick", "--write", str(results_file)])

    assert list(results["served"]) == list(MODELS)
    for name, row in results["served"].items():
        assert row["errors"] == 0, name
        assert row["locust_failures"] == 0, name
        assert row["requests"] > 0, name
        assert row["rps"] > 0, name
        assert 0 < row["p50"] <= row["p95"] <= row["p99"], name
        assert row["bound_rps"] > 0, name
        assert row["bound_share"] == pytest.approx(100 * row["rps"] / row["bound_rps"]), name
        assert row["cpu_window_s"] > 0, name
        for key in CPU_KEYS:
            assert math.isfinite(row[key]), (name, key)
        assert row["cpu_workers"] > 0, name
        assert row["cpu_frontend"] > 0, name
        assert row["worker_cpu_ms_per_request"] > 0, name
        assert row["loadgen_cpu_s"] > 0, name
        assert bool(row["breakdown"]) is name.startswith("ours"), name
    alone = [row for row in results["library"] if "backend" not in row]
    runtimes = {(row["runtime"], row["batch"]) for row in alone}
    assert runtimes == {(runtime, batch) for runtime in ("onnx", "torchscript", "eager") for batch in (1, 8)}
    assert all(row["ms"] > 0 and row["ratio"] > 0 for row in alone)
    side_by_side = [row for row in results["library"] if "backend" in row]  # the default 2 workers x 1 thread
    assert {row["backend"] for row in side_by_side} == {"onnx", "torchscript"}
    assert all(row["ms"] > 0 and row["images"] == 16 and row["batch"] == 8 for row in side_by_side)

    text = results_file.read_text()
    assert text.startswith("# Benchmark results\n\nkept as it is\n")
    assert text.count(START_MARKER) == 1
    assert text.count(END_MARKER) == 1
    body = text[text.index(START_MARKER) : text.index(END_MARKER)]
    for name in MODELS:
        assert f"| {name} |" in body
    for runtime in ("onnx", "torchscript", "eager"):
        assert f"| {runtime} | 1 |" in body
        assert f"| {runtime} | 8 |" in body
    for column in ("% of forward bound", "CPU: load gen %", "CPU: other %", "worker CPU ms / req"):
        assert column in body


# --- the pure parts, on made-up numbers ---


def test_forward_bound_uses_the_runtime_each_model_runs_on() -> None:
    library = [
        {"runtime": "onnx", "batch": 1, "ms": 1.0, "ratio": 0.5},
        {"runtime": "onnx", "batch": 8, "ms": 4.0, "ratio": 0.5},
        {"runtime": "torchscript", "batch": 8, "ms": 5.0, "ratio": 0.6},
        {"runtime": "eager", "batch": 8, "ms": 8.0, "ratio": 1.0},
    ]
    bounds = serving.forward_bounds(library, batch=8)
    assert bounds == pytest.approx({"onnx": 2000.0, "torchscript": 1600.0, "eager": 1000.0})
    fields = serving.bound_fields("ours-onnx", 500.0, bounds, {"onnx": 1000.0})
    assert fields == pytest.approx({"bound_rps": 2000.0, "bound_share": 25.0, "alone_share": 50.0})
    assert serving.bound_fields("ours-torchscript", 400.0, bounds)["bound_rps"] == pytest.approx(1600.0)
    stock = serving.bound_fields("stock-eager", 100.0, bounds)
    assert stock["bound_rps"] == pytest.approx(1000.0)
    assert stock["bound_share"] == pytest.approx(10.0)
    assert math.isnan(stock["alone_share"])  # no one-session bounds given
    assert serving.bound_fields("stock-torchscript", 160.0, bounds)["bound_share"] == pytest.approx(10.0)
    unknown = serving.bound_fields("something-else", 1.0, bounds)
    assert math.isnan(unknown["bound_rps"])
    assert math.isnan(unknown["bound_share"])


def test_forward_bound_is_the_faster_of_one_session_and_sessions_side_by_side() -> None:
    library = [
        {"runtime": "onnx", "batch": 8, "ms": 4.0, "ratio": 0.5},
        {"runtime": "torchscript", "batch": 8, "ms": 5.0, "ratio": 0.6},
        {"runtime": "onnx x2", "backend": "onnx", "batch": 8, "images": 16, "ms": 6.0, "ratio": math.nan},
        {"runtime": "ts x2", "backend": "torchscript", "batch": 8, "images": 16, "ms": 12.0, "ratio": math.nan},
    ]
    bounds = serving.forward_bounds(library, batch=8)
    # onnx: 16 images in 6 ms side by side beat 8 in 4 ms alone; torchscript: 8 in 5 ms alone beat 16 in 12 ms
    assert bounds == pytest.approx({"onnx": 16 / 0.006, "torchscript": 1600.0})


def test_busy_seconds_tolerates_platform_fields() -> None:
    linux = namedtuple("linux", "user nice system idle iowait irq softirq steal guest guest_nice")
    times = linux(10.0, 1.0, 4.0, 100.0, 3.0, 0.5, 0.5, 7.0, 2.0, 0.0)
    assert serving.busy_seconds(times) == pytest.approx(16.0)  # idle, iowait, steal out; guest is inside user
    mac = namedtuple("mac", "user nice system idle")
    assert serving.busy_seconds(mac(1.0, 0.5, 2.0, 9.0)) == pytest.approx(3.5)
    windows = namedtuple("windows", "user system idle interrupt dpc")
    assert serving.busy_seconds(windows(1.0, 2.0, 9.0, 0.25, 0.25)) == pytest.approx(3.5)


def test_process_seconds_tolerates_missing_fields_and_gone_processes() -> None:
    with_children = namedtuple("full", "user system children_user children_system iowait")
    without = namedtuple("bare", "user system")

    class Fake:
        def __init__(self, times: object) -> None:
            self.times = times

        def cpu_times(self) -> object:
            if self.times is None:
                raise psutil.NoSuchProcess(1)
            return self.times

    full = Fake(with_children(1.0, 0.5, 2.0, 0.25, 9.0))
    assert serving.process_seconds(full) == pytest.approx(1.5)  # type: ignore[arg-type]
    assert serving.process_seconds(full, children=True) == pytest.approx(3.75)  # type: ignore[arg-type]
    assert serving.process_seconds(Fake(without(1.0, 1.0)), children=True) == pytest.approx(2.0)  # type: ignore[arg-type]
    assert serving.process_seconds(Fake(None)) is None  # type: ignore[arg-type]


def _sample(at: float, machine: float, **groups: dict[tuple[int, float], float]) -> CpuSample:
    return CpuSample(at=at, machine=machine, groups={group: groups.get(group, {}) for group in serving.CPU_GROUPS})


def test_group_seconds_follows_processes_that_come_and_go() -> None:
    old, dies, restarted, missed = (1, 0.0), (2, 0.0), (3, 105.0), (4, 50.0)
    samples = [
        _sample(100.0, 0.0, workers={old: 10.0, dies: 5.0}),
        _sample(110.0, 0.0, workers={old: 12.0, dies: 6.0, restarted: 1.5, missed: 40.0}),
        _sample(120.0, 0.0, workers={old: 15.0, restarted: 3.0, missed: 41.0}),
    ]
    # old 15 - 10, dies 6 - 5 (its last look), restarted counted from 0 (created inside), missed from its first look
    assert serving.group_seconds(samples, "workers") == pytest.approx(5.0 + 1.0 + 3.0 + 1.0)
    assert serving.group_seconds(samples, "frontend") == 0.0
    assert math.isnan(serving.group_seconds(samples[:1], "workers"))


def test_cpu_accounting_shares_of_the_machine_over_the_load_window() -> None:
    locust, java, worker = (10, 0.0), (20, 0.0), (30, 0.0)
    samples = [
        _sample(99.0, 0.0, loadgen={locust: 0.0}, frontend={java: 0.0}, workers={worker: 0.0}),  # before load
        _sample(100.5, 1.0, loadgen={locust: 0.5}, frontend={java: 1.0}, workers={worker: 2.0}),
        _sample(105.5, 2.0, loadgen={locust: 0.7}, frontend={java: 1.2}, workers={worker: 2.4}),
        _sample(110.5, 11.0, loadgen={locust: 1.5}, frontend={java: 2.0}, workers={worker: 6.0}),
        _sample(112.0, 99.0, loadgen={locust: 9.0}, frontend={java: 9.0}, workers={worker: 9.0}),  # after load
    ]
    ends = [100.4, 101.0, 105.0, 110.0, 110.5, 111.0]  # four finish inside (100.5, 110.5]
    shares = serving.cpu_accounting(samples, first_start=100.0, last_end=111.0, ends=ends, cpus=2)
    assert shares["cpu_window_s"] == pytest.approx(10.0)
    capacity = 10.0 * 2
    assert shares["cpu_loadgen"] == pytest.approx(100 * 1.0 / capacity)
    assert shares["cpu_frontend"] == pytest.approx(100 * 1.0 / capacity)
    assert shares["cpu_workers"] == pytest.approx(100 * 4.0 / capacity)
    assert shares["cpu_other"] == pytest.approx(100 * (10.0 - 6.0) / capacity)
    assert shares["worker_cpu_ms_per_request"] == pytest.approx(1e3 * 4.0 / 4)

    too_short = serving.cpu_accounting(samples, first_start=100.0, last_end=101.0, ends=ends, cpus=2)
    assert all(math.isnan(value) for value in too_short.values())


def test_cpu_sampler_follows_the_load_generators_tree() -> None:
    class NoServer:
        process = None

    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", burn])
    sampler = serving.CpuSampler(NoServer(), child.pid, interval=0.05).start()  # type: ignore[arg-type]
    child.wait(timeout=60)
    samples = sampler.stop()
    assert len(samples) >= 2
    assert all(not taken.groups["frontend"] and not taken.groups["workers"] for taken in samples)
    assert max(max(taken.groups["loadgen"].values(), default=0.0) for taken in samples) > 0.1
    assert samples[-1].machine >= samples[0].machine


METRICS_TEXT = """\
# HELP lafam_batch_size Requests per batch handed to the worker by TorchServe.
# TYPE lafam_batch_size histogram
lafam_batch_size_bucket{le="8.0",model="shapes"} 3.0
lafam_batch_size_bucket{le="+Inf",model="shapes"} 3.0
lafam_batch_size_count{model="shapes"} 3.0
lafam_batch_size_sum{model="shapes"} 12.0
# HELP lafam_inference_seconds Time of one batched forward pass, in seconds.
# TYPE lafam_inference_seconds histogram
lafam_inference_seconds_count{backend="onnx",model="shapes"} 2.0
lafam_inference_seconds_sum{backend="onnx",model="shapes"} 0.5
lafam_inference_seconds_count{backend="torchscript",model="shapes"} 1.0
lafam_inference_seconds_sum{backend="torchscript",model="shapes"} 0.25
# HELP lafam_requests_total Requests handled, by HTTP status class.
# TYPE lafam_requests_total counter
lafam_requests_total{model="shapes",status="2xx"} 12.0
"""


def test_parse_lafam_totals_sums_over_labels() -> None:
    totals = serving.parse_lafam_totals(METRICS_TEXT)
    assert totals == pytest.approx(
        {
            "lafam_batch_size_count": 3.0,
            "lafam_batch_size_sum": 12.0,
            "lafam_inference_seconds_count": 3.0,
            "lafam_inference_seconds_sum": 0.75,
        }
    )


def test_time_breakdown_is_the_stage_share_of_the_window() -> None:
    before = {"lafam_batch_size_count": 10.0, "lafam_batch_size_sum": 40.0, "lafam_inference_seconds_sum": 1.0}
    after = {
        "lafam_batch_size_count": 30.0,
        "lafam_batch_size_sum": 160.0,
        "lafam_inference_seconds_count": 20.0,
        "lafam_inference_seconds_sum": 3.0,
        "lafam_preprocess_seconds_sum": 0.5,
        "lafam_explanation_seconds_sum": 0.25,
    }
    split = serving.time_breakdown(before, after, window=5.0)
    assert split["batches"] == 20.0
    assert split["mean_batch"] == pytest.approx(6.0)
    assert split["forward_ms_per_batch"] == pytest.approx(100.0)
    assert split["inference_share"] == pytest.approx(40.0)
    assert split["preprocess_share"] == pytest.approx(10.0)
    assert split["explanation_share"] == pytest.approx(5.0)
    assert split["rest_share"] == pytest.approx(45.0)
    assert serving.time_breakdown(after, after, window=5.0) == {}  # no batch in the window (the stock handler)
    assert serving.time_breakdown({}, {}, window=5.0) == {}


def _row(rps: float, **extra: object) -> dict:
    row = {"requests": 100, "errors": 0, "rps": rps, "p50": 10.0, "p95": 20.0, "p99": 30.0, "breakdown": {}}
    return row | extra


def test_render_has_the_bound_and_cpu_columns() -> None:
    args = argparse.Namespace(model="shapes", duration=5, users=2, rounds=5, workers=2, threads=1)
    built = serving.Built(
        store=Path("."), kinds={name: name.upper() for name in MODELS}, folders={}, eager=nn.Identity()
    )
    cpu = {"cpu_loadgen": 3.0, "cpu_frontend": 11.0, "cpu_workers": 40.0, "cpu_other": 6.0}
    breakdown = {
        "batches": 92.0,
        "mean_batch": 1.99,
        "forward_ms_per_batch": 2.2,
        "preprocess_share": 5.0,
        "inference_share": 6.0,
        "explanation_share": 4.0,
        "rest_share": 85.0,
    }
    served = {
        "ours-onnx": _row(40.0, bound_rps=1600.0, bound_share=2.5, worker_cpu_ms_per_request=16.6, **cpu)
        | {"breakdown": breakdown},
        "ours-torchscript": _row(30.0, bound_rps=1200.0, bound_share=2.5, worker_cpu_ms_per_request=20.0, **cpu),
        "stock-eager": _row(20.0, bound_rps=float("nan"), bound_share=float("nan"), **cpu),
        "stock-torchscript": _row(25.0),  # no bound, no CPU figures: n/a
    }
    library = [{"runtime": "onnx", "batch": 8, "ms": 5.0, "ratio": 0.7}]
    text = serving.render(args, serving.MODELS["shapes"], built, served, library)

    header = next(line for line in text.splitlines() if line.startswith("| model | what |"))
    for column in (
        "| req/s ÷ stock |",
        "| forward bound req/s | % of forward bound |",
        "| CPU: load gen % | CPU: frontend % | CPU: workers % | CPU: other % | worker CPU ms / req |",
    ):
        assert column in header
    rows = {
        name: next(line for line in text.splitlines() if line.startswith(f"| {name} | {built.kinds[name]} |"))
        for name in MODELS
    }
    assert "| 1600.0 | 2.5 | n/a | 3 | 11 | 40 | 6 | 16.6 |" in rows["ours-onnx"]
    assert rows["stock-eager"].endswith("| 30.0 | 1.00 | 1.00 | n/a | n/a | n/a | 3 | 11 | 40 | 6 | n/a |")
    assert rows["stock-torchscript"].endswith("| n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
    assert header.count("|") == rows["ours-onnx"].count("|")
    assert "Forward bound = images / (median library-level forward time at batch 8" in text
    assert "2 worker(s) of 1 compute thread(s) each" in text
    assert "| ours-onnx | 92 | 1.99 | 2.2 | 5 | 6 | 4 | 85 |" in text
    assert "| ours-torchscript | " not in text.split("Where the worker's time goes")[1].split("Backend comparison")[0]
    assert "| onnx | 8 | 5.0 | 0.70 |" in text
    assert serving.START_MARKER not in text


def test_render_leaves_out_the_breakdown_when_nothing_recorded_it() -> None:
    args = argparse.Namespace(model="shapes", duration=5, users=2, rounds=5, workers=2, threads=1)
    built = serving.Built(store=Path("."), kinds={name: name for name in MODELS}, folders={}, eager=nn.Identity())
    text = serving.render(args, serving.MODELS["shapes"], built, {name: _row(10.0) for name in MODELS}, [])
    assert "Where the worker's time goes" not in text
