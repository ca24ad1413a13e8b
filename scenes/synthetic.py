"""Deterministic synthetic scenes (the demo's training data, the evaluation's images): shapes with exact masks.

Every scene is an RGB image of one or more objects, each of one of :data:`CLASSES`, drawn with random
colours, size, position and rotation on a background made of a colour gradient, smooth noise, pixel noise
and distractor strokes and blobs that are none of the class shapes. Each class has a preferred texture
(:data:`CLASS_TEXTURES`) that it wears only half of the time, so texture alone does not decide the class:
the shape has to be looked at. Objects never overlap and distractors lie under them, so each object's
boolean mask is exactly the set of pixels it was painted on.

Only numpy and PIL are used; a scene takes about 2 ms on one core (20k scenes in under a minute).
``python -m scenes.synthetic --out DIR --n N --seed S`` writes sample PNGs, their masks and an ``index.json``
(see :func:`save_samples`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
"""Class names, in label-index order."""

TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots", "grid", "waves")
"""Texture names an object can be painted with."""

CLASS_TEXTURES: tuple[str, ...] = ("solid", "checker", "stripes", "dots", "grid", "waves")
"""Preferred texture of each class of :data:`CLASSES` (same order)."""

PREFERRED_TEXTURE_PROB = 0.5
"""Probability that an object wears its class's preferred texture; otherwise one of the others, uniformly."""

MIN_OBJECT_FRACTION = 0.20
"""Smallest object extent (circumscribed diameter), as a fraction of the image side."""

MAX_OBJECT_FRACTION = 0.45
"""Largest object extent (circumscribed diameter), as a fraction of the image side."""

MIN_SIZE = 32
"""Smallest supported image side, in pixels."""

MAX_OBJECTS = 3
"""Most objects a scene can hold."""

DEFAULT_TWO_OBJECT_FRACTION = 0.25
"""Share of two-object scenes in :func:`generate_dataset` and :func:`save_samples` by default."""

_MIN_COLOUR_CONTRAST = 90.0  # RGB distance between the two colours of a patterned texture
_MIN_OBJECT_CONTRAST = 60.0  # RGB distance between an object's mean colour and the background under it


