"""The explainer registry: well-formed entries that options, service, encoder and evaluation all derive from.

A toy method registered here (and nowhere else) is validated by the options and served end to end by
``LafamService``; a model LRP refuses keeps ``lrp`` listed and answers it with a 400 giving the engine's
reason; the static decisions (LRP, Grad-CAM's closed form) are taken once, at worker start.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

import handlers.explain.gradients as gradients
import handlers.methods.engines as engines_module
from evaluation.runner import GRID_PAIRS, METHODS, grid_pairs, variants
from handlers.backends import load_backend
from handlers.errors import InvalidOption
from handlers.manifest import Manifest
from handlers.methods import ContractError, Endpoint, Engines, Explanation, Inputs, Method, Need, registry
from handlers.methods.bases import BASES
from handlers.options import OPTION_NAMES, RequestOptions, parse_options
from handlers.service import LafamService, Request

from .conftest import TinyNet, image_bytes

METHODS_DIR = Path(registry.__file__).parent


# ---- toy methods, registered by the tests only -----------------------------------------------------------------


class Saliency(Method):
    """|∂y_c/∂x| summed over colour channels (Simonyan et al., arXiv:1312.6034): a toy backward method."""

    name = "toy_saliency"
    title = "toy saliency"
    endpoint = Endpoint.BACKWARD
    needs = frozenset({Need.EAGER, Need.CLASSES})
    reads = ("classes", "top_classes")

    def explain(self, inputs: Inputs) -> Explanation:
        engines = inputs.require_engines()
        x = inputs.as_batch().requires_grad_(True)
        with torch.enable_grad():
            logits = engines.model(x)[0]
            chosen = logits[0, list(inputs.classes or ())].sum()
            (grads,) = torch.autograd.grad(chosen, x)
        maps = grads.abs().sum(1).expand(len(inputs.classes or ()), -1, -1)
        return Explanation(maps.detach(), inputs.classes, extras={"toy": True})


class Peak(Method):
    """Channel maximum of the graph's activations, scaled to [0, 1]: a toy forward method."""

    name = "toy_peak"
    title = "toy peak"
    endpoint = Endpoint.FORWARD
    needs = frozenset()
    reads = ("layer",)
    signed = False

    def explain(self, inputs: Inputs) -> Explanation:
        peak = inputs.activations[inputs.options.layer].float().amax(0)
        return Explanation((peak / peak.max().clamp_min(1e-12))[None], layer=inputs.options.layer, signed=False)


class Broken(Saliency):
    """Breaks the contract: two maps for one class."""

    name = "toy_broken"

    def explain(self, inputs: Inputs) -> Explanation:
        return Explanation(torch.zeros(2, 3, 3), (0,))


class Unsigned(Saliency):
    """Declares signed maps, returns a [0, 1] map."""

    name = "toy_unsigned"

    def explain(self, inputs: Inputs) -> Explanation:
        return Explanation(torch.zeros(1, 3, 3), inputs.classes[:1] if inputs.classes else None, signed=False)


class Costly(Saliency):
    """Competes and costs one pass per class."""

    name = "toy_costly"
    competes = True
    default_classes = 2
    reads = ("classes", "top_classes", "least_likely")

    def cost_grows_with_k(self, base: str | None = None) -> bool:
        return True


@pytest.fixture
def toys() -> Iterator[None]:
    with registry.registered(Saliency()), registry.registered(Peak()):
        yield
    assert "toy_saliency" not in registry.names()


def service_for(folder: Path, max_classes: int = 10) -> LafamService:
    """The tiny export served with its eager model (TinyNet, same seed as ``write_export``)."""
    manifest = Manifest.load(folder)
    torch.manual_seed(0)
    model = TinyNet(manifest.num_outputs).eval()
    return LafamService(manifest, load_backend(manifest, folder), Engines(model, manifest), max_classes)


def ask(service: LafamService, *, explain: bool = True, **options: Any) -> tuple[int, dict[str, Any]]:
    headers = {f"x-lafam-{k.replace('_', '-')}": str(v) for k, v in options.items()}
    (reply,) = service.predict([Request({"body": image_bytes()}, headers, {}, explain=explain)])
    return reply.status, reply.body


# ---- every entry is well formed --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", registry.methods(), ids=registry.names())
def test_every_entry_is_well_formed(method: Method) -> None:
    registry.check(method)
    assert set(method.reads) <= set(OPTION_NAMES)
    assert set(method.bases) <= set(registry.bases())
    assert (METHODS_DIR / f"{method.name}.py").is_file()  # one file per method, named after it
    assert type(method).__doc__  # the formula and the paper
    assert registry.get(method.name) is method


