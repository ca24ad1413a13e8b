"""Evaluation data: images with exact object masks, and 2×2 grids of four scenes of different classes.

Two sources: the project's synthetic scenes (:mod:`scenes.synthetic`, exact masks by construction) or a user's
folder. A folder either holds an ``index.json`` in the format :func:`scenes.synthetic.save_samples` writes
(``{"samples": [{"image": "a.png", "labels": [3], "masks": ["a_mask0.png"]}], "classes": [...]}``) or
image files each with a ``<stem>_mask.png`` beside it (nonzero = object; no labels: class methods then
explain the predicted class).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from scenes.synthetic import generate_grid, generate_scene

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class Sample:
    """One evaluation image.

    Attributes:
        name: identifier in the results.
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` bool, the object the explanation should land on.
        label: the object's class index, or ``None`` when unknown.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    label: int | None


@dataclass(frozen=True)
class Grid:
    """A 2×2 grid of four scenes of different classes, one per quadrant.

    Attributes:
        name: identifier in the results.
        image: ``(H, W, 3)`` uint8 RGB.
        labels: the class of each quadrant: top-left, top-right, bottom-left, bottom-right.
    """

    name: str
    image: np.ndarray
    labels: tuple[int, int, int, int]


def synthetic_samples(count: int, seed: int = 40_000, size: int = 128) -> list[Sample]:
    """Single-object generated scenes with exact masks (seeded, independent of the training seeds)."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        scene = generate_scene(rng, size, 1)
        samples.append(Sample(f"scene_{index:04d}", np.asarray(scene.image), scene.masks[0], scene.labels[0]))
    return samples


def folder_samples(folder: str | Path) -> list[Sample]:
    """Read a user's folder of images and masks (see the module docstring).

    Raises:
        ValueError: no images, an image without its mask, or a mask of another size than its image.
    """
    folder = Path(folder)
    index = folder / "index.json"
    pairs: list[tuple[str, Path, Path, int | None]] = []
    if index.is_file():
        for entry in json.loads(index.read_text())["samples"]:
            label = entry["labels"][0] if entry.get("labels") else None
            pairs.append((Path(entry["image"]).stem, folder / entry["image"], folder / entry["masks"][0], label))
    else:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            if path.stem.endswith("_mask"):
                continue
            mask = path.with_name(f"{path.stem}_mask.png")
            if not mask.is_file():
                raise ValueError(f"{path} has no mask {mask.name}: give every image a <stem>_mask.png beside it")
            pairs.append((path.stem, path, mask, None))
    if not pairs:
        raise ValueError(f"{folder} holds no images: add an index.json or images with <stem>_mask.png masks")
    samples = []
    for name, image_path, mask_path, label in pairs:
        image = np.asarray(Image.open(image_path).convert("RGB"))
        mask = np.asarray(Image.open(mask_path).convert("L")) > 0
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {mask_path.name} is {mask.shape}, its image {image.shape[:2]}: sizes must match")
        samples.append(Sample(name, image, mask, label))
    return samples


def synthetic_grids(count: int, seed: int = 50_000, tile: int = 128, size: int | None = None) -> list[Grid]:
    """2×2 grids of four single-object scenes of four different classes (:func:`scenes.synthetic.generate_grid`).

    Each scene is ``tile`` pixels, the demo model's training scale by default, so a grid is ``2 * tile``
    pixels; ``size`` resizes the grid (half scale: ``size = tile``).
    """
    rng = np.random.default_rng(seed)
    grids = []
    for index in range(count):
        scene = generate_grid(rng, tile, size)
        labels = tuple(int(label) for label in scene.labels)
        grids.append(Grid(f"grid_{index:04d}", np.asarray(scene.image), labels))  # type: ignore[arg-type]
    return grids
