"""The engines a worker builds once at start: LRP support, Grad-CAM's closed form, and what they offer."""

from __future__ import annotations

import torch
from torch import nn

from handlers.manifest import LayerSpec, Manifest
from handlers.methods import Engines, Need, capabilities, registry


class Cumsum(nn.Module):
    """An op no LRP rule covers: a running sum over channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=1)


class SkipNet(nn.Module):
    """Supported module types, but a forward that is not the chain of its children (a hidden skip)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return self.fc(self.flatten(self.pool(x + self.conv2(x))))


ALL_METHODS = ("lrp", "lrp_class", "gradcam", "input_x_gradient", "distribution", "distribution_fast", "lafam")


def _manifest(layer: str) -> Manifest:
    return Manifest(
        name="skip",
        task="classification",
        backend="onnx",
        model_file="model.onnx",
        input_size=(16, 16),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        main_output="logits",
        layers=(LayerSpec(layer, "act", (4, 16, 16)),),
        num_outputs=3,
    )


def test_a_model_lrp_cannot_follow_keeps_the_lrp_methods_listed_with_the_reason() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), Cumsum(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    engines = Engines(model.eval(), _manifest("0"))
    assert engines.lrp is None
    assert engines.lrp_error is not None
    assert "'1'" in engines.lrp_error  # the engine's reason names the module
    assert "Cumsum" in engines.lrp_error  # and its type
    offered = capabilities(engines.manifest, engines)
    assert Need.LRP not in offered.met
    assert engines.lrp_error in offered.missing[Need.LRP]
    # listed (a request gets a 400 with the reason, see test_registry), but only LRP's methods cannot run
    assert registry.served(offered) == ALL_METHODS
    runnable = [m for m in registry.served(offered) if offered.why_not(registry.get(m).needs) is None]
    assert runnable == ["gradcam", "input_x_gradient", "distribution", "distribution_fast", "lafam"]
    assert offered.why_not(registry.get("distribution").requires("lrp")) == offered.missing[Need.LRP]
    assert offered.why_not(registry.get("distribution").requires("input_x_gradient")) is None


def test_a_chain_model_offers_every_method() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    engines = Engines(model.eval(), _manifest("1"))
    offered = capabilities(engines.manifest, engines)
    assert engines.lrp is not None
    assert not offered.missing
    assert registry.served(offered) == ALL_METHODS
    assert all(offered.why_not(registry.get(m).needs) is None for m in registry.served(offered))


def test_gradcam_closed_form_is_decided_once_at_start() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    engines = Engines(model, _manifest("1"))
    cam = engines.gradcam("1")
    assert cam.closed_form is True  # GAP + linear head: decided at start
    assert cam is engines.gradcam("1")  # reused, not rebuilt per request
    skip = Engines(SkipNet().eval(), _manifest("conv1")).gradcam("conv1")
    assert skip.closed_form is False  # the hidden skip breaks logits == fc(mean A): autograd, decided once
