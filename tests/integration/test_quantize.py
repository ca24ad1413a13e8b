"""INT8 export (``--quantize int8``): ONNX Runtime static quantisation, checked on held-out images, served unchanged."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from cli.main import CALIBRATION_SCENES, main
from demo.run import LABELS, WEIGHTS
from export.exporter import ExportError, export_model
from export.quantize import (
    HELD_OUT_EVERY,
    INT8_GRAPH_FILE,
    MIN_MAP_SPEARMAN,
    MIN_TOP1_AGREEMENT,
    Thresholds,
    failures,
    spearman,
)
from handlers.backends import load_backend
from handlers.manifest import MANIFEST_FILE, Manifest, ManifestError
from handlers.service import LafamService, Request
from scenes.synthetic import generate_dataset


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def scenes(count: int, size: int, seed: int = 5) -> list[bytes]:
    return [png(scene.image) for scene in generate_dataset(count, seed, size=size)]


class SmallNet(nn.Module):
    """A random-weight CNN with a 16x16 map at 64x64 (enough pixels for a rank correlation below 1)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x).mean((2, 3)))


def small_net(num_classes: int = 4) -> SmallNet:
    torch.manual_seed(0)
    return SmallNet(num_classes)


SMALL = f"{__name__}:small_net"


# the demo CNN through the command line: default calibration (generated scenes), archive, served


@pytest.fixture(scope="module")
def demo_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("int8-demo")
    status = main(
        [
            "export", "demo.model:shapes_cnn", "--weights", str(WEIGHTS), "--labels", str(LABELS),
            "--input-size", "128", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--eager", "--dynamic-size",
            "--name", "shapes", "--out", str(root / "export"), "--quantize", "int8", "--archive",
            "--model-store", str(root / "store"),
        ]
    )  # fmt: skip
    assert status == 0
    return root / "export" / "shapes" / "onnx", root / "store" / "shapes.mar"


def test_the_manifest_records_the_int8_graph_and_its_figures(demo_int8: tuple[Path, Path]) -> None:
    folder, _ = demo_int8
    manifest = Manifest.load(folder)
    assert manifest.model_file == INT8_GRAPH_FILE
    assert INT8_GRAPH_FILE in manifest.checksums
    assert "model.onnx" not in manifest.checksums  # the float graph stays beside it, unarchived
    q = manifest.quantization
    assert q is not None
    assert (q.dtype, q.format, q.weight_type, q.activation_type) == ("int8", "QDQ", "QInt8", "QUInt8")
    assert q.per_channel
    assert q.float_model["file"] == "model.onnx"
    held_out = CALIBRATION_SCENES // HELD_OUT_EVERY
    assert q.calibration["images"] == CALIBRATION_SCENES - held_out
    assert q.calibration["held_out"] == held_out
    assert "generated demo scenes" in q.calibration["source"]
    assert q.agreement["metric"] == "top1_agreement"
    assert q.agreement["images"] == held_out
    assert q.agreement["value"] >= q.agreement["threshold"] == MIN_TOP1_AGREEMENT
    block3 = q.maps["act_block3"]
    assert block3["layer"] == "block3"
    assert block3["median"] >= block3["threshold"] == MIN_MAP_SPEARMAN
    assert block3["min"] <= block3["median"] <= 1.0
    # the float graph's verification is kept; the eager model ships as before
    assert manifest.verification["max_abs_diff"]["logits"] < 1e-3
    assert manifest.eager is not None


def test_the_int8_graph_is_quantised_and_its_outputs_are_float(demo_int8: tuple[Path, Path]) -> None:
    folder, _ = demo_int8
    graph = onnx.load(str(folder / INT8_GRAPH_FILE))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.graph.initializer)  # the weights
    assert {o.name: o.type.tensor_type.elem_type for o in graph.graph.output} == {
        "logits": onnx.TensorProto.FLOAT,
        "act_block3": onnx.TensorProto.FLOAT,
    }
    producers = {out: node.op_type for node in graph.graph.node for out in node.output}
    assert producers["act_block3"] == "DequantizeLinear"  # the activations the INT8 graph computed
    assert producers["logits"] != "DequantizeLinear"  # the head writes float logits, not 8-bit steps
    manifest = Manifest.load(folder)
    outputs = load_backend(manifest, folder).run(torch.randn(2, 3, 96, 112))  # dynamic size too
    assert all(value.dtype == torch.float32 for value in outputs.values())
    assert outputs["act_block3"].shape == (2, 128, 6, 7)


