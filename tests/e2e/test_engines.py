"""The same requests on every engine, over real HTTP: TorchServe, KServe's model server and Ray Serve.

Each engine is started as a user starts it (``lafam-serve serve ARCHIVE... --engine E``) and gets:

- the whole bad-input corpus of ``tests/unit/test_bad_inputs.py`` (raw bodies, JSON bodies, multipart forms,
  option headers on ``/predictions``; class, K, temperature and base options on ``/explanations``), each
  case turned into the HTTP request a client sends; every engine must answer each with the corpus's status,
  error code and message keyword, and keep serving;
- the end-to-end checks of a served model: a prediction with its LaFAM map, the backward-pass methods on
  ``/explanations``, a mixed concurrent load each answered alone, the token, an over-size body, and the
  ``lafam_*`` metrics on the exporter.

The KServe v1 / v2 routes, which TorchServe serves only under an envelope (``test_kserve_envelope.py``), are
checked on the KServe and Ray engines with the same instance shapes.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import json
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from demo.run import build_demo_archive
from export.archive import build_archive
from scenes.synthetic import generate_scene
from serving.engines import ENGINES, TOKEN, EngineServer
from serving.ray_cluster import MARK_ENV, Cluster, local_cluster
from tests.unit.conftest import write_export
from tests.unit.test_bad_inputs import CASES, EXPLAIN_CASES, PNG, Case, assert_answer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MiB = 1024 * 1024


def _needs(engine: str) -> list[pytest.MarkDecorator]:
    if engine == "torchserve":
        return [pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's frontend needs Java 11+")]
    module = {"kserve": "kserve", "ray": "ray.serve"}[engine]
    try:
        __import__(module)
    except ImportError:
        return [pytest.mark.skip(reason=f"the [{engine}] extra is not installed")]
    return []


ENGINE_PARAMS = [pytest.param(engine, marks=_needs(engine), id=engine) for engine in ENGINES]


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The corpus's tiny model (4 classes, layer ``stage2``) and the demo CNN with its eager model."""
    root = tmp_path_factory.mktemp("engine-archives")
    store = root / "model_store"
    write_export(root / "tiny-export")
    build_archive(root / "tiny-export", store, name="tiny", log=lambda _: None)
    build_demo_archive(root, store, backend="onnx", name="shapes", log=lambda _: None)
    return {"tiny": store / "tiny.mar", "shapes": store / "shapes.mar"}


@pytest.fixture(scope="module", params=ENGINE_PARAMS)
def server(request: pytest.FixtureRequest, archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[EngineServer]:  # fmt: skip
    engine: str = request.param
    extra: list[str] = []
    env: dict[str, str] = {}
    if engine == "ray":
        cluster: Cluster = request.getfixturevalue("ray_cluster")
        extra = ["--ray-address", cluster.address, "--replicas", "1"]
        env = {key: cluster.env[key] for key in (MARK_ENV, "RAY_USAGE_STATS_ENABLED", "PYTHONPATH")}
    folder = tmp_path_factory.mktemp(engine)
    with EngineServer(engine, [archives["tiny"], archives["shapes"]], folder, extra, env) as instance:
        yield instance


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A private Ray cluster on loopback (``ray start --head``), stopped after the module."""
    with local_cluster() as cluster:
        yield cluster


# the corpus as HTTP


def _field(name: str, value: Any, content_type: str | None, boundary: str) -> bytes:
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str):
        data = value.encode()
    else:
        data = json.dumps(value).encode()
    filename = (
        f'; filename="{name}.bin"'
        if content_type and not content_type.startswith(("text/", "application/json"))
        else ""
    )
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n'
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + data + b"\r\n"


def as_http(case: Case) -> tuple[bytes, dict[str, str]]:
    """The HTTP request whose decoding by TorchServe gives the case's parameters and headers."""
    headers = {k: v for k, v in case.headers.items() if isinstance(v, str)}
    types = {k: v["content-type"] for k, v in case.headers.items() if isinstance(v, dict)}
    if set(case.item) == {"body"}:
        value = case.item["body"]
        if isinstance(value, str) and types.get("body", "").startswith("text/"):  # TorchServe decoded text
            value = value.encode()
        if isinstance(value, bytes | bytearray):
            if "body" in types:
                headers["Content-Type"] = types["body"]
            return bytes(value), headers
        return json.dumps(value).encode(), {**headers, "Content-Type": types.get("body", "application/json")}
    boundary = uuid.uuid4().hex
    body = b"".join(_field(name, value, types.get(name), boundary) for name, value in case.item.items())
    return body + f"--{boundary}--\r\n".encode(), {
        **headers,
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }


def _cases() -> list[Any]:
    return [pytest.param(case, id=case.id) for case in CASES if not case.bug]


NETTY_MAX_HEADER = 8192
"""TorchServe's frontend (Netty) refuses a request whose headers exceed 8 KiB with its own 400, before the handler.

It then closes the connection with the rest of the request unread, so the kernel may reset it before the
client has read the 400 (status 0 from ``EngineServer.call``): either answer is a refusal before the handler.
"""


@pytest.mark.parametrize("case", _cases())
def test_bad_input_corpus(server: EngineServer, case: Case) -> None:
    body, headers = as_http(case)
    status, answer = server.call("POST", "/predictions/tiny", body, headers)
    if server.engine == "torchserve" and sum(len(k) + len(v) for k, v in headers.items()) > NETTY_MAX_HEADER:
        assert (status, answer.get("type")) in {(400, "BadRequestException"), (0, None)}, answer
        return
    assert_answer(case, status, answer)


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in EXPLAIN_CASES if not case.bug])
def test_bad_explanation_corpus(server: EngineServer, case: Case) -> None:
    """The corpus's /explanations cases (classes, K, T, tau, bases, blank images) on the demo CNN's eager model."""
    body, headers = as_http(case)
    status, answer = server.call("POST", "/explanations/shapes", body, headers)
    assert_answer(case, status, answer)


