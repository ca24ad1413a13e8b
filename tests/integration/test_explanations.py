"""``/explanations`` end to end: the demo model exported with its eager copy, served by the real handler.

One module-scoped export (TorchScript graph + ``eager.pt`` + ``eager_code/``) drives every backward-pass
method through ``LafamHandler`` as TorchServe would; the export side (manifest, checksums, ``--no-eager``
archives, torchvision embeddings, tampering) is checked on the same folder.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from export.archive import build_archive, model_config
from export.exporter import export_model
from handlers.eager import load_eager
from handlers.handler import LafamHandler
from handlers.manifest import Manifest, ManifestError
from scenes.synthetic import generate_scene
from tests.demo_export import DEMO, export_demo
from tests.unit.conftest import FakeContext
from tests.unit.test_metrics import sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = tuple((DEMO / "labels.txt").read_text().split())
METHODS = ("lrp", "lrp_class", "gradcam", "input_x_gradient", "distribution", "distribution_fast", "lafam")
BACKWARD = METHODS[:-1]
CLASS_METHODS = METHODS[1:-1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_demo(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def scene_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(generate_scene(np.random.default_rng(3), 128, 2).image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(exported: Path) -> tuple[LafamHandler, FakeContext]:
    context = FakeContext(str(exported))
    handler = LafamHandler()
    handler.initialize(context)
    return handler, context


def handle(
    served: tuple[LafamHandler, FakeContext], items: list[bytes], headers: list[dict[str, str]]
) -> list[tuple[int, dict[str, Any]]]:
    handler, context = served
    context.headers = headers
    context.statuses.clear()
    bodies = handler.handle([{"body": bytearray(item)} for item in items], context)
    return [(context.statuses[i][0], json.loads(body)) for i, body in enumerate(bodies)]


def explain_one(served: tuple[LafamHandler, FakeContext], image: bytes, **options: str) -> tuple[int, dict]:
    headers = {"explain": "True", **{f"X-LaFAM-{k.replace('_', '-')}": v for k, v in options.items()}}
    return handle(served, [image], [headers])[0]


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data, validate=True))))


def image_of(size: tuple[int, int]) -> bytes:
    """A scene of ``size = (W, H)``."""
    scene = Image.fromarray(generate_scene(np.random.default_rng(3), 128, 2).image).resize(size)
    buffer = io.BytesIO()
    scene.save(buffer, format="PNG")
    return buffer.getvalue()


def no_hooks(model: torch.nn.Module) -> bool:
    return not any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in model.modules()
    )


# ---- distributions at their defaults: never empty on a confident image ----------------------------------------


def confident_scenes(served: tuple[LafamHandler, FakeContext], count: int) -> list[bytes]:
    """Single-object demo scenes the model classifies correctly with probability ≥ 0.9."""
    rng, found = np.random.default_rng(60_000), []
    while len(found) < count:
        scene = generate_scene(rng, 128, 1)
        buffer = io.BytesIO()
        Image.fromarray(scene.image).save(buffer, format="PNG")
        status, body = handle(served, [buffer.getvalue()], [{}])[0]
        top = body["predictions"][0]
        if status == 200 and top["index"] == scene.labels[0] and top["probability"] >= 0.9:
            found.append(buffer.getvalue())
    return found


@pytest.mark.parametrize(
    ("method", "base"),
    [
        ("distribution", "gradcam"),
        ("distribution", "input_x_gradient"),
        ("distribution", "lrp"),
        ("distribution_fast", "lrp"),
        ("distribution_fast", "input_x_gradient"),
    ],
)
def test_distributions_at_their_defaults_never_return_an_empty_map(served, method: str, base: str) -> None:
    for image in confident_scenes(served, 8):
        status, body = explain_one(served, image, method=method, base=base, format="array")
        assert status == 200, body
        explanation = body["explanation"]
        assert explanation["normalize"] == "max"  # the default of every base, echoed
        # The most likely class is explained; a runner-up of a one-object scene may rightly keep nothing.
        top = explanation["classes"][0]
        assert top["index"] == body["predictions"][0]["index"]
        assert top["empty"] is False
        assert top["max_abs"] > 0


def test_an_empty_map_says_so(served) -> None:
    image = confident_scenes(served, 1)[0]
    status, body = explain_one(served, image, method="distribution", base="lrp", normalize="none", format="array")
    assert status == 200, body
    entry = body["explanation"]["classes"][0]
    assert entry["empty"] is True  # the reference formula on raw LRP relevance: uniform softmax, nothing > τ
    assert entry["max_abs"] == 0.0


def test_bad_normalize_is_400(served, scene_png: bytes) -> None:
    status, body = explain_one(served, scene_png, method="distribution", normalize="peak")
    assert status == 400
    assert body["error"]["option"] == "normalize"
    assert body["error"]["valid"] == ["max", "none"]


# ---- every method, both formats ----------------------------------------------------------------------------------


def check_map(entry: dict[str, Any], fmt: str, size: list[int], native: list[int]) -> None:
    assert entry["max_abs"] >= 0.0
    if fmt == "png":
        pixels = decode_png(entry["data"])
        assert pixels.shape == tuple(size)
        assert pixels.dtype == np.uint8
    else:
        values = np.asarray(entry["data"])
        assert values.shape == tuple(native)
        assert np.abs(values).max() <= 1.0
        if entry["max_abs"] > 0:
            assert np.abs(values).max() == 1.0  # divided by max_abs


@pytest.mark.parametrize("fmt", ["png", "array"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_answers_with_the_documented_schema(served, scene_png: bytes, method: str, fmt: str) -> None:
    status, body = explain_one(served, scene_png, method=method, format=fmt, top_k="6")
    assert status == 200, body
    assert body["model"] == "shapes"
    predictions = body["predictions"]
    assert len(predictions) == len(LABELS)
    explanation = body["explanation"]
    assert explanation["method"] == method
    assert explanation["format"] == fmt
    assert explanation["size"] == [128, 128]
    assert explanation["upsample"] == "nearest"
    native = explanation["native_size"]
    if method in ("lafam", "lrp"):
        assert explanation["layer"] == served[0].service.manifest.layer_names[0]
    if method == "lafam":
        assert "scale" not in explanation
        assert "max_abs" not in explanation
        return
    assert explanation["scale"] == "signed"
    if method == "lrp":
        assert "classes" not in explanation
        assert native == [128, 128]
        check_map(explanation, fmt, [128, 128], native)
        return
    assert "data" not in explanation
    classes = explanation["classes"]
    top = [p["index"] for p in predictions]
    shown = 2 if method == "distribution" else 1
    assert [c["index"] for c in classes] == top[:shown]  # the explained classes are the top predictions
    for entry, prediction in zip(classes, predictions, strict=False):
        assert set(entry) == {"index", "label", "probability", "empty", "data", "max_abs"}
        assert entry["empty"] is (entry["max_abs"] == 0.0)
        assert entry["label"] == LABELS[entry["index"]] == prediction["label"]
        assert entry["probability"] == prediction["probability"]
        check_map(entry, fmt, [128, 128], native)
    default_layer = served[0].service.manifest.layer_names[0]
    input_level = method in ("lrp_class", "input_x_gradient")
    assert explanation["layer"] == (None if input_level else default_layer)  # input-level: no layer
    if method in ("distribution", "distribution_fast"):
        assert explanation["base"] == ("gradcam" if method == "distribution" else "lrp")
        assert (explanation["temperature"], explanation["tau"]) == (10.0, 0.01)
        assert explanation["normalize"] == "max"  # the default of every base
        least = predictions[-1]["index"]
        assert explanation["competitors"] == [*top[:2], least]  # top-2 + the least likely, which gets no map
        assert least not in [c["index"] for c in classes]
    else:
        assert "competitors" not in explanation


def test_explicit_classes_are_explained_in_order(served, scene_png: bytes) -> None:
    status, body = explain_one(served, scene_png, method="gradcam", classes="4,1", format="array")
    assert status == 200, body
    assert [c["index"] for c in body["explanation"]["classes"]] == [4, 1]
    status, body = explain_one(served, scene_png, method="distribution", classes="2,5,0", least_likely="false")
    assert status == 200, body
    assert [c["index"] for c in body["explanation"]["classes"]] == [2, 5, 0]
    assert body["explanation"]["competitors"] == [2, 5, 0]


@pytest.mark.parametrize(("size", "expected"), [("original", (48, 80)), ("64x32", (64, 32)), ("input", (128, 128))])
def test_png_maps_have_the_requested_size(served, size: str, expected: tuple[int, int]) -> None:
    image = image_of((80, 48))  # (W, H)
    for method in ("lrp", "gradcam", "distribution_fast"):
        status, body = explain_one(served, image, method=method, size=size)
        assert status == 200, body
        explanation = body["explanation"]
        assert explanation["size"] == list(expected)
        data = explanation["data"] if method == "lrp" else explanation["classes"][0]["data"]
        assert decode_png(data).shape == expected


# ---- errors ----------------------------------------------------------------------------------------------------


def test_backward_methods_are_refused_on_predictions(served, scene_png: bytes) -> None:
    status, body = handle(served, [scene_png], [{"X-LaFAM-Method": "lrp"}])[0]
    assert status == 400
    assert body["error"]["option"] == "method"
    assert "/explanations" in body["error"]["message"]
    status, body = handle(served, [scene_png], [{}])[0]
    assert status == 200
    assert body["explanation"]["method"] == "lafam"  # /predictions default


def test_unknown_method_lists_the_valid_ones(served, scene_png: bytes) -> None:
    status, body = explain_one(served, scene_png, method="shap")
    assert status == 400
    assert body["error"]["valid"] == list(METHODS)
    assert (
        "lrp, lrp_class, gradcam, input_x_gradient, distribution, distribution_fast, lafam" in body["error"]["message"]
    )


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"method": "gradcam", "classes": "6"}, "classes"),  # 6 classes: 0..5
        ({"method": "lrp_class", "classes": "1,1"}, "classes"),
        ({"method": "gradcam", "top_classes": "7"}, "top_classes"),
        ({"method": "distribution", "top_classes": "6"}, "top_classes"),  # + the least likely = 7 > 6
        ({"method": "distribution", "temperature": "0"}, "temperature"),
        ({"method": "distribution_fast", "base": "gradcam"}, "base"),
    ],
)
def test_bad_class_options_are_400(served, scene_png: bytes, options: dict[str, str], option: str) -> None:
    status, body = explain_one(served, scene_png, **options)
    assert status == 400, body
    assert body["error"]["option"] == option


def test_k_above_max_classes_is_400_for_costly_methods(exported: Path, scene_png: bytes) -> None:
    context = FakeContext(str(exported), model_yaml_config={"lafam": {"max_classes": 2}})
    handler = LafamHandler()
    handler.initialize(context)
    status, body = explain_one((handler, context), scene_png, method="lrp_class", classes="0,1,2")
    assert status == 400
    assert "at most 2" in body["error"]["message"]
    status, body = explain_one((handler, context), scene_png, method="distribution", base="lrp", top_classes="2")
    assert status == 400  # K = 2 + the least likely
    assert body["error"]["option"] == "top_classes"
    status, body = explain_one((handler, context), scene_png, method="distribution", base="lrp")
    assert status == 200  # the default top-2 shrinks to fit the cap: top-1 + the least likely
    assert len(body["explanation"]["competitors"]) == 2
    status, _ = explain_one((handler, context), scene_png, method="gradcam", classes="0,1,2")
    assert status == 200  # Grad-CAM costs one pass whatever K


def test_one_bad_request_fails_alone(served, scene_png: bytes) -> None:
    headers = [
        {"explain": "True", "X-LaFAM-Method": "distribution"},
        {"explain": "True", "X-LaFAM-Method": "gradcam", "X-LaFAM-Classes": "9"},
        {"explain": "True", "X-LaFAM-Method": "lrp_class", "X-LaFAM-Format": "array"},
    ]
    replies = handle(served, [scene_png] * 3, headers)
    assert [status for status, _ in replies] == [200, 400, 200]
    assert replies[0][1]["explanation"]["method"] == "distribution"
    assert replies[2][1]["explanation"]["method"] == "lrp_class"
    assert replies[1][1]["error"]["option"] == "classes"


def test_without_the_eager_model_only_lafam_is_served(exported: Path, scene_png: bytes) -> None:
    context = FakeContext(str(exported), model_yaml_config={"lafam": {"eager": False}})
    handler = LafamHandler()
    handler.initialize(context)
    assert handler.service.engines is None
    assert handler.service.explain_methods == ("lafam",)
    status, body = explain_one((handler, context), scene_png, method="lrp")
    assert status == 400
    assert body["error"]["valid"] == ["lafam"]
    assert "--eager" in body["error"]["message"]
    assert explain_one((handler, context), scene_png)[0] == 200


# ---- metrics and the served model -------------------------------------------------------------------------------


def test_explanation_metrics_are_labelled_by_method(served, scene_png: bytes) -> None:
    before = sample("lafam_explanation_seconds_count", model="shapes", method="distribution")
    counted = sample("lafam_explanations_total", model="shapes", method="distribution")
    assert explain_one(served, scene_png, method="distribution")[0] == 200
    assert sample("lafam_explanation_seconds_count", model="shapes", method="distribution") == before + 1
    assert sample("lafam_explanations_total", model="shapes", method="distribution") == counted + 1


def test_serving_leaves_the_eager_model_bit_identical(served, scene_png: bytes) -> None:
    model = served[0].service.engines.model
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    for method in BACKWARD:
        for fmt in ("png", "array"):
            assert explain_one(served, scene_png, method=method, format=fmt)[0] == 200
    assert explain_one(served, scene_png, method="distribution", base="lrp")[0] == 200
    assert explain_one(served, scene_png, method="distribution", base="input_x_gradient")[0] == 200
    assert explain_one(served, scene_png, method="distribution_fast", base="input_x_gradient")[0] == 200
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert no_hooks(model)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


# ---- the export side -------------------------------------------------------------------------------------------


def test_manifest_describes_the_eager_model(exported: Path) -> None:
    manifest = Manifest.load(exported)
    eager = manifest.eager
    assert eager is not None
    assert (eager.architecture, eager.state_dict, eager.code, eager.head) == (
        "demo.model:shapes_cnn",
        "eager.pt",
        "eager_code",
        None,
    )
    assert {"eager.pt", "eager_code/demo/model.py"} <= set(manifest.checksums)
    assert (exported / "eager_code" / "demo" / "model.py").read_bytes() == (DEMO / "model.py").read_bytes()


def test_archive_without_the_eager_model(exported: Path, tmp_path: Path) -> None:
    mar = build_archive(exported, tmp_path, name="shapes-lean", config=model_config(), eager=False)
    with zipfile.ZipFile(mar) as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read("lafam.json"))
    assert manifest["eager"] is None
    assert not any(name.startswith("eager_code/") or name == "eager.pt" for name in names)
    assert not any(name.startswith("eager") for name in manifest["checksums"])
    full = build_archive(exported, tmp_path, name="shapes-full", config=model_config())
    with zipfile.ZipFile(full) as archive:
        assert {"eager.pt", "eager_code/demo/model.py"} <= set(archive.namelist())
        assert json.loads(archive.read("lafam.json"))["eager"]["state_dict"] == "eager.pt"


def test_torchvision_embedding_eager_model_rebuilds(tmp_path: Path) -> None:
    folder = export_model(
        "resnet18",
        tmp_path,
        backends=("torchscript",),
        task="embedding",
        input_size=(64, 64),
        eager=True,
        log=lambda _: None,
    )["torchscript"]
    manifest = Manifest.load(folder)
    assert manifest.eager is not None
    assert (manifest.eager.architecture, manifest.eager.head, manifest.eager.code) == ("resnet18", "fc", None)
    assert not (folder / "eager_code").exists()
    model = load_eager(manifest.eager, folder)
    graph = torch.jit.load(str(folder / manifest.model_file))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager_out = model(x)
        graph_out = graph(x)[0]
    assert eager_out.shape == (2, 512)
    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Identity()
    reference.load_state_dict(torch.load(folder / "eager.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(eager_out, reference.eval()(x))  # same code, same weights: bit-identical
    # The graph is verified against the same weights at the export's tolerance (1e-4 relative).
    torch.testing.assert_close(eager_out, graph_out, rtol=0.0, atol=1e-4 * float(graph_out.abs().max()))


def test_tampered_eager_weights_fail_the_checksum(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in exported.rglob("*"):
        if path.is_file():
            target = copy / path.relative_to(exported)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    Manifest.load(copy)
    weights = copy / "eager.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"checksum mismatch for eager\.pt"):
        Manifest.load(copy)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", BACKWARD)
def test_gpu_worker_explains_on_the_assigned_device(
    exported: Path, served: tuple[LafamHandler, FakeContext], scene_png: bytes, method: str
) -> None:
    context = FakeContext(str(exported), gpu_id=0)
    handler = LafamHandler()
    handler.initialize(context)
    assert next(handler.service.engines.model.parameters()).device == torch.device("cuda:0")
    status, on_gpu = explain_one((handler, context), scene_png, method=method, format="array")
    assert status == 200, on_gpu
    _, on_cpu = explain_one(served, scene_png, method=method, format="array")
    gpu, cpu = on_gpu["explanation"], on_cpu["explanation"]
    gpu_maps = [c["data"] for c in gpu["classes"]] if "classes" in gpu else [gpu["data"]]
    cpu_maps = [c["data"] for c in cpu["classes"]] if "classes" in cpu else [cpu["data"]]
    # maps are divided by their max |value|; CUDA kernels differ from the CPU's in the last bits (TF32 off)
    np.testing.assert_allclose(np.asarray(gpu_maps), np.asarray(cpu_maps), atol=2e-3)
