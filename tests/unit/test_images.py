"""Bytes → RGB → tensor: formats, modes, orientation, and the guards of a public endpoint."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from handlers import images
from handlers.errors import EmptyBody, ImageTooLarge, InvalidImage
from handlers.images import ACCEPTED_FORMATS, decode, open_image, to_tensor

from .conftest import image_bytes

LIMIT = 10**8
WHITE = [255, 255, 255]


def encode(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    image = open_image(data, LIMIT)
    assert image.mode == "RGB"
    return np.asarray(image)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming ``width x height`` 8-bit gray pixels, with 10 bytes of data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + png_chunk(b"IEND", b"")
    )


# formats


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_accepted_formats_decode_to_rgb_of_the_same_size(fmt: str) -> None:
    image = open_image(image_bytes(size=(30, 20), fmt=fmt), LIMIT)
    assert image.mode == "RGB"
    assert image.size == (30, 20)


def test_accepted_formats_are_the_documented_five() -> None:
    assert set(ACCEPTED_FORMATS) == {"JPEG", "PNG", "WEBP", "BMP", "GIF"}


def test_lossless_formats_keep_exact_pixels() -> None:
    expected = np.asarray(Image.open(io.BytesIO(image_bytes(size=(30, 20)))))
    for fmt, save in (("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True})):
        np.testing.assert_array_equal(pixels(image_bytes(size=(30, 20), fmt=fmt, **save)), expected)


def test_tiff_is_not_accepted_and_the_message_names_the_formats() -> None:
    with pytest.raises(InvalidImage, match=r"accepted format \(JPEG, PNG, WEBP, BMP, GIF\)"):
        open_image(image_bytes(fmt="TIFF"), LIMIT)


# orientation


@pytest.mark.parametrize(("orientation", "size"), [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int]) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.new("RGB", (40, 20), (200, 10, 10)), "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (40, 20)  # stored unrotated
    assert open_image(data, LIMIT).size == size


def test_exif_rotation_moves_the_pixels() -> None:
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the top-left corner goes to the top-right
    rotated = pixels(encode(image, "PNG", exif=exif.tobytes()))
    assert rotated.shape == (4, 2, 3)
    assert rotated[0, 1].tolist() == WHITE
    assert rotated[0, 0].tolist() == [0, 0, 0]


def test_decode_reports_original_size_after_orientation_as_height_width() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif.tobytes())
    decoded = decode(data, (8, 6), (0.5,) * 3, (0.25,) * 3, LIMIT)
    assert decoded.original_size == (40, 20)  # displayed 20 wide, 40 high
    assert decode(image_bytes(size=(30, 20)), (8, 6), (0.5,) * 3, (0.25,) * 3, LIMIT).original_size == (20, 30)


# modes


def test_grayscale_and_bilevel() -> None:
    gray = Image.new("L", (2, 1))
    gray.putdata([0, 77])
    np.testing.assert_array_equal(pixels(encode(gray))[0], [[0, 0, 0], [77, 77, 77]])
    bilevel = Image.new("1", (2, 1))
    bilevel.putdata([0, 1])
    np.testing.assert_array_equal(pixels(encode(bilevel))[0], [[0, 0, 0], WHITE])


def test_gray_alpha_is_composited_over_white() -> None:
    image = Image.new("LA", (3, 1))
    image.putdata([(0, 0), (50, 255), (0, 128)])
    np.testing.assert_array_equal(pixels(encode(image))[0], [WHITE, [50, 50, 50], [127, 127, 127]])


def test_rgba_is_composited_over_white() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putdata([(10, 20, 30, 0), (10, 20, 30, 255), (0, 0, 0, 128)])
    expected = [WHITE, [10, 20, 30], [127, 127, 127]]  # 255 * (1 - 128/255) = 127
    np.testing.assert_array_equal(pixels(encode(image))[0], expected)
    np.testing.assert_array_equal(pixels(encode(image, "WEBP", lossless=True))[0], expected)


def test_palette_without_transparency() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 128, 255])
    image.putdata([0, 1])
    np.testing.assert_array_equal(pixels(encode(image))[0], [[0, 0, 0], [0, 128, 255]])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt: str) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.putdata([0, 1])
    np.testing.assert_array_equal(pixels(encode(image, fmt, transparency=0))[0], [WHITE, [255, 0, 0]])


def test_cmyk_jpeg() -> None:
    white = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    red = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert Image.open(io.BytesIO(encode(white, "JPEG"))).mode == "CMYK"
    np.testing.assert_array_equal(pixels(encode(white, "JPEG", quality=100))[0, 0], WHITE)
    # JPEG is lossy: allow a few levels per channel
    np.testing.assert_allclose(pixels(encode(red, "JPEG", quality=100))[0, 0], [255, 0, 0], atol=3)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    data = encode(Image.fromarray(np.array([[0, 256, 32768, 65535]], dtype=np.uint16)))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    gray = pixels(data)[0]
    # v / 65535 * 255 rounded: 256 → 1, 32768 → 128 (not 255 as clipping the raw value would give)
    np.testing.assert_array_equal(gray, [[0, 0, 0], [1, 1, 1], [128, 128, 128], WHITE])


def test_mode_i_and_f_become_rgb_uint8() -> None:
    # No accepted format decodes to "I" or "F"; the conversion is checked directly.
    wide = Image.new("I", (4, 1))
    wide.putdata([0, 32768, 65535, 70000])  # 16-bit range: scaled by 65535, clipped above it
    np.testing.assert_array_equal(np.asarray(images._to_rgb(wide))[0, :, 0], [0, 128, 255, 255])
    narrow = Image.new("I", (2, 1))
    narrow.putdata([100, 255])  # values within 8 bits are kept as they are
    np.testing.assert_array_equal(np.asarray(images._to_rgb(narrow))[0, :, 0], [100, 255])
    floats = Image.fromarray(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]], dtype=np.float32))
    assert floats.mode == "F"
    converted = images._to_rgb(floats)
    assert converted.mode == "RGB"
    assert np.asarray(converted).dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(converted)[0, :, 0], [0, 0, 128, 255, 255])


def test_animated_gif_reads_the_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).n_frames == 3
    np.testing.assert_array_equal(pixels(data), np.broadcast_to([255, 0, 0], (4, 4, 3)))


# bad bytes


def test_empty_body() -> None:
    with pytest.raises(EmptyBody, match="request body is empty"):
        open_image(b"", LIMIT)
    with pytest.raises(EmptyBody, match="request body is empty"):
        open_image(bytearray(), LIMIT)


def test_random_bytes_are_invalid() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImage, match="not an image in an accepted format"):
        open_image(noise, LIMIT)


def test_truncated_png_is_invalid() -> None:
    noise = Image.effect_noise((64, 64), 60).convert("RGB")  # incompressible, so the data is long
    data = encode(noise)
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        open_image(data[: len(data) // 2], LIMIT)


def test_truncated_jpeg_is_invalid() -> None:
    data = encode(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        open_image(data[: len(data) // 2], LIMIT)
    with pytest.raises(InvalidImage, match="header cannot be read"):
        open_image(data[:100], LIMIT)


def test_corrupt_png_data_is_invalid() -> None:
    data = bytearray(png_claiming(64, 64))  # the header is fine, the data holds 10 of 4160 bytes
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        open_image(bytes(data), LIMIT)


def test_errors_map_to_client_statuses() -> None:
    assert (EmptyBody.status, EmptyBody.code) == (400, "empty_body")
    assert (InvalidImage.status, InvalidImage.code) == (400, "invalid_image")
    assert (ImageTooLarge.status, ImageTooLarge.code) == (413, "image_too_large")


# size guards


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel data is decoded."""

    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_over_the_limit_is_rejected_from_the_header() -> None:
    with pytest.raises(ImageTooLarge, match=r"5000x4000 = 20000000 pixels, over the limit of 1000"):
        open_image(png_claiming(5000, 4000), max_pixels=1000)