def test_the_served_methods_and_their_order() -> None:
    assert registry.served() == (
        "lrp", "lrp_class", "gradcam", "input_x_gradient", "distribution", "distribution_fast", "lafam"
    )  # fmt: skip
    assert registry.served(explain=False) == ("lafam",)
    assert registry.bases() == tuple(BASES) == ("gradcam", "input_x_gradient", "lrp")


def test_declarations() -> None:
    get = registry.get
    assert [m.name for m in registry.methods(Endpoint.FORWARD)] == ["lafam"]
    assert not get("lafam").signed
    assert all(m.signed for m in registry.methods(Endpoint.BACKWARD))
    assert [m.name for m in registry.methods() if m.competes] == ["distribution", "distribution_fast"]
    assert {m.name: m.default_classes for m in registry.methods() if Need.CLASSES in m.needs} == {
        "lrp_class": 1,
        "gradcam": 1,
        "input_x_gradient": 1,
        "distribution": 2,
        "distribution_fast": 2,
    }
    assert get("lrp_class").cost_grows_with_k()
    assert not get("gradcam").cost_grows_with_k()
    assert not get("distribution").cost_grows_with_k("gradcam")
    assert get("distribution").cost_grows_with_k("input_x_gradient")
    assert get("distribution").cost_grows_with_k("lrp")
    assert not get("distribution_fast").cost_grows_with_k("lrp")
    assert Need.LRP in get("distribution").requires("lrp")
    assert Need.LRP not in get("distribution").requires("gradcam")
    assert get("distribution_fast").bases == ("lrp", "input_x_gradient")


class _Good(Method):
    """A well-formed method to break one declaration at a time."""

    name = "good"
    title = "good"
    endpoint = Endpoint.BACKWARD
    needs = frozenset({Need.EAGER, Need.CLASSES})
    reads: ClassVar[tuple[str, ...]] = ("classes",)

    def explain(self, inputs: Inputs) -> Explanation:
        raise NotImplementedError


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"name": "Bad-Name"}, ValueError, r"name must match"),
        ({"name": ""}, ValueError, r"name must match"),
        ({"endpoint": "backward"}, TypeError, r"endpoint must be an Endpoint"),
        ({"needs": {Need.EAGER}}, TypeError, r"needs must be a frozenset"),
        ({"needs": frozenset({Need.CLASSES})}, ValueError, r"backward methods, and only they, need Need.EAGER"),
        ({"endpoint": Endpoint.FORWARD}, ValueError, r"only they, need Need.EAGER"),
        ({"competes": True, "needs": frozenset({Need.EAGER})}, ValueError, r"compete needs Need.CLASSES"),
        ({"target_only": True, "needs": frozenset({Need.EAGER})}, ValueError, r"target_only needs Need.CLASSES"),
        ({"default_classes": 0}, ValueError, r"default_classes must be at least 1"),
        ({"default_classes": True}, TypeError, r"default_classes must be an int"),
        ({"bases": ("saliency",), "reads": ("base",)}, ValueError, r"unknown: \['saliency'\]"),
        ({"bases": ("lrp",)}, ValueError, r"reads 'base'"),
        ({"reads": ("base",)}, ValueError, r"reads 'base'"),
        ({"reads": "classes"}, TypeError, r"reads must be a tuple"),
        ({"signed": 1}, TypeError, r"signed must be a bool"),
    ],
)
def test_register_rejects_ill_formed_entries(changes: dict[str, Any], error: type[Exception], match: str) -> None:
    bad = type("Bad", (_Good,), changes)()
    with pytest.raises(error, match=match):
        registry.register(bad)
    assert "good" not in registry.names()


def test_register_rejects_duplicates_and_non_methods() -> None:
    with pytest.raises(ValueError, match=r"'lafam' is already registered"):
        registry.register(type("Again", (Peak,), {"name": "lafam"})())
    with pytest.raises(TypeError, match=r"register a Method instance"):
        registry.register(Peak)  # type: ignore[arg-type]  # the class, not an instance
    with pytest.raises(KeyError, match=r"no method 'shap'; registered: lafam, lrp"):
        registry.get("shap")
    with pytest.raises(KeyError):
        registry.unregister("shap")
    assert registry.find("shap") is None
    assert registry.find(3) is None


