"""LaFAM: Label-free Activation Map.

For activations ``A`` of shape ``(N, C, h, w)`` taken at a convolutional layer (or at a transformer block,
arranged on its patch grid by :func:`handlers.explain.tokens.to_grid`: a ViT block's patch tokens, a Swin
stage's channel-last map; exported graphs do this inside the graph)::

    M_n = mean_c A[n, c]                              (channel mean, shape h x w)
    LaFAM_n = (M_n - min M_n) / (max M_n - min M_n)   (min-max scaled to [0, 1])

then upsampled to the input (nearest-neighbour in the paper, bilinear as an option). It needs no label,
so it explains classifiers and encoders alike, and it costs one reduction over activations the forward
pass already computed. A constant ``M_n`` (no spatial contrast) maps to all zeros rather than NaN.

Example:
    >>> acts = torch.zeros(1, 2, 2, 2); acts[0, :, 0, 0] = 4.0
    >>> lafam(acts)[0]
    tensor([[1., 0.],
            [0., 0.]])
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_INTERPOLATION = {"nearest": "nearest-exact", "bilinear": "bilinear"}


def lafam(activations: torch.Tensor) -> torch.Tensor:
    """Compute LaFAM maps at the layer's native resolution.

    Args:
        activations: ``(N, C, h, w)`` activations of one layer, any float dtype, on any device.

    Returns:
        ``(N, h, w)`` float32 maps on the same device, each min-max scaled to [0, 1].

    Raises:
        ValueError: ``activations`` is not 4-D.
    """
    if activations.dim() != 4:
        raise ValueError(
            f"activations must be (N, C, h, w), got shape {tuple(activations.shape)}; turn tokens (N, T, C) or a "
            "channel-last map (N, h, w, C) into one with handlers.explain.tokens.grid_layout and to_grid"
        )
    channel_mean = activations.float().mean(dim=1)
    if channel_mean.device.type == "cpu" and not channel_mean.requires_grad:
        # the served path: on these few values numpy's operations cost a fraction of torch's dispatch
        return torch.from_numpy(_minmax_numpy(channel_mean.numpy()))
    return minmax_scale(channel_mean)


def _minmax_numpy(maps: np.ndarray) -> np.ndarray:
    """:func:`minmax_scale` on a float32 numpy array ``(N, h, w)``: the same float64 arithmetic."""
    limit = float(np.finfo(np.float32).max)
    values = np.nan_to_num(maps.astype(np.float64), nan=0.0, posinf=limit, neginf=-limit)
    flat = values.reshape(len(values), -1)
    low = flat.min(axis=1).reshape(-1, 1, 1)
    span = flat.max(axis=1).reshape(-1, 1, 1) - low
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(span > 0, (values - low) / np.maximum(span, np.finfo(np.float64).tiny), 0.0)
    return scaled.astype(np.float32)


def minmax_scale(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``(N, h, w)`` to [0, 1] in float32; a constant map becomes zeros.

    Non-finite values (an overflowing fp16 graph) are clamped to float32's range first, so the result is
    always finite; the scaling runs in float64, where the span of two float32 values cannot overflow.
    """
    limit = torch.finfo(torch.float32).max
    maps = torch.nan_to_num(maps.double(), nan=0.0, posinf=limit, neginf=-limit)
    flat = maps.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1)
    span = flat.amax(dim=1).view(-1, 1, 1) - low
    scaled = torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return scaled.float()


def resize_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Upsample (or downsample) maps ``(N, h, w)`` to ``size = (H, W)``.

    Args:
        maps: maps, in [0, 1] (LaFAM) or signed (LRP, Grad-CAM, distributions).
        size: target ``(H, W)``.
        mode: ``nearest`` (exact nearest-neighbour, pixel centres aligned) or ``bilinear``.

    Returns:
        ``(N, H, W)`` maps within each input map's own range (neither mode can overshoot it; the clamp only
        removes rounding), so [0, 1] maps stay in [0, 1] and signed maps keep their negative evidence.

    Raises:
        ValueError: unknown ``mode``, ``maps`` not 3-D, or ``size`` not two positive sides.
    """
    if mode not in _INTERPOLATION:
        raise ValueError(f"mode must be one of {', '.join(_INTERPOLATION)}, got {mode!r}")
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, h, w), got shape {tuple(maps.shape)}; add a batch dimension with [None]")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with positive sides, got {tuple(size)!r}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(maps.unsqueeze(1), size=tuple(size), mode=_INTERPOLATION[mode], **kwargs).squeeze(1)
    low = maps.flatten(1).amin(1).view(-1, 1, 1)
    high = maps.flatten(1).amax(1).view(-1, 1, 1)
    return torch.minimum(torch.maximum(out, low), high)
