"""``export --dynamic-size`` and ``resize``: graphs verified at two sizes, refusals that name what fails, and the
demo model served at an image's own size, equal to eager on the same tensor, on both backends.

Tolerance: the export rule, ``max|eager - exported| <= 1e-4 * max|eager|`` per output (``export.verify``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import export.onnx as onnx_module
from cli.main import main
from demo import model as demo_model
from export.exporter import ExportError, export_model, second_size
from export.models import ActivationModel, resolve_model
from export.verify import DEFAULT_TOLERANCE, VerificationError, allowed_difference
from handlers.backends import load_backend, output_names
from handlers.manifest import Manifest
from handlers.methods import registry
from handlers.service import LafamService, Request
from scenes.synthetic import generate_scene
from tests.demo_export import DEMO, export_demo

THIS = __name__
pytestmark = pytest.mark.usefixtures("one_torch_thread")
BACKENDS = ("onnx", "torchscript")


class FlattenHead(nn.Module):
    """Convolutions, then a Linear over the flattened 8x8 map: it only takes 32x32 inputs."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SizeBakingPool(nn.Module):
    """Global pooling written as a pool whose kernel is the map's size: eager takes any size, a trace does not."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        pooled = F.avg_pool2d(features, kernel_size=(int(features.shape[-2]), int(features.shape[-1])))
        return self.head(pooled.flatten(1))


class ShapeDependentOutput(nn.Module):
    """No pooling: the 'logits' are the flattened map, so their length depends on the input size."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 3, 4, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


def flatten_head() -> FlattenHead:
    return FlattenHead()


def size_baking_pool() -> SizeBakingPool:
    return SizeBakingPool()


def shape_dependent_output() -> ShapeDependentOutput:
    return ShapeDependentOutput()


def close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape, name
    difference = float((actual.float().cpu() - expected).abs().max())
    allowed = allowed_difference(float(expected.abs().max()), DEFAULT_TOLERANCE)
    assert difference <= allowed, f"{name}: {difference:.3g} > {allowed:.3g}"


def grid_image(seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """A 256-px 2x2 grid of four single-object 128-px scenes (the training scale) of four distinct classes."""
    rng = np.random.default_rng(seed)
    tiles, labels = [], []
    while len(tiles) < 4:
        scene = generate_scene(rng, 128, 1)
        if scene.labels[0] not in labels:
            tiles.append(scene.image)
            labels.append(int(scene.labels[0]))
    top, bottom = np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)
    return np.concatenate([top, bottom], axis=0), labels


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    return {backend: export_demo(root / backend, backend) for backend in BACKENDS}


@pytest.fixture(scope="module")
def eager() -> ActivationModel:
    model = resolve_model("demo.model:shapes_cnn", weights=DEMO / "weights" / "shapes_cnn.pt")
    return ActivationModel(model, ["block3"])


@pytest.fixture(scope="module")
def services(exported: dict[str, Path]) -> dict[str, LafamService]:
    return {backend: LafamService.from_folder(folder) for backend, folder in exported.items()}


def ask(service: LafamService, data: bytes, explain: bool = False, **options: str) -> Any:
    headers = {f"X-LaFAM-{name.replace('_', '-')}": value for name, value in options.items()}
    (reply,) = service.predict([Request({"body": data}, headers, {}, explain=explain)])
    return reply


# export: the demo model and resnet18, verified at two sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_demo_export_is_dynamic_and_verified_at_two_sizes(exported: dict[str, Path], backend: str) -> None:
    manifest = Manifest.load(exported[backend])
    assert (manifest.dynamic_size, manifest.min_side, manifest.input_size) == (True, 16, (128, 128))
    assert second_size((128, 128), 16) == (97, 161)  # non-square, no multiple of the stride
    assert manifest.verification["input_sizes"] == [[128, 128], [97, 161]]
    assert manifest.verification["batch_sizes"] == [1, 3]


def test_the_onnx_graph_declares_dynamic_height_and_width(exported: dict[str, Path]) -> None:
    graph = onnx.load(str(exported["onnx"] / "model.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    act = graph.output[1].type.tensor_type.shape.dim
    assert act[2].dim_param
    assert act[3].dim_param


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(256, 256), (16, 16), (200, 72)])
def test_the_demo_graph_matches_eager_at_other_sizes(
    exported: dict[str, Path], eager: ActivationModel, backend: str, size: tuple[int, int]
) -> None:
    manifest = Manifest.load(exported[backend])
    batch = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.no_grad():
        expected = eager(batch)
    outputs = load_backend(manifest, exported[backend]).run(batch)
    for name, reference in zip(output_names(manifest), expected, strict=True):
        close(f"{backend} {name} at {size}", outputs[name], reference)


