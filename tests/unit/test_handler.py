"""The TorchServe entry point, driven as TorchServe drives it: initialize(context), handle(data, context)."""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.mmap_dict import MmapedDict
from ts.torch_handler.request_envelope.kserve import KServeEnvelope
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope
from ts.utils.util import PredictionException

from handlers import metrics
from handlers.handler import LafamHandler, select_device
from handlers.service import LafamService

from .conftest import INPUT, LABELS, FakeContext, TinyNet, image_bytes, write_export


def serve(folder: Path, items: list[dict], headers: list[dict] | None = None, **context_kwargs: object):
    context = FakeContext(str(folder), headers=headers or [{} for _ in items], **context_kwargs)
    handler = LafamHandler()
    handler.initialize(context)
    bodies = handler.handle(items, context)
    return [json.loads(body) for body in bodies], context


def png_item(**kwargs: object) -> dict:
    return {"body": bytearray(image_bytes(**kwargs))}


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def test_prediction_and_lafam_png_from_one_run(tiny_export: Path) -> None:
    bodies, context = serve(tiny_export, [png_item()])
    body = bodies[0]
    assert context.statuses[0][0] == 200
    assert context.content_types[0] == "application/json"
    assert body["model"] == "tiny-classification"
    predictions = body["predictions"]
    assert len(predictions) == 4  # default top_k 5 capped at 4 classes
    assert [p["probability"] for p in predictions] == sorted((p["probability"] for p in predictions), reverse=True)
    assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    assert {p["label"] for p in predictions} == set(LABELS)
    explanation = body["explanation"]
    assert explanation["method"] == "lafam"
    assert explanation["layer"] == "stage2"
    assert explanation["format"] == "png"
    assert explanation["size"] == list(INPUT)
    assert explanation["native_size"] == [8, 10]
    pixels = decode_png(explanation["data"])
    assert pixels.shape == INPUT
    assert pixels.dtype == np.uint8
    assert pixels.max() == 255  # min-max scaled: the peak is 1.0


def test_map_equals_lafam_of_the_eager_model(tiny_export: Path) -> None:
    """The served array map is the channel mean of the eager model's activations, min-max scaled."""
    data = image_bytes()
    bodies, _ = serve(tiny_export, [{"body": data}], [{"X-LaFAM-Format": "array"}])
    served = np.asarray(bodies[0]["explanation"]["data"])
    from handlers.images import decode

    torch.manual_seed(0)
    model = TinyNet().eval()
    tensor = decode(data, INPUT, (0.5,) * 3, (0.25,) * 3, 10**8).tensor
    with torch.no_grad():
        _, acts = model(tensor[None])
    expected = acts.mean(1)[0]
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(served, expected.numpy(), atol=1e-4)  # 5 decimals in JSON + trace noise


def test_batch_with_bad_items_answers_each_alone(tiny_export: Path) -> None:
    items = [png_item(), {"body": bytearray(b"not an image")}, png_item(fmt="JPEG"), {"body": bytearray()}]
    headers = [{}, {}, {"x-lafam-top-k": "2"}, {}]
    bodies, context = serve(tiny_export, items, headers)
    assert [context.statuses[i][0] for i in range(4)] == [200, 400, 200, 400]
    assert bodies[1]["error"]["code"] == "invalid_image"
    assert bodies[3]["error"]["code"] == "empty_body"
    assert len(bodies[2]["predictions"]) == 2
    assert context.statuses[1][1] == "Bad Request"


def test_json_body_with_options(tiny_export: Path) -> None:
    encoded = base64.b64encode(image_bytes(size=(30, 20))).decode()
    item = {"body": {"image": encoded, "options": {"top_k": 1, "size": "original", "upsample": "bilinear"}}}
    bodies, _ = serve(tiny_export, [item])
    assert len(bodies[0]["predictions"]) == 1
    assert bodies[0]["explanation"]["size"] == [20, 30]
    assert bodies[0]["explanation"]["upsample"] == "bilinear"
    assert decode_png(bodies[0]["explanation"]["data"]).shape == (20, 30)


