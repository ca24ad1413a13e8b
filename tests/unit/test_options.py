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


# backward-pass methods and their class options

EXPLAIN_METHODS = ("lrp", "lrp_class", "gradcam", "input_x_gradient", "distribution", "distribution_fast", "lafam")
WIDE = make_manifest(num_outputs=12)


def parse_explain(headers: dict[str, str] | None = None, body: Any = None, **kwargs: Any) -> RequestOptions:
    kwargs.setdefault("methods", EXPLAIN_METHODS)
    return parse_options(WIDE, headers=headers, body=body, **kwargs)


def invalid_explain(option: str, match: str, **kwargs: Any) -> InvalidOption:
    with pytest.raises(InvalidOption, match=match) as info:
        parse_explain(**kwargs)
    assert info.value.status == 400
    assert info.value.details["option"] == option
    assert option in info.value.message
    return info.value


def test_class_option_defaults_per_method() -> None:
    assert parse_explain().method == "lrp"
    for method, top in (("lrp_class", 1), ("gradcam", 1), ("distribution", 2), ("distribution_fast", 2)):
        options = parse_explain(body={"method": method})
        assert (options.classes, options.top_classes, options.least_likely) == (None, top, True)
        assert (options.temperature, options.tau) == (10.0, 0.01)
    assert parse_explain(body={"method": "distribution"}).base == "gradcam"
    assert parse_explain(body={"method": "distribution_fast"}).base == "lrp"
    assert parse_explain(body={"method": "distribution"}).num_classes == 3  # top-2 + the least likely
    assert parse_explain(body={"method": "gradcam"}).num_classes == 1


def test_class_options_from_headers() -> None:
    options = parse_explain(
        headers={
            "X-LaFAM-Method": "Distribution",
            "X-LaFAM-Top-Classes": "3",
            "X-LaFAM-Least-Likely": "false",
            "X-LaFAM-Temperature": "5",
            "X-LaFAM-Tau": "0.2",
            "X-LaFAM-Base": "LRP",
        }
    )
    assert (options.method, options.top_classes, options.least_likely) == ("distribution", 3, False)
    assert (options.temperature, options.tau, options.base) == (5.0, 0.2, "lrp")
    assert options.num_classes == 3
    options = parse_explain(headers={"X-LaFAM-Method": "gradcam", "X-LaFAM-Classes": "1,2"})
    assert options.classes == (1, 2)
    assert options.num_classes == 2
    assert parse_explain(headers={"X-LaFAM-Method": "lrp_class", "X-LaFAM-Classes": " 4 , 0 "}).classes == (4, 0)


def test_class_options_from_the_body() -> None:
    body = {
        "method": "distribution_fast",
        "classes": [7, 0, 3],
        "least_likely": False,
        "temperature": 2,
        "tau": 0,
        "base": "input_x_gradient",
    }
    options = parse_explain(body=body)
    assert (options.classes, options.least_likely, options.base) == ((7, 0, 3), False, "input_x_gradient")
    assert (options.temperature, options.tau) == (2.0, 0.0)
    assert isinstance(options.temperature, float)
    assert parse_explain(body={"method": "gradcam", "top_classes": 12}).top_classes == 12
    assert parse_explain(body={"method": "distribution", "classes": "5,6"}).classes == (5, 6)
    overridden = parse_explain(
        headers={"X-LaFAM-Temperature": "1"}, body={"method": "distribution", "temperature": 3.5}
    )
    assert overridden.temperature == 3.5  # the body wins over the header


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("classes", [12], r"class indices from 0 to 11"),
        ("classes", "-1", r"class indices from 0 to 11"),
        ("classes", [1, 1], r"repeats a class"),
        ("classes", "2,3,2", r"repeats a class"),
        ("classes", ["a", 1], r"class indices"),
        ("classes", "1,two", r"class indices"),
        ("classes", [1.5], r"class indices"),
        ("classes", [True], r"class indices"),
        ("classes", [], r"class indices"),
        ("classes", 3, r"class indices"),
        ("temperature", 0, r"'temperature' must be a number in \(0, 1e6\]"),
        ("temperature", -1, r"'temperature' must be a number in \(0, 1e6\]"),
        ("temperature", "abc", r"'temperature' must be a number in \(0, 1e6\]"),
        ("temperature", "inf", r"'temperature' must be a number in \(0, 1e6\]"),
        ("temperature", float("inf"), r"'temperature' must be a number in \(0, 1e6\]"),
        ("temperature", float("nan"), r"'temperature' must be a number in \(0, 1e6\]"),
        ("temperature", True, r"'temperature' must be a number in \(0, 1e6\]"),
        ("temperature", 1e7, r"'temperature' must be a number in \(0, 1e6\]"),
        ("tau", 1, r"'tau' must be a number in \[0, 1\)"),
        ("tau", -0.1, r"'tau' must be a number in \[0, 1\)"),
        ("tau", "1.0", r"'tau' must be a number in \[0, 1\)"),
        ("least_likely", "maybe", r"'least_likely' must be true or false"),
        ("least_likely", 1, r"'least_likely' must be true or false"),
        ("top_classes", 0, r"'top_classes' must be an integer from 1 to 11"),
        ("top_classes", 12, r"'top_classes' must be an integer from 1 to 11"),  # 12 + the least likely > 12
        ("top_classes", "2.0", r"'top_classes' must be an integer"),
        ("base", "saliency", r"'base' has invalid value 'saliency'; valid values: gradcam, input_x_gradient, lrp"),
    ],
)
def test_bad_class_options_name_the_option(option: str, value: Any, match: str) -> None:
    invalid_explain(option, match, body={"method": "distribution", option: value})


