"""Heatmap overlays a person can look at: the image beside the image with its map in colour."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Piecewise-linear "jet-like" colour ramp: dark blue → cyan → yellow → red.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 128], [0, 160, 255], [120, 255, 120], [255, 200, 0], [200, 0, 0]], dtype=np.float32)


def colourise(heatmap: np.ndarray) -> np.ndarray:
    """Map ``(H, W)`` values in [0, 1] to ``(H, W, 3)`` uint8 colours."""
    values = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    channels = [np.interp(values, _STOPS, _COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Blend a heatmap over an image; strong regions are more opaque.

    Args:
        image: the picture (any mode).
        heatmap: ``(h, w)`` values in [0, 1]; resized to the image with bilinear interpolation.
        alpha: opacity of the map where it is 1.

    Returns:
        An RGB image, the picture on the left and the overlay on the right.
    """
    rgb = image.convert("RGB")
    scaled = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8), mode="L")
    scaled = np.asarray(scaled.resize(rgb.size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    weight = (alpha * (0.3 + 0.7 * scaled))[..., None]
    picture = np.asarray(rgb, dtype=np.float32)
    blended = (1.0 - weight) * picture + weight * colourise(scaled).astype(np.float32)
    canvas = Image.new("RGB", (rgb.width * 2, rgb.height))
    canvas.paste(rgb, (0, 0))
    canvas.paste(Image.fromarray(blended.astype(np.uint8)), (rgb.width, 0))
    return canvas


def montage(panels: list[Image.Image], columns: int = 2, gap: int = 4) -> Image.Image:
    """Tile equally sized panels into a grid on a white background."""
    if not panels:
        raise ValueError("montage needs at least one panel")
    width, height = panels[0].size
    rows = -(-len(panels) // columns)
    canvas = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white")
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        canvas.paste(panel, (column * (width + gap), row * (height + gap)))
    return canvas
