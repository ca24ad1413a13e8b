"""Maps and predictions → the JSON response of one request."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

ARRAY_DECIMALS = 5


def png_base64(map_2d: torch.Tensor) -> str:
    """Encode an ``(H, W)`` map in [0, 1] as a base64 8-bit grayscale PNG (0 → 0, 1 → 255)."""
    pixels = (map_2d.detach().float().cpu().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def map_data(fmt: str, native: torch.Tensor, resized: torch.Tensor | None, *, signed: bool) -> dict[str, Any]:
    """Encode one map: ``{"data": ...}`` (plus ``max_abs`` for a signed map).

    A LaFAM map is already in [0, 1]. A signed map (LRP, Grad-CAM, distributions) is divided by its largest
    absolute value ``max_abs`` (reported, so raw values can be recovered): ``array`` data then lies in
    [-1, 1], and a ``png`` pixel is ``round(255 · (1 + value) / 2)``: 0 the most negative, 128 no evidence,
    255 the most positive.

    Args:
        fmt: ``png`` or ``array``.
        native: ``(h, w)`` map at the method's native resolution (used for ``array``).
        resized: ``(H, W)`` map at the requested size, required for ``png``.
        signed: whether the map is signed (not min-max scaled).
    """
    scale = float(native.detach().abs().max()) if signed else 1.0
    entry: dict[str, Any] = {"max_abs": round(scale, 8)} if signed else {}
    divisor = scale if scale > 0 else 1.0
    if fmt == "png":
        if resized is None:
            raise ValueError("a png explanation needs the resized map")
        entry["data"] = png_base64(0.5 + resized / (2 * divisor) if signed else resized)
    else:
        # round in float64: rounded float32 values would reach the JSON as e.g. 0.12346000224351883
        values = native.detach().cpu().double() / divisor
        entry["data"] = np.round(values.numpy(), ARRAY_DECIMALS).tolist()
    return entry


def explanation_json(
    *,
    method: str,
    layer: str | None,
    fmt: str,
    native: torch.Tensor,
    size: tuple[int, int],
    upsample: str,
    resized: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Build the ``explanation`` object of a label-free map in [0, 1] (LaFAM).

    Args:
        method: explanation method name.
        layer: explained layer.
        fmt: ``png`` or ``array``.
        native: ``(h, w)`` map at the layer's native resolution.
        size: ``(H, W)`` the map is (png) or should be (array) upsampled to.
        upsample: interpolation used or to use.
        resized: ``(H, W)`` map, required for ``png``.
    """
    header = explanation_header(method=method, layer=layer, fmt=fmt, native=native, size=size, upsample=upsample)
    return {**header, **map_data(fmt, native, resized, signed=False)}


def explanation_header(
    *, method: str, layer: str | None, fmt: str, native: torch.Tensor, size: tuple[int, int], upsample: str
) -> dict[str, Any]:
    """The keys every ``explanation`` object has, whatever the method."""
    return {
        "method": method,
        "layer": layer,
        "format": fmt,
        "size": [int(size[0]), int(size[1])],
        "native_size": [int(native.shape[-2]), int(native.shape[-1])],
        "upsample": upsample,
    }


def predictions_json(probabilities: torch.Tensor, top_k: int, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """Return the ``top_k`` classes of one probability vector, most likely first."""
    values, indices = torch.topk(probabilities.detach().float().cpu(), top_k)
    return [
        {"index": int(i), "label": labels[int(i)] if labels else str(int(i)), "probability": round(float(p), 6)}
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