def test_an_int8_archive_serves_a_scene_with_a_lafam_map(demo_int8: tuple[Path, Path]) -> None:
    folder, archive = demo_int8
    with zipfile.ZipFile(archive) as mar:
        names = set(mar.namelist())
    assert INT8_GRAPH_FILE in names
    assert "model.onnx" not in names
    service = LafamService.from_folder(folder)
    image = scenes(1, 128, seed=123)[0]
    reply = service.predict([Request({"body": image}, {}, {})])[0]
    assert reply.status == 200, reply.body
    assert reply.body["explanation"]["native_size"] == [8, 8]
    assert reply.body["predictions"][0]["label"] in {"circle", "square", "triangle", "star", "cross", "ring"}
    at_own_size = service.predict([Request({"body": image}, {"x-lafam-resize": "none", "x-lafam-format": "array"}, {})])
    assert at_own_size[0].status == 200, at_own_size[0].body
    # the INT8 graph picks the float graph's class for this scene
    float_manifest = Manifest.load(folder)
    float_backend = load_backend(
        Manifest.from_dict({**float_manifest.to_dict(), "model_file": "model.onnx", "quantization": None}), folder
    )
    batch = service._prepare(0, Request({"body": image}, {}, {})).image.tensor[None]
    expected = float_backend.run(batch)["logits"].argmax(1)
    assert service.backend.run(batch)["logits"].argmax(1).tolist() == expected.tolist()


# a small model through the API: both backends, an embedding, strict thresholds, errors


def test_both_backends_quantise_the_onnx_graph_only_and_a_float_export_removes_the_int8_graph(tmp_path: Path) -> None:
    lines: list[str] = []
    folders = export_model(
        SMALL, tmp_path, backends=("onnx", "torchscript"), input_size=(64, 64), quantize="int8",
        calibration=scenes(8, 64), int8_min_agreement=0.0, int8_min_spearman=-1.0, log=lines.append,
    )  # fmt: skip
    assert any("TorchScript graph stays float32" in line for line in lines)
    assert Manifest.load(folders["onnx"]).quantization is not None
    assert Manifest.load(folders["torchscript"]).quantization is None
    assert "quantization" not in json.loads((folders["torchscript"] / MANIFEST_FILE).read_text())
    export_model(SMALL, tmp_path, input_size=(64, 64), log=lines.append)
    assert not (folders["onnx"] / INT8_GRAPH_FILE).exists()
    assert Manifest.load(folders["onnx"]).model_file == "model.onnx"


def test_an_embedding_is_compared_by_cosine_similarity(tmp_path: Path) -> None:
    folder = export_model(
        SMALL, tmp_path, task="embedding", input_size=(64, 64), quantize="int8", calibration=scenes(8, 64),
        int8_min_spearman=-1.0, log=lambda _: None,
    )["onnx"]  # fmt: skip
    q = Manifest.load(folder).quantization
    assert q is not None
    assert q.agreement["metric"] == "cosine_similarity"
    assert q.agreement["min"] <= q.agreement["value"] <= 1.0 + 1e-9
    assert q.agreement["value"] >= 0.99
    assert q.agreement["images"] == 2