@dataclass(frozen=True, eq=False)
class Scene:
    """One generated scene.

    The arrays are made read-only, so a scene cannot be changed after creation.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB image.
        labels: class index of each object, in drawing order; indices into :data:`CLASSES`.
        masks: ``(K, H, W)`` boolean masks, ``masks[k]`` is exactly the pixels of the object ``labels[k]``.
    """

    image: np.ndarray
    labels: tuple[int, ...]
    masks: np.ndarray

    def __post_init__(self) -> None:
        """Validate shapes and dtypes and freeze the arrays.

        Raises:
            ValueError: if ``image``, ``labels`` or ``masks`` is malformed or they disagree.
        """
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(f"image must be a uint8 (H, W, 3) array, got {self.image.dtype} {self.image.shape}")
        if self.masks.dtype != np.bool_ or self.masks.ndim != 3 or self.masks.shape[1:] != self.image.shape[:2]:
            raise ValueError(
                f"masks must be a bool (K, H, W) array matching the image, got {self.masks.dtype} {self.masks.shape}"
            )
        if len(self.labels) != self.masks.shape[0]:
            raise ValueError(f"labels must have one entry per mask, got {len(self.labels)} for {self.masks.shape[0]}")
        if any(not 0 <= label < len(CLASSES) for label in self.labels):
            raise ValueError(f"labels must be in [0, {len(CLASSES)}), got {self.labels}")
        self.image.setflags(write=False)
        self.masks.setflags(write=False)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the objects' classes, in the order of :attr:`labels`."""
        return tuple(CLASSES[label] for label in self.labels)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, float32 ``(size, size)``; cached and read-only."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Return an RGB background: a colour gradient with smooth noise, upsampled from a coarse grid, plus pixel noise.

    Bicubic upsampling keeps a linear gradient linear, so gradient and smooth noise are both built on the coarse
    grid, which is much cheaper than building them at full resolution.
    """
    cells = int(rng.integers(3, 9))
    axis = np.linspace(0.0, 1.0, cells, dtype=np.float32)
    start, end = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp = axis[None, :] * math.cos(angle) + axis[:, None] * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    coarse = start + (end - start) * ramp[..., None]
    coarse += rng.uniform(-127.5, 127.5, size=coarse.shape).astype(np.float32) * np.float32(rng.uniform(0.1, 0.5))
    coarse_image = Image.fromarray(np.clip(coarse, 0.0, 255.0).astype(np.uint8))
    smooth = np.asarray(coarse_image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    amplitude = int(rng.integers(0, 16))
    noisy = smooth + rng.integers(-amplitude, amplitude + 1, size=smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _draw_distractors(rng: np.random.Generator, image: Image.Image) -> None:
    """Draw random thin polylines and small irregular blobs (none of them a class shape) onto ``image``."""
    size = image.width
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 9))):
        count = int(rng.integers(2, 5))
        start = rng.uniform(0, size, size=2)
        steps = rng.normal(0.0, 0.15 * size, size=(count - 1, 2))
        points = np.vstack([start, start + np.cumsum(steps, axis=0)])
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        width = int(rng.integers(1, max(2, size // 40) + 1))
        draw.line([tuple(p) for p in points.tolist()], fill=colour, width=width, joint="curve")
    for _ in range(int(rng.integers(0, 7))):
        centre = rng.uniform(0, size, size=2)
        vertices = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=vertices))
        radii = rng.uniform(0.01, 0.045, size=vertices) * size
        points = centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.polygon([tuple(p) for p in points.tolist()], fill=colour)


def _rotated(points: np.ndarray, angle: float, centre: np.ndarray) -> list[tuple[float, float]]:
    """Rotate ``(N, 2)`` offsets by ``angle`` radians and move them to ``centre``."""
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    return [tuple(p) for p in (points @ rotation.T + centre).tolist()]


def _polar(radii: np.ndarray, start: float = -math.pi / 2) -> np.ndarray:
    """Offsets of ``len(radii)`` evenly spaced vertices at the given radii, the first pointing up."""
    angles = start + 2.0 * math.pi * np.arange(len(radii)) / len(radii)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]


def _shape_mask(rng: np.random.Generator, label: int, size: int, centre: np.ndarray, radius: float) -> np.ndarray:
    """Rasterise one object of class ``label`` with circumscribed ``radius``; return its bool mask."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    cx, cy = float(centre[0]), float(centre[1])
    name = CLASSES[label]
    if name in ("circle", "ring"):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        if name == "ring":
            inner = radius * rng.uniform(0.45, 0.62)
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif name == "square":
        draw.polygon(_rotated(_polar(np.full(4, radius)), angle, centre), fill=255)
    elif name == "triangle":
        draw.polygon(_rotated(_polar(np.full(3, radius)), angle, centre), fill=255)
    elif name == "star":
        radii = np.tile([radius, radius * rng.uniform(0.38, 0.5)], 5)
        draw.polygon(_rotated(_polar(radii), angle, centre), fill=255)
    elif name == "cross":
        half = radius * rng.uniform(0.26, 0.34)
        arm = math.sqrt(radius**2 - half**2)
        quarter = np.array([[half, -arm], [half, -half], [arm, -half]])
        turn = np.array([[0.0, -1.0], [1.0, 0.0]])  # 90 degrees clockwise in image coordinates
        points = np.vstack([quarter @ np.linalg.matrix_power(turn, k).T for k in range(4)])
        draw.polygon(_rotated(points, angle, centre), fill=255)
    else:  # pragma: no cover - CLASSES and this function are edited together
        raise ValueError(f"label has no shape: {label}")
    return np.asarray(canvas) > 0


