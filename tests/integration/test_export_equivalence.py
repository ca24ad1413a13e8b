"""Eager vs TorchScript vs ONNX Runtime, for every supported family, from one list of cases.

Each case is exported to both backends by ``export_model`` and checked through ``handlers.backends``, the
code that serves the graphs. Batch norms get random statistics first so that a dropped or mis-fused
normalisation shows. Tolerance everywhere: ``max |a - b| <= 1e-4 * max |eager|`` per output (export.verify).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

import export.exporter as exporter_module
import export.onnx as onnx_module
from export.exporter import IMAGENET_MEAN, IMAGENET_STD, ExportError, export_model
from export.models import ActivationModel, resolve_model
from export.verify import (
    DEFAULT_TOLERANCE,
    VerificationError,
    VerificationReport,
    allowed_difference,
    verify_report,
)
from handlers.backends import INPUT_NAME, load_backend, output_names
from handlers.explain.lafam import lafam
from handlers.fused import agrees
from handlers.manifest import MANIFEST_FILE, Manifest, sha256_file
from tests.tiny_models import Encoder

THIS = __name__
# Builds and exports nine model families; on one torch thread (OpenMP threads waiting on each other on a
# shared 2-core machine made TorchScript up to 100x slower).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
TOLERANCE = DEFAULT_TOLERANCE


class EncoderNet(nn.Module):
    """A user's own model: layer names such as ``encoder.blocks.2`` that torchvision does not use."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=(2, 3)))


def build_encoder_net(num_classes: int = 10) -> EncoderNet:
    return EncoderNet(num_classes)


def build_tiny_vit(num_classes: int = 10) -> nn.Module:
    """torchvision's ViT at 32 px with 8 px patches: tokens (N, 1 + 4x4, 32); the head is not left at zero."""
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=num_classes
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def build_tiny_swin(num_classes: int = 10) -> nn.Module:
    """torchvision's Swin (the code of swin_t) with two small stages: channel-last maps (N, h, w, C)."""
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2], num_classes=num_classes
    )


def build_fully_convolutional() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))


@dataclass(frozen=True)
class Case:
    id: str
    spec: str
    layers: tuple[str, ...] | None = None  # None: the default layer is found
    expected_layers: tuple[str, ...] = ()
    input_size: tuple[int, int] = (64, 64)
    num_classes: int = 10
    task: str = "classification"
    labels: str = "none"  # none | list | file
    outputs: int = 10  # classes, or the embedding dimension


CASES = [
    Case("resnet18", "resnet18", expected_layers=("layer4",), labels="list"),
    Case("resnet50", "resnet50", expected_layers=("layer4",)),
    Case("vgg11_bn", "vgg11_bn", expected_layers=("features",)),
    Case("densenet121", "densenet121", expected_layers=("features",)),
    Case("mobilenet_v3_small", "mobilenet_v3_small", expected_layers=("features",)),
    Case("efficientnet_b0", "efficientnet_b0", expected_layers=("features",)),
    Case("convnext_tiny", "convnext_tiny", expected_layers=("features",)),
    Case(
        "custom",
        f"{THIS}:build_encoder_net",
        layers=("encoder.blocks.2", "encoder.stem"),
        expected_layers=("encoder.blocks.2", "encoder.stem"),
        input_size=(48, 40),  # not square, so that height/width mix-ups show
        num_classes=5,
        labels="file",
        outputs=5,
    ),
    # the class token alone leaves the last block: the default is the block before it (export.models)
    Case(
        "vit", f"{THIS}:build_tiny_vit", expected_layers=("encoder.layers.encoder_layer_0.mlp.1",), input_size=(32, 32)
    ),
    Case(
        "vit_layers",
        f"{THIS}:build_tiny_vit",
        layers=("encoder.layers.encoder_layer_1", "conv_proj"),
        expected_layers=("encoder.layers.encoder_layer_1", "conv_proj"),
        input_size=(32, 32),
    ),
    Case("swin", f"{THIS}:build_tiny_swin", expected_layers=("features.3.0.mlp.1",), input_size=(32, 48)),
    Case(
        "embedding",
        "resnet18",
        layers=("layer3", "layer4"),
        expected_layers=("layer3", "layer4"),
        task="embedding",
        outputs=512,
    ),
]


@dataclass
class Exported:
    case: Case
    folders: dict[str, Path]
    reference: ActivationModel
    weights: Path
    labels: tuple[str, ...]
    log: list[str] = field(default_factory=list)


