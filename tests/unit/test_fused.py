"""LaFAM fused into the runtime (handlers.fused): the ONNX node's and torch's channel means against the reference."""

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

import handlers.encode as encode_module
import handlers.service as service_module
from handlers.explain.lafam import lafam
from handlers.fused import agrees, channel_mean, fuse_onnx, fused_output
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


def assert_matches_reference(means: torch.Tensor, values: torch.Tensor) -> None:
    assert means.shape == (values.shape[0], 1, *values.shape[2:])
    assert means.dtype == torch.float32
    assert agrees(means, values)
    reference = lafam(values)
    assert float((lafam(means) - reference).abs().max()) <= 1e-5  # the reference's scaling of the runtime's means


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_node_computes_the_channel_mean(opset: int, kind: str) -> None:
    model = identity_graph(opset)
    fused = fuse_onnx(model, {"act": activations(kind).shape[1]})
    assert fused == {"act": fused_output("act")} == {"act": "lafam_mean:act"}
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = activations(kind)
    (means,) = session.run([fused["act"]], {"x": values.numpy()})
    assert_matches_reference(torch.from_numpy(means), values)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_channel_mean_matches_the_reference(kind: str) -> None:
    values = activations(kind)
    assert_matches_reference(channel_mean(values), values)


def test_agrees_is_strict_on_shape_and_values() -> None:
    values = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    means = channel_mean(values)
    assert agrees(means, values)
    moved = means.clone()
    moved[0, 0, 1, 1] += 0.05 * float(means[0].max() - means[0].min())  # 5 % of the span: far over 1e-4
    assert not agrees(moved, values)
    assert not agrees(means[:1], values)
    assert not agrees(means[:, :, :2], values)
    assert not agrees(means[:, 0], values)


def test_two_activations_get_two_means() -> None:
    model = identity_graph(18)
    model.graph.node.append(helper.make_node("Relu", ["x"], ["act2"]))
    model.graph.output.append(helper.make_tensor_value_info("act2", TensorProto.FLOAT, None))
    fused = fuse_onnx(model, {"act": 16, "act2": 16})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = activations("random")
    first, second = session.run([fused["act"], fused["act2"]], {"x": values.numpy()})
    assert agrees(torch.from_numpy(first), values)
    assert agrees(torch.from_numpy(second), values.relu())


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_service_serves_the_fused_map_with_the_reference_pixels(tmp_path: Path, backend: str) -> None:
    write_export(tmp_path, backend=backend)
    service = LafamService.from_folder(tmp_path)
    assert service._fused == {layer.name: fused_output(layer.output) for layer in service.manifest.layers}
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
    monkeypatch.setattr(service_module, "agrees", lambda means, activations: False)
    with caplog.at_level(logging.WARNING, logger="handlers.service"):
        service = LafamService.from_folder(tmp_path)
    assert service._fused == {}
    assert "differs from the reference: not used" in caplog.text
    reply = service.predict([Request(parameters={"body": image_bytes()}, headers={}, content_types={})])[0]
    assert reply.status == 200
    assert not reply.body["explanation"]["empty"]


def test_lafam_method_scales_the_runtimes_means(tmp_path: Path) -> None:
    options = parse_options(write_export(tmp_path))
    values = torch.randn(2, 8, 8, 10, generator=torch.Generator().manual_seed(1))
    means = channel_mean(values)
    method = registry.get("lafam")
    for row in (0, 1):
        inputs = Inputs(torch.zeros(3, 8, 8), options, batch_maps={options.layer: means}, row=row)
        result = method.explain(inputs)
        torch.testing.assert_close(result.maps, lafam(means)[row][None])
        torch.testing.assert_close(result.maps, lafam(values)[row][None], atol=1e-5, rtol=0)
    without = method.explain(Inputs(torch.zeros(3, 8, 8), options, batch_activations={options.layer: values}))
    torch.testing.assert_close(without.maps, lafam(values)[:1])  # the reference when the runtime fused nothing


@pytest.mark.parametrize("writer", ["c", "python"])
@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_fused_png_path_gives_the_general_paths_answer(
    tmp_path: Path, backend: str, writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The served default (LaFAM, PNG, nearest) straight from the runtime's means equals what the method
    registry and the encoder give for the same batch: every size option, every row, and the same drift values;
    with the C writer and with the Python one."""
    if writer == "python":
        monkeypatch.setattr(encode_module, "_native", None)
    else:
        assert encode_module._native is not None, "the C writer (handlers/_png.c) is not built: pip install -e ."
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