@pytest.mark.usefixtures("no_pixel_decoding")
def test_decompression_bomb_is_rejected_from_the_header() -> None:
    bomb = png_claiming(100_000, 100_000)
    assert len(bomb) < 100
    with pytest.raises(ImageTooLarge, match="decompression-bomb guard"):
        open_image(bomb, max_pixels=40_000_000)


def test_limit_is_inclusive() -> None:
    assert open_image(image_bytes(size=(10, 10)), max_pixels=100).size == (10, 10)
    with pytest.raises(ImageTooLarge, match="10x10 = 100 pixels, over the limit of 99"):
        open_image(image_bytes(size=(10, 10)), max_pixels=99)


def test_pillow_guard_stays_on_after_importing_handlers() -> None:
    import handlers.backends
    import handlers.encode
    import handlers.handler
    import handlers.service  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS > 0


# tensors


def test_to_tensor_normalises_exactly() -> None:
    image = Image.new("RGB", (5, 3), (255, 0, 51))
    tensor = to_tensor(image, (3, 5), (0.5, 0.5, 0.2), (0.25, 0.5, 0.4))
    assert tensor.dtype == torch.float32
    assert tensor.shape == (3, 3, 5)
    # (255/255 - 0.5)/0.25 = 2, (0 - 0.5)/0.5 = -1, (51/255 - 0.2)/0.4 = 0; float32 of 1/255: tolerance 1e-6
    expected = torch.tensor([2.0, -1.0, 0.0]).view(3, 1, 1).expand(3, 3, 5)
    torch.testing.assert_close(tensor, expected, rtol=0.0, atol=1e-6)


def test_to_tensor_resizes_to_height_width_without_swapping() -> None:
    image = Image.new("RGB", (10, 4))
    image.paste((255, 255, 255), (0, 0, 10, 2))  # top half white
    tensor = to_tensor(image, (6, 20), (0.0,) * 3, (1.0,) * 3)
    assert tensor.shape == (3, 6, 20)
    torch.testing.assert_close(tensor[:, 0], torch.ones(3, 20), rtol=0.0, atol=1e-6)
    torch.testing.assert_close(tensor[:, -1], torch.zeros(3, 20), rtol=0.0, atol=1e-6)


def test_to_tensor_keeps_the_channel_order() -> None:
    tensor = to_tensor(Image.new("RGB", (2, 2), (255, 0, 0)), (2, 2), (0.0,) * 3, (1.0,) * 3)
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), rtol=0.0, atol=1e-6)


def test_decode_end_to_end() -> None:
    decoded = decode(image_bytes(size=(64, 48), fmt="JPEG"), (32, 40), (0.5,) * 3, (0.25,) * 3, LIMIT)
    assert decoded.tensor.shape == (3, 32, 40)
    assert decoded.original_size == (48, 64)
    assert decoded.tensor.is_contiguous()
    assert decoded.tensor.min() >= -2.0
    assert decoded.tensor.max() <= 2.0 + 1e-6
