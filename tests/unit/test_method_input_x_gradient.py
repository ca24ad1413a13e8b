"""``input_x_gradient``: the served maps equal a plain autograd loop, one backward per class."""

from __future__ import annotations

import numpy as np
import torch

from handlers.images import open_image, to_tensor
from handlers.methods import registry

from .conftest import image_bytes
from .test_registry import ask, service_for


def test_declarations() -> None:
    method = registry.get("input_x_gradient")
    assert method.cost_grows_with_k()
    assert method.signed
    assert not method.competes
    assert "classes" in method.reads


def test_served_maps_equal_an_autograd_loop(tiny_export) -> None:
    service = service_for(tiny_export)
    status, body = ask(service, method="input_x_gradient", classes="2,0", format="array")
    assert status == 200, body
    explanation = body["explanation"]
    assert [entry["index"] for entry in explanation["classes"]] == [2, 0]
    manifest = service.manifest
    x = to_tensor(open_image(image_bytes(), 10**7), manifest.input_size, manifest.mean, manifest.std)[None]
    model = service.engines.model
    for entry in explanation["classes"]:
        inputs = x.clone().requires_grad_(True)
        logits = model(inputs)
        logits = logits[0] if isinstance(logits, tuple) else logits
        (grad,) = torch.autograd.grad(logits[0, entry["index"]], inputs)
        expected = (grad * x).sum(1)[0]
        got = np.asarray(entry["data"]) * entry["max_abs"]
        np.testing.assert_allclose(got, expected.numpy(), atol=2e-5 * float(expected.abs().max()))


def test_k_is_capped_as_its_cost_grows_with_k(tiny_export) -> None:
    service = service_for(tiny_export, max_classes=1)
    status, body = ask(service, method="input_x_gradient", classes="0,1")
    assert status == 400
    assert body["error"]["option"] == "classes"