def test_json_sent_as_bytes_and_data_url(tiny_export: Path) -> None:
    encoded = "data:image/png;base64," + base64.b64encode(image_bytes()).decode()
    item = {"body": bytearray(json.dumps({"image": encoded}).encode())}
    headers = [{"body": {"content-type": "application/json"}}]
    bodies, context = serve(tiny_export, [item], headers)
    assert context.statuses[0][0] == 200, bodies


def test_multipart_form_with_options_field(tiny_export: Path) -> None:
    item = {"data": bytearray(image_bytes()), "options": bytearray(b'{"format": "none"}')}
    headers = [{"data": {"content-type": "image/png"}, "options": {"content-type": "text/plain"}}]
    bodies, _ = serve(tiny_export, [item], headers)
    assert bodies[0]["explanation"] is None
    assert "predictions" in bodies[0]


def test_requested_size_and_nearest_blocks(tiny_export: Path) -> None:
    bodies, _ = serve(tiny_export, [png_item()], [{"X-LaFAM-Size": "16x20"}])
    pixels = decode_png(bodies[0]["explanation"]["data"])
    assert pixels.shape == (16, 20)
    np.testing.assert_array_equal(pixels[0::2], pixels[1::2])  # 8x10 → 16x20 nearest: 2x2 blocks
    np.testing.assert_array_equal(pixels[:, 0::2], pixels[:, 1::2])


@pytest.mark.parametrize(
    ("item", "headers", "status", "code"),
    [
        ({"body": bytearray(b"GIF89a\x01\x00")}, {}, 400, "invalid_image"),
        ({"body": bytearray(b"{bad json")}, {"body": {"content-type": "application/json"}}, 400, "invalid_json"),
        ({"body": {"image": "***"}}, {}, 400, "invalid_json"),
        ({"body": {"img": "x"}}, {}, 400, "invalid_json"),
        ({"body": bytearray(image_bytes())}, {"X-LaFAM-Colour": "red"}, 400, "invalid_option"),
        ({"body": bytearray(image_bytes())}, {"X-LaFAM-Top-K": "zero"}, 400, "invalid_option"),
        ({"body": bytearray(image_bytes())}, {"X-LaFAM-Layer": "stage9"}, 400, "invalid_option"),
        ({"body": bytearray(image_bytes())}, {"body": {"content-type": "text/csv"}}, 415, "unsupported_media_type"),
        ({"other": bytearray(b"x")}, {}, 400, "empty_body"),
    ],
)
def test_bad_requests_get_a_named_4xx(tiny_export: Path, item: dict, headers: dict, status: int, code: str) -> None:
    bodies, context = serve(tiny_export, [item, png_item()], [headers, {}])
    assert context.statuses[0][0] == status
    assert bodies[0]["error"]["code"] == code
    assert bodies[0]["error"]["message"]
    assert context.statuses[1][0] == 200  # the good neighbour is still answered


def test_image_over_the_pixel_limit_is_413(tiny_export: Path) -> None:
    bodies, context = serve(tiny_export, [png_item(size=(200, 200))], model_yaml_config={"lafam": {"max_pixels": 1000}})
    assert context.statuses[0][0] == 413
    assert bodies[0]["error"]["code"] == "image_too_large"


def test_model_config_overrides_defaults(tiny_export: Path) -> None:
    bodies, _ = serve(tiny_export, [png_item()], model_yaml_config={"lafam": {"top_k": 2, "format": "array"}})
    assert len(bodies[0]["predictions"]) == 2
    assert bodies[0]["explanation"]["format"] == "array"