def randomise_normalisation(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, name
    difference = float((actual - expected).abs().max())
    allowed = allowed_difference(float(expected.abs().max()), TOLERANCE)
    assert difference <= allowed, f"{name}: {difference:.3g} > {allowed:.3g}"
    return difference


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    case: Case = request.param
    root = tmp_path_factory.mktemp(case.id)
    torch.manual_seed(0)
    model = resolve_model(case.spec, num_classes=case.num_classes)
    randomise_normalisation(model)
    weights = root / "weights.pt"
    torch.save(model.state_dict(), weights)
    del model
    labels = tuple(f"class {i}" for i in range(case.num_classes)) if case.labels != "none" else ()
    labels_argument: tuple[str, ...] | Path | None = labels or None
    if case.labels == "file":
        labels_argument = root / "labels.txt"
        labels_argument.write_text("\n".join(labels[:2]) + "\n\n" + "\n".join(labels[2:]) + "\n\n")  # blank lines
    log: list[str] = []
    folders = export_model(
        case.spec,
        root / "out",
        backends=("onnx", "torchscript"),
        layers=case.layers,
        weights=weights,
        num_classes=case.num_classes,
        labels=labels_argument,
        input_size=case.input_size,
        task=case.task,
        log=log.append,
    )
    layers = case.layers or case.expected_layers
    reference = ActivationModel(
        resolve_model(case.spec, num_classes=case.num_classes, weights=weights, task=case.task), layers
    )
    return Exported(case, folders, reference, weights, labels, log)


def test_folders_hold_one_graph_file_each(exported: Exported) -> None:
    assert set(exported.folders) == {"onnx", "torchscript"}
    extra = {"labels.txt"} if exported.labels else set()
    for backend, graph in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        folder = exported.folders[backend]
        assert folder == folder.parent / backend
        assert {p.name for p in folder.iterdir()} == {graph, MANIFEST_FILE, *extra}  # no external data file
        if exported.labels:
            assert (folder / "labels.txt").read_text().splitlines() == list(exported.labels)


def test_manifest_content(exported: Exported) -> None:
    case = exported.case
    shapes = exported.reference.layer_shapes(case.input_size)
    main_output = "logits" if case.task == "classification" else "embedding"
    for backend, graph in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        folder = exported.folders[backend]
        manifest = Manifest.load(folder)  # checks every listed checksum too
        assert manifest.name == case.spec.rsplit(":", 1)[-1]
        assert (manifest.task, manifest.backend, manifest.model_file) == (case.task, backend, graph)
        assert manifest.input_size == case.input_size
        assert (manifest.mean, manifest.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert manifest.main_output == main_output
        assert manifest.layer_names == case.expected_layers
        assert {spec.name: spec.shape for spec in manifest.layers} == shapes
        assert [spec.output for spec in manifest.layers] == ["act_" + n.replace(".", "_") for n in case.expected_layers]
        assert manifest.num_outputs == case.outputs
        assert manifest.labels == exported.labels
        expected_files = [graph, "labels.txt"] if exported.labels else [graph]
        assert manifest.checksums == {name: sha256_file(folder / name) for name in expected_files}
        verification = manifest.verification
        assert verification["batch_sizes"] == [1, 3]
        assert verification["tolerance"] == TOLERANCE
        assert set(verification["max_abs_diff"]) == set(output_names(manifest))
        for name, difference in verification["max_abs_diff"].items():
            assert 0 <= difference <= allowed_difference(verification["max_abs_reference"][name], TOLERANCE), name
        source = manifest.source
        assert source["spec"] == case.spec
        assert source["weights_sha256"] == sha256_file(exported.weights)
        assert source["torch_version"] == torch.__version__
        if backend == "onnx":
            assert source["exporter"] == "dynamo"
            assert isinstance(source["opset"], int)
            assert source["opset"] >= 17
        else:
            assert source["exporter"] == "torch.jit.trace"
            assert source["frozen"] is True
    if case.layers is None:
        c, h, w = shapes[case.expected_layers[0]]
        size = case.input_size
        line = f"default layer: {case.expected_layers[0]} ({c}x{h}x{w} at {size[0]}x{size[1]}"
        assert any(entry.startswith(line) for entry in exported.log), exported.log


def test_onnx_graph_has_a_dynamic_batch_and_the_manifest_output_names(exported: Exported) -> None:
    folder = exported.folders["onnx"]
    manifest = Manifest.load(folder)
    graph = onnx.load(str(folder / manifest.model_file)).graph
    assert [i.name for i in graph.input] == [INPUT_NAME]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param
    assert [d.dim_value for d in dims[1:]] == [3, *exported.case.input_size]
    assert [o.name for o in graph.output] == output_names(manifest)
    assert all(o.type.tensor_type.shape.dim[0].dim_param for o in graph.output)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_eager_torchscript_and_onnx_runtime_agree(exported: Exported, batch_size: int) -> None:
    generator = torch.Generator().manual_seed(100 + batch_size)  # other inputs than verify_report()'s
    batch = torch.randn(batch_size, 3, *exported.case.input_size, generator=generator)
    with torch.no_grad():
        eager = exported.reference(batch)
    results = {}
    for backend, folder in exported.folders.items():
        manifest = Manifest.load(folder)
        results[backend] = load_backend(manifest, folder, "cpu").run(batch)
        names = output_names(manifest)
        assert list(results[backend]) == names
        for name, expected in zip(names, eager, strict=True):
            assert expected.shape[0] == batch_size
            assert_close(f"{backend} {name}", results[backend][name], expected)
    for name, expected in zip(output_names(Manifest.load(exported.folders["onnx"])), eager, strict=True):
        # ONNX Runtime vs TorchScript, held to the same bound relative to eager's magnitude.
        difference = float((results["onnx"][name] - results["torchscript"][name]).abs().max())
        assert difference <= 2 * allowed_difference(float(expected.abs().max()), TOLERANCE), name


@pytest.mark.parametrize("batch_size", [1, 3])
def test_fused_maps_match_the_reference_lafam(exported: Exported, batch_size: int) -> None:
    """Each runtime's fused channel mean (handlers.fused) gives LaFAM of its own activations, within AGREEMENT,
    every layer."""
    batch = torch.randn(batch_size, 3, *exported.case.input_size, generator=torch.Generator().manual_seed(7))
    for backend, folder in exported.folders.items():
        manifest = Manifest.load(folder)
        loaded = load_backend(manifest, folder, "cpu", fuse_maps=True)
        outputs = loaded.run(batch)
        assert set(loaded.maps) == {spec.output for spec in manifest.layers}, backend
        for spec in manifest.layers:
            means, activations = outputs[loaded.maps[spec.output]], outputs[spec.output]
            assert means.shape == (batch_size, 1, *spec.shape[1:]), (backend, spec.name)
            difference = float((lafam(means) - lafam(activations)).abs().max())
            assert agrees(means, activations), (backend, spec.name, difference)


# --- fallbacks and failures, on the small custom model ----------------------------------------------------------


SMALL = {"input_size": (32, 32), "num_classes": 4, "layers": ("encoder.blocks.1",)}


def export_small(out_dir: Path, **kwargs: object) -> dict[str, Path]:
    """Export the small custom model (32x32, 4 classes, layer encoder.blocks.1) with ``kwargs`` on top."""
    return export_model(f"{THIS}:build_encoder_net", out_dir, **{**SMALL, **kwargs})  # type: ignore[arg-type]


def test_falls_back_to_the_legacy_onnx_exporter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_module, "_export_dynamo", broken)
    log: list[str] = []
    folder = export_small(tmp_path, log=log.append)["onnx"]
    source = Manifest.load(folder).source
    assert source["exporter"] == "legacy"
    assert "simulated dynamo failure" in source["fallback_reason"]
    assert any("falling back to the legacy exporter" in line for line in log)
    model = onnx.load(str(folder / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param


def test_unfrozen_torchscript_when_the_frozen_graph_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[bool] = []

    def flaky_verify(
        reference: ActivationModel, folder: Path, manifest: Manifest, **kwargs: object
    ) -> VerificationReport:
        calls.append(manifest.source["frozen"])
        if len(calls) == 1:
            raise VerificationError("simulated mismatch")
        return verify_report(reference, folder, manifest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(exporter_module, "verify_report", flaky_verify)
    folder = export_small(tmp_path, backends=("torchscript",))["torchscript"]
    assert calls == [True, False]
    assert Manifest.load(folder).source["frozen"] is False


def test_a_wrong_graph_fails_verification_and_gets_no_manifest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_export_onnx: Callable[..., dict[str, object]] = onnx_module.export_onnx

    def export_other_weights(model: ActivationModel, *args: object, **kwargs: object) -> dict[str, object]:
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.model.head.bias.add_(0.5)
        return real_export_onnx(other, *args, **kwargs)

    monkeypatch.setattr(exporter_module, "export_onnx", export_other_weights)
    with pytest.raises(VerificationError, match=r"onnx graph .*model\.onnx does not match .*logits: max\|diff\| 0\.5"):
        export_small(tmp_path)
    assert {p.name for p in (tmp_path / "onnx").iterdir()} == {"model.onnx"}  # kept for inspection, no manifest


def test_verify_catches_the_wrong_layer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = export_small(tmp_path, backends=("torchscript",))["torchscript"]
    manifest = Manifest.load(folder)
    torch.manual_seed(0)
    model = resolve_model(f"{THIS}:build_encoder_net", num_classes=4)
    assert verify_report(ActivationModel(model, ["encoder.blocks.1"]), folder, manifest).max_abs_diff
    # encoder.blocks.2 has the same shape as encoder.blocks.1: only the values tell them apart.
    with pytest.raises(VerificationError, match=r"torchscript graph .*act_encoder_blocks_1: max\|diff\|"):
        verify_report(ActivationModel(model, ["encoder.blocks.2"]), folder, manifest)


def test_layers_returning_the_same_tensor_are_distinct_outputs(tmp_path: Path) -> None:
    # encoder returns the output of encoder.blocks.2, whose in-place ReLU encoder.blocks.2.2 returns too.
    layers = ("encoder", "encoder.blocks.2", "encoder.blocks.2.2")
    folders = export_small(tmp_path, backends=("onnx", "torchscript"), layers=layers)
    for folder in folders.values():
        manifest = Manifest.load(folder)
        outputs = load_backend(manifest, folder).run(torch.randn(2, 3, 32, 32))
        assert list(outputs) == ["logits", "act_encoder", "act_encoder_blocks_2", "act_encoder_blocks_2_2"]
        assert torch.equal(outputs["act_encoder"], outputs["act_encoder_blocks_2_2"])


def test_verify_is_relative_to_small_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_encoder_net(4)
    with torch.no_grad():
        model.head.weight.mul_(1e-6)
        model.head.bias.mul_(1e-6)  # logits of the order of 1e-7
    weights = tmp_path / "small.pt"
    torch.save(model.state_dict(), weights)
    folder = export_small(tmp_path / "out", weights=weights)["onnx"]
    manifest = Manifest.load(folder)
    assert manifest.verification["max_abs_reference"]["logits"] < 1e-5
    with torch.no_grad():
        model.head.bias.add_(2e-7)
    with pytest.raises(VerificationError, match=r"logits: max\|diff\| [0-9.e+-]+ > allowed"):
        verify_report(ActivationModel(model, SMALL["layers"]), folder, manifest)  # type: ignore[arg-type]


# --- argument errors, raised before anything is written -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": ("a", "b")}, r"labels: 2 labels for 4 model outputs; .*or pass num_classes=2"),
        ({"labels": "FILE"}, r"labels: 3 labels for 4 model outputs"),
        ({"labels": ("a", "b\nc", "d", "e")}, r"labels contains 'b\\nc'"),
        ({"labels": "missing.txt"}, r"labels='missing\.txt' is not a file"),
        ({"labels": ("a", "b", "c", "d"), "task": "embedding"}, r"labels were given for task='embedding'"),
        ({"backends": ("onnx", "tflite")}, r"backends: 'tflite' not supported; choose from: onnx, torchscript"),
        ({"backends": ()}, r"backends is empty"),
        ({"name": "my model"}, r"name='my model' must start with a letter or digit"),
        ({"input_size": (32, 0)}, r"input_size=\(32, 0\) must be \(height, width\)"),
        ({"mean": (0.5, 0.5)}, r"mean=\(0\.5, 0\.5\) must be three numbers"),
        ({"tolerance": 0.0}, r"tolerance=0\.0 must be positive"),
    ],
)
def test_export_rejects_bad_arguments(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    if kwargs.get("labels") == "FILE":
        kwargs["labels"] = tmp_path / "labels.txt"
        kwargs["labels"].write_text("a\n\nb\n  \nc\n")  # type: ignore[union-attr]  # blank lines are ignored
    with pytest.raises(ExportError, match=message):
        export_small(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_export_needs_a_two_dimensional_main_output(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"returns a tensor of shape \(1, 4, 32, 32\) .*returns a 2-D tensor"):
        export_model(f"{THIS}:build_fully_convolutional", tmp_path, input_size=(32, 32), layers=["0"])
