"""The evaluation runner on a fake source whose maps are known: scores, class options, grids, failures."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from evaluation.data import Sample, folder_samples, synthetic_grids, synthetic_samples
from evaluation.runner import METHODS, Method, class_options, evaluate, grid_game, map_of
from evaluation.sources import SourceError


class OracleSource:
    """Answers every method with the sample's own mask (per class: the mask of that class's quadrant)."""

    name = "oracle"

    def __init__(self, masks: dict[int, np.ndarray], refuse: tuple[str, ...] = ()) -> None:
        self.masks = masks  # image id → (H, W) float map to return
        self.refuse = refuse
        self.requests: list[dict[str, Any]] = []

    def explain(self, image: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(options)
        if options["method"] in self.refuse:
            raise SourceError(f"400 method {options['method']} not offered")
        saliency = self.masks[id(image)]
        body: dict[str, Any] = {"predictions": [{"index": 2}, {"index": 0}, {"index": 1}]}
        if options.get("format") == "none":
            return body
        if options["method"] in ("lafam", "lrp"):
            body["explanation"] = {"data": saliency.tolist()}
        else:
            classes = options.get("classes") or [2, 0]
            body["explanation"] = {
                "classes": [
                    {"index": c, "data": (saliency if i == 0 else 1 - saliency).tolist()} for i, c in enumerate(classes)
                ]
            }
        return body


def _sample(label: int | None = 2) -> Sample:
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:10, 6:12] = True
    return Sample("s", np.zeros((16, 16, 3), dtype=np.uint8), mask, label)


def test_a_map_equal_to_the_mask_scores_perfectly_and_baselines_do_not() -> None:
    sample = _sample()
    source = OracleSource({id(sample.image): sample.mask.astype(float)})
    results = evaluate(source, [sample], progress=False)
    summary = results.summary()
    for method in METHODS:
        assert summary[method.name]["pointing_game"]["mean"] == 1.0
        assert summary[method.name]["relevance_rank_accuracy"]["mean"] == pytest.approx(1.0)
    assert summary["baseline: uniform random"]["relevance_rank_accuracy"]["mean"] < 0.6
    assert results.accuracy == 1.0  # the oracle ranks class 2 first
    assert not results.unavailable


def test_a_method_the_server_refuses_is_reported_unavailable_not_fatal() -> None:
    sample = _sample()
    source = OracleSource({id(sample.image): sample.mask.astype(float)}, refuse=("lrp", "lrp_class"))
    results = evaluate(source, [sample, sample], progress=False)
    assert set(results.unavailable) == {"LRP label-free", "LRP class"}
    assert "LRP class" not in results.scores
    assert sum(r["method"] == "lrp" for r in source.requests) == 1  # not asked again after the refusal


def test_class_options_follow_the_paper_when_the_target_is_top_1() -> None:
    distribution = next(m for m in METHODS if m.name == "distribution · LRP")
    gradcam = next(m for m in METHODS if m.name == "Grad-CAM")
    assert class_options(distribution, 2, [2, 0, 1]) == {"top_classes": 2, "least_likely": True}
    assert class_options(distribution, 0, [2, 0, 1]) == {"classes": [0, 2]}
    assert class_options(gradcam, 0, [2, 0, 1]) == {"classes": [0]}


def test_map_of_picks_the_target_class_and_upsamples() -> None:
    body = {"explanation": {"classes": [{"index": 5, "data": [[0.0, 1.0]]}, {"index": 7, "data": [[1.0, 0.0]]}]}}
    got = map_of(body, 7, (2, 4), "nearest")
    np.testing.assert_array_equal(got, [[1, 1, 0, 0], [1, 1, 0, 0]])
    label_free = map_of({"explanation": {"data": [[0.0, 1.0]]}}, None, (1, 2), "bilinear")
    assert got.dtype == np.float64
    assert label_free.shape == (1, 2)


def test_grid_game_scores_each_class_against_its_quadrant() -> None:
    (grid,) = synthetic_grids(1, size=32)
    assert len(set(grid.labels)) == 4
    assert grid.image.shape == (32, 32, 3)
    assert synthetic_grids(1)[0].image.shape == (256, 256, 3)  # four 128-px scenes: the demo model's scale
    quadrant = np.zeros((32, 32))
    quadrant[:16, :16] = 1.0  # the oracle's first class map covers the top-left quadrant only
    source = OracleSource({id(grid.image): quadrant})
    results = grid_game(source, [grid], progress=False)
    assert results.resize == "none"
    assert results.top4 == [False]  # the oracle ranks classes 2, 0, 1 only
    summary = results.summary()
    assert set(summary) == {
        "Grad-CAM",
        "distribution · Grad-CAM",
        "input×gradient",
        "distribution · input×gradient",
        "LRP class",
        "distribution · LRP",
        "distribution fast · LRP",
    }
    for values in summary.values():
        assert 0.0 <= values["region"] <= 1.0
        assert values["empty"] == 0.0
        assert values["region_nonempty"] == values["region"]
        assert 0.0 <= values["auc"] <= 1.0
    assert all(r["resize"] == "none" for r in source.requests)
    fast = [r for r in source.requests if r["method"] == "distribution_fast"]
    assert [r["classes"][0] for r in fast] == list(grid.labels)  # one request per quadrant, its class first
    assert results.summary("top4")["Grad-CAM"]["maps"] == 0.0
    json = results.to_json()
    assert json["grids"] == 1
    assert json["top4_grids"] == 0


def test_grid_game_counts_empty_maps_and_falls_back_to_the_model_size() -> None:
    (grid,) = synthetic_grids(1, size=32)

    class Fixed(OracleSource):
        def explain(self, image: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
            if options.get("resize") == "none":
                raise SourceError("400 option 'resize': the model was exported with a fixed input size")
            return super().explain(image, options)

    source = Fixed({id(grid.image): np.zeros((32, 32))})
    results = grid_game(source, [grid], progress=False)
    assert results.resize == "model"
    assert "fixed input size" in results.note
    for name, values in results.summary().items():
        if name == "distribution fast · LRP":  # asked once per class, always its first map: all zeros
            assert values["empty"] == 1.0
            assert np.isnan(values["region_nonempty"])
        else:  # the oracle's first class map is all zeros, the three others all ones
            assert values["empty"] == 0.25
            assert values["region_nonempty"] == pytest.approx(0.25)  # a uniform map: chance
        assert values["auc"] == pytest.approx(0.5)


def test_synthetic_data_is_seeded_and_masks_fit(tmp_path) -> None:
    first, again = synthetic_samples(3), synthetic_samples(3)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again, strict=True))
    assert all(s.mask.shape == s.image.shape[:2] and s.mask.any() for s in first)
    from PIL import Image

    Image.fromarray(first[0].image).save(tmp_path / "a.png")
    Image.fromarray(first[0].mask.astype(np.uint8) * 255).save(tmp_path / "a_mask.png")
    (loaded,) = folder_samples(tmp_path)
    assert loaded.label is None
    np.testing.assert_array_equal(loaded.mask, first[0].mask)
    Image.fromarray(first[1].image).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"b_mask\.png"):
        folder_samples(tmp_path)


def test_custom_methods_are_accepted() -> None:
    sample = _sample(label=None)
    source = OracleSource({id(sample.image): sample.mask.astype(float)})
    results = evaluate(source, [sample], [Method("mine", {"method": "lafam"})], progress=False)
    assert "mine" in results.scores
    assert results.accuracy is None
