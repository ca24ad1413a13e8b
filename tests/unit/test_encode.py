"""Maps and predictions → JSON: exact pixel values, field names, and ordering."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import handlers.encode as encode_module
from handlers.encode import (
    ARRAY_DECIMALS,
    encode_nearest,
    explanation_json,
    lafam_png_base64,
    map_data,
    png_base64,
    png_bytes,
    png_nearest,
    predictions_json,
    to_pixels,
    upsample_pixels,
)
from handlers.explain.lafam import lafam, resize_maps


def decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    assert image.format == "PNG"
    return image


def test_png_is_8_bit_grayscale_with_exact_levels() -> None:
    image = decode_png(png_base64(torch.tensor([[0.0, 1.0, 0.5], [0.25, 1 / 255, 0.998]])))
    assert image.mode == "L"
    assert image.size == (3, 2)  # (W, H): the map's rows are the image's rows
    # round(v * 255): 0.5 → 127.5 → 128, 0.25 → 63.75 → 64, 0.998 → 254.49 → 254
    np.testing.assert_array_equal(np.asarray(image), [[0, 255, 128], [64, 1, 254]])


def test_png_clamps_out_of_range_values() -> None:
    image = decode_png(png_base64(torch.tensor([[-0.5, 1.5]])))
    np.testing.assert_array_equal(np.asarray(image), [[0, 255]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_png_accepts_any_float_dtype(dtype: torch.dtype) -> None:
    image = decode_png(png_base64(torch.tensor([[0.0, 0.5, 1.0]], dtype=dtype)))
    np.testing.assert_array_equal(np.asarray(image), [[0, 128, 255]])


def test_png_of_a_map_that_requires_grad() -> None:
    assert decode_png(png_base64(torch.ones(2, 2, requires_grad=True))).getpixel((0, 0)) == 255


NATIVE = torch.tensor([[0.0, 0.123456789], [0.5, 1.0]])


def test_png_explanation_fields() -> None:
    resized = NATIVE.repeat_interleave(2, 0).repeat_interleave(3, 1)
    body = explanation_json(
        method="lafam", layer="layer4", fmt="png", native=NATIVE, size=(4, 6), upsample="nearest", resized=resized
    )
    assert set(body) == {"method", "layer", "format", "size", "native_size", "upsample", "empty", "data"}
    assert body["empty"] is False
    assert body["method"] == "lafam"
    assert body["layer"] == "layer4"
    assert body["format"] == "png"
    assert body["size"] == [4, 6]
    assert body["native_size"] == [2, 2]
    assert body["upsample"] == "nearest"
    pixels = np.asarray(decode_png(body["data"]))
    assert pixels.shape == (4, 6)
    np.testing.assert_array_equal(pixels[::2, ::3], [[0, 31], [128, 255]])
    json.dumps(body)  # serialisable as is


def test_array_explanation_is_native_size_rounded() -> None:
    body = explanation_json(
        method="lafam", layer="layer4", fmt="array", native=NATIVE, size=(224, 224), upsample="bilinear"
    )
    assert body["format"] == "array"
    assert body["size"] == [224, 224]
    assert body["native_size"] == [2, 2]
    assert body["data"] == [[0.0, 0.12346], [0.5, 1.0]]
    assert all(isinstance(v, float) for row in body["data"] for v in row)
    assert json.loads(json.dumps(body)) == body


def test_array_rounding_is_to_five_decimals() -> None:
    assert ARRAY_DECIMALS == 5
    native = torch.tensor([[0.333333, 0.666666], [0.000004, 0.000006]], dtype=torch.float64)
    body = explanation_json(method="lafam", layer="l", fmt="array", native=native, size=(2, 2), upsample="nearest")
    assert body["data"] == [[0.33333, 0.66667], [0.0, 0.00001]]


def test_non_square_native_size_is_height_width() -> None:
    body = explanation_json(
        method="lafam", layer="l", fmt="array", native=torch.zeros(3, 5), size=(30, 50), upsample="nearest"
    )
    assert body["native_size"] == [3, 5]
    assert np.asarray(body["data"]).shape == (3, 5)


def test_size_values_are_plain_ints() -> None:
    body = explanation_json(
        method="lafam", layer="l", fmt="array", native=NATIVE, size=(np.int64(4), torch.tensor(6)), upsample="nearest"
    )
    assert body["size"] == [4, 6]
    assert all(type(v) is int for v in body["size"])


def test_png_without_resized_map_raises() -> None:
    with pytest.raises(ValueError, match="a png explanation needs the resized map"):
        explanation_json(method="lafam", layer="l", fmt="png", native=NATIVE, size=(4, 4), upsample="nearest")


def test_predictions_most_likely_first_with_labels() -> None:
    probabilities = torch.tensor([0.1, 0.6, 0.05, 0.25])
    result = predictions_json(probabilities, 3, ("cat", "dog", "bird", "fish"))
    assert result == [
        {"index": 1, "label": "dog", "probability": 0.6},
        {"index": 3, "label": "fish", "probability": 0.25},
        {"index": 0, "label": "cat", "probability": 0.1},
    ]


def test_predictions_fall_back_to_the_index_as_label() -> None:
    result = predictions_json(torch.tensor([0.2, 0.8]), 2, ())
    assert [(p["index"], p["label"]) for p in result] == [(1, "1"), (0, "0")]


def test_predictions_round_to_six_decimals_and_are_plain_types() -> None:
    result = predictions_json(torch.tensor([1 / 3, 2 / 3], dtype=torch.float64), 2, ())
    assert [p["probability"] for p in result] == [0.666667, 0.333333]
    assert all(type(p["index"]) is int and type(p["probability"]) is float for p in result)


def test_predictions_top_1() -> None:
    assert predictions_json(torch.tensor([0.3, 0.7]), 1, ("a", "b")) == [{"index": 1, "label": "b", "probability": 0.7}]


# signed maps (backward-pass methods)


def test_signed_zero_map_is_mid_gray_with_max_abs_zero() -> None:
    zeros = torch.zeros(3, 4)
    entry = map_data("png", zeros, torch.zeros(6, 8), signed=True)
    assert entry["max_abs"] == 0.0
    pixels = np.asarray(decode_png(entry["data"]))
    assert pixels.shape == (6, 8)
    assert (pixels == 128).all()
    entry = map_data("array", zeros, None, signed=True)
    assert entry == {"empty": True, "max_abs": 0.0, "data": [[0.0] * 4] * 3}


def test_signed_png_levels() -> None:
    native = torch.tensor([[-2.0, 0.0, 2.0, 1.0, -1.0]])
    entry = map_data("png", native, native, signed=True)
    assert entry["max_abs"] == 2.0
    # pixel = floor(255 * (0.5 + v / (2 max_abs)) + 0.5): -1 → 0, 0 → 128 (127.5 rounds up), 1 → 255,
    # 0.5 → floor(191.75) = 191, -0.5 → floor(64.25) = 64. (The map_data docstring says 128 + 127·v, which
    # would give 1 for -max_abs and 191.5 for 0.5: the code's rule is 127.5 · (1 + v), rounded half up.)
    np.testing.assert_array_equal(np.asarray(decode_png(entry["data"])), [[0, 128, 255, 191, 64]])


def test_signed_png_scale_comes_from_the_native_map() -> None:
    native = torch.tensor([[-4.0, 1.0]])
    resized = torch.tensor([[-4.0, -4.0, 1.0, 1.0]])
    entry = map_data("png", native, resized, signed=True)
    assert entry["max_abs"] == 4.0
    # -1 → 0; 0.25 → floor(255 * 0.625 + 0.5) = 159
    np.testing.assert_array_equal(np.asarray(decode_png(entry["data"])), [[0, 0, 159, 159]])


def test_signed_array_is_divided_by_max_abs() -> None:
    native = torch.tensor([[-3.0, 1.5], [0.0, 0.75]])
    entry = map_data("array", native, None, signed=True)
    assert entry == {"empty": False, "max_abs": 3.0, "data": [[-1.0, 0.5], [0.0, 0.25]]}
    small = torch.tensor([[1e-3, -3e-9]])
    entry = map_data("array", small, None, signed=True)
    assert entry["max_abs"] == pytest.approx(1e-3, rel=1e-6)  # float32 input, rounded to 8 decimals
    assert entry["data"] == [[1.0, -0.0]]  # -3e-6 relative rounds to 5 decimals
    assert json.loads(json.dumps(entry)) == entry


def test_unsigned_maps_are_unchanged() -> None:
    native = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    entry = map_data("array", native, None, signed=False)
    assert entry == {"empty": False, "data": [[0.0, 0.25], [0.5, 1.0]]}
    entry = map_data("png", native, native, signed=False)
    assert set(entry) == {"empty", "data"}
    assert entry["data"] == png_base64(native)


def test_png_needs_the_resized_map() -> None:
    with pytest.raises(ValueError, match="png explanation needs the resized map"):
        map_data("png", torch.zeros(2, 2), None, signed=True)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 5), (224, 224), (17, 300)])
def test_png_bytes_decode_to_the_same_pixels(shape: tuple[int, int]) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    image = decode_png(base64.b64encode(png_bytes(pixels)).decode())
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize(
    ("native", "size"), [((7, 7), (224, 224)), ((8, 8), (128, 128)), ((7, 9), (200, 301)), ((14, 14), (5, 3)),
                         ((1, 1), (4, 6)), ((3, 3), (3, 3)), ((13, 11), (97, 1))]
)  # fmt: skip
def test_nearest_upsampling_of_pixels_matches_resizing_the_map(native: tuple[int, int], size: tuple[int, int]) -> None:
    maps = torch.rand(1, *native, generator=torch.Generator().manual_seed(1))
    expected = to_pixels(resize_maps(maps, size, "nearest")[0])
    np.testing.assert_array_equal(upsample_pixels(to_pixels(maps[0]), size), expected)


@pytest.mark.parametrize("signed", [False, True])
def test_png_from_the_native_map_equals_png_of_the_resized_map(signed: bool) -> None:
    native = torch.rand(7, 7, generator=torch.Generator().manual_seed(2)) * (2 if signed else 1) - (1 if signed else 0)
    resized = resize_maps(native[None], (50, 60), "nearest")[0]
    slow = map_data("png", native, resized, signed=signed)
    fast = map_data("png", native, None, signed=signed, size=(50, 60))
    np.testing.assert_array_equal(np.asarray(decode_png(fast["data"])), np.asarray(decode_png(slow["data"])))
    assert {k: v for k, v in fast.items() if k != "data"} == {k: v for k, v in slow.items() if k != "data"}


@pytest.mark.parametrize(("native", "size"), [((7, 7), (224, 224)), ((7, 9), (200, 301)), ((14, 14), (5, 3)),
                                              ((1, 1), (4, 6)), ((3, 3), (3, 3)), ((13, 11), (97, 1))])  # fmt: skip
def test_png_nearest_is_the_png_of_the_upsampled_pixels(native: tuple[int, int], size: tuple[int, int]) -> None:
    pixels = np.random.default_rng(3).integers(0, 256, size=native, dtype=np.uint8)
    assert png_nearest(pixels, size) == png_bytes(upsample_pixels(pixels, size))


def idat(png: bytes) -> bytes:
    """The concatenated IDAT data of a PNG, chunk CRCs checked."""
    position, data = len(b"\x89PNG\r\n\x1a\n"), b""
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind, body = png[position + 4 : position + 8], png[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", png[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        data += body if kind == b"IDAT" else b""
        position += 12 + length
    return data


WRITTEN = [((7, 7), (224, 224)), ((14, 14), (224, 224)), ((7, 9), (200, 301)), ((14, 14), (5, 3)), ((1, 1), (4, 6)),
           ((3, 3), (3, 3)), ((2, 2), (1, 1)), ((13, 11), (97, 1)), ((7, 7), (500, 500)), ((1, 1), (1, 1)),
           ((5, 3), (17, 13)), ((2, 3), (4096, 2)), ((3, 2), (2, 4096)), ((56, 56), (224, 224)),
           ((5, 1), (20, 1)), ((1, 1), (3, 1)), ((300, 2), (3, 2))]  # fmt: skip
CONTENTS = ["random", "zeros", "full"]


def grey(native: tuple[int, int], content: str) -> np.ndarray:
    return {
        "random": np.random.default_rng(4).integers(0, 256, size=native, dtype=np.uint8),
        "zeros": np.zeros(native, np.uint8),
        "full": np.full(native, 255, np.uint8),
    }[content]


def decoded(png: bytes, size: tuple[int, int]) -> np.ndarray:
    """The pixels of a PNG, with its CRCs, its zlib stream (Adler-32 included) and its raw length checked."""
    raw = zlib.decompress(idat(png))
    assert len(raw) == size[0] * (size[1] + 1)
    image = decode_png(base64.b64encode(png).decode())
    assert image.mode == "L"
    return np.asarray(image)


def test_the_c_writer_is_built() -> None:
    assert encode_module._native is not None, "handlers/_png.c is not built: pip install -e . (needs a C compiler)"


@pytest.mark.parametrize(("native", "size"), WRITTEN)
@pytest.mark.parametrize("content", CONTENTS)
def test_c_writer_decodes_to_the_upsampled_pixels(native: tuple[int, int], size: tuple[int, int], content: str) -> None:
    pixels = grey(native, content)
    png = encode_nearest(pixels, size)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(decoded(png, size), upsample_pixels(pixels, size))
    np.testing.assert_array_equal(decoded(png_nearest(pixels, size), size), upsample_pixels(pixels, size))


@pytest.mark.parametrize(("native", "size"), WRITTEN)
def test_the_python_writer_gives_the_same_pixels(
    native: tuple[int, int], size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    pixels = grey(native, "random")
    written = encode_nearest(pixels, size)
    monkeypatch.setattr(encode_module, "_native", None)
    fallback = encode_nearest(pixels, size)
    assert fallback == png_nearest(pixels, size)
    np.testing.assert_array_equal(decoded(fallback, size), decoded(written, size))


def test_a_small_nearest_map_is_a_small_png() -> None:
    pixels = grey((7, 7), "random")
    png = encode_nearest(pixels, (224, 224))
    assert len(png) < 1000  # literals and back-references (at most 258 bytes each) for 50 KB of raw pixels


MEANS = {
    "random": lambda: torch.randn(3, 1, 7, 9, generator=torch.Generator().manual_seed(3)),
    "constant": lambda: torch.full((2, 1, 5, 5), 3.0),
    "large": lambda: torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(4)) * 3e38,
    "tiny_span": lambda: 1.0 + torch.arange(16.0).view(1, 1, 4, 4) * 1e-7,
    "non_finite": lambda: torch.tensor([[[[float("nan"), 1.0], [float("inf"), -float("inf")]]]]),
    "half_levels": lambda: torch.tensor([[[[0.0, 0.5, 1.0, 0.25, 1 / 255, 0.75, 2.0, 127.5 / 255]]]]),
}


@pytest.mark.parametrize("kind", list(MEANS))
@pytest.mark.parametrize("size", [(224, 224), (3, 5), (31, 17)])
@pytest.mark.parametrize("writer", ["c", "python"])
def test_lafam_png_from_means_is_the_reference_map(
    kind: str, size: tuple[int, int], writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The served default's writer (:func:`lafam_png_base64`) gives the PNG of the reference's map of the means:
    lafam (non-finite values clamped, min-max in float64, a constant map zeros), to_pixels, nearest upsampling."""
    if writer == "python":
        monkeypatch.setattr(encode_module, "_native", None)
    means = MEANS[kind]()
    native = (means.shape[-2], means.shape[-1])
    array = means.numpy()
    for row in range(len(means)):
        reference = to_pixels(lafam(means[row : row + 1])[0])
        data, empty = lafam_png_base64(array, row, native, size)
        assert isinstance(data, str)
        assert empty == (not reference.any())
        png = base64.b64decode(data, validate=True)
        np.testing.assert_array_equal(decoded(png, size), upsample_pixels(reference, size))
        assert data == base64.b64encode(encode_nearest(reference, size)).decode("ascii")  # as the general path


