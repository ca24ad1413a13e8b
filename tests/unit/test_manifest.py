"""The manifest schema: round trip, and a start-up error naming the field for every broken one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from handlers.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Defaults,
    LayerSpec,
    Manifest,
    ManifestError,
    QuantizationSpec,
    output_name_for,
    sha256_file,
)


def make_manifest(**changes: Any) -> Manifest:
    fields: dict[str, Any] = {
        "name": "shapes",
        "task": "classification",
        "backend": "onnx",
        "model_file": "model.onnx",
        "input_size": (32, 40),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "main_output": "logits",
        "layers": (LayerSpec("layer4", "act_layer4", (512, 1, 2)), LayerSpec("layer3", "act_layer3", (256, 2, 3))),
        "num_outputs": 3,
        "labels": ("circle", "square", "triangle"),
        "defaults": Defaults(top_k=2, format="array"),
        "verification": {"logits": 1e-6, "tolerance": 1e-4},
        "source": {"model": "demo", "torch": "2.14.1"},
    }
    fields.update(changes)
    return Manifest(**fields)


def as_json(**changes: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(make_manifest().to_dict()))
    data.update(changes)
    return data


def write_folder(folder: Path, **changes: Any) -> Manifest:
    (folder / "model.onnx").write_bytes(b"graph bytes")
    (folder / "labels.txt").write_text("circle\nsquare\ntriangle\n")
    checksums = {name: sha256_file(folder / name) for name in ("model.onnx", "labels.txt")}
    manifest = make_manifest(checksums=checksums, **changes)
    manifest.dump(folder / MANIFEST_FILE)
    return manifest


# round trip


def test_dump_load_round_trip(tmp_path: Path) -> None:
    manifest = write_folder(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    assert Manifest.load(tmp_path / MANIFEST_FILE) == manifest


def test_from_dict_of_to_dict_is_identity() -> None:
    manifest = make_manifest(task="embedding", labels=(), num_outputs=128, main_output="embedding")
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


def test_dump_is_sorted_pretty_json(tmp_path: Path) -> None:
    make_manifest().dump(tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert text.endswith("}\n")
    assert data["input_size"] == [32, 40]
    assert data["layers"][0] == {"name": "layer4", "output": "act_layer4", "shape": [512, 1, 2]}
    assert data["schema_version"] == SCHEMA_VERSION


def test_optional_fields_take_their_defaults() -> None:
    data = as_json()
    for name in ("labels", "defaults", "max_pixels", "checksums", "verification", "source", "schema_version"):
        del data[name]
    manifest = Manifest.from_dict(data)
    assert manifest.labels == ()
    assert manifest.defaults == Defaults()
    assert manifest.max_pixels == 40_000_000
    assert manifest.schema_version == SCHEMA_VERSION


# helpers


@pytest.mark.parametrize(
    ("layer", "output"),
    [("layer4", "act_layer4"), ("layer4.1", "act_layer4_1"), ("features.7", "act_features_7"), ("a/b-c", "act_a_b_c")],
)
def test_output_name_for(layer: str, output: str) -> None:
    assert output_name_for(layer) == output


def test_layer_lookup() -> None:
    manifest = make_manifest()
    assert manifest.layer(None) == manifest.layers[0]
    assert manifest.layer("layer3").output == "act_layer3"
    assert manifest.layer_names == ("layer4", "layer3")
    with pytest.raises(KeyError, match="'x'"):
        manifest.layer("x")


def test_label_falls_back_to_the_index() -> None:
    assert make_manifest().label(1) == "square"
    assert make_manifest(labels=()).label(1) == "1"


def test_sha256_file(tmp_path: Path) -> None:
    (tmp_path / "abc").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# invalid values, each named


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"task": "regression"}, r"task 'regression' \(valid: classification, embedding\)"),
        ({"backend": "tensorrt"}, r"backend 'tensorrt' \(valid: onnx, torchscript\)"),
        ({"input_size": (224,)}, r"input_size \(224,\)"),
        ({"input_size": (224, 0)}, r"input_size \(224, 0\)"),
        ({"std": (0.2, 0.0, 0.2)}, r"mean/std \(need 3 values each, std > 0\)"),
        ({"mean": (0.5, 0.5)}, r"mean/std"),
        ({"labels": ("a", "b")}, r"labels \(2 labels for 3 outputs\)"),
        ({"task": "embedding"}, r"labels \(an embedding model has no labels\)"),
        ({"layers": ()}, r"layers \(need at least one exported activation\)"),
        ({"num_outputs": 0, "labels": ()}, r"num_outputs 0"),
        ({"num_outputs": "3"}, r"num_outputs '3'"),
        ({"max_pixels": 0}, r"max_pixels 0"),
        ({"max_pixels": "big"}, r"max_pixels 'big'"),
        ({"checksums": None}, r"checksums None"),
        ({"schema_version": 2}, r"schema_version 2 \(this handler reads 1\)"),
    ],
)
def test_invalid_values_name_the_field(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        make_manifest(**changes)
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(json.loads(json.dumps(make_manifest().to_dict() | changes)))


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ManifestError, match=r"task 'x' .*; backend 'y'"):
        make_manifest(task="x", backend="y")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"input_size": 224}, r"field 'input_size'"),
        ({"input_size": ["a", 1]}, r"field 'input_size'"),
        ({"mean": None}, r"field 'mean'"),
        ({"std": ["x", 1, 1]}, r"field 'std'"),
        ({"labels": 3}, r"field 'labels'"),
        ({"layers": "layer4"}, r"field 'layers'"),
        ({"layers": [{"name": "layer4", "output": "act_layer4"}]}, r"field 'layers': missing key 'shape'"),
        ({"defaults": None}, r"field 'defaults'"),
        ({"defaults": {"topk": 1}}, r"field 'defaults'.*topk"),
    ],
)
def test_ill_typed_json_names_the_field(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(as_json(**changes))


@pytest.mark.parametrize("name", ["name", "task", "input_size", "layers", "num_outputs"])
def test_missing_field(name: str) -> None:
    data = as_json()
    del data[name]
    with pytest.raises(ManifestError, match=rf"missing field\(s\) '{name}'"):
        Manifest.from_dict(data)


def test_unknown_field() -> None:
    with pytest.raises(ManifestError, match=r"unknown field\(s\) 'colour'"):
        Manifest.from_dict(as_json(colour="red"))


@pytest.mark.parametrize("data", [[1, 2], "manifest", None])
def test_not_an_object(data: Any) -> None:
    with pytest.raises(ManifestError, match="expected a JSON object"):
        Manifest.from_dict(data)


# files


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00binary", b""])
def test_not_json(tmp_path: Path, content: bytes) -> None:
    (tmp_path / MANIFEST_FILE).write_bytes(content)
    with pytest.raises(ManifestError, match="is not valid JSON"):
        Manifest.load(tmp_path)


def test_json_array_file(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="expected a JSON object"):
        Manifest.load(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest not found"):
        Manifest.load(tmp_path)
    with pytest.raises(ManifestError, match="manifest not found"):
        Manifest.load(tmp_path / "elsewhere.json")


def test_checksum_mismatch_after_editing_the_graph(tmp_path: Path) -> None:
    write_folder(tmp_path)
    with (tmp_path / "model.onnx").open("ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(ManifestError, match=r"checksum mismatch for model\.onnx"):
        Manifest.load(tmp_path)
    assert Manifest.load(tmp_path, verify_checksums=False).model_file == "model.onnx"


def test_missing_listed_file(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "labels.txt").unlink()
    with pytest.raises(ManifestError, match=r"file labels\.txt listed in the manifest is missing"):
        Manifest.load(tmp_path)


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)


# quantization (export --quantize int8)


def make_quantization(**changes: Any) -> QuantizationSpec:
    fields: dict[str, Any] = {
        "dtype": "int8",
        "format": "QDQ",
        "method": "onnxruntime.quantization.quantize_static",
        "onnxruntime_version": "1.31.1",
        "weight_type": "QInt8",
        "activation_type": "QUInt8",
        "per_channel": True,
        "reduce_range": True,
        "calibrate_method": "MinMax",
        "calibration": {"source": "folder x", "images": 24, "held_out": 8},
        "agreement": {"metric": "top1_agreement", "value": 1.0, "threshold": 0.99, "images": 8},
        "maps": {
            "act_layer4": {"layer": "layer4", "median": 0.99, "min": 0.9, "threshold": 0.95, "images": 8},
            "act_layer3": {"layer": "layer3", "median": 0.98, "min": 0.8, "threshold": 0.95, "images": 8},
        },
        "float_model": {"file": "model.onnx", "sha256": "0" * 64},
    }
    fields.update(changes)
    return QuantizationSpec(**fields)


def test_a_quantised_manifest_round_trips(tmp_path: Path) -> None:
    manifest = write_folder(tmp_path, quantization=make_quantization())
    assert Manifest.load(tmp_path) == manifest
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["quantization"]["maps"]["act_layer4"]["median"] == 0.99


def test_a_float_manifest_has_no_quantization_entry_and_an_older_one_loads() -> None:
    data = make_manifest().to_dict()
    assert "quantization" not in data
    assert Manifest.from_dict(data).quantization is None
    assert Manifest.from_dict({**data, "quantization": None}).quantization is None


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dtype": "int4"}, r"field 'quantization': dtype 'int4' \(valid: int8\)"),
        ({"format": "QOperator"}, r"format 'QOperator' \(valid: QDQ\)"),
        ({"per_channel": "yes"}, r"per_channel 'yes' \(need true or false\)"),
        ({"agreement": {"metric": "mse", "value": 1.0, "threshold": 0.5}}, r"agreement.metric 'mse'"),
        ({"agreement": {"metric": "top1_agreement", "value": "high", "threshold": 0.5}}, r"need numbers 'value'"),
        ({"maps": {"act_layer4": {"median": 0.9}, "act_layer3": {}}}, r"maps.act_layer4 \(need numbers"),
        ({"colour": "red"}, r"field 'quantization'.*colour"),
    ],
)
def test_invalid_quantization_names_the_field(changes: dict[str, Any], match: str) -> None:
    data = as_json(quantization=json.loads(json.dumps(make_quantization().__dict__)) | changes)
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(data)


def test_quantization_must_describe_the_onnx_graph_and_its_layers() -> None:
    with pytest.raises(ManifestError, match=r"quantization \(an ONNX graph only, not backend 'torchscript'\)"):
        make_manifest(backend="torchscript", model_file="model.pt", quantization=make_quantization())
    with pytest.raises(ManifestError, match=r"quantization.maps \(figures for \['act_layer4'\]"):
        make_manifest(quantization=make_quantization(maps={"act_layer4": make_quantization().maps["act_layer4"]}))


def test_the_quantised_graph_must_be_checksummed(tmp_path: Path) -> None:
    write_folder(tmp_path, quantization=make_quantization(), model_file="model.int8.onnx")
    with pytest.raises(ManifestError, match=r"the quantised graph 'model.int8.onnx' is not in checksums"):
        Manifest.load(tmp_path)
