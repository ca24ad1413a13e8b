"""Maps and predictions → the JSON response of one request."""

from __future__ import annotations

import base64
import functools
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .explain.lafam import lafam, resize_maps
from .methods.contract import Explanation

ARRAY_DECIMALS = 5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_ZLIB_LEVEL = 1
"""zlib level of the map PNGs: the 'Up' filter turns a nearest-upsampled map's repeated rows into zeros, which
level 1 already packs as tightly as Pillow's default encoder does."""


def to_pixels(map_2d: torch.Tensor) -> np.ndarray:
    """An ``(H, W)`` map in [0, 1] as 8-bit grey levels (0 → 0, 1 → 255, rounded; outside values clamped)."""
    values = map_2d.detach().float().cpu().numpy()
    return (np.clip(values, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(rows: np.ndarray) -> bytes:
    """A greyscale PNG of already filtered ``rows`` (``(H, 1 + W)``: each row's filter byte, then its bytes)."""
    height, width = rows.shape[0], rows.shape[1] - 1
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    idat = zlib.compress(rows.tobytes(), PNG_ZLIB_LEVEL)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode ``(H, W)`` uint8 grey levels as an 8-bit greyscale PNG.

    Every row but the first uses PNG's 'Up' filter (the difference to the row above, modulo 256), so the
    repeated rows of a nearest-upsampled map compress to almost nothing at zlib level 1; about 5x faster
    than Pillow's encoder on a 224x224 map, byte-for-byte the same image.
    """
    height, width = pixels.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up
    rows[0, 0] = 0  # the first row has no row above: filter None
    rows[0, 1:] = pixels[0]
    np.subtract(pixels[1:], pixels[:-1], out=rows[1:, 1:])  # uint8 arithmetic wraps: the filter's modulo 256
    return _png(rows)


try:  # the C writer, built when the package is installed (setup.py); without it, the Python one below
    from . import _png as _native
except ImportError:  # pragma: no cover - a build without a C compiler
    _native = None


@functools.lru_cache(maxsize=256)
def _run_lengths(native: int, target: int) -> bytes:
    """How many of ``target`` nearest output pixels each of ``native`` source pixels gives (int32 bytes, in order)."""
    return np.bincount(_nearest_indices(native, target), minlength=native).astype(np.int32).tobytes()


def png_nearest(pixels: np.ndarray, size: tuple[int, int]) -> bytes:
    """The PNG of ``(h, w)`` grey levels nearest-upsampled to ``size``, without building the upsampled image.

    The same pixels as ``png_bytes(upsample_pixels(pixels, size))``: an output row that repeats the one above
    is all zeros under the 'Up' filter, so only the first row of each source row is filled in. The Python
    writer behind :func:`encode_grey` when the C one is not built.
    """
    sources = _nearest_indices(pixels.shape[0], size[0])
    columns = _nearest_indices(pixels.shape[1], size[1])
    rows = np.zeros((size[0], size[1] + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up
    rows[0, 0] = 0  # the first row has no row above: filter None
    upsampled = pixels[:, columns]  # each source row at the output width
    starts = np.flatnonzero(np.r_[True, sources[1:] != sources[:-1]])  # first output row of each run
    rows[0, 1:] = upsampled[sources[0]]
    later = starts[starts > 0]
    rows[later, 1:] = upsampled[sources[later]] - upsampled[sources[later - 1]]  # uint8: modulo 256
    return _png(rows)


def encode_nearest(pixels: np.ndarray, size: tuple[int, int]) -> bytes:
    """The PNG of ``(h, w)`` grey levels nearest-upsampled to ``size`` (:func:`encode_grey`)."""
    return encode_grey(pixels.tobytes(), (int(pixels.shape[0]), int(pixels.shape[1])), size)


def encode_grey(data: bytes, native: tuple[int, int], size: tuple[int, int]) -> bytes:
    """The PNG of ``h * w`` grey levels (bytes, row-major) nearest-upsampled to ``size``.

    Written by the C writer (``handlers/_png.c``: one deflate block of literals and back-references, O(h·w + H)
    work, a few hundred bytes for a 7x7 map at 224x224) when it is built, else by :func:`png_nearest` (zlib).
    Both give the same pixels.
    """
    if _native is not None:
        return _native.png_from_grey(data, 0, _run_lengths(native[0], size[0]), _run_lengths(native[1], size[1]))
    return png_nearest(np.frombuffer(data, np.uint8).reshape(native), size)


def lafam_png_base64(means: np.ndarray, index: int, native: tuple[int, int], size: tuple[int, int]) -> tuple[str, bool]:
    """The served default from the runtime's channel means: the base64 PNG of one image's LaFAM map, and ``empty``.

    ``means``: float32, C-contiguous, holding ``h * w`` values per image (``(N, 1, h, w)``); ``index``: the
    image. The map is the reference's (:func:`~handlers.explain.lafam.lafam` of the mean, then
    :func:`to_pixels`), nearest-upsampled to ``size``. The C writer does all of it in one call (right after
    the forward pass, each Python-level operation costs several times its warm time); without it, numpy and
    :func:`encode_grey`.
    """
    (h, w), (height, width) = native, size
    if _native is not None:
        return _native.lafam_png_base64(means, index * h * w, _run_lengths(h, height), _run_lengths(w, width))
    one = np.asarray(means, dtype=np.float32).reshape(-1, 1, h, w)[index : index + 1]
    pixels = to_pixels(lafam(torch.from_numpy(one))[0])
    return base64.b64encode(encode_grey(pixels.tobytes(), native, size)).decode("ascii"), not pixels.any()


def png_base64(map_2d: torch.Tensor) -> str:
    """Encode an ``(H, W)`` map in [0, 1] as a base64 8-bit grayscale PNG (0 → 0, 1 → 255)."""
    return base64.b64encode(png_bytes(to_pixels(map_2d))).decode("ascii")


@functools.lru_cache(maxsize=256)
def _nearest_indices(native: int, target: int) -> np.ndarray:
    """Source index of each of ``target`` pixels under :func:`resize_maps`' nearest mode (derived from it)."""
    source = torch.arange(native, dtype=torch.float32).view(1, 1, native)  # one map, one row: the indices
    picked = resize_maps(source, (1, target), "nearest")
    return picked.view(target).round().to(torch.int64).numpy()


def upsample_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-upsample ``(h, w)`` grey levels to ``size = (H, W)``, on uint8.

    Exactly ``resize_maps(..., "nearest")`` followed by :func:`to_pixels`: nearest copies values, so
    quantising first changes nothing.
    """
    rows = _nearest_indices(pixels.shape[0], size[0])
    columns = _nearest_indices(pixels.shape[1], size[1])
    return pixels[rows[:, None], columns[None, :]]


def map_data(
    fmt: str,
    native: torch.Tensor,
    resized: torch.Tensor | None,
    *,
    signed: bool,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
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
        resized: ``(H, W)`` map at the requested size (any interpolation), for ``png``.
        signed: whether the map is signed (not min-max scaled).
        size: for ``png`` without ``resized``: the ``(H, W)`` to nearest-upsample the native map to, done on the
            8-bit grey levels (the same pixels as resizing first, a fraction of the work).

    Raises:
        ValueError: ``png`` with neither ``resized`` nor ``size``.
    """
    values = native.detach().float().cpu().numpy()  # no copy for the CPU float32 maps the methods return
    peak = float(np.abs(values).max()) if values.size else 0.0
    scale = peak if signed else 1.0
    entry: dict[str, Any] = {"empty": not peak > 0}
    if signed:
        entry["max_abs"] = round(scale, 8)
    divisor = scale if scale > 0 else 1.0
    if fmt == "png":
        if resized is None and size is None:
            raise ValueError("a png explanation needs the resized map or the size to upsample to")
        if resized is not None:
            entry["data"] = png_base64(0.5 + resized / (2 * divisor) if signed else resized)
        else:
            grey = 0.5 + values / np.float32(2 * divisor) if signed else values
            pixels = (np.clip(grey, 0.0, 1.0) * np.float32(255.0) + np.float32(0.5)).astype(np.uint8)  # to_pixels
            entry["data"] = base64.b64encode(encode_nearest(pixels, size)).decode("ascii")
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
    native_size = (int(native.shape[-2]), int(native.shape[-1]))
    header = explanation_header(
        method=method, layer=layer, fmt=fmt, native_size=native_size, size=size, upsample=upsample
    )
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
        resized: ``(K, H, W)`` maps at ``size`` for ``png``; ``None``: nearest-upsampled to ``size`` when encoded.
        label: class index → label.
        probabilities: ``(C,)`` class probabilities, or ``None``.
    """
    native_size = (int(maps.shape[-2]), int(maps.shape[-1]))
    body = explanation_header(
        method=method, layer=result.layer, fmt=fmt, native_size=native_size, size=size, upsample=upsample
    )
    if result.signed:
        body["scale"] = "signed"
    images: list[torch.Tensor | None] = list(resized) if resized is not None else [None] * len(maps)
    if result.classes is None:
        body.update(map_data(fmt, maps[0], images[0], signed=result.signed, size=size))
    else:
        body["classes"] = [
            {
                "index": index,
                "label": label(index),
                "probability": round(float(probabilities[index]), 6) if probabilities is not None else None,
                **map_data(fmt, native, image, signed=result.signed, size=size),
            }
            for index, native, image in zip(result.classes, maps, images, strict=True)
        ]
    body.update(result.extras)
    if result.competitors is not None:
        body["competitors"] = list(result.competitors)
    return body


def explanation_header(
    *, method: str, layer: str | None, fmt: str, native_size: tuple[int, int], size: tuple[int, int], upsample: str
) -> dict[str, Any]:
    """The keys every ``explanation`` object has, whatever the method (``native_size``: the map's ``(h, w)``)."""
    return {
        "method": method,
        "layer": layer,
        "format": fmt,
        "size": [int(size[0]), int(size[1])],
        "native_size": [int(native_size[0]), int(native_size[1])],
        "upsample": upsample,
    }


def predictions_json(probabilities: torch.Tensor, top_k: int, labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """Return the ``top_k`` classes of one probability vector, most likely first."""
    values, indices = torch.topk(probabilities.detach().float().cpu(), top_k)
    return [
        {"index": int(i), "label": labels[int(i)] if labels else str(int(i)), "probability": round(float(p), 6)}
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]