def test_an_explanation_keeps_its_contract() -> None:
    with pytest.raises(ContractError, match=r"float \(K, h, w\)"):
        Explanation(torch.zeros(4, 4))
    with pytest.raises(ContractError, match=r"float \(K, h, w\)"):
        Explanation(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ContractError, match=r"one map per class \(2 for classes=\(3, 7\)\), got 1"):
        Explanation(torch.zeros(1, 4, 4), (3, 7))
    with pytest.raises(ContractError, match=r"one map per class \(1 for classes=None\)"):
        Explanation(torch.zeros(2, 4, 4))
    with pytest.raises(ContractError):
        Explanation(torch.zeros(0, 4, 4), ())


# ---- options, service and evaluation derive from the registry ----------------------------------------------------


def _parse(manifest: Manifest, **body: Any) -> RequestOptions:
    return parse_options(manifest, body=body, methods=registry.served())


@pytest.mark.parametrize("method", [m for m in registry.methods() if Need.CLASSES in m.needs], ids=lambda m: m.name)
def test_options_follow_each_entry(tiny_export: Path, method: Method) -> None:
    manifest = Manifest.load(tiny_export)
    options = _parse(manifest, method=method.name)
    assert options.top_classes == method.default_classes
    assert options.num_classes == method.default_classes + method.competes
    if method.bases:
        assert options.base == method.bases[0]
        with pytest.raises(InvalidOption, match="valid values: " + ", ".join(method.bases)):
            _parse(manifest, method=method.name, base="nope")
    two = {"method": method.name, "classes": [0, 1]}
    if method.cost_grows_with_k(options.base if method.bases else None):
        with pytest.raises(InvalidOption, match=r"its cost grows with K"):
            parse_options(manifest, body=two, methods=registry.served(), max_classes=1)
    else:
        assert parse_options(manifest, body=two, methods=registry.served(), max_classes=1).classes == (0, 1)


def test_a_toy_method_appears_in_options_validation(toys: None, tiny_export: Path) -> None:
    manifest = Manifest.load(tiny_export)
    assert registry.served() == (
        "lrp", "lrp_class", "gradcam", "input_x_gradient", "distribution", "distribution_fast", "toy_saliency",
        "lafam", "toy_peak",
    )  # fmt: skip
    with pytest.raises(InvalidOption, match=r"valid values: .*toy_saliency, lafam, toy_peak") as info:
        _parse(manifest, method="shap")
    assert "toy_saliency" in info.value.details["valid"]
    assert _parse(manifest, method="toy_saliency").top_classes == 1
    with registry.registered(Costly()):
        options = _parse(manifest, method="toy_costly")
        assert (options.top_classes, options.num_classes) == (2, 3)  # competes: + the least likely
        with pytest.raises(InvalidOption, match=r"at most 2 \(K is capped at 2 for toy_costly"):
            parse_options(manifest, body={"method": "toy_costly", "classes": [0, 1, 2]}, methods=registry.served(),
                          max_classes=2)  # fmt: skip


def test_a_toy_method_is_served_end_to_end(toys: None, tiny_export: Path) -> None:
    service = service_for(tiny_export)
    assert "toy_saliency" in service.explain_methods
    assert service.predict_methods == ("lafam", "toy_peak")
    status, body = ask(service, method="toy_saliency", format="array", top_k=4)
    assert status == 200, body
    explanation = body["explanation"]
    assert (explanation["method"], explanation["scale"], explanation["toy"]) == ("toy_saliency", "signed", True)
    assert explanation["native_size"] == [32, 40]
    (entry,) = explanation["classes"]
    assert entry["index"] == body["predictions"][0]["index"]  # the most likely class, chosen by the service
    assert np.asarray(entry["data"]).shape == (32, 40)
    status, body = ask(service, method="toy_saliency", classes="3,1", format="png", size="20x10")
    assert status == 200, body
    assert [c["index"] for c in body["explanation"]["classes"]] == [3, 1]
    png = Image.open(io.BytesIO(base64.b64decode(body["explanation"]["classes"][0]["data"])))
    assert png.size == (10, 20)
    status, body = ask(service, explain=False, method="toy_saliency")
    assert status == 400
    assert "/explanations" in body["error"]["message"]
    for explain in (False, True):  # a forward method: both endpoints, from the graph's activations
        status, body = ask(service, explain=explain, method="toy_peak", format="array")
        assert status == 200, body
        assert "scale" not in body["explanation"]
        assert np.asarray(body["explanation"]["data"]).max() == 1.0


def test_a_method_that_breaks_the_contract_is_a_500_alone(tiny_export: Path) -> None:
    with registry.registered(Broken()), registry.registered(Unsigned()):
        service = service_for(tiny_export)
        requests = [
            Request({"body": image_bytes()}, {"x-lafam-method": method}, {}, explain=True)
            for method in ("toy_broken", "gradcam", "toy_unsigned")
        ]
        broken, fine, unsigned = service.predict(requests)
    assert broken.status == 500
    assert broken.body["error"]["code"] == "internal_error"
    assert fine.status == 200
    assert unsigned.status == 500  # its declaration must match what it returns


