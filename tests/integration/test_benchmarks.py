"""The explanation-cost benchmark runs end to end (``--quick``) and writes only its own results section."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks import distribution_quality, explain_speed
from benchmarks._report import replace_section, section

OTHER = "<!-- lafam-overhead -->\n## LaFAM overhead\n\n| a |\n|---|\n| 1 |\n<!-- lafam-overhead -->\n"


def _cells(text: str, row: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.startswith(f"| {row} |")]
    assert len(lines) == 1, f"row {row!r} appears {len(lines)} times"
    return [cell.strip() for cell in lines[0].strip("|").split("|")][1:]


@pytest.mark.slow
def test_quick_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n" + OTHER + "\nkept prose\n")
    threads = torch.get_num_threads()
    try:
        assert explain_speed.main(["--quick", "--write", str(results)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n" + OTHER + "\nkept prose\n")
    assert text.count(explain_speed.START_MARKER) == 1
    assert text.count(explain_speed.END_MARKER) == 1
    mine = text[text.index(explain_speed.START_MARKER) : text.index(explain_speed.END_MARKER)]
    assert "batch 1" in mine
    assert "torch threads" in mine
    for row in explain_speed.SINGLE_ROWS:
        ratio, ms = (float(cell) for cell in _cells(mine, row))
        assert 0 < ratio < math.inf, row
        assert 0 < ms < math.inf, row
    assert float(_cells(mine, explain_speed.FORWARD)[0]) == 1.0
    assert "| K=1 | K=2 | K=5 |" in mine
    for row in explain_speed.DIST_ROWS:
        cells = _cells(mine, row)
        assert len(cells) == 3, row
        for cell in cells:  # --quick measures every cell: nothing skipped
            assert 0 < float(cell) < math.inf, (row, cell)
    assert explain_speed.START_MARKER in capsys.readouterr().out
    # A second run replaces the section instead of appending another one.
    marked = section("new", explain_speed.START_MARKER, explain_speed.END_MARKER)
    again = replace_section(text, marked, explain_speed.START_MARKER, explain_speed.END_MARKER)
    assert again.count(explain_speed.START_MARKER) == 1
    assert again.endswith(marked)


def test_skipped_cells_extrapolate_linearly() -> None:
    assert explain_speed._skipped({1: 2.0, 2: 3.0, 5: 6.0}, 100) == "— (≈ 101)"
    assert explain_speed._skipped({1: 2.0}, 100) == "—"


def test_distribution_quality_runs_and_writes_its_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    threads = torch.get_num_threads()
    try:
        assert distribution_quality.main(["--scenes", "2", "--write", str(results)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = results.read_text()
    assert text.count(distribution_quality.START_MARKER) == 1
    for row in ("LRP alone", "LRP distribution, exact", "LRP distribution, fast", "input×gradient distribution, fast"):
        shares = _cells(text, row)[:3]
        assert all(0.0 <= float(cell.rstrip("%")) <= 100.0 for cell in shares), (row, shares)