def test_thresholds_too_strict_fail_the_export_naming_the_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, data in enumerate(scenes(8, 80)):
        (images / f"scene_{i}.png").write_bytes(data)
    (images / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "export"
    status = main(
        ["export", SMALL, "--input-size", "64", "--out", str(out), "--quantize", "int8", "--calibration",
         str(images), "--int8-min-spearman", "1.0", "--archive", "--model-store", str(tmp_path / "store")]
    )  # fmt: skip
    assert status == 1
    error = capsys.readouterr().err
    assert "median Spearman correlation of the LaFAM maps of layer 'trunk'" in error
    assert "< 1 (--int8-min-spearman" in error
    folder = out / "small_net" / "onnx"
    assert not (folder / MANIFEST_FILE).exists()  # nothing servable is left
    with pytest.raises(ManifestError):
        LafamService.from_folder(folder)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    ("agreement", "message"),
    [
        (
            {"metric": "top1_agreement", "value": 0.9, "images": 10},
            r"top-1 agreement 0.9000 < 0.99 \(--int8-min-agreement",
        ),
        (
            {"metric": "cosine_similarity", "value": 0.5, "min": 0.1, "images": 10},
            r"median cosine similarity of the embeddings 0.5000 < 0.99",
        ),
    ],
)
def test_the_output_agreement_is_named_when_it_fails(agreement: dict[str, object], message: str) -> None:
    maps = {"act_x": {"layer": "x", "median": 0.96, "min": 0.5, "images": 10}}
    problems = failures({"agreement": agreement, "maps": maps}, Thresholds())
    assert len(problems) == 1
    assert re.search(message, problems[0])
    assert failures({"agreement": {**agreement, "value": 1.0}, "maps": maps}, Thresholds()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quantize", "int8", "--backend", "torchscript"], "quantize='int8' needs the onnx backend"),
        (["--calibration", "somewhere"], "calibration given without quantize='int8' (--quantize int8)"),
        (["--quantize", "int8", "--calibration", "/nonexistent"], "is not a folder"),
        (["--quantize", "int8", "--int8-min-agreement", "1.5"], "must be a number from 0 to 1"),
    ],
)
def test_bad_int8_arguments_are_one_clear_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", SMALL, "--input-size", "64", "--out", str(tmp_path), *argv]) == 1
    error = capsys.readouterr().err
    assert error.startswith("lafam-serve export: error:")
    assert message in error


def test_too_few_calibration_images(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"3 images .* needs at least 4"):
        export_model(SMALL, tmp_path, input_size=(64, 64), quantize="int8", calibration=scenes(3, 64))
    broken = [png(np.zeros((8, 8, 3), np.uint8)), b"text", b"x", b"y"]
    with pytest.raises(ExportError, match=r"calibration image #1: the body is not an image"):
        export_model(SMALL, tmp_path, input_size=(64, 64), quantize="int8", calibration=broken)


# a torchvision model at random init: residual adds, two layers


def test_a_random_resnet18_with_two_layers(tmp_path: Path) -> None:
    folder = export_model(
        "resnet18", tmp_path, num_classes=10, layers=["layer4", "layer3"], input_size=(128, 128), quantize="int8",
        calibration=scenes(8, 128), int8_min_agreement=0.0, int8_min_spearman=-1.0, log=lambda _: None,
    )["onnx"]  # fmt: skip
    manifest = Manifest.load(folder)
    assert manifest.quantization is not None
    assert set(manifest.quantization.maps) == {"act_layer4", "act_layer3"}
    assert all(-1.0 <= f["min"] <= f["median"] <= 1.0 for f in manifest.quantization.maps.values())
    service = LafamService.from_folder(folder)
    reply = service.predict([Request({"body": scenes(1, 128, seed=9)[0]}, {"x-lafam-layer": "layer3"}, {})])[0]
    assert reply.status == 200, reply.body
    assert reply.body["explanation"]["native_size"] == [8, 8]


# the rank correlation


def test_spearman_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 5, size=(6, 7)).astype(np.float32)  # many ties, as in a map with ReLU zeros
        b = a + rng.normal(0, 1.5, size=a.shape)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
    assert spearman(np.arange(9.0), np.arange(9.0)[::-1]) == pytest.approx(-1.0)


def test_spearman_of_blank_maps() -> None:
    assert spearman(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert spearman(np.zeros((3, 3)), np.arange(9.0)) == 0.0


# the benchmark


def test_the_benchmark_writes_its_section(tmp_path: Path) -> None:
    from benchmarks import quantize as bench

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nkept prose\n")
    bench.main(["--models", "demo", "--scenes", "8", "--rounds", "2", "--runs", "1", "--write", str(results)])
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nkept prose\n")
    assert text.count(bench.MARKER) == 2
    rows = [line for line in text.splitlines() if line.startswith("| demo CNN (`block3`) | 128×128 |")]
    assert len(rows) == len(bench.BATCHES)
    assert "1.000 (2/2)" in rows[0]
