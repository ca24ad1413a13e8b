"""A corpus of hostile, broken and unusual requests, driven through the real handler as TorchServe drives it.

Each case is one request as TorchServe's Python worker hands it to ``handle``: a ``body`` (or form fields)
already decoded the way TorchServe decodes it (JSON bodies parsed to Python objects, ``text/*`` bodies
to ``str``, everything else as bytes), plus the request headers and each parameter's content type. A bad
case must be answered alone with its 4xx, a JSON ``error.code`` and a message naming the problem; an
unusual but valid image must be served (200). One handler serves the whole module, so the worker is
shown to survive every case.

Known bugs are marked ``xfail(strict=True, reason="BUG: ...")``: they assert the correct behaviour.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from handlers.handler import LafamHandler
from scenes.synthetic import generate_scene
from tests.demo_export import export_demo

from .conftest import FakeContext, image_bytes
from .test_images import png_chunk, png_claiming

JSON = "application/json"
EXPLAIN = {"explain": "True"}  # what TorchServe adds to a request to POST /explanations/{model}


# forged and unusual images


def encode(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def noise(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Incompressible pixels, so that half of the file is half of the data."""
    return Image.effect_noise(size, 60).convert("RGB")


PNG = image_bytes()
TRUNCATED_PNG = encode(noise())[: len(encode(noise())) // 2]
TRUNCATED_JPEG = encode(noise(), "JPEG")[: len(encode(noise(), "JPEG")) // 2]
# valid signature, IHDR of the right length but garbage content and a wrong CRC
BROKEN_IHDR_PNG = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + b"\xff" * 13 + b"\x00" * 4
SHORT_IHDR_PNG = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", b"\x00\x01")
# SOI, then a start-of-frame segment claiming 65535x65535 with 1 component and no tables or data
CORRUPT_JPEG = b"\xff\xd8\xff\xc0\x00\x11\x08\xff\xff\xff\xff" + b"\x00" * 40
ZERO_WIDTH_PNG = png_claiming(0, 10)
ZERO_HEIGHT_GIF = b"GIF89a" + struct.pack("<HH", 10, 0) + b"\x00\x00\x00;"


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def palette_png_with_transparency() -> bytes:
    image = Image.new("P", (6, 4))
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.putdata([0, 1] * 12)
    return encode(image, transparency=0)


def sixteen_bit_png() -> bytes:
    data = encode(Image.fromarray(np.linspace(0, 65535, 24 * 16, dtype=np.uint16).reshape(16, 24)))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    return data


def cmyk_jpeg() -> bytes:
    data = encode(Image.new("CMYK", (20, 12), (0, 255, 255, 0)), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high; orientation 6 displays it 20 wide x 40 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.new("RGB", (40, 20), (200, 10, 10)), "JPEG", exif=exif.tobytes())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# the table


@dataclass(frozen=True)
class Case:
    """One request and what must come back.

    Attributes:
        id: the pytest id.
        item: the request's parameters as TorchServe hands them to ``handle``.
        headers: request headers plus, under a parameter's name, ``{"content-type": ...}``.
        status: the expected HTTP status.
        code: the expected ``error.code`` (``None`` for a success).
        keyword: a word the error message must contain (case-insensitive), naming the problem.
        check: an extra check of a successful body.
        bug: why the case fails today; it is then a strict xfail asserting the correct behaviour.
        or_rejected: for a success case, a 400 ``invalid_option`` whose message names this is also correct.
    """

    id: str
    item: dict[str, Any]
    headers: dict[str, Any] = field(default_factory=dict)
    status: int = 400
    code: str | None = None
    keyword: str = ""
    check: Callable[[dict[str, Any]], None] | None = None
    bug: str | None = None
    or_rejected: str | None = None


def image(data: bytes, status: int = 400, code: str | None = None, keyword: str = "", **kwargs: Any) -> dict:
    return {"item": {"body": bytearray(data)}, "status": status, "code": code, "keyword": keyword, **kwargs}


def with_headers(headers: dict[str, str], code: str = "invalid_option", keyword: str = "") -> dict:
    return {"item": {"body": bytearray(PNG)}, "headers": headers, "code": code, "keyword": keyword}


def json_body(body: Any, code: str = "invalid_json", keyword: str = "", status: int = 400, **kwargs: Any) -> dict:
    """A JSON request as TorchServe delivers it: parsed when it parses, else the raw bytes."""
    return {
        "item": {"body": body},
        "headers": {"body": {"content-type": JSON}},
        "status": status,
        "code": code,
        "keyword": keyword,
        **kwargs,
    }


def multipart(options: Any, code: str, keyword: str, content_type: str = "text/plain") -> dict:
    """A form with an image field and an ``options`` field (TorchServe decodes a text/plain field to str, an
    application/json one to an object when it parses, else leaves its bytes)."""
    return {
        "item": {"data": bytearray(PNG), "options": options},
        "headers": {"data": {"content-type": "image/png"}, "options": {"content-type": content_type}},
        "code": code,
        "keyword": keyword,
    }


DEEP = 100_000
"""Nesting levels of the deep JSON cases: Python's parser recurses per level (TorchServe's own decoding of
such a body fails with RecursionError and hands over the raw bytes)."""
HUGE = "1" + "0" * 5000
"""An integer of 5001 digits: over Python's int-string conversion limit (4300)."""


def nested(inner: str = "", depth: int = DEEP, opening: str = "[", closing: str = "]") -> str:
    """``inner`` inside ``depth`` levels of arrays (or of ``opening`` … ``closing``), as JSON text."""
    return opening * depth + inner + closing * depth


def nested_list(depth: int) -> list[Any]:
    """``depth`` levels of lists as TorchServe's decoding delivers them when it succeeds (built without recursion)."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def with_image(options: str) -> bytearray:
    """A JSON body text with the PNG and ``options`` (JSON text)."""
    return bytearray(f'{{"image": "{b64(PNG)}", "options": {options}}}'.encode())


def _original_size(height: int, width: int) -> Callable[[dict[str, Any]], None]:
    def check(body: dict[str, Any]) -> None:
        assert body["explanation"]["size"] == [height, width]

    return check


def _served(body: dict[str, Any]) -> None:
    assert len(body["predictions"]) == 4
    assert body["explanation"]["method"] == "lafam"


ORIGINAL = {"X-LaFAM-Size": "original"}
CASES = [
    # bodies that are not images
    Case("empty-body", **image(b"", code="empty_body", keyword="empty")),
    Case("no-image-field", {"options": '{"top_k": 1}'}, code="empty_body", keyword="no image"),
    Case("non-image-bytes", **image(b"hello world" * 10, code="invalid_image", keyword="accepted format")),
    Case("tiff-not-accepted", **image(image_bytes(fmt="TIFF"), code="invalid_image", keyword="accepted format")),
    Case("truncated-png", **image(TRUNCATED_PNG, code="invalid_image", keyword="truncated")),
    Case("truncated-jpeg", **image(TRUNCATED_JPEG, code="invalid_image", keyword="truncated")),
    Case("jpeg-cut-in-header", **image(TRUNCATED_JPEG[:100], code="invalid_image", keyword="header")),
    Case("png-broken-ihdr", **image(BROKEN_IHDR_PNG, code="invalid_image", keyword="image")),
    Case("png-short-ihdr", **image(SHORT_IHDR_PNG, code="invalid_image", keyword="IHDR")),
    Case("corrupt-jpeg-header", **image(CORRUPT_JPEG, code="invalid_image", keyword="image")),
    Case("zero-width-png", **image(ZERO_WIDTH_PNG, code="invalid_image", keyword="image")),
    Case("zero-height-gif", **image(ZERO_HEIGHT_GIF, code="invalid_image", keyword="image")),
    # sizes
    Case("one-by-one", **image(image_bytes(size=(1, 1)), 200, check=_served)),
    Case(
        "one-by-one-original-size", **image(image_bytes(size=(1, 1)), 200, check=_original_size(1, 1)), headers=ORIGINAL
    ),
    Case("aspect-1x4000", **image(image_bytes(size=(1, 4000)), 200, check=_original_size(4000, 1)), headers=ORIGINAL),
    Case("aspect-4000x1", **image(image_bytes(size=(4000, 1)), 200, check=_original_size(1, 4000)), headers=ORIGINAL),
    Case("decompression-bomb", **image(png_claiming(30_000, 30_000), 413, "image_too_large", "decompression-bomb")),
    Case("over-pixel-limit", **image(png_claiming(7000, 6000), 413, "image_too_large", "over the limit")),
    # unusual but valid images
    Case("animated-gif", **image(animated_gif(), 200, check=_served)),
    Case("sixteen-bit-png", **image(sixteen_bit_png(), 200, check=_served)),
    Case("cmyk-jpeg", **image(cmyk_jpeg(), 200, check=_served)),
    Case("palette-png-transparency", **image(palette_png_with_transparency(), 200, check=_served)),
    Case("exif-rotated-jpeg", **image(exif_rotated_jpeg(), 200, check=_original_size(40, 20)), headers=ORIGINAL),
    # content types
    Case(
        "text-plain",
        {"body": "hello"},
        {"body": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        "text/plain",
    ),
    Case(
        "text-csv-image-bytes",
        {"body": bytearray(PNG)},
        {"body": {"content-type": "text/csv"}},
        415,
        "unsupported_media_type",
        "text/csv",
    ),
    # JSON bodies
    Case("malformed-json", **json_body(bytearray(b'{"image": "abc"'), keyword="cannot be parsed")),
    Case("json-string", **json_body("just a string", keyword="json")),
    Case("json-array", **json_body([1, 2, 3], keyword="object")),
    Case("json-null", **json_body(None, keyword="object")),
    Case("json-number", **json_body(42, keyword="object")),
    Case("json-unknown-field", **json_body({"image": b64(PNG), "colour": "red"}, keyword="colour")),
    Case("json-missing-image", **json_body({"options": {}}, keyword="image")),
    Case("json-image-not-string", **json_body({"image": 123}, keyword="image")),
    Case("json-bad-base64", **json_body({"image": "***not base64***"}, keyword="base64")),
    Case(  # line-wrapped base64 (the base64 tool, MIME) is accepted
        "json-line-wrapped-base64",
        **json_body({"image": base64.encodebytes(PNG).decode()}, None, status=200, check=_served),
    ),
    Case("json-base64-of-non-image", **json_body({"image": b64(b"hello world")}, "invalid_image", "accepted format")),
    Case("json-data-url", **json_body({"image": "data:image/png;base64," + b64(PNG)}, None, status=200, check=_served)),
    Case("json-options-not-object", **json_body({"image": b64(PNG), "options": [1]}, "invalid_option", "options")),
    Case(
        "json-options-infinite-temperature",
        **json_body({"image": b64(PNG), "options": {"temperature": math.inf}}, "invalid_option", "temperature"),
    ),
    Case(
        "json-options-nan-tau", **json_body({"image": b64(PNG), "options": {"tau": math.nan}}, "invalid_option", "tau")
    ),
    Case(
        "json-options-bool-top-k",
        **json_body({"image": b64(PNG), "options": {"top_k": True}}, "invalid_option", "top_k"),
    ),
    # JSON past the parser's limits (depth, digits): each a 400 naming the limit, never a 500
    Case("json-nested-arrays-100000", **json_body(bytearray(nested().encode()), keyword="nested deeper than 32")),
    Case(
        "json-nested-objects-100000",
        **json_body(bytearray(nested("1", opening='{"a":', closing="}").encode()), keyword="nested deeper than 32"),
    ),
    Case(
        "json-options-nested-100000",
        **json_body(with_image(f'{{"top_k": {nested()}}}'), keyword="nested deeper than 32"),
    ),
    Case(
        "json-decoded-options-nested-500",
        **json_body({"image": b64(PNG), "options": {"classes": nested_list(500)}}, keyword="nested deeper than 32"),
    ),
    Case("json-integer-5001-digits", **json_body(with_image(f'{{"top_k": {HUGE}}}'), keyword="5001 digits")),
    Case(
        "text-plain-nested-json",
        {"body": nested()},
        {"body": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        "text/plain",
    ),
    # options
    Case("unknown-option-header", **with_headers({"X-LaFAM-Colour": "red"}, keyword="unknown option")),
    Case("top-k-abc", **with_headers({"X-LaFAM-Top-K": "abc"}, keyword="top_k")),
    Case("top-k-zero", **with_headers({"X-LaFAM-Top-K": "0"}, keyword="top_k")),
    Case("top-k-fraction", **with_headers({"X-LaFAM-Top-K": "2.5"}, keyword="top_k")),
    Case("top-k-above-classes", **with_headers({"X-LaFAM-Top-K": "5"}, keyword="1 to 4")),
    Case("size-big", **with_headers({"X-LaFAM-Size": "big"}, keyword="size")),
    Case("size-zero-side", **with_headers({"X-LaFAM-Size": "0x10"}, keyword="size")),
    Case("size-over-4096", **with_headers({"X-LaFAM-Size": "5000x5000"}, keyword="4096")),
    Case("format-gif", **with_headers({"X-LaFAM-Format": "gif"}, keyword="format")),
    Case("upsample-cubic", **with_headers({"X-LaFAM-Upsample": "cubic"}, keyword="upsample")),
    Case("layer-unknown", **with_headers({"X-LaFAM-Layer": "stage9"}, keyword="stage2")),
    Case("backward-method-on-predictions", **with_headers({"X-LaFAM-Method": "lrp"}, keyword="/explanations")),
    Case("temperature-zero", **with_headers({"X-LaFAM-Temperature": "0"}, keyword="temperature")),
    Case("tau-one", **with_headers({"X-LaFAM-Tau": "1"}, keyword="tau")),
    Case("classes-out-of-range", **with_headers({"X-LaFAM-Classes": "9"}, keyword="0 to 3")),
    Case("least-likely-maybe", **with_headers({"X-LaFAM-Least-Likely": "maybe"}, keyword="least_likely")),
    Case("top-k-5001-digits", **with_headers({"X-LaFAM-Top-K": HUGE}, keyword="top_k")),
    Case("classes-5001-digits", **with_headers({"X-LaFAM-Classes": f"1,{HUGE}"}, keyword="classes")),
    Case("size-5001-digits", **with_headers({"X-LaFAM-Size": f"{HUGE}x{HUGE}"}, keyword="size")),
    Case("resize-5001-digits", **with_headers({"X-LaFAM-Resize": HUGE}, keyword="resize")),
    # multipart forms
    Case("multipart-options-bad-json", **multipart("{nope", "invalid_json", "options")),
    Case("multipart-options-not-object", **multipart("[1, 2]", "invalid_option", "options")),
    Case("multipart-options-unknown", **multipart('{"colour": "red"}', "invalid_option", "colour")),
    Case("multipart-options-nested-100000", **multipart(nested(), "invalid_json", "nested deeper than 32")),
    Case(  # an application/json field TorchServe could not decode: its raw bytes
        "multipart-json-options-nested-100000",
        **multipart(bytearray(nested().encode()), "invalid_json", "nested deeper than 32", JSON),
    ),
    Case("multipart-json-options-decoded-array", **multipart([1, 2], "invalid_option", "options", JSON)),
    Case(
        "multipart-json-options-decoded-nested-500",
        **multipart({"classes": nested_list(500)}, "invalid_json", "nested deeper than 32", JSON),
    ),
    Case("multipart-options-integer-5001-digits", **multipart(f'{{"top_k": {HUGE}}}', "invalid_json", "5001 digits")),
]


def params(cases: list[Case]) -> list[Any]:
    return [
        pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=case.bug)] if case.bug else [])
        for case in cases
    ]


def strict_json(text: str) -> dict[str, Any]:
    """Parse a body as strict JSON: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def answer(handler: LafamHandler, folder: Path, cases: list[Case], extra: dict | None = None) -> list[tuple]:
    """Send ``cases`` as one batch; return ``(status, body)`` per request."""
    context = FakeContext(str(folder), headers=[{**(extra or {}), **case.headers} for case in cases])
    bodies = handler.handle([case.item for case in cases], context)
    assert len(bodies) == len(cases)
    assert all(context.content_types[i] == "application/json" for i in range(len(cases)))
    return [(context.statuses[i][0], strict_json(body)) for i, body in enumerate(bodies)]


def assert_answer(case: Case, status: int, body: dict[str, Any]) -> None:
    if case.code is None and case.or_rejected and status == 400:
        assert body["error"]["code"] == "invalid_option", body
        assert case.or_rejected in body["error"]["message"], body
        return
    if case.code is None:
        assert status == case.status, body
        assert "error" not in body
        if case.check is not None:
            case.check(body)
        return
    assert (status, body.get("error", {}).get("code")) == (case.status, case.code), body
    message = body["error"]["message"]
    assert case.keyword.lower() in message.lower(), message


@pytest.fixture(scope="module")
def handler(tiny_export: Path) -> LafamHandler:
    """One worker for the whole module: it must survive every case."""
    instance = LafamHandler()
    instance.initialize(FakeContext(str(tiny_export)))
    return instance


def test_the_corpus_is_large_and_its_ids_unique() -> None:
    ids = [case.id for case in [*CASES, *EXPLAIN_CASES]]
    assert len(CASES) >= 30
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(handler: LafamHandler, tiny_export: Path, case: Case) -> None:
    [(status, body)] = answer(handler, tiny_export, [case])
    assert_answer(case, status, body)


def test_batch_of_every_case_each_answered_alone(handler: LafamHandler, tiny_export: Path) -> None:
    good = Case("good", {"body": bytearray(PNG)}, status=200)
    batch = [item for case in CASES for item in (case, good)]
    answers = answer(handler, tiny_export, batch)
    for case, (status, body) in zip(batch, answers, strict=True):
        if case.bug:  # still fails alone, whatever its status
            assert status >= 400, (case.id, body)
            assert body["error"]["code"], case.id
        else:
            assert_answer(case, status, body)
    [(status, body)] = answer(handler, tiny_export, [good])  # the worker keeps serving
    assert status == 200, body
    assert body["predictions"]


def test_json_past_the_parser_limits_then_the_worker_keeps_serving(handler: LafamHandler, tiny_export: Path) -> None:
    hostile = [case for case in CASES if "nested" in case.id or "5001-digits" in case.id]
    assert len(hostile) >= 10
    for case in hostile:  # one at a time, as each would arrive
        [(status, body)] = answer(handler, tiny_export, [case])
        assert_answer(case, status, body)
        assert status < 500, (case.id, body)
    [(status, body)] = answer(handler, tiny_export, [Case("good", {"body": bytearray(PNG)}, status=200)])
    assert status == 200, body
    assert body["predictions"]


# /explanations: class options and backward methods need the eager model


@pytest.fixture(scope="module")
def shapes_export(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    return export_demo(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def eager_handler(shapes_export: Path) -> LafamHandler:
    instance = LafamHandler()
    instance.initialize(FakeContext(str(shapes_export)))
    return instance


SCENE = encode(Image.fromarray(generate_scene(np.random.default_rng(3), 128, 2).image))
BLACK = encode(Image.new("RGB", (128, 128)))
M = "X-LaFAM-Method"


def explain(headers: dict[str, str], code: str | None = "invalid_option", keyword: str = "", **kwargs: Any) -> dict:
    status = 200 if code is None else 400
    return {
        "item": {"body": bytearray(SCENE)},
        "headers": headers,
        "status": status,
        "code": code,
        "keyword": keyword,
        **kwargs,
    }


def _finite_maps(body: dict[str, Any]) -> None:
    explanation = body["explanation"]
    entries = explanation.get("classes") or [explanation]
    assert all(math.isfinite(entry["max_abs"]) for entry in entries), entries


EXPLAIN_CASES = [
    Case("class-out-of-range", **explain({M: "lrp_class", "X-LaFAM-Classes": "6"}, keyword="0 to 5")),
    Case("class-negative", **explain({M: "gradcam", "X-LaFAM-Classes": "-1"}, keyword="0 to 5")),
    Case("class-not-a-number", **explain({M: "gradcam", "X-LaFAM-Classes": "cat"}, keyword="classes")),
    Case("duplicate-classes", **explain({M: "gradcam", "X-LaFAM-Classes": "1,1"}, keyword="repeats")),
    Case(
        "k-too-large",
        **explain({M: "distribution", "X-LaFAM-Base": "lrp", "X-LaFAM-Top-Classes": "9"}, keyword="1 to 5"),
    ),
    Case("top-classes-zero", **explain({M: "gradcam", "X-LaFAM-Top-Classes": "0"}, keyword="top_classes")),
    Case("unknown-method", **explain({M: "shap"}, keyword="distribution_fast")),
    Case("temperature-zero-explain", **explain({M: "distribution", "X-LaFAM-Temperature": "0"}, keyword="temperature")),
    Case("temperature-negative", **explain({M: "distribution", "X-LaFAM-Temperature": "-1"}, keyword="temperature")),
    Case("tau-one-explain", **explain({M: "distribution", "X-LaFAM-Tau": "1"}, keyword="tau")),
    Case("tau-negative", **explain({M: "distribution", "X-LaFAM-Tau": "-0.1"}, keyword="tau")),
    Case("base-unknown", **explain({M: "distribution", "X-LaFAM-Base": "shap"}, keyword="input_x_gradient")),
    Case("fast-base-gradcam", **explain({M: "distribution_fast", "X-LaFAM-Base": "gradcam"}, keyword="base")),
    Case(
        "least-likely-maybe-explain",
        **explain({M: "distribution", "X-LaFAM-Least-Likely": "maybe"}, keyword="least_likely"),
    ),
    Case("layer-unknown-explain", **explain({M: "lrp", "X-LaFAM-Layer": "block1"}, keyword="block3")),
    Case(
        "temperature-overflow",
        **explain(
            {M: "distribution", "X-LaFAM-Temperature": "1e308", "X-LaFAM-Format": "array"}, None, check=_finite_maps
        ),
        or_rejected="temperature",
    ),
    # unusual but valid: one competitor, a blank image (all-zero evidence)
    Case(
        "distribution-k-one",
        **explain(
            {M: "distribution", "X-LaFAM-Classes": "2", "X-LaFAM-Least-Likely": "false"}, None, check=_finite_maps
        ),
    ),
    *(
        Case(f"blank-image-{method}", {"body": bytearray(BLACK)}, {M: method}, 200, check=_finite_maps)
        for method in ("lrp", "lrp_class", "gradcam", "input_x_gradient", "distribution", "distribution_fast")
    ),
]


@pytest.mark.parametrize("case", params(EXPLAIN_CASES))
def test_bad_explanation_request(eager_handler: LafamHandler, shapes_export: Path, case: Case) -> None:
    [(status, body)] = answer(eager_handler, shapes_export, [case], EXPLAIN)
    assert_answer(case, status, body)


def test_explanation_batch_each_answered_alone(eager_handler: LafamHandler, shapes_export: Path) -> None:
    good = Case("good", {"body": bytearray(SCENE)}, {M: "gradcam"}, status=200)
    batch = [item for case in EXPLAIN_CASES if not case.bug for item in (case, good)]
    for case, (status, body) in zip(batch, answer(eager_handler, shapes_export, batch, EXPLAIN), strict=True):
        assert_answer(case, status, body)
    [(status, body)] = answer(eager_handler, shapes_export, [good], EXPLAIN)
    assert status == 200, body
    assert body["explanation"]["method"] == "gradcam"