def test_bad_model_config_fails_at_start(tiny_export: Path) -> None:
    with pytest.raises(ValueError, match="unknown key"):
        LafamService.from_folder(tiny_export, config={"topk": 2})
    with pytest.raises(ValueError, match="format"):
        LafamService.from_folder(tiny_export, config={"format": "jpeg"})


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_threads_in_the_model_config_set_torch_and_onnx_runtime(tmp_path: Path, backend: str) -> None:
    folder = tmp_path / backend
    write_export(folder, backend=backend)
    before = torch.get_num_threads()
    try:
        service = LafamService.from_folder(folder, config={"threads": 1})
        assert torch.get_num_threads() == 1
        if backend == "onnx":
            assert service.backend._session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [0, -1, "2", True, 1.5])
def test_bad_threads_fail_at_start(tiny_export: Path, threads: object) -> None:
    with pytest.raises(ValueError, match="threads"):
        LafamService.from_folder(tiny_export, config={"threads": threads})


def test_embedding_model_returns_embedding_and_map(tiny_encoder_export: Path) -> None:
    bodies, _ = serve(tiny_encoder_export, [png_item(), png_item()])
    for body in bodies:
        assert "predictions" not in body
        assert len(body["embedding"]) == 5
        assert body["explanation"]["method"] == "lafam"