def test_the_engine_keeps_serving_after_the_corpus(server: EngineServer) -> None:
    status, body = server.call("POST", "/predictions/tiny", PNG, {"Content-Type": "image/png"})
    assert status == 200, body
    assert body["predictions"]


# end to end


@functools.cache
def _scene() -> tuple[bytes, int]:
    generated = generate_scene(np.random.default_rng(3))
    buffer = io.BytesIO()
    Image.fromarray(generated.image).save(buffer, format="PNG")
    return buffer.getvalue(), generated.labels[0]


def scene() -> bytes:
    """A generated scene of one object, as PNG bytes."""
    return _scene()[0]


def test_prediction_with_its_map(server: EngineServer) -> None:
    status, body = server.call("POST", "/predictions/shapes", scene(), {"Content-Type": "image/png"})
    assert status == 200, body
    assert body["model"] == "shapes"
    assert body["predictions"][0]["index"] == _scene()[1]
    explanation = body["explanation"]
    assert (explanation["method"], explanation["layer"], explanation["format"]) == ("lafam", "block3", "png")
    assert explanation["size"] == [128, 128]


def test_backward_methods_on_explanations(server: EngineServer) -> None:
    for method in ("lrp", "distribution"):
        headers = {"Content-Type": "image/png", "X-LaFAM-Method": method}
        status, body = server.call("POST", "/explanations/shapes", scene(), headers)
        assert status == 200, body
        assert body["explanation"]["method"] == method
    status, body = server.call("POST", "/predictions/shapes", scene(), {"Content-Type": "image/png",
                                                                       "X-LaFAM-Method": "lrp"})  # fmt: skip
    assert (status, body["error"]["code"]) == (400, "invalid_option")


