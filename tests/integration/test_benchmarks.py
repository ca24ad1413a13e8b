"""The explanation-cost benchmark runs end to end (``--quick``) and writes only its own results section."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import architectures, distribution_quality, explain_speed
from benchmarks._report import replace_section, section

OTHER = "<!-- lafam-overhead -->\n## LaFAM overhead\n\n| a |\n|---|\n| 1 |\n<!-- lafam-overhead -->\n"


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """The benchmarks set torch's thread count: put it back after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _cells(text: str, row: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.startswith(f"| {row} |")]
    assert len(lines) == 1, f"row {row!r} appears {len(lines)} times"
    return [cell.strip() for cell in lines[0].strip("|").split("|")][1:]


def _ratio(cell: str) -> float:
    """The figure a cell starts with (``2.97 ✓ (target ≤ 3)``, ``9.24 wrong †``, ``1.05 ✓``)."""
    return float(cell.split(maxsplit=1)[0])


@pytest.mark.slow
def test_quick_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str], torch_threads: None) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n" + OTHER + "\nkept prose\n")
    assert explain_speed.main(["--quick", "--write", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n" + OTHER + "\nkept prose\n")
    assert text.count(explain_speed.START_MARKER) == 1
    assert text.count(explain_speed.END_MARKER) == 1
    mine = text[text.index(explain_speed.START_MARKER) : text.index(explain_speed.END_MARKER)]
    assert "batch 1" in mine
    assert "torch threads 1;" in mine  # --quick runs on one thread
    resnet, effnet, convnext = explain_speed.ARCHS
    assert f"| {resnet} (`layer4`) | {effnet} (`features`) | {convnext} (`features`) |" in mine

    one_class = mine[: mine.index("Conservation, ")]
    balance = mine[mine.index("Conservation, ") : mine.index("Attribution distributions")]
    single = {
        row: dict(zip(explain_speed.ARCHS, _cells(one_class, row), strict=True)) for row in explain_speed.SINGLE_ROWS
    }
    for arch in explain_speed.ARCHS:
        assert 0 < float(single[explain_speed.FORWARD][arch]) < math.inf  # ms
        for row in explain_speed.SINGLE_ROWS[1:]:
            if row == explain_speed.CAPTUM and arch != resnet:
                continue
            assert 0 < _ratio(single[row][arch]) < math.inf, (row, arch)
        target = explain_speed.LRP_TARGETS[arch]
        for row in (explain_speed.LRP_FREE, explain_speed.LRP_CLASS):
            assert single[row][arch].endswith(f"(target ≤ {target:g})"), (row, arch)
    # zennit: ResNetCanonizer on ResNet-50; no canonizer elsewhere, so flagged wrong.
    assert "wrong" not in single[explain_speed.ZENNIT][resnet]
    assert single[explain_speed.ZENNIT][effnet].endswith("wrong †")
    assert single[explain_speed.ZENNIT][convnext].endswith("wrong †")
    # captum: runs on ResNet-50 (wrong residuals); refuses the others with its exact error in the cell.
    assert single[explain_speed.CAPTUM][resnet].endswith("wrong ‡")
    assert single[explain_speed.CAPTUM][effnet].startswith("not run: `TypeError: Module of type <class 'torch.nn.")
    assert "SiLU" in single[explain_speed.CAPTUM][effnet]
    assert "LayerNorm2d" in single[explain_speed.CAPTUM][convnext]

    conservation = {
        row: dict(zip(explain_speed.ARCHS, _cells(balance, row), strict=True))
        for row in explain_speed.CONSERVATION_ROWS
    }
    for arch in explain_speed.ARCHS:  # ours conserves (ConvNeXt label-free: a few % of signed-sum cancellation)
        assert abs(float(conservation[explain_speed.LRP_CLASS][arch]) - 1) < 0.01, arch
        assert abs(float(conservation[explain_speed.LRP_FREE][arch]) - 1) < 0.1, arch
    assert abs(float(conservation[explain_speed.ZENNIT][resnet]) - 1) < 0.01
    assert not abs(float(conservation[explain_speed.CAPTUM][resnet]) - 1) < 0.1  # residual sums double

    assert "| variant | ratio to | K=2 | K=3 | K=5 |" in mine
    for row in explain_speed.DIST_ROWS:
        cells = _cells(mine, row)
        assert len(cells) == 4, row
        reference, *by_k = cells
        if row not in explain_speed.FAST_ROWS:
            assert reference == "forward", row
        for k, cell in zip((2, 3, 5), by_k, strict=True):
            if row in explain_speed.SLOW_ROWS and k > 3:
                assert cell.startswith("— (≈ "), (row, cell)  # extrapolated from K = 2 and 3
                continue
            assert 0 < _ratio(cell) < math.inf, (row, cell)
            if row in explain_speed.FAST_ROWS:
                assert cell.endswith(("✓", "✗")), (row, cell)
    assert _cells(mine, explain_speed.FAST_LRP)[0] == "LRP one class (top-1)"
    assert _cells(mine, explain_speed.FAST_IXG)[0] == "input×gradient one class (top-1)"
    assert explain_speed.START_MARKER in capsys.readouterr().out
    # A second run replaces the section instead of appending another one.
    marked = section("new", explain_speed.START_MARKER, explain_speed.END_MARKER)
    again = replace_section(text, marked, explain_speed.START_MARKER, explain_speed.END_MARKER)
    assert again.count(explain_speed.START_MARKER) == 1
    assert again.endswith(marked)


def test_skipped_cells_extrapolate_linearly() -> None:
    assert explain_speed._skipped({1: 2.0, 2: 3.0, 5: 6.0}, 100) == "— (≈ 101)"
    assert explain_speed._skipped({1: 2.0}, 100) == "—"


def test_errors_become_one_code_span() -> None:
    error = TypeError("Module of type <class 'x'> has | no rule\n defined")
    assert explain_speed._error(error) == "`TypeError: Module of type <class 'x'> has \\| no rule defined`"


def test_archs_and_quick_defaults() -> None:
    settings, _ = explain_speed.parse_settings(["--quick"])
    assert settings.archs == explain_speed.ARCHS
    assert (settings.size, settings.pairs, settings.ks, settings.max_k_slow) == (64, 1, (2, 3, 5), 3)
    settings, _ = explain_speed.parse_settings(["--archs", "resnet50"])
    assert (settings.archs, settings.size, settings.ks, settings.max_k_slow) == (
        ("resnet50",),
        224,
        (2, 10, 100, 1000),
        100,
    )
    with pytest.raises(SystemExit):
        explain_speed.parse_settings(["--archs", "not_a_model"])


def test_distribution_quality_runs_and_writes_its_section(tmp_path: Path, torch_threads: None) -> None:
    results = tmp_path / "RESULTS.md"
    assert distribution_quality.main(["--scenes", "2", "--write", str(results)]) == 0
    text = results.read_text()
    assert text.count(distribution_quality.START_MARKER) == 1
    for row in ("LRP alone", "LRP distribution, exact", "LRP distribution, fast", "input×gradient distribution, fast"):
        shares = _cells(text, row)[:3]
        assert all(0.0 <= float(cell.rstrip("%")) <= 100.0 for cell in shares), (row, shares)


@pytest.mark.slow
def test_architectures_quick_run_explains_every_family_with_every_method(tmp_path: Path, torch_threads: None) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n" + OTHER)
    assert architectures.main(["--quick", "--write", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n" + OTHER)
    assert text.count(architectures.START_MARKER) == 1
    mine = text[text.index(architectures.START_MARKER) : text.index(architectures.END_MARKER)]
    columns = architectures.columns()
    assert {c.method for c in columns} >= {
        "lafam", "lrp", "lrp_class", "gradcam", "input_x_gradient", "distribution", "distribution_fast"
    }  # fmt: skip
    for family in architectures.QUICK_FAMILIES:
        side, layer, forward, *cells = _cells(mine, family)
        assert side == str(architectures.QUICK_SIDE)
        assert layer
        assert forward.endswith(" ms"), forward
        assert len(cells) == len(columns), family
        for column, cell in zip(columns, cells, strict=True):
            answered = re.fullmatch(rf"✓ ([0-9.]+) ms( {architectures.ZERO})?", cell)  # ∅: valid, all-zero maps
            assert answered, (family, column.title, cell)
            assert 0 < float(answered.group(1)) < math.inf, (family, column.title, cell)
    assert "Failures" not in mine


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU host runs the script for real")
def test_gpu_script_says_so_and_measures_nothing_without_a_gpu(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.sh"
    result = subprocess.run(
        [str(script), str(tmp_path / "out")], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    assert "no NVIDIA GPU" in result.stderr
    assert not (tmp_path / "out" / "RESULTS.md").exists()


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_lafam_overhead_times_the_fused_outputs_inside_the_pass(tmp_path: Path, backend: str) -> None:
    from benchmarks.lafam_overhead import fused_seconds
    from tests.unit.conftest import write_export

    write_export(tmp_path, backend=backend)
    seconds = fused_seconds(tmp_path, batch=2, runs=3)
    assert 0 < seconds < 1  # some time, and less than a second on a tiny graph


def test_lafam_overhead_times_the_explanation_step_of_requests_with_a_map(tmp_path: Path) -> None:
    """'direct' is the explanation step's share (map, PNG) on the served path; what is recorded after it, apart."""
    from benchmarks.lafam_overhead import measure
    from handlers.service import LafamService
    from tests.unit.conftest import write_export

    write_export(tmp_path, backend="onnx")
    service = LafamService.from_folder(tmp_path)
    result = measure(service, batch=2, pairs=2)
    assert 0 < result["direct"] < 1
    assert result["with"] > 0
    assert result["without"] > 0
    assert result["deferred"] > 0  # the metrics and drift statistics, recorded after the answer
    assert "_explanation" not in vars(service)  # the class's methods again
    assert "_record" not in vars(service)