def test_the_c_writer_refuses_bad_arguments() -> None:
    native = encode_module._native
    assert native is not None
    runs = np.array([2, 2], np.int32).tobytes()
    values = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="run lengths"):
        native.lafam_png_base64(values, 1, runs, runs)  # rows 2x2 from item 1: past the end
    with pytest.raises(ValueError, match="run lengths"):
        native.png_from_grey(bytes(4), 0, runs[:6], runs)  # not int32
    with pytest.raises(ValueError, match="negative"):
        native.png_from_grey(bytes(4), 0, np.array([-1, 2], np.int32).tobytes(), runs)
    with pytest.raises(ValueError, match="at least 1x1"):
        native.png_from_grey(bytes(4), 0, np.zeros(2, np.int32).tobytes(), runs)
    with pytest.raises(TypeError):
        native.png_from_grey("text", 0, runs, runs)
    with pytest.raises(TypeError, match="float32"):
        native.lafam_png_base64(np.zeros(4, np.float64), 0, runs, runs)  # read as float32 it would be another map
    with pytest.raises(TypeError, match="float32"):
        native.lafam_png_base64(bytes(16), 0, runs, runs)
    with pytest.raises(ValueError, match="C-contiguous"):
        native.lafam_png_base64(np.zeros((4, 4), np.float32)[:, ::2], 0, runs, runs)
