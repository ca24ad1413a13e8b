"""The ``resize`` option: parsing, the size an image is run at, the guard rails, and batches of several sizes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from handlers.errors import InvalidOption
from handlers.manifest import MANIFEST_FILE, Defaults, LayerSpec, Manifest
from handlers.options import OPTION_NAMES, parse_options
from handlers.service import LafamService, Request
from handlers.sizing import DEFAULT_MIN_SIDE, MAX_INPUT_PIXELS, MAX_RESIZE_SIDE, input_size, parse_resize

from .conftest import INPUT, image_bytes


def make_manifest(*, dynamic: bool = True, min_side: int | None = 16, **changes: Any) -> Manifest:
    return Manifest(
        name="fcn",
        task="classification",
        backend="torchscript",
        model_file="model.pt",
        input_size=(128, 96),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        main_output="logits",
        layers=(LayerSpec("block3", "act_block3", (8, 8, 6)),),
        num_outputs=3,
        dynamic_size=dynamic,
        min_side=min_side,
        **changes,
    )


DYNAMIC = make_manifest()
FIXED = make_manifest(dynamic=False, min_side=None)


def rejected(match: str, value: Any, manifest: Manifest = DYNAMIC) -> InvalidOption:
    with pytest.raises(InvalidOption, match=match) as info:
        parse_options(manifest, body={"resize": value})
    error = info.value
    assert (error.status, error.body()["error"]["code"], error.body()["error"]["option"]) == (
        400,
        "invalid_option",
        "resize",
    )
    return error


# parsing


def test_resize_is_a_request_option_defaulting_to_the_model_size() -> None:
    assert "resize" in OPTION_NAMES
    assert parse_options(DYNAMIC).resize == "model"
    assert parse_options(FIXED).resize == "model"
    assert parse_options(FIXED, body={"resize": "MODEL"}).resize == "model"  # always valid


@pytest.mark.parametrize(
    ("value", "expected"),
    [("none", "none"), (" None ", "none"), ("model", "model"), ("512", 512), (" 64 ", 64), (16, 16), (4096, 4096)],
)
def test_resize_values(value: Any, expected: str | int) -> None:
    assert parse_options(DYNAMIC, body={"resize": value}).resize == expected
    assert parse_options(DYNAMIC, headers={"X-LaFAM-Resize": str(value)}).resize == expected


def test_body_wins_over_the_header() -> None:
    assert parse_options(DYNAMIC, headers={"X-LaFAM-Resize": "none"}, body={"resize": 64}).resize == 64


@pytest.mark.parametrize("value", ["small", "", "-64", "64.5", 64.5, True, None, [64], "15", 15, 4097, "0"])
def test_bad_values_list_the_valid_ones(value: Any) -> None:
    error = rejected(r"option 'resize' must be 'model', 'none' or a maximum side N from 16 to 4096", value)
    assert error.body()["error"]["valid"] == ["model", "none", f"16..{MAX_RESIZE_SIDE}"]


def test_the_smallest_n_defaults_to_32_without_a_recorded_minimum() -> None:
    manifest = make_manifest(min_side=None)
    assert parse_resize(DEFAULT_MIN_SIDE, manifest) == DEFAULT_MIN_SIDE
    with pytest.raises(InvalidOption, match=r"from 32 to 4096"):
        parse_resize(31, manifest)


@pytest.mark.parametrize("value", ["none", "256", 64])
def test_a_fixed_size_model_refuses_anything_but_model(value: Any) -> None:
    error = rejected(r"option 'resize'=.* needs a model that takes any input size", value, FIXED)
    message = error.message
    assert "'fcn' was exported with a fixed input size 128x96" in message
    assert "re-export it with --dynamic-size" in message
    assert error.body()["error"]["valid"] == ["model"]


def test_a_deployment_default_comes_from_the_manifest_defaults() -> None:
    manifest = dataclasses.replace(DYNAMIC, defaults=Defaults(resize="none"))
    assert parse_options(manifest).resize == "none"
    assert parse_options(manifest, body={"resize": "model"}).resize == "model"


# the size an image is run at


@pytest.mark.parametrize(
    ("resize", "image", "expected"),
    [
        ("model", (300, 40), (128, 96)),  # today's behaviour, whatever the image
        ("none", (256, 256), (256, 256)),
        ("none", (17, 900), (17, 900)),
        (256, (512, 384), (256, 192)),  # longer side to N, aspect ratio kept
        (256, (384, 512), (192, 256)),
        (100, (1000, 333), (100, 33)),
        (512, (256, 200), (256, 200)),  # never upscaled
        (256, (256, 100), (256, 100)),
    ],
)
def test_input_size(resize: str | int, image: tuple[int, int], expected: tuple[int, int]) -> None:
    assert input_size(resize, image, DYNAMIC) == expected


@pytest.mark.parametrize(
    ("resize", "image"),
    [("none", (15, 400)), ("none", (400, 8)), (64, (1000, 100))],  # 1000x100 → 64x6
)
def test_a_side_under_the_minimum_is_a_400_naming_it(resize: str | int, image: tuple[int, int]) -> None:
    minimum = r"under the model's minimum side of 16 pixels \(its total stride\)"
    with pytest.raises(InvalidOption, match=minimum) as info:
        input_size(resize, image, DYNAMIC)
    assert info.value.status == 400
    assert info.value.body()["error"]["option"] == "resize"


def test_more_pixels_than_the_budget_is_a_400_naming_the_limit() -> None:
    with pytest.raises(InvalidOption, match=r"4096x4096 input = 16777216 pixels, over the limit of 1048576") as info:
        input_size("none", (4096, 4096), DYNAMIC)
    assert "resize=1024 fits any image" in info.value.message
    assert input_size(1024, (4096, 4096), DYNAMIC) == (1024, 1024)  # the fix it suggests
    assert input_size("none", (1024, 1024), DYNAMIC) == (1024, 1024)  # the limit itself
    with pytest.raises(InvalidOption, match=r"over the limit of 10000 pixels per input \(e.g. 100x100\)"):
        input_size(200, (400, 300), DYNAMIC, max_pixels=10_000)


def test_the_budget_keeps_a_worker_far_from_4096_squared() -> None:
    assert MAX_INPUT_PIXELS == 1024 * 1024
    assert MAX_INPUT_PIXELS * 16 == 4096 * 4096


# the manifest fields


def test_old_manifests_are_fixed_size() -> None:
    data = json.loads(json.dumps(DYNAMIC.to_dict()))
    del data["dynamic_size"], data["min_side"]
    del data["defaults"]["resize"]
    manifest = Manifest.from_dict(data)
    assert (manifest.dynamic_size, manifest.min_side, manifest.defaults.resize) == (False, None, "model")


def test_dynamic_fields_round_trip() -> None:
    data = json.loads(json.dumps(DYNAMIC.to_dict()))
    assert (data["dynamic_size"], data["min_side"]) == (True, 16)
    assert Manifest.from_dict(data) == DYNAMIC


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"dynamic_size": "yes"}, r"dynamic_size 'yes' \(need true or false\)"), ({"min_side": 0}, r"min_side 0")],
)
def test_bad_dynamic_fields_are_named(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(DYNAMIC, **changes)


# the service: a dynamic TinyNet (fully convolutional, mean pooling), traced at INPUT


@pytest.fixture(scope="module")
def dynamic_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-dynamic")
    shutil.copytree(tiny_export, folder, dirs_exist_ok=True)
    manifest = Manifest.load(folder)
    dataclasses.replace(manifest, dynamic_size=True, min_side=4).dump(folder / MANIFEST_FILE)
    return folder


def ask(service: LafamService, items: list[tuple[bytes, dict[str, str]]], explain: bool = False) -> list[Any]:
    return service.predict([Request({"body": data}, headers, {}, explain=explain) for data, headers in items])


def test_a_fixed_size_service_answers_400_for_resize_none(tiny_export: Path) -> None:
    service = LafamService.from_folder(tiny_export)
    (reply,) = ask(service, [(image_bytes(), {"X-LaFAM-Resize": "none"})])
    assert reply.status == 400
    assert reply.body["error"]["option"] == "resize"
    assert "re-export it with --dynamic-size" in reply.body["error"]["message"]
    (reply,) = ask(service, [(image_bytes(), {})])
    assert reply.body["input_size"] == list(INPUT)


def test_a_batch_of_several_sizes_runs_once_per_size(dynamic_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = LafamService.from_folder(dynamic_export)
    shapes: list[tuple[int, ...]] = []
    run = service.backend.run
    monkeypatch.setattr(service.backend, "run", lambda batch: shapes.append(tuple(batch.shape)) or run(batch))
    big, small, wide = image_bytes((64, 48)), image_bytes((20, 30)), image_bytes((90, 20))  # (W, H)
    items = [
        (big, {"X-LaFAM-Resize": "none", "X-LaFAM-Format": "array"}),
        (small, {"X-LaFAM-Resize": "none", "X-LaFAM-Format": "array"}),
        (big, {"X-LaFAM-Format": "array"}),  # resize=model: INPUT
        (b"junk", {"X-LaFAM-Resize": "none"}),
        (big, {"X-LaFAM-Resize": "none", "X-LaFAM-Format": "array"}),
        (wide, {"X-LaFAM-Resize": "40", "X-LaFAM-Format": "array", "X-LaFAM-Size": "original"}),
        (image_bytes((64, 2)), {"X-LaFAM-Resize": "none"}),  # a side under the minimum: its own 400
    ]
    replies = ask(service, items)
    assert [r.status for r in replies] == [200, 200, 200, 400, 200, 200, 400]
    assert sorted(shapes) == sorted([(2, 3, 48, 64), (1, 3, 30, 20), (1, 3, *INPUT), (1, 3, 9, 40)])
    sizes = [r.body.get("input_size") for r in replies]
    assert sizes == [[48, 64], [30, 20], list(INPUT), None, [48, 64], [9, 40], None]
    assert replies[6].body["error"]["option"] == "resize"
    assert "minimum side of 4 pixels" in replies[6].body["error"]["message"]
    for reply, (height, width) in zip(replies[:3], ([48, 64], [30, 20], list(INPUT)), strict=True):
        explanation = reply.body["explanation"]
        assert explanation["size"] == [height, width]  # size=input: the size the model saw
        assert explanation["native_size"] == [-(-height // 4), -(-width // 4)]  # two stride-2 convolutions
    assert replies[5].body["explanation"]["size"] == [20, 90]  # size=original still means the posted image
    # each answer is the one it gets alone, whatever else shared its batch (exact where its size ran alone too)
    for index in (1, 2, 5):
        (alone,) = ask(service, [items[index]])
        assert alone.body == replies[index].body
    (alone,) = ask(service, [items[0]])
    assert alone.body["predictions"][0]["index"] == replies[0].body["predictions"][0]["index"]
    np.testing.assert_allclose(alone.body["explanation"]["data"], replies[0].body["explanation"]["data"], atol=1e-4)


def test_one_size_failing_fails_only_its_requests(dynamic_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = LafamService.from_folder(dynamic_export)
    run = service.backend.run

    def fail_on_the_big_one(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if batch.shape[-1] == 64:
            raise RuntimeError("simulated out of memory")
        return run(batch)

    monkeypatch.setattr(service.backend, "run", fail_on_the_big_one)
    replies = ask(service, [(image_bytes((64, 48)), {"X-LaFAM-Resize": "none"}), (image_bytes(), {})])
    assert [r.status for r in replies] == [500, 200]


def test_the_pixel_budget_is_set_per_deployment(dynamic_export: Path) -> None:
    service = LafamService.from_folder(dynamic_export, config={"max_input_pixels": 1000})
    (reply,) = ask(service, [(image_bytes((64, 48)), {"X-LaFAM-Resize": "none"})])
    assert reply.status == 400
    assert "over the limit of 1000 pixels" in reply.body["error"]["message"]
    with pytest.raises(ValueError, match=r"max_input_pixels .* must be a positive int: 0"):
        LafamService.from_folder(dynamic_export, config={"max_input_pixels": 0})


def test_a_deployment_may_default_to_native_size(dynamic_export: Path, tiny_export: Path) -> None:
    service = LafamService.from_folder(dynamic_export, config={"resize": "none"})
    (reply,) = ask(service, [(image_bytes((64, 48)), {})])
    assert reply.body["input_size"] == [48, 64]
    with pytest.raises(ValueError, match=r"invalid default .*exported with a fixed input size"):
        LafamService.from_folder(tiny_export, config={"resize": "none"})
