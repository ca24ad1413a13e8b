"""Drift statistics of served maps: exact values on hand-made maps, and what the service records."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from handlers import service
from handlers.drift import SMALL_MAP, _tensor_statistics, grid_statistics, map_statistics, mean_statistics
from handlers.explain.lafam import lafam
from tests.unit.test_handler import png_item, serve
from tests.unit.test_metrics import sample


def test_one_central_peak_has_no_entropy_no_border_no_offset() -> None:
    native = torch.zeros(7, 7)
    native[3, 3] = 5.0
    assert map_statistics(native) == (0.0, 0.0, 0.0)


def test_a_uniform_map_has_full_entropy_and_the_ring_share() -> None:
    stats = map_statistics(torch.ones(7, 7))
    assert stats.entropy == pytest.approx(1.0, abs=1e-12)
    assert stats.border_share == pytest.approx(24 / 49, abs=1e-12)  # the outer ring of a 7x7 map
    assert stats.peak_offset == pytest.approx(1.0)  # argmax of a tie: the first location, a corner


def test_corner_peak_and_negative_evidence() -> None:
    native = -torch.ones(8, 8)  # negative evidence does not count
    native[0, 7] = 2.0
    stats = map_statistics(native)
    assert stats == (0.0, 1.0, pytest.approx(1.0))
    native[0, 7] = 1.0
    native[4, 4] = 1.0  # half the evidence inside, half on the ring: entropy log(2)/log(64)
    stats = map_statistics(native)
    assert stats.entropy == pytest.approx(math.log(2) / math.log(64))
    assert stats.border_share == pytest.approx(0.5)


def test_pixel_level_maps_use_an_eighth_of_the_side_as_border() -> None:
    native = torch.zeros(64, 64)
    native[7, 32] = 1.0  # inside the 8-pixel ring
    assert map_statistics(native).border_share == 1.0
    native[7, 32], native[8, 32] = 0.0, 1.0
    assert map_statistics(native).border_share == 0.0


@pytest.mark.parametrize("native", [torch.zeros(7, 7), -torch.ones(7, 7), torch.full((7, 7), float("nan"))])
def test_a_map_without_positive_evidence_records_nothing(native: torch.Tensor) -> None:
    assert map_statistics(native) is None


def test_bad_shape_is_named() -> None:
    with pytest.raises(ValueError, match="shape"):
        map_statistics(torch.ones(1, 7, 7))


def test_the_service_records_every_served_map(tiny_export: Path) -> None:
    model = "tiny-classification"
    before = sample("lafam_map_entropy_ratio_count", model=model, method="lafam")
    serve(tiny_export, [png_item(), png_item()])
    assert sample("lafam_map_entropy_ratio_count", model=model, method="lafam") == before + 2
    assert sample("lafam_map_border_ratio_count", model=model, method="lafam") >= 2
    assert sample("lafam_map_peak_offset_ratio_count", model=model, method="lafam") >= 2


def test_failing_drift_statistics_never_fail_the_request(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("drift broke")

    monkeypatch.setattr(service, "map_statistics", broken)
    monkeypatch.setattr(service, "mean_statistics", broken)  # the fused path's
    model = "tiny-classification"
    before = sample("lafam_map_entropy_ratio_count", model=model, method="lafam")
    with caplog.at_level(logging.ERROR, logger="handlers.service"):
        bodies, context = serve(tiny_export, [png_item()])
    assert context.statuses[0][0] == 200
    assert bodies[0]["explanation"]["data"]
    assert sample("lafam_map_entropy_ratio_count", model=model, method="lafam") == before
    assert any(record.getMessage() == "drift statistics failed" for record in caplog.records)


def test_drift_can_be_switched_off_per_deployment(tiny_export: Path) -> None:
    model = "tiny-classification"
    before = sample("lafam_map_entropy_ratio_count", model=model, method="lafam")
    serve(tiny_export, [png_item()], model_yaml_config={"lafam": {"drift": False}})
    assert sample("lafam_map_entropy_ratio_count", model=model, method="lafam") == before
    with pytest.raises(ValueError, match="drift"):
        serve(tiny_export, [png_item()], model_yaml_config={"lafam": {"drift": "yes"}})


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (3, 4), (7, 7), (14, 14), (16, 16), (9, 20)])
def test_python_and_torch_statistics_agree(shape: tuple[int, int]) -> None:
    """Maps up to SMALL_MAP locations are summed in Python floats; larger ones in torch: the same figures."""
    generator = torch.Generator().manual_seed(sum(shape))
    for trial in range(5):
        native = torch.randn(*shape, generator=generator)
        if trial == 1:
            native = native.clamp_min(0)  # ties at zero
        if trial == 2:
            native = torch.ones(*shape)  # ties everywhere: the first location is the peak
        expected = _tensor_statistics(native)
        values = native.double().flatten().tolist()
        got = grid_statistics(values, *shape)
        assert (got is None) == (expected is None)
        if expected is not None:
            assert got == pytest.approx(expected, abs=1e-12)
            assert got.peak_offset == expected.peak_offset
        assert map_statistics(native) == got if shape[0] * shape[1] <= SMALL_MAP else expected


def test_python_statistics_refuse_non_finite_totals() -> None:
    assert grid_statistics([1.0, float("inf")], 1, 2) is None
    assert grid_statistics([1.0, float("nan")], 1, 2) is None
    assert grid_statistics([-float("inf"), 1.0], 1, 2) == grid_statistics([0.0, 1.0], 1, 2)


@pytest.mark.parametrize("shape", [(7, 7), (1, 3), (16, 16), (17, 16), (40, 30)])  # both sides of SMALL_MAP
@pytest.mark.parametrize("content", ["random", "non_finite", "constant", "large"])
def test_statistics_of_the_runtimes_means_are_those_of_their_lafam_map(shape: tuple[int, int], content: str) -> None:
    means = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    if content == "non_finite":
        means[0, 0], means[-1, -1], means[0, -1] = float("nan"), float("inf"), -float("inf")
    elif content == "constant":
        means.fill_(2.5)
    elif content == "large":
        means *= 3e38
    expected = map_statistics(lafam(means[None, None])[0])
    got = mean_statistics(means)
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert got == pytest.approx(expected, abs=1e-12)