def test_the_service_and_evaluation_derive_their_lists(tiny_export: Path) -> None:
    service = service_for(tiny_export)
    assert service.explain_methods == registry.served(service.capabilities)
    assert service.predict_methods == registry.served(service.capabilities, explain=False)
    assert {m.options["method"] for m in METHODS} == set(registry.names())
    assert all(m.entry is registry.get(m.options["method"]) for m in METHODS)
    assert grid_pairs(METHODS) == GRID_PAIRS
    for alone, distribution in GRID_PAIRS:
        first = next(m for m in METHODS if m.name == distribution)
        assert first.competes
        assert BASES[first.options["base"]].method == next(m for m in METHODS if m.name == alone).options["method"]
    with registry.registered(Saliency()):
        assert "toy saliency" in [m.name for m in variants()]  # a new method is evaluated with no other edit
        assert next(m for m in variants() if m.name == "toy saliency").per_class


# ---- static decisions at worker start ---------------------------------------------------------------------------


def test_lrp_unavailable_is_a_400_that_gives_the_engine_reason(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reason = "module 'features.3' (MyOp) has no LRP rule; add one to the rule map"

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise ValueError(reason)

    monkeypatch.setattr("handlers.methods.engines.LRP", refuse)
    with caplog.at_level(logging.WARNING, logger="handlers.methods.engines"):
        service = service_for(tiny_export)
    warnings = [r.getMessage() for r in caplog.records if r.name == "handlers.methods.engines"]
    assert warnings == [f"LRP is off for tiny-classification: {reason}"]  # logged once, at start
    assert service.explain_methods[:2] == ("lrp", "lrp_class")  # still listed
    for method in ("lrp", "lrp_class"):
        status, body = ask(service, method=method)
        assert status == 400, body
        error = body["error"]
        assert (error["code"], error["option"]) == ("invalid_option", "method")
        assert f"method {method!r} is not available for model 'tiny-classification'" in error["message"]
        assert reason in error["message"]
        assert "lrp" not in error["valid"]
        assert "gradcam" in error["valid"]
    status, body = ask(service, method="distribution", base="lrp")
    assert status == 400, body
    assert body["error"]["option"] == "base"
    assert "base 'lrp' of method 'distribution' is not available" in body["error"]["message"]
    assert reason in body["error"]["message"]
    assert body["error"]["valid"] == ["gradcam", "input_x_gradient"]
    status, body = ask(service, method="distribution_fast", base="lrp")
    assert status == 400
    assert reason in body["error"]["message"]
    status, body = ask(service, method="distribution_fast")
    assert status == 200, body
    assert body["explanation"]["base"] == "input_x_gradient"  # the default falls back to a base that runs
    status, body = ask(service)
    assert status == 200
    assert body["explanation"]["method"] == "gradcam"  # the /explanations default: the first that runs
    assert len([r for r in caplog.records if r.name == "handlers.methods.engines"]) == 1  # not again per request


def test_static_decisions_are_made_once_at_start(tiny_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[object] = []
    real_lrp = engines_module.LRP

    def counting(*args: object, **kwargs: object) -> object:
        built.append(args)
        return real_lrp(*args, **kwargs)

    monkeypatch.setattr(engines_module, "LRP", counting)
    service = service_for(tiny_export)
    assert service.engines is not None
    cam = service.engines.gradcam("stage2")
    assert cam.closed_form is True  # TinyNet's head: mean over h, w then one Linear

    def no_trace(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the head was traced during a request")

    monkeypatch.setattr(gradients, "_trace_after", no_trace)
    runs_without_lrp = [
        {"method": "gradcam"},
        {"method": "distribution"},
        {"method": "distribution", "base": "input_x_gradient"},
        {"method": "distribution_fast", "base": "input_x_gradient"},
    ]
    for options in [*runs_without_lrp, *runs_without_lrp]:
        status, body = ask(service, **options)
        assert status == 200, body
    for method in ("lrp", "lrp_class"):  # whether or not LRP explains TinyNet, it is never rebuilt
        ask(service, method=method)
    assert len(built) == 1  # LRP built once, at start
    assert service.engines.gradcam("stage2") is cam


def test_options_without_capabilities_accept_every_registered_method(tiny_export: Path) -> None:
    manifest = Manifest.load(tiny_export)
    for name in registry.served():
        assert _parse(manifest, method=name).method == name
    assert dataclasses.fields(RequestOptions)[0].name == "method"