def test_json_body_with_options(server: EngineServer) -> None:
    request = {"image": base64.b64encode(scene()).decode(), "options": {"top_k": 2, "format": "array"}}
    status, body = server.call("POST", "/predictions/shapes", json.dumps(request).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
    assert status == 200, body
    assert len(body["predictions"]) == 2
    assert body["explanation"]["format"] == "array"
    assert len(body["explanation"]["data"]) == body["explanation"]["native_size"][0]  # arrays: the native map


def test_concurrent_mixed_load_each_answered_alone(server: EngineServer) -> None:
    payloads = [scene()] * 6 + [b"junk"] * 3
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        results = list(pool.map(lambda data: server.call("POST", "/predictions/shapes", data), payloads))
    assert [status for status, _ in results] == [200] * 6 + [400] * 3
    assert all(body["error"]["code"] == "invalid_image" for _, body in results[6:])


def test_a_token_is_required(server: EngineServer) -> None:
    refused = (400, 401) if server.engine == "torchserve" else (401,)  # TorchServe: 400 InvalidKeyException
    for token in (False, "wrong-token-0123456789"):
        status, body = server.call("POST", "/predictions/shapes", scene(), token=token)
        assert status in refused, body
        if server.engine != "torchserve":
            assert body["error"]["code"] == "unauthorized"


def test_an_11_mib_body_is_refused(server: EngineServer) -> None:
    data = scene()
    status, body = server.call("POST", "/predictions/shapes", data + b"\x00" * (11 * MiB - len(data)))
    if server.engine == "torchserve":  # its frontend refuses it (413 in its own JSON) or resets the connection
        assert status in (0, 413), body
    else:
        assert (status, body["error"]["code"]) == (413, "payload_too_large"), body
    assert server.call("POST", "/predictions/shapes", data)[0] == 200


def test_metrics_on_the_exporter(server: EngineServer) -> None:
    assert server.call("POST", "/predictions/shapes", scene())[0] == 200
    families = {family.name: family for family in text_string_to_metric_families(server.metrics())}
    requests = sum(s.value for s in families["lafam_requests"].samples if s.labels.get("model") == "shapes")
    assert requests >= 1
    assert "lafam_explanation_seconds" in families
    assert "lafam_inference_seconds" in families


# KServe v1 and v2 (TorchServe: only under its envelopes, see test_kserve_envelope.py)


def _not_on_torchserve(server: EngineServer) -> None:
    if server.engine == "torchserve":
        pytest.skip("TorchServe serves KServe's routes only under service_envelope (test_kserve_envelope.py)")


def test_kserve_v1_predict_and_explain(server: EngineServer) -> None:
    _not_on_torchserve(server)
    image = base64.b64encode(scene()).decode()
    request = {"instances": [{"image": image, "options": {"top_k": 2}}, {"data": {"b64": image}}, image]}
    status, body = server.call("POST", "/v1/models/shapes:predict", json.dumps(request).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
    assert status == 200, body
    assert [len(p["predictions"]) for p in body["predictions"]] == [2, 5, 5]  # top_k 2, then the default 5
    explain = {"instances": [{"image": image, "options": {"method": "lrp"}}]}
    status, body = server.call("POST", "/v1/models/shapes:explain", json.dumps(explain).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
    assert status == 200, body
    assert body["explanations"][0]["explanation"]["method"] == "lrp"
    bad = {"instances": [{"image": image}, {"data": "!!"}]}
    status, body = server.call("POST", "/v1/models/shapes:predict", json.dumps(bad).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
    assert status == 400
    assert body["predictions"][0]["predictions"]
    assert body["predictions"][1]["error"]["code"] == "invalid_json"  # not base64


def test_kserve_v2_infer(server: EngineServer) -> None:
    _not_on_torchserve(server)
    image = base64.b64encode(scene()).decode()
    tensor = {"name": "photo", "datatype": "BYTES", "shape": [1], "data": [image],
              "parameters": {"options": json.dumps({"top_k": 1})}}  # fmt: skip
    status, body = server.call("POST", "/v2/models/shapes/infer", json.dumps({"inputs": [tensor]}).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
    assert status == 200, body
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("photo", "BYTES", [1])
    answer = json.loads(output["data"][0])
    assert len(answer["predictions"]) == 1
    assert answer["explanation"]["method"] == "lafam"
    wrong = {**tensor, "datatype": "FP32", "data": [1.0], "parameters": {}}
    status, body = server.call("POST", "/v2/models/shapes/infer", json.dumps({"inputs": [wrong]}).encode(),
                               {"Content-Type": "application/json"})  # fmt: skip
    assert status == 400
    assert json.loads(body["outputs"][0]["data"][0])["error"]["code"] == "invalid_json"


def test_health_is_open_and_the_token_shared(server: EngineServer) -> None:
    _not_on_torchserve(server)
    assert server.call("GET", "/v2/health/ready", token=False)[0] == 200
    assert server.call("GET", "/v1/models/shapes", token=False) == (200, {"name": "shapes", "ready": True})
    assert server.token() == TOKEN  # one token, whatever the replica


@pytest.mark.parametrize("engine", [p for p in ENGINE_PARAMS if p.id == "kserve"])
def test_engine_benchmark_runs(engine: str, tmp_path: Path) -> None:
    """``benchmarks.engines`` end to end on one engine, a few seconds of load: a row with figures."""
    if importlib.util.find_spec("locust") is None:  # not imported: locust's gevent patches ssl in this process
        pytest.skip("the bench extra (locust) is not installed")
    from benchmarks.engines import main as engine_benchmark

    [row] = engine_benchmark(
        ["--engines", engine, "--duration", "3", "--users", "2", "--write", str(tmp_path / "R.md")]
    )
    assert row["engine"] == engine
    assert row["requests"] > 0
    assert row["errors"] == 0
    assert row["cpu_ms_per_request"] > 0
    assert "Choosing an engine" in (tmp_path / "R.md").read_text()
