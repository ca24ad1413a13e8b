"""Request options: defaults, headers, body, and a 400 that lists the valid values for every bad one."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from handlers.errors import InvalidOption
from handlers.manifest import Defaults, LayerSpec, Manifest
from handlers.options import (
    FORMATS,
    MAX_MAP_SIDE,
    OPTION_NAMES,
    RequestOptions,
    headers_to_options,
    parse_options,
)


def make_manifest(num_outputs: int = 3, defaults: Defaults | None = None) -> Manifest:
    return Manifest(
        name="hand-made",
        task="classification",
        backend="onnx",
        model_file="model.onnx",
        input_size=(16, 20),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        main_output="logits",
        layers=(LayerSpec("layer4", "act_layer4", (8, 2, 3)), LayerSpec("layer3", "act_layer3", (4, 4, 5))),
        num_outputs=num_outputs,
        defaults=defaults or Defaults(),
    )


MANIFEST = make_manifest()


def parse(headers: dict[str, str] | None = None, body: Any = None, **kwargs: Any) -> RequestOptions:
    return parse_options(MANIFEST, headers=headers, body=body, **kwargs)


def invalid(match: str, **kwargs: Any) -> InvalidOption:
    with pytest.raises(InvalidOption, match=match) as info:
        parse(**kwargs)
    assert info.value.body()["error"]["code"] == "invalid_option"
    assert info.value.status == 400
    return info.value


# defaults


def test_defaults_come_from_the_manifest_and_top_k_is_capped() -> None:
    options = parse()
    assert options == RequestOptions(
        method="lafam", layer="layer4", top_k=3, format="png", upsample="nearest", size="input"
    )


def test_manifest_defaults_are_used() -> None:
    manifest = make_manifest(10, Defaults(top_k=2, format="array", upsample="bilinear", size="original"))
    options = parse_options(manifest)
    assert (options.top_k, options.format, options.upsample, options.size) == (2, "array", "bilinear", "original")


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse().top_k = 1  # type: ignore[misc]


# headers and body


@pytest.mark.parametrize("name", ["X-LaFAM-Top-K", "x-lafam-top-k", "X-LAFAM-TOP-K", "x-LaFaM-top_k"])
def test_headers_any_case(name: str) -> None:
    assert parse(headers={name: "2"}).top_k == 2


def test_headers_to_options_ignores_other_headers() -> None:
    headers = {"Content-Type": "image/png", "X-LaFAM-Format": "array", "X-Request-Id": "1", "x-lafam-size": "4x4"}
    assert headers_to_options(headers) == {"format": "array", "size": "4x4"}


def test_every_option_from_headers() -> None:
    headers = {
        "X-LaFAM-Method": "LaFAM",
        "X-LaFAM-Layer": "layer3",
        "X-LaFAM-Top-K": " 1 ",
        "X-LaFAM-Format": "Array",
        "X-LaFAM-Upsample": "BILINEAR",
        "X-LaFAM-Size": "8x9",
    }
    assert parse(headers=headers) == RequestOptions("lafam", "layer3", 1, "array", "bilinear", (8, 9))


def test_body_overrides_header() -> None:
    options = parse(headers={"X-LaFAM-Top-K": "1", "X-LaFAM-Format": "none"}, body={"top_k": 2})
    assert options.top_k == 2
    assert options.format == "none"  # headers still apply where the body is silent


def test_body_accepts_json_types() -> None:
    options = parse(body={"top_k": 3, "size": [16, 20], "format": "array"})
    assert (options.top_k, options.size, options.format) == (3, (16, 20), "array")


# size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("input", "input"),
        ("original", "original"),
        (" Original ", "original"),
        ("16x20", (16, 20)),
        ("16X20", (16, 20)),
        ("16,20", (16, 20)),
        (" 16 x 20 ", (16, 20)),
        ([16, 20], (16, 20)),
        ((16, 20), (16, 20)),
        ([1, MAX_MAP_SIDE], (1, MAX_MAP_SIDE)),
    ],
)
def test_size_parsing(value: Any, expected: str | tuple[int, int]) -> None:
    assert parse(body={"size": value}).size == expected


@pytest.mark.parametrize(
    "value",
    ["0x5", "5x0", "5000x5", "16", "abc", "16x20x3", "-1x5", "", 0, 5000, 16, [1], [0, 5], [16, 5000], [16.0, 20],
     [True, 2], True, None, {"h": 1}],
)  # fmt: skip
def test_size_rejects(value: Any) -> None:
    error = invalid(
        r"option 'size' must be 'input', 'original', 'HxW' or \[H, W\] with sides 1\.\.4096", body={"size": value}
    )
    assert error.details["valid"] == ["input", "original", "HxW", "[H, W]"]


def test_size_header_is_parsed_too() -> None:
    assert parse(headers={"X-LaFAM-Size": "7,9"}).size == (7, 9)
    invalid("option 'size'", headers={"X-LaFAM-Size": "big"})


# top_k


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (3, 3), ("2", 2), (" 3 ", 3)])
def test_top_k_accepts(value: Any, expected: int) -> None:
    assert parse(body={"top_k": value}).top_k == expected


@pytest.mark.parametrize("value", [0, -1, 4, "0", "4", "-2", "--3", "²", "two", "2.0", "", 2.0, None, [2]])
def test_top_k_rejects_with_the_valid_range(value: Any) -> None:
    error = invalid(r"option 'top_k' must be an integer from 1 to 3, got ", body={"top_k": value})
    assert error.details == {"option": "top_k", "valid": "1..3"}


@pytest.mark.parametrize("value", [True, False])
def test_top_k_rejects_bool_and_names_it(value: bool) -> None:
    invalid(rf"option 'top_k' must be an integer from 1 to 3, got {value}$", body={"top_k": value})


# choices


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("format", "jpeg", r"option 'format' has invalid value 'jpeg'; valid values: png, array, none"),
        ("format", 1, r"option 'format' has invalid value 1; valid values: png, array, none"),
        ("upsample", "bicubic", r"option 'upsample' has invalid value 'bicubic'; valid values: nearest, bilinear"),
        ("upsample", None, r"option 'upsample' has invalid value None; valid values: nearest, bilinear"),
        ("method", "gradcam", r"option 'method' has invalid value 'gradcam'; valid values: lafam"),
        ("layer", "layer9", r"option 'layer' has invalid value 'layer9'; exported layers: layer4, layer3"),
        ("layer", "LAYER4", r"option 'layer' has invalid value 'LAYER4'; exported layers: layer4, layer3"),
    ],
)
def test_bad_choice_lists_the_valid_values(name: str, value: Any, match: str) -> None:
    error = invalid(match, body={name: value})
    body = error.body()["error"]
    assert body["option"] == name
    assert body["valid"]
    assert error.message in body["message"]


def test_format_values_are_all_accepted() -> None:
    for fmt in FORMATS:
        assert parse(body={"format": fmt.upper()}).format == fmt


def test_methods_depend_on_the_endpoint() -> None:
    assert parse(body={"method": "lrp"}, methods=("lrp", "lafam")).method == "lrp"
    assert parse(methods=("lrp", "lafam")).method == "lrp"  # the endpoint's first method is the default
    invalid(r"valid values: lrp, lafam", body={"method": "gradcam"}, methods=("lrp", "lafam"))


# unknown and malformed


def test_unknown_option_lists_the_valid_names() -> None:
    error = invalid(
        r"unknown option\(s\) colour; valid options: method, layer, top_k, format, upsample, size",
        body={"colour": "red"},
    )
    assert error.details == {"option": "colour", "valid": list(OPTION_NAMES)}


def test_unknown_header_option_is_rejected_too() -> None:
    invalid(r"unknown option\(s\) topk, zoom", headers={"X-LaFAM-TopK": "2", "X-LaFAM-Zoom": "2"})


@pytest.mark.parametrize("body", [["top_k", 1], "top_k=1", 3, True])
def test_options_must_be_an_object(body: Any) -> None:
    error = invalid(r"'options' must be a JSON object, got ", body=body)
    assert error.details["option"] == "options"


def test_empty_body_object_means_defaults() -> None:
    assert parse(body={}) == parse()
