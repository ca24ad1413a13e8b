"""End to end: the demo model exported, archived, served by a real TorchServe on free loopback ports.

One server for the module (started once, always stopped), two archives of the same weights: ONNX
Runtime and TorchScript. Requests carry the inference token as a client would.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from demo.run import build_demo_archive
from scenes.synthetic import generate_scene, save_samples
from serving.torchserve import TorchServe, running

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's frontend needs Java 11+"),
]

MODELS = {"shapes": "onnx", "shapes-ts": "torchscript"}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("samples")
    index = json.loads(save_samples(folder, 12, seed=7).read_text())
    return [
        {
            "path": folder / s["image"],
            "labels": s["labels"],
            "masks": [np.asarray(Image.open(folder / m)) > 0 for m in s["masks"]],
        }
        for s in index["samples"]
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    root = tmp_path_factory.mktemp("e2e")
    store = root / "model_store"
    for name, backend in MODELS.items():
        build_demo_archive(root, store, backend=backend, name=name, log=lambda _: None)
    # A checkout-free run: TorchServe works in its own folder and imports the code from the archives.
    with running(store, list(MODELS), workdir=root / "ts") as instance:  # stop() checks every port closed
        yield instance


def call(
    server: TorchServe,
    path: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: str | None = "inference",
    method: str = "POST",
) -> tuple[int, dict]:
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {server.token(token)}"
    request = urllib.request.Request(server.url() + path, data=data, headers=all_headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def predict(server: TorchServe, model: str, data: bytes, **headers: str) -> tuple[int, dict]:
    return call(server, f"/predictions/{model}", data, {"Content-Type": "image/png", **headers})


@pytest.mark.parametrize("model", list(MODELS))
def test_prediction_and_map_for_generated_scenes(server: TorchServe, samples: list[dict], model: str) -> None:
    single = [s for s in samples if len(s["labels"]) == 1]
    correct = 0
    inside_higher = 0
    for sample in single:
        status, body = predict(server, model, sample["path"].read_bytes())
        assert status == 200, body
        assert body["model"] == model
        top = body["predictions"][0]
        correct += top["index"] == sample["labels"][0]
        explanation = body["explanation"]
        assert (explanation["method"], explanation["layer"], explanation["format"]) == ("lafam", "block3", "png")
        assert explanation["native_size"] == [8, 8]
        heatmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(explanation["data"]))), dtype=np.float32)
        assert heatmap.shape == (128, 128)
        mask = sample["masks"][0]
        inside_higher += heatmap[mask].mean() > heatmap[~mask].mean()
    assert correct >= len(single) - 1  # the shipped model is ≥ 95 % accurate on held-out scenes
    assert inside_higher >= len(single) - 1  # LaFAM lands on the object


def test_both_backends_agree(server: TorchServe, samples: list[dict]) -> None:
    data = samples[0]["path"].read_bytes()
    _, onnx_body = predict(server, "shapes", data, **{"X-LaFAM-Format": "array"})
    _, script_body = predict(server, "shapes-ts", data, **{"X-LaFAM-Format": "array"})
    assert [p["index"] for p in onnx_body["predictions"]] == [p["index"] for p in script_body["predictions"]]
    np.testing.assert_allclose(onnx_body["explanation"]["data"], script_body["explanation"]["data"], atol=1e-3)


def test_json_body_and_original_size(server: TorchServe, samples: list[dict]) -> None:
    buffer = io.BytesIO()
    Image.open(samples[0]["path"]).resize((300, 200)).save(buffer, format="JPEG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode(), "options": {"size": "original", "top_k": 2}}
    headers = {"Content-Type": "application/json"}
    status, answer = call(server, "/predictions/shapes", json.dumps(body).encode(), headers)
    assert status == 200, answer
    assert len(answer["predictions"]) == 2
    assert answer["explanation"]["size"] == [200, 300]


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = [
    ("empty body", b"", {}, 400, "empty_body"),
    ("not an image", b"hello world" * 10, {}, 400, "invalid_image"),
    ("truncated", None, {}, 400, "invalid_image"),
    ("over the pixel limit", _png((7000, 6000)), {}, 413, "image_too_large"),
    ("unknown option", _png((64, 64)), {"X-LaFAM-Colour": "red"}, 400, "invalid_option"),
    ("malformed option", _png((64, 64)), {"X-LaFAM-Top-K": "-1"}, 400, "invalid_option"),
    ("malformed size", _png((64, 64)), {"X-LaFAM-Size": "big"}, 400, "invalid_option"),
]


@pytest.mark.parametrize(("case", "data", "headers", "status", "code"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_named_4xx_and_the_worker_keeps_serving(
    server: TorchServe, samples: list[dict], case: str, data: bytes | None, headers: dict, status: int, code: str
) -> None:
    if data is None:
        data = samples[0]["path"].read_bytes()[:300]
    got, body = predict(server, "shapes", data, **headers)
    assert (got, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"]
    assert predict(server, "shapes", samples[0]["path"].read_bytes())[0] == 200


def test_concurrent_mixed_batch_each_answered_alone(server: TorchServe, samples: list[dict]) -> None:
    payloads = [s["path"].read_bytes() for s in samples[:6]] + [b"junk"] * 3
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        results = list(pool.map(lambda data: predict(server, "shapes", data), payloads))
    assert [status for status, _ in results] == [200] * 6 + [400] * 3
    assert all(body["error"]["code"] == "invalid_image" for _, body in results[6:])


def test_token_is_required(server: TorchServe, samples: list[dict]) -> None:
    status, body = call(server, "/predictions/shapes", samples[0]["path"].read_bytes(), token=None)
    assert status in (400, 401, 403)
    assert "Token" in json.dumps(body)


def test_model_api_is_off(server: TorchServe) -> None:
    request = urllib.request.Request(
        server.url("management") + "/models?url=shapes.mar",
        method="POST",
        headers={"Authorization": f"Bearer {server.token('management')}"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code in (400, 403, 405)


def explain(server: TorchServe, model: str, data: bytes, **headers: str) -> tuple[int, dict]:
    return call(server, f"/explanations/{model}", data, {"Content-Type": "image/png", **headers})


def _decoded(entry: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["data"]))), dtype=np.float32)


def _grid_png() -> tuple[bytes, list[int]]:
    """A 256-px 2x2 grid of four 128-px single-object scenes (the demo's training scale), four classes."""
    rng = np.random.default_rng(0)
    tiles: list[np.ndarray] = []
    labels: list[int] = []
    while len(tiles) < 4:
        scene = generate_scene(rng, 128, 1)
        if scene.labels[0] not in labels:
            tiles.append(scene.image)
            labels.append(int(scene.labels[0]))
    grid = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return buffer.getvalue(), labels


@pytest.mark.parametrize("model", list(MODELS))
def test_resize_none_serves_a_256_px_grid_at_its_own_size(server: TorchServe, model: str) -> None:
    data, labels = _grid_png()
    status, body = predict(server, model, data, **{"X-LaFAM-Resize": "none", "X-LaFAM-Top-K": "6"})
    assert status == 200, body
    assert body["input_size"] == [256, 256]  # the demo archive is exported with --dynamic-size
    explanation = body["explanation"]
    assert (explanation["size"], explanation["native_size"]) == ([256, 256], [16, 16])
    assert _decoded(explanation).shape == (256, 256)
    top4 = {p["index"] for p in body["predictions"][:4]}
    assert len(top4 & set(labels)) >= 3  # at its training scale the model sees the grid's objects
    request = {"image": base64.b64encode(data).decode(), "options": {"resize": "none", "format": "array"}}
    headers = {"Content-Type": "application/json"}
    status, body = call(server, f"/predictions/{model}", json.dumps(request).encode(), headers)
    assert status == 200, body
    assert np.asarray(body["explanation"]["data"]).shape == (16, 16)
    status, body = explain(server, model, data, **{"X-LaFAM-Resize": "none", "X-LaFAM-Format": "array"})
    assert status == 200, body
    assert body["input_size"] == [256, 256]
    assert np.asarray(body["explanation"]["data"]).shape == (256, 256)  # label-free LRP at the pixels it saw
    status, body = predict(server, model, data)
    assert (status, body["input_size"]) == (200, [128, 128])  # the default is still the model's size
    status, body = predict(server, model, data, **{"X-LaFAM-Resize": "8"})
    assert (status, body["error"]["code"]) == (400, "invalid_option")
    assert "resize" in body["error"]["message"]


def test_several_sizes_in_one_batch_are_each_answered(server: TorchServe, samples: list[dict]) -> None:
    grid, _ = _grid_png()
    scene = samples[0]["path"].read_bytes()
    payloads = [(grid, "none"), (scene, "none"), (grid, "model"), (grid, "200"), (scene, "model")] * 2
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        results = list(pool.map(lambda p: predict(server, "shapes", p[0], **{"X-LaFAM-Resize": p[1]}), payloads))
    assert [status for status, _ in results] == [200] * len(payloads)
    sizes = [body["input_size"] for _, body in results]
    assert sizes == [[256, 256], [128, 128], [128, 128], [200, 200], [128, 128]] * 2


@pytest.mark.parametrize("model", list(MODELS))
def test_explanations_endpoint_serves_backward_methods(server: TorchServe, samples: list[dict], model: str) -> None:
    single = [s for s in samples if len(s["labels"]) == 1][:4]
    inside_higher = 0
    for sample in single:
        status, body = explain(server, model, sample["path"].read_bytes())  # default method: label-free LRP
        assert status == 200, body
        explanation = body["explanation"]
        assert (explanation["method"], explanation["scale"], explanation["native_size"]) == (
            "lrp",
            "signed",
            [128, 128],
        )
        relevance = _decoded(explanation) - 127.5  # png: round(255 * (1 + r / max|r|) / 2)
        mask = sample["masks"][0]
        inside_higher += relevance[mask].mean() > relevance[~mask].mean()
    assert inside_higher >= len(single) - 1  # LRP lands on the object too

    data = samples[0]["path"].read_bytes()
    status, body = explain(server, model, data, **{"X-LaFAM-Method": "distribution", "X-LaFAM-Base": "lrp"})
    assert status == 200, body
    explanation = body["explanation"]
    top = [p["index"] for p in body["predictions"]]
    assert [c["index"] for c in explanation["classes"]] == top[:2]  # the maps explain the served predictions
    assert explanation["competitors"][:2] == top[:2]
    assert len(explanation["competitors"]) == 3  # top-2 + the least likely class
    assert all(_decoded(c).shape == (128, 128) for c in explanation["classes"])

    status, body = explain(server, model, data, **{"X-LaFAM-Method": "distribution_fast", "X-LaFAM-Format": "array"})
    assert status == 200, body
    assert np.asarray(body["explanation"]["classes"][0]["data"]).shape == (128, 128)


@pytest.mark.parametrize(
    ("endpoint", "headers", "needle"),
    [
        ("predictions", {"X-LaFAM-Method": "lrp"}, "/explanations"),
        ("explanations", {"X-LaFAM-Method": "shap"}, "distribution_fast"),
        ("explanations", {"X-LaFAM-Method": "lrp_class", "X-LaFAM-Classes": "6"}, "0 to 5"),
        ("explanations", {"X-LaFAM-Method": "distribution", "X-LaFAM-Base": "lrp", "X-LaFAM-Top-Classes": "9"}, "1 to"),
    ],
    ids=["backward-on-predictions", "unknown-method", "class-out-of-range", "k-too-large"],
)
def test_explanation_options_are_validated(
    server: TorchServe, samples: list[dict], endpoint: str, headers: dict, needle: str
) -> None:
    status, body = call(
        server, f"/{endpoint}/shapes", samples[0]["path"].read_bytes(), {"Content-Type": "image/png", **headers}
    )
    assert (status, body["error"]["code"]) == (400, "invalid_option"), body
    assert needle in body["error"]["message"]


def test_explanation_metrics_on_one_scrape_target(server: TorchServe, samples: list[dict]) -> None:
    predict(server, "shapes", samples[0]["path"].read_bytes())
    predict(server, "shapes-ts", samples[0]["path"].read_bytes())
    predict(server, "shapes", b"junk")
    explain(server, "shapes", samples[0]["path"].read_bytes(), **{"X-LaFAM-Method": "gradcam"})
    wanted = {("shapes", "lafam"), ("shapes-ts", "lafam"), ("shapes", "gradcam")}
    deadline = time.monotonic() + 30  # a worker records an explanation's metrics just after answering it
    while True:
        with urllib.request.urlopen(server.url("lafam_metrics") + "/metrics", timeout=10) as response:
            text = response.read().decode()
        families = {family.name: family for family in text_string_to_metric_families(text)}
        histogram = families["lafam_explanation_seconds"]
        counts = {
            (s.labels["model"], s.labels["method"]): s.value for s in histogram.samples if s.name.endswith("_count")
        }
        if wanted <= set(counts) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert histogram.type == "histogram"
    assert counts[("shapes", "lafam")] >= 1
    assert counts[("shapes-ts", "lafam")] >= 1  # both models' workers, one endpoint
    assert counts[("shapes", "gradcam")] >= 1  # each method in the same histogram
    bounds = {float(s.labels["le"]) for s in histogram.samples if s.name.endswith("_bucket")}
    assert min(bounds) < 0.001  # sub-millisecond resolution
    errors = {(s.labels["model"], s.labels["code"]): s.value for s in families["lafam_errors"].samples}
    assert errors[("shapes", "invalid_image")] >= 1
    assert "lafam_inference_seconds" in families
    # TorchServe's own metrics stay on its metrics port, in Prometheus format.
    with urllib.request.urlopen(server.url("metrics") + "/metrics", timeout=10) as response:
        assert "ts_inference_requests_total" in response.read().decode()


def test_eval_through_the_rest_api(server: TorchServe) -> None:
    from evaluation.data import synthetic_samples
    from evaluation.runner import METHODS, evaluate
    from evaluation.sources import RestSource

    source = RestSource(server.url(), "shapes", server.token("inference"))
    results = evaluate(source, synthetic_samples(3), progress=False)
    assert not results.unavailable
    summary = results.summary()
    assert all(summary[m.name]["auc"]["n"] == 3 for m in METHODS)
    assert summary["LaFAM (nearest)"]["pointing_game"]["mean"] >= 2 / 3
