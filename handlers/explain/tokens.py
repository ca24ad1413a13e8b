"""Spatial maps from any layer output: channel-first maps, channel-last maps and token sequences.

LaFAM, Grad-CAM and the distribution methods work on maps ``(N, C, h, w)``. Convolutional layers produce
those directly; transformer blocks do not:

* a ViT encoder block outputs tokens ``(N, T, C)``: ``extra`` leading non-patch tokens (class, distillation,
  register tokens) followed by the ``h * w`` patch tokens in row-major order;
* a Swin stage outputs a channel-last map ``(N, h, w, C)``.

:func:`grid_layout` decides, from the output's shape and the input size alone, which of the three it is
(:class:`Layout`); :func:`to_grid` then turns an output of that layout into ``(N, C, h, w)`` with a slice,
reshape and permute only (no data-dependent Python control flow), so it can live inside a graph exported by
``torch.jit.trace`` or ``torch.onnx.export``.

Example:
    >>> layout = grid_layout((1, 197, 768), (224, 224))      # ViT-B/16 encoder block
    >>> layout
    Layout(kind='tokens', extra=1, grid=(14, 14), stride=16)
    >>> to_grid(torch.zeros(1, 197, 768), layout).shape
    torch.Size([1, 768, 14, 14])
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

Kind = Literal["nchw", "nhwc", "tokens"]
KINDS: tuple[str, ...] = ("nchw", "nhwc", "tokens")
MAX_EXTRA = 16
"""The most leading non-patch tokens :func:`grid_layout` tries to drop (class + distillation + registers)."""


class Layout(NamedTuple):
    """How a layer output becomes a map ``(N, C, h, w)``."""

    kind: Kind
    """``"nchw"`` (already a map), ``"nhwc"`` (channel-last map, e.g. Swin) or ``"tokens"`` (``(N, T, C)``)."""
    extra: int
    """Leading non-patch tokens dropped (``"tokens"`` only; 0 otherwise)."""
    grid: tuple[int, int]
    """``(h, w)`` of the map at the input size the layout was decided for."""
    stride: int
    """Input pixels per map cell: ``h == H / stride``; for a 4-D map where no stride divides the input, the
    smallest stride with ``h == H // stride`` (convolutions) or ``ceil(H / stride)`` (padded stages)."""

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready form (for manifests); :meth:`from_dict` reads it back."""
        return {"kind": self.kind, "extra": self.extra, "grid": list(self.grid), "stride": self.stride}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Layout:
        """Read the form :meth:`to_dict` writes.

        Raises:
            ValueError: not such a dict.
        """
        try:
            kind, extra, grid, stride = data["kind"], data["extra"], data["grid"], data["stride"]
            h, w = grid  # type: ignore[misc]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a layout needs kind, extra, grid [h, w] and stride, got {data!r}") from exc
        values = (extra, h, w, stride)
        if kind not in KINDS or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"a layout needs kind in {KINDS} and non-negative integers, got {data!r}")
        return cls(kind, extra, (h, w), stride)  # type: ignore[arg-type]

    def describe(self) -> str:
        """One phrase for messages and logs, e.g. ``"tokens (1 extra + 14x14 grid)"``."""
        h, w = self.grid
        if self.kind == "tokens":
            return f"tokens ({self.extra} extra + {h}x{w} grid)"
        return f"{self.kind} {h}x{w} map"


def _grids(input_size: tuple[int, int], stride: int, *, exact: bool) -> tuple[tuple[int, int], ...]:
    """Grids ``(h, w)`` an input gives at ``stride``.

    ``exact``: only where the stride divides both sides; else floor (convolutions) and ceil (padded stages,
    e.g. Swin's patch merging), each applied to both sides alike.
    """
    height, width = input_size
    if exact:
        return ((height // stride, width // stride),) if height % stride == 0 and width % stride == 0 else ()
    floor, ceil = (height // stride, width // stride), (-(-height // stride), -(-width // stride))
    return tuple(g for g in dict.fromkeys((floor, ceil)) if min(g) >= 1)


def _strides_for(side: int, size: int) -> range:
    """The strides whose floor or ceil of ``size / stride`` can be ``side`` (a few around ``size / side``)."""
    return range(max(1, size // (side + 1)), size // max(1, side - 1) + 2)


def _fit_map(h: int, w: int, input_size: tuple[int, int]) -> int | None:
    """The smallest integer stride ``s >= 1`` that gives grid ``(h, w)`` (exact strides first), else None."""
    if h < 1 or w < 1:
        return None
    for exact in (True, False):
        for stride in _strides_for(h, input_size[0]):
            if (h, w) in _grids(input_size, stride, exact=exact):
                return stride
    return None


def _fit_tokens(tokens: int, input_size: tuple[int, int]) -> tuple[int, tuple[int, int], int] | None:
    """``(extra, (h, w), stride)`` with the smallest ``extra`` (fewer than the patches) at an exact stride."""
    common = math.gcd(*input_size)
    strides = [s for s in range(1, math.isqrt(common) + 1) if common % s == 0]
    strides = sorted({*strides, *(common // s for s in strides)})  # every stride dividing both sides
    for extra in range(min(MAX_EXTRA, (tokens - 1) // 2) + 1):
        for stride in strides:
            h, w = input_size[0] // stride, input_size[1] // stride
            if h * w == tokens - extra:
                return extra, (h, w), stride
    return None


def grid_layout(shape: tuple[int, ...], input_size: tuple[int, int], hint: str | None = None) -> Layout:
    """Decide how a layer output of ``shape`` (at input ``(H, W)``) becomes a map ``(N, C, h, w)``.

    Rules:

    * 3-D ``(N, T, C)``: tokens. The smallest ``extra`` in ``0..16`` such that ``T - extra == h * w`` with
      ``(h, w) == (H / s, W / s)`` for an integer stride ``s`` (ViT-B/16 at 224: ``T = 197`` gives one class
      token and a 14x14 grid). The stride must divide the input (patch embeddings require it; rounded
      grids would make almost any ``T`` fit), and ``extra`` must be fewer than the patch tokens.
    * 4-D ``(N, a, b, c)``: ``"nchw"`` if ``(b, c) == (H / s, W / s)`` for an integer ``s >= 1``, else
      ``"nhwc"`` if ``(a, b)`` is. When both fit (e.g. ``(N, 56, 56, 56)`` at 224), ``"nchw"`` unless
      ``hint == "nhwc"``. Where no stride divides the input, floor sides (convolutions) and ceil sides
      (padded stages) are accepted too.

    Args:
        shape: the layer output's shape, batch first.
        input_size: ``(H, W)`` of the model input that produced it.
        hint: ``"nchw"`` or ``"nhwc"`` to settle an ambiguous 4-D shape; ignored otherwise.

    Raises:
        ValueError: the shape is none of these (the message names the shape and why), or a bad ``hint``.
    """
    shape = tuple(int(d) for d in shape)
    height, width = (int(s) for s in input_size)
    if hint not in (None, "nchw", "nhwc"):
        raise ValueError(f"hint must be 'nchw' or 'nhwc', got {hint!r}")
    if height < 1 or width < 1:
        raise ValueError(f"input_size must be two positive ints (H, W), got {input_size!r}")
    where = f"layer output of shape {shape} at input {height}x{width}"
    if len(shape) == 3:
        fit = _fit_tokens(shape[1], (height, width))
        if fit is None:
            raise ValueError(
                f"{where}: not a token grid: no T - extra (extra 0..{MAX_EXTRA}) of T={shape[1]} tokens is an "
                f"h x w grid at an integer stride of the input"
            )
        extra, grid, stride = fit
        return Layout("tokens", extra, grid, stride)
    if len(shape) == 4:
        first = _fit_map(shape[2], shape[3], (height, width))
        last = _fit_map(shape[1], shape[2], (height, width))
        if first is not None and (last is None or hint != "nhwc"):
            return Layout("nchw", 0, (shape[2], shape[3]), first)
        if last is not None:
            return Layout("nhwc", 0, (shape[1], shape[2]), last)
        raise ValueError(
            f"{where}: not a spatial map: neither dims (2, 3) = {shape[2:]} (NCHW) nor dims (1, 2) = "
            f"{shape[1:3]} (NHWC) are the input size divided by an integer stride"
        )
    raise ValueError(
        f"{where}: a map needs (N, C, h, w), (N, h, w, C) or tokens (N, T, C); a {len(shape)}-D output has no "
        "spatial grid"
    )


def map_layout(shape: tuple[int, ...], input_size: tuple[int, int], hint: str | None = None) -> Layout:
    """:func:`grid_layout`, except that a 4-D output none of whose dims fit the input's grid is taken as NCHW.

    What exports and the eager explainers use: every 4-D activation was a channel-first map before token
    layouts existed (e.g. the output of unpadded convolutions, ``30x38`` at ``32x40``), and stays one.

    Raises:
        ValueError: a 3-D output that is no token grid, or an output that is neither 3-D nor 4-D.
    """
    try:
        return grid_layout(shape, input_size, hint)
    except ValueError:
        if len(shape) != 4:
            raise
        h, w = int(shape[2]), int(shape[3])
        return Layout("nchw", 0, (h, w), max(1, int(input_size[0]) // max(1, h)))


def to_grid(output: torch.Tensor, layout: Layout, input_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Turn a layer output of ``layout`` into a map ``(N, C, h, w)`` (a view where possible).

    Traceable: only a slice, reshape and permute, with sizes from the tensor's shape and ``layout``.

    Args:
        output: the layer output, ``(N, C, h, w)``, ``(N, h, w, C)`` or ``(N, T, C)``.
        layout: from :func:`grid_layout`.
        input_size: for ``"tokens"`` at another input size than the layout was decided at (a graph with a
            dynamic size passes ``x.shape[-2:]``): the grid becomes ``(H // stride, W // stride)``. Default: the
            layout's grid.

    Raises:
        ValueError: ``output`` has the wrong number of dimensions for ``layout``.
    """
    ndim = 3 if layout.kind == "tokens" else 4
    if output.dim() != ndim:
        raise ValueError(f"a {layout.kind} layout needs a {ndim}-D output, got shape {tuple(output.shape)}")
    if layout.kind == "nchw":
        return output
    if layout.kind == "nhwc":
        return output.permute(0, 3, 1, 2)
    if input_size is None:
        h, w = layout.grid
    else:
        h, w = input_size[0] // layout.stride, input_size[1] // layout.stride
    patches = output[:, layout.extra :, :] if layout.extra else output
    return patches.reshape(output.shape[0], h, w, output.shape[2]).permute(0, 3, 1, 2)


def from_grid(grid: torch.Tensor, layout: Layout, output: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_grid`: the layer output ``output`` with its grid part taken from ``grid``.

    ``from_grid(to_grid(output, layout), layout, output)`` equals ``output``; the result depends on ``grid``
    (and, for tokens, on ``output``'s extra tokens), so a forward hook that returns it makes the rest of the
    model a function of ``grid``, and gradients w.r.t. the map ``(N, C, h, w)`` can be taken directly.
    """
    if layout.kind == "nchw":
        return grid
    channel_last = grid.permute(0, 2, 3, 1)
    if layout.kind == "nhwc":
        return channel_last
    patches = channel_last.reshape(grid.shape[0], -1, grid.shape[1])
    return torch.cat([output[:, : layout.extra], patches], dim=1) if layout.extra else patches