def _texture(rng: np.random.Generator, kind: str, xs: np.ndarray, ys: np.ndarray, scale: float) -> np.ndarray:
    """Return the bool pattern at pixel centres ``(xs, ys)``: True where the texture's first colour goes.

    ``scale`` is the image side over 128; periods are in pixels at 128x128 and scale with it.
    """
    if kind == "solid":
        return np.ones(xs.shape, dtype=bool)
    angle = rng.uniform(0.0, math.pi)
    u = xs * math.cos(angle) + ys * math.sin(angle)
    v = -xs * math.sin(angle) + ys * math.cos(angle)
    period = rng.uniform(5.0, 10.0) * scale
    phase_u, phase_v = rng.uniform(0.0, 1.0, size=2)
    fu = (u / period + phase_u) % 1.0
    fv = (v / period + phase_v) % 1.0
    if kind == "stripes":
        return fu < 0.5
    if kind == "checker":
        return (fu < 0.5) ^ (fv < 0.5)
    if kind == "dots":
        return (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < rng.uniform(0.2, 0.3) ** 2
    if kind == "grid":
        width = rng.uniform(0.12, 0.2)
        return (fu < width) | (fv < width)
    if kind == "waves":
        wavelength = rng.uniform(12.0, 20.0) * scale
        amplitude = rng.uniform(2.0, 3.5) * scale
        bent = u + amplitude * np.sin(2.0 * math.pi * v / wavelength)
        return (bent / period + phase_u) % 1.0 < 0.5
    raise ValueError(f"kind must be one of {TEXTURES}, got {kind!r}")


def _colours(rng: np.random.Generator, patterned: bool, underneath: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pick the object's two colours: apart from each other if ``patterned``, and from the background mean."""
    best: tuple[np.ndarray, np.ndarray] = (underneath, underneath)
    best_score = -1.0
    for _ in range(20):
        first = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
        second = rng.uniform(0.0, 255.0, size=3).astype(np.float32) if patterned else first
        contrast = float(np.linalg.norm(first - second)) if patterned else _MIN_COLOUR_CONTRAST
        separation = float(np.linalg.norm((first + second) / 2.0 - underneath))
        score = min(contrast / _MIN_COLOUR_CONTRAST, separation / _MIN_OBJECT_CONTRAST)
        if score >= 1.0:
            return first, second
        if score > best_score:
            best, best_score = (first, second), score
    return best


def _place(rng: np.random.Generator, size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick centres ``(count, 2)`` and radii ``(count,)`` of objects whose circumscribed discs are disjoint."""
    low, high = MIN_OBJECT_FRACTION * size / 2.0, MAX_OBJECT_FRACTION * size / 2.0
    gap = max(2.0, 0.02 * size)
    shrink = 1.0
    for attempt in range(1000):
        if attempt and attempt % 25 == 0:
            shrink *= 0.9  # dense scenes may not fit at full size; shrinking always ends the search
        radii = rng.uniform(low, high, size=count) * shrink
        centres = np.stack([rng.uniform(r + 1.0, size - r - 1.0, size=2) for r in radii])
        distances = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        needed = radii[:, None] + radii[None] + gap
        if np.all(distances[np.triu_indices(count, 1)] >= needed[np.triu_indices(count, 1)]):
            return centres, radii
    raise RuntimeError(f"could not place {count} objects in a {size}x{size} image")  # pragma: no cover


def generate_scene(rng: np.random.Generator, size: int = 128, num_objects: int = 1) -> Scene:
    """Generate one scene.

    Args:
        rng: the random generator; the scene is a deterministic function of its state.
        size: image side in pixels (at least :data:`MIN_SIZE`).
        num_objects: number of objects, 1 to :data:`MAX_OBJECTS`, all of different classes.

    Returns:
        The scene, with one exact mask per object.

    Raises:
        ValueError: if ``size`` or ``num_objects`` is out of range.
    """
    if not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in [1, {MAX_OBJECTS}], got {num_objects}")
    return _render(rng, size, num_objects, labels=None)


def _render(rng: np.random.Generator, size: int, num_objects: int, labels: Sequence[int] | None) -> Scene:
    """Draw a scene of ``num_objects`` objects; their classes are drawn from ``rng`` unless ``labels`` is given.

    With ``labels=None`` this consumes ``rng`` exactly as :func:`generate_scene` always has, so existing seeds
    keep giving the same scenes; with ``labels`` given, the class draw is skipped.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")

    canvas = _background(rng, size)
    _draw_distractors(rng, canvas)
    image = np.array(canvas)

    if labels is None:
        labels = tuple(int(label) for label in rng.choice(len(CLASSES), size=num_objects, replace=False))
    else:
        labels = tuple(int(label) for label in labels)
    centres, radii = _place(rng, size, num_objects)
    yy, xx = _grid(size)
    scale = size / 128.0
    masks = np.zeros((num_objects, size, size), dtype=bool)
    for k, label in enumerate(labels):
        mask = _shape_mask(rng, label, size, centres[k], float(radii[k]))
        if rng.random() < PREFERRED_TEXTURE_PROB:
            kind = CLASS_TEXTURES[label]
        else:
            kind = str(rng.choice([t for t in TEXTURES if t != CLASS_TEXTURES[label]]))
        xs, ys = xx[mask], yy[mask]
        pattern = _texture(rng, kind, xs, ys, scale)
        first, second = _colours(rng, kind != "solid", image[mask].mean(axis=0, dtype=np.float32))
        # A gentle light ramp across the object, so solid objects are not perfectly flat.
        light_angle = rng.uniform(0.0, 2.0 * math.pi)
        ramp = ((xs - centres[k, 0]) * math.cos(light_angle) + (ys - centres[k, 1]) * math.sin(light_angle)) / radii[k]
        shading = 1.0 + rng.uniform(0.0, 0.15) * ramp
        painted = np.where(pattern[:, None], first, second) * shading[:, None]
        image[mask] = np.rint(np.clip(painted, 0.0, 255.0))
        masks[k] = mask

    return Scene(image=image, labels=labels, masks=masks)


def _resize_image(image: np.ndarray, side: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of a uint8 RGB array to ``side`` x ``side``."""
    if image.shape[0] == side and image.shape[1] == side:
        return np.array(image)
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR)).copy()


def _resize_mask(mask: np.ndarray, side: int) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``side`` x ``side``."""
    if mask.shape[0] == side and mask.shape[1] == side:
        return np.array(mask)
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


GRID_CELLS = 4
"""Number of scenes (quadrants) in a grid of :func:`generate_grid`."""


def generate_grid(
    rng: np.random.Generator, tile: int = 128, size: int | None = None, num_objects: int = GRID_CELLS
) -> Scene:
    """Generate a 2x2 grid of single-object scenes of distinct classes.

    With the default ``num_objects=4``: four distinct classes are drawn first (without replacement), then one
    single-object scene of each, ``tile`` pixels a side, is generated with :func:`generate_scene`'s renderer.
    The scenes go top-left, top-right, bottom-left, bottom-right, and ``labels`` follows that quadrant order.
    With ``size`` given, each tile is resized to ``size // 2`` before assembly (image bilinear, antialiased when
    shrinking, as ``evaluation.data.synthetic_grids`` does; masks nearest), so ``generate_grid(rng, 128,
    size=128)`` is a grid of half-scale 128-px scenes.

    With ``num_objects`` below 4, that many quadrants (drawn at random after the classes) hold an object and
    the others an object-free scene (background and distractors only); ``labels`` and ``masks`` then list the
    occupied quadrants in quadrant order.

    Args:
        rng: the random generator; the grid is a deterministic function of its state.
        tile: side of each generated scene in pixels (at least :data:`MIN_SIZE`).
        size: side of the returned grid image, even and at least 2; ``None`` (default) means ``2 * tile``.
        num_objects: number of quadrants holding an object, 1 to 4.

    Returns:
        A scene of ``num_objects`` objects: ``image`` ``(size, size, 3)``, ``labels`` their distinct classes in
        quadrant order, ``masks`` ``(num_objects, size, size)`` with ``masks[k]`` the object of ``labels[k]``
        placed in the full grid (exact at ``size == 2 * tile``; nearest-resized otherwise, so inside its
        quadrant either way).

    Raises:
        ValueError: if ``tile`` is below :data:`MIN_SIZE`, ``size`` is odd or below 2, or ``num_objects`` is
            outside [1, 4].
    """
    if tile < MIN_SIZE:
        raise ValueError(f"tile must be >= {MIN_SIZE}, got {tile}")
    out = 2 * tile if size is None else int(size)
    if out < 2 or out % 2:
        raise ValueError(f"size must be an even integer >= 2, got {size}")
    if not 1 <= num_objects <= GRID_CELLS:
        raise ValueError(f"num_objects must be in [1, {GRID_CELLS}], got {num_objects}")
    half = out // 2
    drawn = [int(label) for label in rng.choice(len(CLASSES), size=num_objects, replace=False)]
    if num_objects < GRID_CELLS:
        occupied = sorted(int(k) for k in rng.choice(GRID_CELLS, size=num_objects, replace=False))
    else:
        occupied = list(range(GRID_CELLS))
    cell_labels = dict(zip(occupied, drawn, strict=True))
    image = np.empty((out, out, 3), dtype=np.uint8)
    masks = np.zeros((num_objects, out, out), dtype=bool)
    for k in range(GRID_CELLS):
        top, left = (k // 2) * half, (k % 2) * half
        if k in cell_labels:
            scene = _render(rng, tile, 1, labels=(cell_labels[k],))
            image[top : top + half, left : left + half] = _resize_image(scene.image, half)
            masks[occupied.index(k), top : top + half, left : left + half] = _resize_mask(scene.masks[0], half)
        else:
            canvas = _background(rng, tile)
            _draw_distractors(rng, canvas)
            image[top : top + half, left : left + half] = _resize_image(np.asarray(canvas), half)
    labels = tuple(cell_labels[k] for k in occupied)
    return Scene(image=image, labels=labels, masks=masks)


def generate_zoomed_scene(
    rng: np.random.Generator,
    size: int = 128,
    scale: tuple[float, float] = (0.5, 1.0),
    num_objects: int = 1,
) -> Scene:
    """Generate a scene shrunk by a random factor and pasted at a random place on a fresh background.

    A ``size``-px scene is generated, shrunk to ``round(f * size)`` pixels with ``f ~ U(scale)`` (image
    bilinear, antialiased; masks nearest) and pasted at a uniformly random position onto a new background with
    distractors (as :func:`generate_scene` draws them), so objects appear at down to ``scale[0]`` times their
    usual size, with the pasted scene's own background around them. Labels are unchanged.

    Args:
        rng: the random generator; the scene is a deterministic function of its state.
        size: side of the output image (at least :data:`MIN_SIZE`).
        scale: ``(low, high)`` range of the shrink factor, ``0 < low <= high <= 1``.
        num_objects: objects in the inner scene, 1 to :data:`MAX_OBJECTS`.

    Returns:
        The scene, ``size`` pixels a side, with the objects' masks at their pasted place.

    Raises:
        ValueError: if ``size``, ``scale`` or ``num_objects`` is out of range.
    """
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    inner = generate_scene(rng, size, num_objects)
    side = max(1, min(size, round(float(rng.uniform(low, high)) * size)))
    canvas = _background(rng, size)
    _draw_distractors(rng, canvas)
    image = np.array(canvas)
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    image[top : top + side, left : left + side] = _resize_image(inner.image, side)
    masks = np.zeros((num_objects, size, size), dtype=bool)
    for k, mask in enumerate(inner.masks):
        masks[k, top : top + side, left : left + side] = _resize_mask(mask, side)
    return Scene(image=image, labels=inner.labels, masks=masks)


def generate_dataset(
    n: int, seed: int, size: int = 128, two_object_fraction: float = DEFAULT_TWO_OBJECT_FRACTION
) -> list[Scene]:
    """Generate ``n`` scenes deterministically from ``seed``.

    Args:
        n: number of scenes (0 or more).
        seed: seed of the random generator; equal arguments give identical scenes.
        size: image side in pixels.
        two_object_fraction: share of two-object scenes, in [0, 1]; exactly ``round(n * fraction)`` of the
            scenes hold two objects, at random positions in the list, the others one.

    Returns:
        The scenes.

    Raises:
        ValueError: if ``n`` is negative, ``two_object_fraction`` is outside [0, 1] or ``size`` is too small.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    rng = np.random.default_rng(seed)
    counts = np.ones(n, dtype=int)
    counts[rng.permutation(n)[: round(n * two_object_fraction)]] = 2
    return [generate_scene(rng, size=size, num_objects=int(count)) for count in counts]


def save_samples(
    folder: str | Path,
    n: int,
    seed: int,
    size: int = 128,
    two_object_fraction: float = DEFAULT_TWO_OBJECT_FRACTION,
) -> Path:
    """Write ``n`` generated scenes as PNGs, with their masks and an ``index.json``.

    For scene ``i`` the folder gets ``scene_{i:04d}.png`` and one ``scene_{i:04d}_mask{k}.png`` (8-bit,
    255 inside the object) per object. ``index.json`` holds ``classes``, ``seed``, ``size`` and ``samples``, a
    list of ``{"image", "labels", "classes", "masks"}`` with file names relative to the folder.

    Args:
        folder: output folder, created if missing.
        n: number of scenes.
        seed: seed of :func:`generate_dataset`.
        size: image side in pixels.
        two_object_fraction: share of two-object scenes.

    Returns:
        The path of ``index.json``.

    Raises:
        ValueError: as :func:`generate_dataset`.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    samples: list[dict[str, object]] = []
    for i, scene in enumerate(generate_dataset(n, seed, size=size, two_object_fraction=two_object_fraction)):
        stem = f"scene_{i:04d}"
        Image.fromarray(scene.image).save(out / f"{stem}.png")
        mask_files = []
        for k, mask in enumerate(scene.masks):
            mask_files.append(f"{stem}_mask{k}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / mask_files[-1])
        samples.append(
            {
                "image": f"{stem}.png",
                "labels": list(scene.labels),
                "classes": list(scene.class_names),
                "masks": mask_files,
            }
        )
    index = out / "index.json"
    index.write_text(json.dumps({"classes": list(CLASSES), "seed": seed, "size": size, "samples": samples}, indent=2))
    return index


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: ``python -m scenes.synthetic --out DIR --n N --seed S``."""
    parser = argparse.ArgumentParser(description="Write generated demo scenes, their masks and index.json.")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--n", type=int, default=16, help="number of scenes (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument(
        "--two-object-fraction",
        type=float,
        default=DEFAULT_TWO_OBJECT_FRACTION,
        help=f"share of two-object scenes (default {DEFAULT_TWO_OBJECT_FRACTION})",
    )
    args = parser.parse_args(argv)
    try:
        index = save_samples(args.out, args.n, args.seed, size=args.size, two_object_fraction=args.two_object_fraction)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.n} scenes to {args.out} (index: {index})")


if __name__ == "__main__":
    main()
