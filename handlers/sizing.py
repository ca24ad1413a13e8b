"""The ``resize`` request option: which size an image is run at, and the limits of native-resolution serving.

``model`` (the default) resizes every image to the manifest's ``input_size``, as a fixed-size graph needs.
A graph exported with ``--dynamic-size`` (manifest ``dynamic_size: true``) may also see an image at its own
size (``none``) or scaled down, keeping its aspect ratio, so that its longer side is at most ``N`` (an
integer; an image already within ``N`` is left as it is: never upscaled, which would only add pixels the
camera never saw). Two guard rails hold whatever the value: each side at least the model's ``min_side``
(its total stride: below it the explained layer has no pixel left) and at most :data:`MAX_INPUT_PIXELS`
pixels, so that one large image cannot exhaust a worker's memory in a backward pass.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import InvalidOption, shown
from .manifest import Manifest

RESIZE_KEYWORDS: tuple[str, ...] = ("model", "none")
MAX_RESIZE_SIDE = 4096
"""The largest ``N`` of ``resize=N`` (as ``size``'s largest side)."""
MAX_INPUT_PIXELS = 1024 * 1024
"""The largest input (height x width) a dynamic-size model is run at, by default (model config
``lafam: {max_input_pixels: ...}`` overrides it). 1 M pixels is 21x the pixels of 224x224: an LRP or
input x gradient pass of ResNet-50 keeps every layer's activations, about 0.1 GB per image at 224x224, so
about 2 GB here (and a batch of 8 plain forwards less), instead of about 33 GB at 4096x4096."""
DEFAULT_MIN_SIDE = 32
"""The smallest side served when the manifest records no ``min_side`` (the stride of most CNN backbones)."""
_INT_PATTERN = re.compile(r"^\s*[0-9]{1,32}\s*$")  # int() refuses over 4300 digits; no bound needs 32


def min_side(manifest: Manifest) -> int:
    """The smallest input side served for ``manifest``'s model."""
    return manifest.min_side if manifest.min_side is not None else DEFAULT_MIN_SIDE


def parse_resize(value: Any, manifest: Manifest) -> str | int:
    """Validate the ``resize`` option: ``model``, ``none`` or a maximum side ``N`` (dynamic-size models only).

    Raises:
        InvalidOption: a malformed value, an ``N`` out of range, or ``none``/``N`` for a model exported with a
            fixed input size.
    """
    low = min_side(manifest)
    resize: str | int | None = None
    if isinstance(value, str) and value.strip().lower() in RESIZE_KEYWORDS:
        resize = value.strip().lower()
    elif isinstance(value, str) and _INT_PATTERN.match(value):
        resize = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        resize = value
    if resize is None or (isinstance(resize, int) and not low <= resize <= MAX_RESIZE_SIDE):
        raise InvalidOption(
            f"option 'resize' must be 'model', 'none' or a maximum side N from {low} to {MAX_RESIZE_SIDE}, "
            f"got {shown(value)}",
            option="resize",
            valid=[*RESIZE_KEYWORDS, f"{low}..{MAX_RESIZE_SIDE}"],
        )
    if resize != "model" and not manifest.dynamic_size:
        height, width = manifest.input_size
        raise InvalidOption(
            f"option 'resize'={resize!r} needs a model that takes any input size, but {manifest.name!r} was "
            f"exported with a fixed input size {height}x{width}: every image is resized to it (resize=model); "
            f"re-export it with --dynamic-size (fully convolutional models with global pooling)",
            option="resize",
            valid=["model"],
        )
    return resize


def input_size(
    resize: str | int, image_size: tuple[int, int], manifest: Manifest, max_pixels: int = MAX_INPUT_PIXELS
) -> tuple[int, int]:
    """The ``(H, W)`` an image of ``image_size`` is run at, for a validated ``resize``.

    Args:
        resize: ``model``, ``none`` or a maximum side (see :func:`parse_resize`).
        image_size: ``(height, width)`` of the decoded image.
        manifest: the served model's manifest.
        max_pixels: the largest ``H * W`` accepted for ``none`` and ``N``.

    Raises:
        InvalidOption: the size ``resize`` gives has a side under the model's minimum, or more pixels than
            ``max_pixels``; the message names the limit and the fix.
    """
    if resize == "model":
        return manifest.input_size
    height, width = image_size
    if isinstance(resize, int) and max(height, width) > resize:
        scale = resize / max(height, width)
        height, width = max(1, round(height * scale)), max(1, round(width * scale))
    outcome = f"resize={resize!r} gives a {height}x{width} input"
    low = min_side(manifest)
    if min(height, width) < low:
        raise InvalidOption(
            f"option 'resize': {outcome} (from a {image_size[0]}x{image_size[1]} image), under the model's minimum "
            f"side of {low} pixels (its total stride); send a larger image, a larger N, or resize=model",
            option="resize",
            valid=[*RESIZE_KEYWORDS, f"{low}..{MAX_RESIZE_SIDE}"],
        )
    if height * width > max_pixels:
        largest = math.isqrt(max_pixels)
        raise InvalidOption(
            f"option 'resize': {outcome} = {height * width} pixels, over the limit of {max_pixels} pixels per input "
            f"(e.g. {largest}x{largest}); send a maximum side N (resize={largest} fits any image) or resize=model",
            option="resize",
            valid=[*RESIZE_KEYWORDS, f"{low}..{MAX_RESIZE_SIDE}"],
        )
    return height, width
