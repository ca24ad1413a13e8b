"""End to end: the demo archive on TorchServe started with KServe's envelopes (``service_envelope``).

One server per envelope (``kserve``: ``POST /v1/models/{name}:predict``; ``kservev2``:
``POST /v2/models/{name}/infer``), the same archive, the token as a client sends it. Each image shape a
KServe client sends is answered with our response object inside the envelope's format; a bad image keeps
our error code and its HTTP status.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.run import build_demo_archive
from scenes.synthetic import generate_scene
from serving.torchserve import TorchServe, running

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's frontend needs Java 11+"),
]

MODEL = "shapes"
ROUTES = {"kserve": f"/v1/models/{MODEL}:predict", "kservev2": f"/v2/models/{MODEL}/infer"}


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kserve")
    store = root / "model_store"
    build_demo_archive(root, store, backend="onnx", name=MODEL, log=lambda _: None)
    return store


@pytest.fixture(scope="module", params=list(ROUTES))
def server(request: pytest.FixtureRequest, model_store: Path, tmp_path_factory: pytest.TempPathFactory):
    envelope = request.param
    workdir = tmp_path_factory.mktemp(f"ts-{envelope}")
    with running(model_store, [MODEL], workdir=workdir, config={"service_envelope": envelope}) as instance:
        yield envelope, instance


@pytest.fixture(scope="module")
def image() -> str:
    scene = generate_scene(np.random.default_rng(3))
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(server: TorchServe, path: str, body: dict) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.token('inference')}"}
    request = urllib.request.Request(server.url() + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def ask(envelope: str, server: TorchServe, images: list[tuple[object, dict | None]]) -> tuple[int, list[dict]]:
    """Send images ``(value, options)`` in the envelope's format; return the status and our answers."""
    if envelope == "kserve":
        instances = [value if options is None else {**value, "options": options} for value, options in images]
        status, body = post(server, ROUTES[envelope], {"instances": instances})
        assert set(body) == {"predictions"}, body
        return status, body["predictions"]
    inputs = [
        {"name": f"image-{i}", "shape": [1], "datatype": "BYTES", "data": [value]}
        | ({} if options is None else {"parameters": {"options": options}})
        for i, (value, options) in enumerate(images)
    ]
    status, body = post(server, ROUTES[envelope], {"id": "request-1", "inputs": inputs})
    assert body["id"] == "request-1", body
    assert body["model_name"] == MODEL
    assert [output["name"] for output in body["outputs"]] == [f"image-{i}" for i in range(len(images))]
    assert all(output["datatype"] == "BYTES" and output["shape"] == [1] for output in body["outputs"])
    return status, [json.loads(output["data"][0]) for output in body["outputs"]]


def shapes(envelope: str, image: str) -> list[tuple[object, dict | None]]:
    if envelope == "kserve":
        return [({"data": image}, None), ({"data": {"b64": image}}, None), ({"image": image}, None)]
    return [(image, None)]


def test_every_image_shape_gets_our_response(server: tuple[str, TorchServe], image: str) -> None:
    envelope, instance = server
    status, answers = ask(envelope, instance, shapes(envelope, image))
    assert status == 200, answers
    for answer in answers:
        assert answer["model"] == MODEL
        assert answer["predictions"]
        assert answer["predictions"][0]["label"]
        explanation = answer["explanation"]
        assert (explanation["method"], explanation["format"]) == ("lafam", "png")
        Image.open(io.BytesIO(base64.b64decode(explanation["data"])))
    assert all(answer == answers[0] for answer in answers)


def test_options_travel_with_the_image(server: tuple[str, TorchServe], image: str) -> None:
    envelope, instance = server
    value = {"image": image} if envelope == "kserve" else image
    status, (answer,) = ask(envelope, instance, [(value, {"top_k": 2, "format": "array"})])
    assert status == 200, answer
    assert len(answer["predictions"]) == 2
    assert answer["explanation"]["format"] == "array"


def test_bad_image_keeps_our_error_code_and_status(server: tuple[str, TorchServe], image: str) -> None:
    envelope, instance = server
    bad = base64.b64encode(b"hello world" * 10).decode()
    good_value, bad_value = ({"data": image}, {"data": bad}) if envelope == "kserve" else (image, bad)
    status, (answer,) = ask(envelope, instance, [(bad_value, None)])
    assert status == 400
    assert answer["error"]["code"] == "invalid_image"
    assert answer["error"]["message"]
    status, (failed, answered) = ask(envelope, instance, [(bad_value, None), (good_value, None)])
    assert status == 400  # the request's status is its first failure's; the good image is still answered
    assert failed["error"]["code"] == "invalid_image"
    assert answered["explanation"]["method"] == "lafam"
