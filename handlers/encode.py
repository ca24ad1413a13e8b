"""Maps and predictions → the JSON response of one request."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from .methods.contract import Explanation

ARRAY_DECIMALS = 5


def png_base64(map_2d: torch.Tensor) -> str:
    """Encode an ``(H, W)`` map in [0, 1] as a base64 8-bit grayscale PNG (0 → 0, 1 → 255)."""
    pixels = (map_2d.detach().float().cpu().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def map_data(fmt: str, native: torch.Tensor, resized: torch.Tensor | None, *, signed: bool) -> dict[str, Any]:
    """Encode one map: ``{"empty": ..., "data": ...}`` (plus ``max_abs`` for a signed map).

    ``empty`` is true when every value of the map is zero: nothing was attributed, e.g. a distribution's map
    where no location passed the threshold τ, or a LaFAM map of constant activations.

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
    peak = float(native.detach().abs().max()) if native.numel() else 0.0
    scale = peak if signed else 1.0
    entry: dict[str, Any] = {"empty": not peak > 0}
    if signed:
        entry["max_abs"] = round(scale, 8)
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


def encode_explanation(
    result: Explanation,
    *,
    maps: torch.Tensor,
    method: str,
    fmt: str,
    size: tuple[int, int],
    upsample: str,
    resized: torch.Tensor | None,
    label: Callable[[int], str],
    probabilities: torch.Tensor | None,
) -> dict[str, Any]:
    """Build the ``explanation`` object of any method's :class:`~.methods.contract.Explanation`.

    The header (:func:`explanation_header`), then ``"scale": "signed"`` for signed maps; a label-free
    result puts ``data`` (and ``max_abs``) on the object, a per-class one lists them under ``classes`` with
    each class's label and probability; then the method's ``extras`` and its ``competitors``, if any.

    Args:
        result: what the method returned.
        maps: ``result.maps`` as float32 on the CPU, ``(K, h, w)``.
        method: the method's name.
        fmt: ``png`` or ``array``.
        size: ``(H, W)`` the maps are (png) or would be (array) upsampled to.
        upsample: interpolation used or to use.
        resized: ``(K, H, W)`` maps at ``size``, required for ``png``.
        label: class index → label.
        probabilities: ``(C,)`` class probabilities, or ``None``.
    """
    body = explanation_header(method=method, layer=result.layer, fmt=fmt, native=maps, size=size, upsample=upsample)
    if result.signed:
        body["scale"] = "signed"
    images: list[torch.Tensor | None] = list(resized) if resized is not None else [None] * len(maps)
    if result.classes is None:
        body.update(map_data(fmt, maps[0], images[0], signed=result.signed))
    else:
        body["classes"] = [
            {
                "index": index,
                "label": label(index),
                "probability": round(float(probabilities[index]), 6) if probabilities is not None else None,
                **map_data(fmt, native, image, signed=result.signed),
            }
            for index, native, image in zip(result.classes, maps, images, strict=True)
        ]
    body.update(result.extras)
    if result.competitors is not None:
        body["competitors"] = list(result.competitors)
    return body


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
