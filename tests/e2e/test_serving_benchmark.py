"""Smoke test of the served benchmark: ``python -m benchmarks.serving --quick`` end to end.

Builds the four archives of the demo model, serves them from one TorchServe, drives each with locust for
5 s and checks the report: every row present, no errors, positive throughput, the section written
between its markers. Speed targets are not checked here (benchmarks report them; timed tests flake).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's frontend needs Java 11+"),
    pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs the 'bench' extra (locust)"),
]

MODELS = ("ours-onnx", "ours-torchscript", "stock-eager", "stock-torchscript")


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
    runtimes = {(row["runtime"], row["batch"]) for row in results["library"]}
    assert runtimes == {(runtime, batch) for runtime in ("onnx", "torchscript", "eager") for batch in (1, 8)}
    assert all(row["ms"] > 0 and row["ratio"] > 0 for row in results["library"])

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
