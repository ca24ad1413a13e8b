"""``lafam-serve eval`` end to end on a local demo archive: tables, JSON, montage, grid game, sanity check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from cli.main import main
from demo.run import build_demo_archive
from evaluation.runner import GRID_PAIRS, METHODS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    return build_demo_archive(root, root / "store", backend="torchscript", log=lambda _: None)


def test_eval_writes_tables_json_and_montage(archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results"
    argv = ["eval", "--archive", str(archive), "--samples", "4", "--grids", "1", "--sanity", "2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "## Localisation" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["model"] == "shapes"
    assert data["samples"] == 4
    for method in [m.name for m in METHODS] + ["baseline: centred Gaussian", "baseline: uniform random"]:
        scores = data["localisation"][method]
        assert set(scores) == {"pointing_game", "top_k_intersection", "relevance_mass_accuracy",
                               "relevance_rank_accuracy", "sparseness", "auc"}  # fmt: skip
        assert all(0.0 <= s["mean"] <= 1.0 for s in scores.values()), (method, scores)
    assert not data["unavailable"]
    grid = data["grid"]
    assert grid["resize"] == "none"  # the demo export takes any size: 256-px grids at the model's scale
    assert grid["grids"] == 1
    for base, distribution in GRID_PAIRS:
        assert math.isfinite(grid["all"][base]["region"])
        assert math.isfinite(grid["all"][distribution]["auc"])
        assert 0.0 <= grid["all"][distribution]["empty"] <= 1.0
    assert "RA gain" in printed
    assert data["sanity"]["steps"] == ["head", "block3", "block2", "block1", "stem"]
    assert all(len(v) == 5 for v in data["sanity"]["spearman"].values())
    # the trained model's LaFAM does not depend on the head: randomising it alone leaves the map unchanged
    assert data["sanity"]["spearman"]["LaFAM (nearest)"][0] == pytest.approx(1.0)
    montage = Image.open(out / "montage.png")
    assert montage.width == 128 * (len(METHODS) + 3)  # the image + every method + two baselines


def test_eval_needs_a_model_name_with_a_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--url", "http://127.0.0.1:9", "--samples", "1"]) == 1
    assert "--model" in capsys.readouterr().err
