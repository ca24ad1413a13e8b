"""LaFAM fused into the runtime (handlers.fused): the ONNX nodes and the TorchScript function against the reference."""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

import handlers.service as service_module
from handlers.encode import to_pixels
from handlers.explain.lafam import lafam
from handlers.fused import Fused, agrees, fuse_onnx, fused_outputs, lafam_map, lafam_scripted
from handlers.methods import registry
from handlers.methods.contract import Inputs
from handlers.options import parse_options
from handlers.service import LafamService, Request
from tests.unit.conftest import image_bytes, write_export


def identity_graph(opset: int) -> onnx.ModelProto:
    """A graph whose 'activation' output is its input, so the fused map of any tensor can be checked."""
    node = helper.make_node("Identity", ["x"], ["act"])
    graph = helper.make_graph(
        [node],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [helper.make_tensor_value_info("act", TensorProto.FLOAT, ["n", "c", "h", "w"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def activations(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if kind == "random":
        return torch.randn(3, 16, 7, 9, generator=generator)
    if kind == "constant":  # no spatial contrast: zeros, like the reference
        return torch.full((2, 4, 5, 5), 3.0)
    if kind == "one_image_constant":
        values = torch.randn(2, 4, 5, 5, generator=generator)
        values[1] = 1.5
        return values
    if kind == "non_finite":  # clamped like the reference: NaN → 0, ±inf → ±float32 max
        values = torch.randn(2, 3, 4, 4, generator=generator)
        values[0, :, 1, 1] = float("nan")
        values[1, :, 0, 0] = float("inf")
        values[1, :, 3, 3] = -float("inf")
        return values
    return torch.randn(1, 2048, 7, 7, generator=generator) * 1e3  # large magnitudes


KINDS = ["random", "constant", "one_image_constant", "large", "non_finite"]


def assert_matches_reference(maps: torch.Tensor, pixels: torch.Tensor, values: torch.Tensor) -> None:
    assert maps.shape == pixels.shape == (values.shape[0], 1, *values.shape[2:])
    maps, pixels = maps[:, 0], pixels[:, 0]
    reference = lafam(values)
    assert agrees(maps, reference), float((maps - reference).abs().max())
    assert pixels.dtype == torch.uint8
    expected = np.stack([to_pixels(one) for one in maps])
    np.testing.assert_array_equal(pixels.numpy(), expected)  # to_pixels of the fused map, exactly


@pytest.mark.parametrize("opset", [17, 18])  # reduction axes: an attribute before 18, an input from 18
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_nodes_compute_lafam(opset: int, kind: str) -> None:
    model = identity_graph(opset)
    fused = fuse_onnx(model, {"act": activations(kind).shape[1]})
    assert fused == {"act": fused_outputs("act")} == {"act": Fused("lafam:act", "lafam_u8:act")}
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = activations(kind)
    maps, pixels = session.run([fused["act"].map, fused["act"].pixels], {"x": values.numpy()})
    assert_matches_reference(torch.from_numpy(maps), torch.from_numpy(pixels), values)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_function_computes_lafam_eager_and_scripted(kind: str) -> None:
    values = activations(kind)
    assert_matches_reference(*lafam_map(values), values)
    assert_matches_reference(*lafam_scripted()(values), values)
    assert lafam_scripted() is lafam_scripted()  # compiled once


def test_agrees_is_strict_on_shape_and_values() -> None:
    maps = torch.rand(2, 3, 3)
    assert agrees(maps, maps + 5e-5)
    assert not agrees(maps, maps + 1e-3)
    assert not agrees(maps, maps[:1])


def test_two_activations_get_two_maps() -> None:
    model = identity_graph(18)
    model.graph.node.append(helper.make_node("Relu", ["x"], ["act2"]))
    model.graph.output.append(helper.make_tensor_value_info("act2", TensorProto.FLOAT, None))
    fused = fuse_onnx(model, {"act": 16, "act2": 16})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = activations("random")
    first, second = session.run([fused["act"].map, fused["act2"].map], {"x": values.numpy()})
    assert agrees(torch.from_numpy(first)[:, 0], lafam(values))
    assert agrees(torch.from_numpy(second)[:, 0], lafam(values.relu()))


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_service_serves_the_fused_map_with_the_reference_pixels(tmp_path: Path, backend: str) -> None:
    write_export(tmp_path, backend=backend)
    service = LafamService.from_folder(tmp_path)
    assert service._fused == {layer.name: fused_outputs(layer.output) for layer in service.manifest.layers}
    requests = [
        Request(parameters={"body": image_bytes()}, headers={"x-lafam-format": f}, content_types={})
        for f in ("png", "array")
    ]
    fused = service.predict(requests)
    service._fused.clear()  # the reference path: lafam() on the activations
    reference = service.predict(requests)
    assert [r.status for r in fused + reference] == [200] * 4
    png = [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(r.body["explanation"]["data"]))))
        for r in (fused[0], reference[0])
    ]
    np.testing.assert_array_equal(*png)
    np.testing.assert_allclose(
        fused[1].body["explanation"]["data"], reference[1].body["explanation"]["data"], atol=2e-5
    )


def test_service_drops_a_fused_map_that_disagrees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write_export(tmp_path, backend="onnx")
    monkeypatch.setattr(service_module, "agrees", lambda fused, reference: False)
    with caplog.at_level(logging.WARNING, logger="handlers.service"):
        service = LafamService.from_folder(tmp_path)
    assert service._fused == {}
    assert "differs from the reference: not used" in caplog.text
    reply = service.predict([Request(parameters={"body": image_bytes()}, headers={}, content_types={})])[0]
    assert reply.status == 200
    assert not reply.body["explanation"]["empty"]


def test_lafam_method_serves_the_fused_map_and_its_grey_levels(tmp_path: Path) -> None:
    options = parse_options(write_export(tmp_path))
    values = torch.randn(2, 8, 8, 10, generator=torch.Generator().manual_seed(1))
    maps, pixels = lafam_map(values)
    method = registry.get("lafam")
    for row in (0, 1):
        inputs = Inputs(torch.zeros(3, 8, 8), options, batch_maps={options.layer: (maps, pixels)}, row=row)
        result = method.explain(inputs)
        torch.testing.assert_close(result.maps, maps[row])
        assert result.pixels == pixels[row].numpy().tobytes()
    without = method.explain(Inputs(torch.zeros(3, 8, 8), options, batch_activations={options.layer: values}))
    torch.testing.assert_close(without.maps, lafam(values)[:1])  # the reference when the runtime fused nothing
    assert without.pixels is None


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_fused_png_path_gives_the_general_paths_answer(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The served default (LaFAM, PNG, nearest) straight from the runtime's grey levels equals what the method
    registry and the encoder give for the same batch: every size option, every row, and the same drift values."""
    write_export(tmp_path, backend=backend)
    service = LafamService.from_folder(tmp_path)
    headers = [{}, {"x-lafam-size": "original"}, {"x-lafam-size": "33x45"}, {"x-lafam-size": "input"}]
    requests = [
        Request(parameters={"body": image_bytes(size=(40 + 17 * i, 30 + 9 * i))}, headers=h, content_types={})
        for i, h in enumerate(headers)
    ]
    recorded: list[tuple[str, float]] = []
    monkeypatch.setattr(service_module.metrics, "observe", lambda metric, value, **_: recorded.append((metric, value)))
    taken: list[dict] = []
    fast = service._fused_png
    monkeypatch.setattr(service, "_fused_png", lambda *args: taken.append(fast(*args)) or taken[-1])
    direct = service.predict(requests)
    assert service_module.metrics.settle()  # the drift statistics are recorded on the metrics thread
    assert len(taken) == len(requests)  # every request took the fused path
    assert all(taken)
    drift = (
        service_module.metrics.MAP_ENTROPY,
        service_module.metrics.MAP_BORDER,
        service_module.metrics.MAP_PEAK_OFFSET,
    )
    fused_drift = [(m, v) for m, v in recorded if m in drift]
    recorded.clear()
    monkeypatch.setattr(service, "_fused_png", lambda *args: None)
    general = service.predict(requests)
    assert service_module.metrics.settle()
    general_drift = [(m, v) for m, v in recorded if m in drift]
    assert [r.status for r in direct + general] == [200] * 8
    assert [r.body for r in direct] == [r.body for r in general]
    assert len(fused_drift) == 3 * len(requests)
    assert [m for m, _ in fused_drift] == [m for m, _ in general_drift]
    np.testing.assert_allclose([v for _, v in fused_drift], [v for _, v in general_drift], atol=1e-12)