def test_onnx_backend_serves_the_same_answer(tmp_path: Path, tiny_export: Path) -> None:
    write_export(tmp_path, backend="onnx")
    onnx_body = serve(tmp_path, [png_item()], [{"X-LaFAM-Format": "array"}])[0][0]
    script_body = serve(tiny_export, [png_item()], [{"X-LaFAM-Format": "array"}])[0][0]
    for a, b in zip(onnx_body["predictions"], script_body["predictions"], strict=True):
        assert a["index"] == b["index"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    np.testing.assert_allclose(onnx_body["explanation"]["data"], script_body["explanation"]["data"], atol=1e-4)


def test_unexpected_failure_is_a_500_json_and_the_handler_survives(tiny_export: Path, monkeypatch) -> None:
    context = FakeContext(str(tiny_export), headers=[{}])
    handler = LafamHandler()
    handler.initialize(context)

    def broken(batch: torch.Tensor) -> dict:
        raise RuntimeError("device lost")

    monkeypatch.setattr(handler.service.backend, "run", broken)
    body = json.loads(handler.handle([png_item()], context)[0])
    assert context.statuses[0][0] == 500
    assert body["error"]["code"] == "internal_error"
    assert "device lost" not in body["error"]["message"]  # no internals leak
    monkeypatch.undo()
    assert json.loads(handler.handle([png_item()], context)[0])["predictions"]


def test_metrics_are_recorded(tiny_export: Path) -> None:
    serve(tiny_export, [png_item(), {"body": bytearray(b"junk")}])
    text = metrics.render().decode()
    assert 'lafam_explanation_seconds_bucket{le="0.0001",method="lafam",model="tiny-classification"}' in text
    assert 'lafam_errors_total{code="invalid_image",model="tiny-classification"}' in text
    assert 'lafam_inference_seconds_count{backend="torchscript",model="tiny-classification"}' in text


def test_a_failing_metrics_store_never_fails_a_request(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's configured store (memory-mapped files) failing on every write, as on a full disk."""

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MmapedDict, "write_value", full_disk)
    with caplog.at_level(logging.ERROR, logger="handlers.metrics"):
        bodies, context = serve(tiny_export, [png_item(), {"body": bytearray(b"junk")}])
    assert metrics.configuration() is not None  # initialize configured them (a no-op after the suite's call)
    assert [context.statuses[i][0] for i in range(2)] == [200, 400]
    assert bodies[0]["predictions"]
    assert bodies[0]["explanation"]["data"]
    assert bodies[1]["error"]["code"] == "invalid_image"
    failures = [record for record in caplog.records if record.getMessage().startswith("could not record")]
    assert len(failures) >= 5  # batch size, preprocessing, inference, explanation, drift, requests, errors
    assert all("No space left" in str(record.exc_info[1]) for record in failures if record.exc_info)


def test_cpu_without_cuda_even_when_a_gpu_id_is_given() -> None:
    expected = "cuda:1" if torch.cuda.is_available() else "cpu"
    assert str(select_device(1)) == expected
    assert str(select_device(None)) == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_worker_keeps_tensors_on_the_assigned_device(tiny_export: Path) -> None:
    bodies, _ = serve(tiny_export, [png_item()], gpu_id=0)
    assert bodies[0]["predictions"]
    handler = LafamHandler()
    handler.initialize(FakeContext(str(tiny_export), gpu_id=0))
    assert handler.service.backend.device == torch.device("cuda:0")


def test_original_size_maps_are_capped_at_the_largest_map_side(tiny_export: Path) -> None:
    bodies, context = serve(tiny_export, [png_item(size=(5000, 100))], [{"x-lafam-size": "original"}])
    assert context.statuses[0][0] == 200
    assert bodies[0]["explanation"]["size"] == [82, 4096]  # aspect kept: a huge image must not mean a huge map
    assert decode_png(bodies[0]["explanation"]["data"]).shape == (82, 4096)


def grpc_item(options: bytes | None = None, explain: bytes | None = None, data: bytes | None = None) -> dict:
    """Input fields as TorchServe hands over a gRPC ``PredictionsRequest.input`` map: raw bytes each."""
    item = {"data": bytearray(image_bytes() if data is None else data)}
    if options is not None:
        item["options"] = bytearray(options)
    if explain is not None:
        item["explain"] = bytearray(explain)
    return item


def grpc_headers(item: dict, **sequence: str) -> dict:
    """A gRPC request's headers: no HTTP header, each input field's (empty) content type, sequence keys."""
    return {**{name: {"content-type": ""} for name in item}, **sequence}


def test_grpc_input_fields_with_options(tiny_export: Path) -> None:
    items = [grpc_item(b'{"top_k": 1, "format": "array"}'), grpc_item(b'{"top_k": "many"}')]
    bodies, context = serve(tiny_export, items, [grpc_headers(item) for item in items], grpc=True)
    assert [context.statuses[i][0] for i in range(2)] == [200, 400]
    assert len(bodies[0]["predictions"]) == 1
    assert bodies[0]["explanation"]["format"] == "array"
    assert bodies[1]["error"]["code"] == "invalid_option"


def test_every_grpc_reply_ends_its_stream_and_no_rest_reply_is_streamed(tiny_export: Path) -> None:
    items = [grpc_item(), grpc_item(data=b"junk")]
    _, context = serve(tiny_export, items, [grpc_headers(item) for item in items], grpc=True)
    assert context.response_headers == {0: {"ts_stream_next": "false"}, 1: {"ts_stream_next": "false"}}
    _, context = serve(tiny_export, [png_item(), {"body": bytearray(b"junk")}])
    assert context.response_headers == {}  # on REST the header would turn the reply into a chunked stream


def test_explain_input_field_opens_the_explanations_path_on_grpc_only(tiny_export: Path) -> None:
    lrp = b'{"method": "lrp"}'
    items = [grpc_item(lrp, explain=b"true"), grpc_item(lrp), grpc_item(lrp, explain=b"True"), grpc_item()]
    bodies, _ = serve(tiny_export, items, [grpc_headers(item) for item in items], grpc=True)
    assert "no eager model" in bodies[0]["error"]["message"]  # the /explanations path's answer for this archive
    assert "/explanations" in bodies[1]["error"]["message"]
    assert "explain=true" in bodies[1]["error"]["message"]
    assert "no eager model" in bodies[2]["error"]["message"]
    rest = [{"data": bytearray(image_bytes()), "options": bytearray(lrp), "explain": bytearray(b"true")}, png_item()]
    bodies, _ = serve(tiny_export, rest, [{"data": {"content-type": "image/png"}}, {}])
    assert "/explanations" in bodies[0]["error"]["message"]  # over REST only the route opens it


@pytest.mark.parametrize(
    ("item", "status", "code"),
    [
        (grpc_item(data=b"junk"), 400, "invalid_image"),
        (grpc_item(b'{"colour": "red"}'), 400, "invalid_option"),
        (grpc_item(data=image_bytes(size=(200, 200))), 413, "image_too_large"),
    ],
)
def test_a_failed_grpc_request_alone_in_its_batch_is_the_batch_error(
    tiny_export: Path, item: dict, status: int, code: str
) -> None:
    """TorchServe maps a batch error's code to a gRPC status (400 → INVALID_ARGUMENT, 413 → RESOURCE_EXHAUSTED)."""
    context = FakeContext(str(tiny_export), headers=[grpc_headers(item)], grpc=True)
    context.model_yaml_config = {"lafam": {"max_pixels": 20000}}
    handler = LafamHandler()
    handler.initialize(context)
    with pytest.raises(PredictionException) as raised:
        handler.handle([item], context)
    assert raised.value.error_code == status
    assert json.loads(raised.value.message)["error"]["code"] == code
    assert context.statuses == {}
    assert json.loads(handler.handle([grpc_item()], context)[0])["predictions"]  # and the handler keeps serving


def test_stream_predictions2_and_rest_failures_are_never_raised(tiny_export: Path) -> None:
    """StreamPredictions2 reports a batch error with a null prediction, which TorchServe 0.12.0 cannot build."""
    item = grpc_item(data=b"junk")
    sequence = grpc_headers(item, ts_request_sequence_id="ts-seq-1", ts_request_sequence_start="true")
    bodies, context = serve(tiny_export, [item], [sequence], grpc=True)
    assert context.statuses[0][0] == 400
    assert bodies[0]["error"]["code"] == "invalid_image"
    assert context.response_headers[0] == {"ts_stream_next": "false"}
    bodies, context = serve(tiny_export, [{"body": bytearray(b"junk")}])
    assert context.statuses[0][0] == 400


# KServe's envelopes (service_envelope=kserve | kservev2): the real envelopes wrap the handler as TorchServe does.


@dataclass
class EnvelopeContext(FakeContext):
    """What TorchServe's KServe envelopes read of the context, besides what the handler reads."""

    manifest: dict = field(default_factory=lambda: {"model": {"modelName": "tiny", "modelVersion": "1.0"}})

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.get_all_request_header(idx).get(key)

    def get_request_id(self, idx: int = 0) -> str:
        return "request-0"


def through_envelope(folder: Path, envelope: str, body: dict, headers: dict | None = None):
    context = EnvelopeContext(str(folder), headers=[{"body": {"content-type": "application/json"}, **(headers or {})}])
    handler = LafamHandler()
    handler.initialize(context)
    wrapper = (KServeEnvelope if envelope == "kserve" else KServev2Envelope)(handler.handle)
    (response,) = wrapper.handle([{"body": body}], context)
    return response, context


def b64_png(**kwargs: object) -> str:
    return base64.b64encode(image_bytes(**kwargs)).decode()


def v2_input(data: object, name: str = "image-0", datatype: str = "BYTES", shape: list | None = None, **extra: object):
    return {"name": name, "shape": shape or [1], "datatype": datatype, "data": [data], **extra}


def test_kserve_v1_instance_shapes_become_the_json_body(tiny_export: Path) -> None:
    encoded = b64_png()
    instances = [
        {"data": encoded},
        {"data": {"b64": encoded}},
        {"image": encoded, "options": {"top_k": 2, "format": "array"}},
        {"image": {"b64": encoded}},
        encoded,
    ]
    response, context = through_envelope(tiny_export, "kserve", {"instances": instances})
    assert context.statuses[0][0] == 200
    assert context.content_types[0] == "application/json"
    answers = response["predictions"]
    assert len(answers) == len(instances)
    assert all(answer["explanation"]["method"] == "lafam" for answer in answers)
    assert [len(answer["predictions"]) for answer in answers] == [4, 4, 2, 4, 4]
    assert answers[2]["explanation"]["format"] == "array"
    assert answers[0] == answers[1] == answers[3] == answers[4]


@pytest.mark.parametrize(
    ("instance", "code"),
    [
        ({"data": base64.b64encode(b"not an image").decode()}, "invalid_image"),
        ({"data": "***"}, "invalid_json"),
        ({"data": {"b64": 5}}, "invalid_json"),
        ({"data": "x", "image": "y"}, "invalid_json"),
        ({"img": "x"}, "invalid_json"),
        ({"data": b64_png(), "options": {"top_k": 0}}, "invalid_option"),
        (5, "invalid_json"),
    ],
)
def test_kserve_v1_bad_instance_keeps_its_code_and_fails_alone(tiny_export: Path, instance: object, code: str) -> None:
    response, context = through_envelope(tiny_export, "kserve", {"instances": [{"data": b64_png()}, instance]})
    assert context.statuses[0] == (400, "Bad Request")  # the first failure's status is the request's
    good, bad = response["predictions"]
    assert good["explanation"]["method"] == "lafam"
    assert bad["error"]["code"] == code
    assert bad["error"]["message"]


def test_kserve_v1_without_instances_is_a_400(tiny_export: Path) -> None:
    response, context = through_envelope(tiny_export, "kserve", {"inputs": []})
    assert context.statuses[0][0] == 400
    assert response["predictions"][0]["error"]["code"] == "invalid_json"


def test_kserve_v1_explain_header_opens_explanations(tiny_export: Path) -> None:
    response, context = through_envelope(
        tiny_export, "kserve", {"instances": [{"data": b64_png()}]}, {"explain": "True"}
    )
    assert context.statuses[0][0] == 200
    assert response["explanations"][0]["explanation"]["method"] == "lafam"


def test_kserve_v2_bytes_tensors_answer_bytes_outputs(tiny_export: Path) -> None:
    inputs = [
        v2_input(b64_png()),
        v2_input(b64_png(), name="with-options", parameters={"options": {"top_k": 1}}),
        v2_input(b64_png(), name="options-as-text", parameters={"options": '{"format": "none"}'}),
    ]
    response, context = through_envelope(tiny_export, "kservev2", {"id": "abc", "inputs": inputs})
    assert context.statuses[0][0] == 200
    assert response["id"] == "abc"
    assert response["model_name"] == "tiny"
    outputs = response["outputs"]
    assert [output["name"] for output in outputs] == ["image-0", "with-options", "options-as-text"]
    assert all(output["datatype"] == "BYTES" and list(output["shape"]) == [1] for output in outputs)
    answers = [json.loads(output["data"][0]) for output in outputs]
    assert answers[0]["explanation"]["method"] == "lafam"
    assert len(answers[1]["predictions"]) == 1
    assert answers[2]["explanation"] is None


@pytest.mark.parametrize(
    ("tensor", "code"),
    [
        (v2_input(base64.b64encode(b"GIF89a\x01\x00").decode()), "invalid_image"),
        (v2_input(1, datatype="INT64"), "invalid_json"),
        (v2_input("x", shape=[2]), "invalid_json"),
        (v2_input(b64_png(), parameters={"options": "{bad"}), "invalid_json"),
        (v2_input(b64_png(), parameters={"options": {"colour": "red"}}), "invalid_option"),
    ],
)
def test_kserve_v2_bad_tensor_keeps_its_code(tiny_export: Path, tensor: dict, code: str) -> None:
    response, context = through_envelope(tiny_export, "kservev2", {"inputs": [tensor, v2_input(b64_png(), name="ok")]})
    assert context.statuses[0][0] == 400
    bad, good = (json.loads(output["data"][0]) for output in response["outputs"])
    assert bad["error"]["code"] == code
    assert good["explanation"]["method"] == "lafam"


def test_plain_handle_call_is_not_taken_for_an_envelope(tiny_export: Path) -> None:
    bodies, context = serve(tiny_export, [{"body": {"image": b64_png()}}])
    assert context.statuses[0][0] == 200
    assert bodies[0]["explanation"]["method"] == "lafam"
