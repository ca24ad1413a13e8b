"""The synthetic scene generator (:mod:`scenes.synthetic`): determinism, exact masks, grids, zoomed scenes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scenes import synthetic as scene_module
from scenes.synthetic import (
    CLASSES,
    Scene,
    generate_dataset,
    generate_grid,
    generate_scene,
    generate_zoomed_scene,
    save_samples,
)


def _assert_valid(scene: Scene, size: int) -> None:
    assert scene.image.shape == (size, size, 3)
    assert scene.image.dtype == np.uint8
    assert scene.masks.dtype == np.bool_
    assert scene.masks.shape == (len(scene.labels), size, size)
    assert len(set(scene.labels)) == len(scene.labels)
    assert all(0 <= label < len(CLASSES) for label in scene.labels)
    for mask in scene.masks:
        assert mask.any()
        ys, xs = np.nonzero(mask)
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        # Circumscribed diameter is 20-45 % of the side; an inscribed extent is at least ~half of that.
        assert 0.1 * size <= extent <= 0.45 * size + 2
        # Objects lie wholly inside the image: none touches its border.
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        assert not border.any()
    if len(scene.masks) > 1:
        assert scene.masks.sum(axis=0).max() == 1, "objects overlap"


def test_same_seed_same_scenes() -> None:
    first = generate_dataset(12, seed=7, two_object_fraction=0.5)
    second = generate_dataset(12, seed=7, two_object_fraction=0.5)
    for a, b in zip(first, second, strict=True):
        assert a.labels == b.labels
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)


def test_other_seed_other_scenes() -> None:
    first = generate_dataset(4, seed=1)
    second = generate_dataset(4, seed=2)
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(first, second, strict=True))


def test_generate_scene_is_a_function_of_the_generator_state() -> None:
    a = generate_scene(np.random.default_rng(3), num_objects=2)
    b = generate_scene(np.random.default_rng(3), num_objects=2)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)


@pytest.mark.parametrize("size", [64, 128, 160])
def test_scene_shapes_dtypes_and_masks(size: int) -> None:
    for scene in generate_dataset(24, seed=11, size=size, two_object_fraction=0.5):
        _assert_valid(scene, size)


@pytest.mark.parametrize("seed", [0, 5, 9])
def test_masks_are_exactly_the_painted_pixels(seed: int) -> None:
    scene = generate_scene(np.random.default_rng(seed), num_objects=2)
    # Replay the same generator up to the objects: background and distractors only.
    rng = np.random.default_rng(seed)
    canvas = scene_module._background(rng, 128)
    scene_module._draw_distractors(rng, canvas)
    background = np.asarray(canvas)
    outside = ~scene.masks.any(axis=0)
    np.testing.assert_array_equal(scene.image[outside], background[outside])
    for mask in scene.masks:
        changed = (scene.image[mask] != background[mask]).any(axis=-1)
        assert changed.mean() > 0.9


def test_two_object_fraction_and_distinct_labels() -> None:
    scenes = generate_dataset(20, seed=3, two_object_fraction=0.25)
    counts = [len(scene.labels) for scene in scenes]
    assert counts.count(2) == 5
    assert counts.count(1) == 15
    for scene in scenes:
        if len(scene.labels) == 2:
            assert scene.labels[0] != scene.labels[1]
            assert scene.masks.shape[0] == 2


def test_all_classes_appear() -> None:
    labels = {label for scene in generate_dataset(60, seed=0) for label in scene.labels}
    assert labels == set(range(len(CLASSES)))


def test_scene_is_read_only() -> None:
    scene = generate_scene(np.random.default_rng(0))
    with pytest.raises(ValueError, match="read-only"):
        scene.image[0, 0, 0] = 1
    assert scene.class_names == (CLASSES[scene.labels[0]],)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": -1, "seed": 0}, "n"),
        ({"n": 2, "seed": 0, "two_object_fraction": 1.5}, "two_object_fraction"),
        ({"n": 2, "seed": 0, "size": 8}, "size"),
    ],
)
def test_generate_dataset_rejects_bad_arguments(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_dataset(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_objects", [0, 4])
def test_generate_scene_rejects_bad_object_count(num_objects: int) -> None:
    with pytest.raises(ValueError, match="num_objects"):
        generate_scene(np.random.default_rng(0), num_objects=num_objects)


def test_scene_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        Scene(image=np.zeros((8, 8, 3), np.uint8), labels=(0, 1), masks=np.ones((1, 8, 8), bool))


def test_save_samples_writes_images_masks_and_index(tmp_path: Path) -> None:
    index_path = save_samples(tmp_path, n=4, seed=2, two_object_fraction=0.5)
    index = json.loads(index_path.read_text())
    assert index["classes"] == list(CLASSES)
    assert len(index["samples"]) == 4
    expected = generate_dataset(4, seed=2, two_object_fraction=0.5)
    for sample, scene in zip(index["samples"], expected, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / sample["image"])), scene.image)
        assert sample["labels"] == list(scene.labels)
        assert sample["classes"] == list(scene.class_names)
        assert len(sample["masks"]) == len(scene.labels)
        for mask_file, mask in zip(sample["masks"], scene.masks, strict=True):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / mask_file)) > 0, mask)


def _quadrant(size: int, k: int) -> tuple[slice, slice]:
    half = size // 2
    return slice((k // 2) * half, (k // 2 + 1) * half), slice((k % 2) * half, (k % 2 + 1) * half)


@pytest.mark.parametrize(("tile", "size"), [(128, None), (128, 128), (64, None), (64, 96)])
def test_grid_has_four_distinct_classes_each_inside_its_quadrant(tile: int, size: int | None) -> None:
    side = 2 * tile if size is None else size
    rng = np.random.default_rng(5)
    for _ in range(6):
        grid = generate_grid(rng, tile=tile, size=size)
        assert grid.image.shape == (side, side, 3)
        assert grid.image.dtype == np.uint8
        assert grid.masks.shape == (4, side, side)
        assert len(grid.labels) == 4
        assert len(set(grid.labels)) == 4
        assert all(0 <= label < len(CLASSES) for label in grid.labels)
        assert grid.masks.sum(axis=0).max() == 1
        for k, mask in enumerate(grid.masks):
            rows, cols = _quadrant(side, k)
            assert mask[rows, cols].any()
            outside = mask.copy()
            outside[rows, cols] = False
            assert not outside.any(), f"mask {k} leaves its quadrant"


def test_grid_quadrants_are_the_scenes_of_the_renderer() -> None:
    """At full scale each quadrant is exactly a generated scene of its label, and its mask is exact."""
    grid = generate_grid(np.random.default_rng(8), tile=64)
    rng = np.random.default_rng(8)
    labels = tuple(int(label) for label in rng.choice(len(CLASSES), size=4, replace=False))
    assert grid.labels == labels
    for k, label in enumerate(labels):
        scene = scene_module._render(rng, 64, 1, labels=(label,))
        rows, cols = _quadrant(128, k)
        np.testing.assert_array_equal(grid.image[rows, cols], scene.image)
        np.testing.assert_array_equal(grid.masks[k, rows, cols], scene.masks[0])
        _assert_valid(scene, 64)


def test_half_scale_grid_shrinks_the_full_scale_grid() -> None:
    full = generate_grid(np.random.default_rng(4), tile=128)
    half = generate_grid(np.random.default_rng(4), tile=128, size=128)
    assert half.labels == full.labels
    for k in range(4):
        rows, cols = _quadrant(256, k)
        tile = Image.fromarray(full.image[rows, cols]).resize((64, 64), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(half.image[_quadrant(128, k)], np.asarray(tile))
        # Nearest-resized masks keep roughly a quarter of the pixels.
        assert abs(half.masks[k].sum() - full.masks[k].sum() / 4) <= 0.1 * full.masks[k].sum() / 4 + 8


@pytest.mark.parametrize("num_objects", [1, 2, 3])
def test_sparse_grid_puts_each_object_in_its_own_quadrant(num_objects: int) -> None:
    rng = np.random.default_rng(num_objects)
    for _ in range(6):
        grid = generate_grid(rng, tile=64, size=128, num_objects=num_objects)
        assert grid.masks.shape == (num_objects, 128, 128)
        assert len(set(grid.labels)) == num_objects
        quadrants = []
        for mask in grid.masks:
            hits = [k for k in range(4) if mask[_quadrant(128, k)].any()]
            assert len(hits) == 1, "an object spans quadrants"
            quadrants.append(hits[0])
        assert quadrants == sorted(set(quadrants)), "labels and masks follow quadrant order"


def test_grid_is_deterministic_per_seed() -> None:
    a = generate_grid(np.random.default_rng(21))
    b = generate_grid(np.random.default_rng(21))
    c = generate_grid(np.random.default_rng(22))
    assert a.labels == b.labels
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert not np.array_equal(a.image, c.image)


def test_grid_labels_cover_all_classes_over_many_grids() -> None:
    rng = np.random.default_rng(0)
    seen = {label for _ in range(12) for label in generate_grid(rng, tile=32).labels}
    assert seen == set(range(len(CLASSES)))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"tile": 16}, "tile"),
        ({"size": 127}, "size"),
        ({"size": 0}, "size"),
        ({"num_objects": 0}, "num_objects"),
        ({"num_objects": 5}, "num_objects"),
    ],
)
def test_generate_grid_rejects_bad_arguments(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_grid(np.random.default_rng(0), **kwargs)


def test_zoomed_scene_keeps_labels_and_masks_inside_the_image() -> None:
    rng = np.random.default_rng(3)
    areas = []
    for _ in range(10):
        scene = generate_zoomed_scene(rng, 128, (0.5, 1.0))
        assert scene.image.shape == (128, 128, 3)
        assert scene.masks.shape == (1, 128, 128)
        assert len(scene.labels) == 1
        assert scene.masks[0].any()
        areas.append(scene.masks[0].sum())
    a = generate_zoomed_scene(np.random.default_rng(9))
    b = generate_zoomed_scene(np.random.default_rng(9))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    with pytest.raises(ValueError, match="scale"):
        generate_zoomed_scene(rng, 128, (0.0, 1.0))


def test_generate_scene_stream_is_unchanged_by_the_grid_renderer() -> None:
    """generate_scene draws its labels itself; the labelled renderer must not shift seeded datasets."""
    scene = generate_scene(np.random.default_rng(12), num_objects=2)
    again = scene_module._render(np.random.default_rng(12), 128, 2, labels=None)
    assert scene.labels == again.labels
    np.testing.assert_array_equal(scene.image, again.image)
