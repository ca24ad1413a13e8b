"""Bytes → RGB image → normalised tensor, with the guards a public endpoint needs.

Pillow's decompression-bomb guard stays on; on top of it the pixel count is checked from the header,
before any pixel data is decoded, against the model's ``max_pixels``.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EmptyBody, ImageTooLarge, InvalidImage

ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image and its size before resizing.

    Attributes:
        tensor: ``(3, H, W)`` float32, resized to the model input and normalised.
        original_size: ``(height, width)`` of the decoded image (after EXIF orientation).
    """

    tensor: torch.Tensor
    original_size: tuple[int, int]


def open_image(data: bytes | bytearray, max_pixels: int) -> Image.Image:
    """Decode image bytes into an 8-bit RGB Pillow image.

    Handles EXIF orientation, grayscale, palette (with transparency), RGBA, CMYK and 16-bit images;
    an animated GIF/WebP is read at its first frame.

    Args:
        data: the encoded image.
        max_pixels: largest accepted ``width * height``.

    Raises:
        EmptyBody: ``data`` is empty.
        InvalidImage: not an image of an accepted format, or truncated/corrupt.
        ImageTooLarge: more pixels than ``max_pixels`` (checked before decoding the pixel data).
    """
    if not data:
        raise EmptyBody("the request body is empty: send image bytes (JPEG, PNG, WebP, BMP or GIF)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image rejected by the decompression-bomb guard: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(f"the body is not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"the image header cannot be read: {exc}") from exc

    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImage(f"the image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image has {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImage(f"the image data is truncated or corrupt: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, scaling 16-bit data instead of clipping it."""
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode != "I" or array.max(initial=0) > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def to_tensor(
    image: Image.Image, input_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Resize (whole image, no crop, so maps align with the full picture) and normalise.

    Args:
        image: an RGB image.
        input_size: ``(H, W)`` of the model input.
        mean: per-channel mean on [0, 1] values.
        std: per-channel standard deviation.

    Returns:
        ``(3, H, W)`` float32 tensor.
    """
    height, width = input_size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    scale, offset = _affine(tuple(mean), tuple(std))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W) view of the bytes
    # (x / 255 - mean) / std as one multiply-subtract on the float copy: about 4x faster than three numpy passes
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).sub_(offset)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(1 / (255 std), mean / std)``, shaped ``(3, 1, 1)``: normalisation as ``x * scale - offset``."""
    deviation = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * deviation)).float().view(3, 1, 1)
    offset = (torch.tensor(mean, dtype=torch.float64) / deviation).float().view(3, 1, 1)
    return scale, offset


def decode(
    data: bytes | bytearray,
    input_size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    max_pixels: int,
) -> DecodedImage:
    """Decode, orient, convert, resize and normalise one image (see :func:`open_image`)."""
    image = open_image(data, max_pixels)
    return DecodedImage(tensor=to_tensor(image, input_size, mean, std), original_size=(image.height, image.width))