def test_resnet18_is_dynamic_on_both_backends(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(resolve_model("resnet18", num_classes=10).state_dict(), weights)  # random init
    log: list[str] = []
    folders = export_model(
        "resnet18",
        tmp_path / "out",
        backends=BACKENDS,
        weights=weights,
        num_classes=10,
        input_size=(64, 64),
        dynamic_size=True,
        log=log.append,
    )
    assert "dynamic size: resnet18 runs at 49x81 as at 64x64; minimum side 32 (total stride 32)" in log
    for folder in folders.values():
        manifest = Manifest.load(folder)
        assert (manifest.dynamic_size, manifest.min_side) == (True, 32)
        assert manifest.verification["input_sizes"] == [[64, 64], [49, 81]]
    reference = ActivationModel(resolve_model("resnet18", num_classes=10, weights=weights), ["layer4"])
    batch = torch.randn(1, 3, 40, 72, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(batch)
    for backend, folder in folders.items():
        outputs = load_backend(Manifest.load(folder), folder).run(batch)
        close(f"{backend} logits", outputs["logits"], expected[0])
        close(f"{backend} layer4", outputs["act_layer4"], expected[1])


def test_the_legacy_onnx_exporter_is_dynamic_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_module, "_export_dynamo", broken)
    folder = export_demo(tmp_path, "onnx")
    manifest = Manifest.load(folder)
    assert manifest.source["exporter"] == "legacy"
    assert manifest.verification["input_sizes"] == [[128, 128], [97, 161]]
    dims = onnx.load(str(folder / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]


# export: refusals, before any graph is written


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        (
            f"{THIS}:flatten_head",
            {"input_size": (32, 32)},
            r"--dynamic-size: '.*:flatten_head' cannot take another input size than 32x32: at 25x41 its module "
            r"'head\.1' \(Linear\) fails: RuntimeError: mat1 and mat2 shapes cannot be multiplied .*; export it "
            r"without --dynamic-size \(every image is then resized to 32x32\)",
        ),
        (
            f"{THIS}:shape_dependent_output",
            {"input_size": (32, 32), "layers": ["features"]},
            r"cannot take another input size than 32x32: its output has shape \(1, 154\) instead of \(1, 128\) at "
            r"25x41 \(its output depends on the input size: is there no global pooling before the head\?\)",
        ),
        (
            "vit_b_16",
            {"num_classes": 4},
            r"'vit_b_16' cannot take another input size than 224x224: at 169x281 its VisionTransformer\.forward "
            r"fails: AssertionError: Wrong image height! Expected 224 but got 169!",
        ),
    ],
    ids=["fixed-linear-head", "output-depends-on-size", "vit_b_16"],
)
def test_a_model_that_cannot_take_other_sizes_is_refused(
    spec: str, kwargs: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match=message):
        export_model(spec, tmp_path / "out", dynamic_size=True, **kwargs)
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_with_an_error_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["export", f"{THIS}:flatten_head", "--input-size", "32", "--out", str(tmp_path), "--dynamic-size"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("lafam-serve export: error: --dynamic-size: ")
    assert "module 'head.1' (Linear) fails" in err
    assert "Traceback" not in err
    assert main(argv[:-1]) == 0  # the same model, fixed size: exported
    assert Manifest.load(tmp_path / "flatten_head" / "onnx").dynamic_size is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_graph_that_bakes_the_size_in_fails_verification_at_the_second_size(tmp_path: Path, backend: str) -> None:
    # TorchScript's trace keeps the pooling kernel of 32x32 (an error at 25x41); torch.export refuses the
    # data-dependent kernel and the legacy ONNX exporter keeps it too (wrong numbers at 25x41).
    with pytest.raises(VerificationError, match=r"at 25x41 failed|\(at 25x41\) > allowed") as info:
        export_model(
            f"{THIS}:size_baking_pool",
            tmp_path,
            backends=(backend,),
            input_size=(32, 32),
            layers=["features"],
            dynamic_size=True,
        )
    assert "--dynamic-size verifies the graph at 32x32 and 25x41" in str(info.value)
    assert "export without --dynamic-size" in str(info.value)
    assert not (tmp_path / backend / "lafam.json").exists()


# serving: resize=none on both backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_none_serves_the_eager_models_answer_at_256(
    services: dict[str, LafamService], eager: ActivationModel, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid, labels = grid_image()
    service = services[backend]
    seen: dict[str, torch.Tensor] = {}
    run = service.backend.run

    def spy(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = run(batch)
        seen.update(outputs, batch=batch)
        return outputs

    monkeypatch.setattr(service.backend, "run", spy)
    reply = ask(service, png(grid), resize="none", format="array", top_k="6")
    assert reply.status == 200, reply.body
    tensor = demo_model.preprocess(grid)  # what the eager model is given for this 256-px image
    torch.testing.assert_close(seen["batch"], tensor, rtol=0, atol=1e-6)
    with torch.no_grad():
        logits, act = eager(tensor)
    close("logits", seen["logits"], logits)
    close("act_block3", seen["act_block3"], act)
    body = reply.body
    assert body["input_size"] == [256, 256]
    explanation = body["explanation"]
    assert (explanation["size"], explanation["native_size"]) == ([256, 256], [16, 16])
    probabilities = torch.softmax(logits[0], 0)
    for prediction in body["predictions"]:
        assert prediction["probability"] == pytest.approx(float(probabilities[prediction["index"]]), abs=2e-6)
    mean = act[0].mean(0)
    expected_map = (mean - mean.min()) / (mean.max() - mean.min())
    np.testing.assert_allclose(explanation["data"], expected_map.numpy(), atol=2e-5)  # 5 decimals
    top4 = {p["index"] for p in body["predictions"][:4]}
    assert len(top4 & set(labels)) >= 3  # at its own scale the model sees the four objects


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_to_a_maximum_side_and_the_default(services: dict[str, LafamService], backend: str) -> None:
    grid, _ = grid_image()
    service = services[backend]
    assert ask(service, png(grid)).body["input_size"] == [128, 128]  # resize=model: as before
    body = ask(service, png(grid[:, :200]), resize="160", size="original").body
    assert body["input_size"] == [160, 125]
    assert body["explanation"]["size"] == [256, 200]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", registry.served())  # every method: each reads the image it was given
def test_every_explanation_method_at_native_size(services: dict[str, LafamService], backend: str, method: str) -> None:
    grid, _ = grid_image()
    image = png(grid[:, :224])  # 256x224: not square
    reply = ask(services[backend], image, explain=True, method=method, resize="none", format="array")
    assert reply.status == 200, reply.body
    explanation = reply.body["explanation"]
    assert reply.body["input_size"] == [256, 224]
    assert explanation["size"] == [256, 224]
    assert explanation["native_size"] in ([256, 224], [16, 14])  # the pixels it saw, or block3 at that size
    data = explanation["data"] if "data" in explanation else explanation["classes"][0]["data"]
    assert np.asarray(data).shape == tuple(explanation["native_size"])


def assert_same_answer(batched: dict[str, Any], alone: dict[str, Any]) -> None:
    """Two answers equal up to float noise (a batch of 2 and a batch of 1 may round differently in float32)."""
    assert batched["input_size"] == alone["input_size"]
    assert [p["index"] for p in batched["predictions"]] == [p["index"] for p in alone["predictions"]]
    for mine, theirs in zip(batched["predictions"], alone["predictions"], strict=True):
        assert mine["probability"] == pytest.approx(theirs["probability"], abs=1e-5)
    explanation, expected = batched["explanation"], alone["explanation"]
    assert {k: v for k, v in explanation.items() if k != "data"} == {k: v for k, v in expected.items() if k != "data"}
    np.testing.assert_allclose(explanation["data"], expected["data"], atol=1e-4)


def test_one_batch_of_several_sizes_on_both_backends(services: dict[str, LafamService]) -> None:
    grid, _ = grid_image()
    images = [png(grid), png(grid[:128, :128]), png(grid[:, :100]), png(grid)]
    headers = [{"X-LaFAM-Resize": "none", "X-LaFAM-Format": "array"}] * 3 + [{"X-LaFAM-Format": "array"}]
    for service in services.values():
        replies = service.predict([Request({"body": d}, h, {}) for d, h in zip(images, headers, strict=True)])
        assert [r.body["input_size"] for r in replies] == [[256, 256], [128, 128], [256, 100], [128, 128]]
        for reply, data, header in zip(replies, images, headers, strict=True):
            (alone,) = service.predict([Request({"body": data}, header, {})])
            assert_same_answer(reply.body, alone.body)
