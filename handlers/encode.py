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


def explanation_json(
    *,
    method: str,
    layer: str,
    fmt: str,
    native: torch.Tensor,
    size: tuple[int, int],
    upsample: str,
    resized: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Build the ``explanation`` object.

    Args:
        method: explanation method name.
        layer: explained layer.
        fmt: ``png`` or ``array``.
        native: ``(h, w)`` map at the layer's native resolution.
        size: ``(H, W)`` the map is (png) or should be (array) upsampled to.
        upsample: interpolation used or to use.
        resized: ``(H, W)`` map, required for ``png``.
    """
    body: dict[str, Any] = {
        "method": method,
        "layer": layer,
        "format": fmt,
        "size": [int(size[0]), int(size[1])],
        "native_size": [int(native.shape[-2]), int(native.shape[-1])],
        "upsample": upsample,
    }
    if fmt == "png":
        if resized is None:
            raise ValueError("a png explanation needs the resized map")
        body["data"] = png_base64(resized)
    else:
        # round in float64: rounded float32 values would reach the JSON as e.g. 0.12346000224351883
        body["data"] = np.round(native.detach().cpu().double().numpy(), ARRAY_DECIMALS).tolist()
    return body


def predictions_json(probabilities: torch.Tensor, top_k: int, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """Return the ``top_k`` classes of one probability vector, most likely first."""
    values, indices = torch.topk(probabilities.detach().float().cpu(), top_k)
    return [
        {"index": int(i), "label": labels[int(i)] if labels else str(int(i)), "probability": round(float(p), 6)}
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