def test_base_must_suit_the_method() -> None:
    invalid_explain(
        "base", r"valid values: lrp, input_x_gradient", body={"method": "distribution_fast", "base": "gradcam"}
    )
    no_lrp = ("gradcam", "input_x_gradient")
    invalid_explain(
        "base",
        r"valid values: gradcam, input_x_gradient$",
        body={"method": "distribution", "base": "lrp"},
        bases=no_lrp,
    )
    # Without LRP the fast method falls back to input x gradient.
    assert parse_explain(body={"method": "distribution_fast"}, bases=no_lrp).base == "input_x_gradient"


def test_top_classes_leaves_room_for_the_least_likely() -> None:
    assert parse_explain(body={"method": "distribution", "top_classes": 11}).top_classes == 11
    assert parse_explain(body={"method": "distribution", "top_classes": 12, "least_likely": False}).top_classes == 12
    with pytest.raises(InvalidOption, match=r"'top_classes' must be an integer from 1 to 3, got 4"):
        parse(body={"method": "gradcam", "top_classes": 4}, methods=EXPLAIN_METHODS)  # 3 classes, no least likely


@pytest.mark.parametrize(
    ("body", "most"),
    [
        ({"method": "lrp_class"}, 4),
        ({"method": "distribution", "base": "lrp"}, 4),
        ({"method": "distribution", "base": "input_x_gradient"}, 4),
    ],
)
def test_k_is_capped_for_costly_bases(body: dict[str, Any], most: int) -> None:
    ok = parse_explain(body={**body, "classes": list(range(most))}, max_classes=most)
    assert ok.num_classes == most
    too_many = {**body, "classes": list(range(most + 1))}
    error = invalid_explain(
        "classes", rf"names {most + 1} classes; at most {most} \(K is capped", body=too_many, max_classes=most
    )
    assert "its cost grows with K" in error.message
    room = most - (body["method"] == "distribution")  # the least likely class takes one of the K
    invalid_explain(
        "top_classes", rf"from 1 to {room} \(K is capped", body={**body, "top_classes": most + 1}, max_classes=most
    )


@pytest.mark.parametrize(
    "body",
    [
        {"method": "gradcam"},
        {"method": "distribution", "base": "gradcam"},
        {"method": "distribution_fast", "base": "lrp"},
        {"method": "distribution_fast", "base": "input_x_gradient"},
    ],
)
def test_k_is_not_capped_where_the_cost_does_not_grow(body: dict[str, Any]) -> None:
    options = parse_explain(body={**body, "classes": list(range(12))}, max_classes=2)
    assert options.num_classes == 12
    assert parse_explain(body={**body, "top_classes": 11}, max_classes=2).top_classes == 11


def test_methods_parameter_restricts_methods_and_shows_the_hint() -> None:
    hint = " (backward-pass methods are served on POST /explanations)"
    match = r"valid values: lafam \(backward-pass methods are served on POST /explanations"
    error = invalid_explain("method", match, body={"method": "lrp"}, methods=("lafam",), hint=hint)
    assert error.details["valid"] == ["lafam"]
    three = ("lrp", "gradcam", "lafam")
    invalid_explain(
        "method",
        r"valid values: lrp, gradcam, lafam; see the docs",
        body={"method": "lrp_class"},
        methods=three,
        hint="; see the docs",
    )
    for method in ("lrp", "gradcam", "lafam"):
        assert parse_explain(body={"method": method}, methods=("lrp", "gradcam", "lafam")).method == method


def test_an_error_message_does_not_echo_a_huge_value_whole() -> None:
    huge = "7" * 5000
    for name in ("top_k", "size", "resize", "format"):
        with pytest.raises(InvalidOption) as info:
            parse_options(MANIFEST, body={name: huge})
        message = str(info.value)
        assert "(5002 characters)" in message, message
        assert len(message) < 400, message
