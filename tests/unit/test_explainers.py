"""BackwardExplainer offers only the methods the model supports, decided once at worker start."""

from __future__ import annotations

import torch
from torch import nn

from handlers.explainers import BackwardExplainer
from handlers.manifest import LayerSpec, Manifest


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


def test_a_model_lrp_cannot_follow_loses_only_the_lrp_methods() -> None:
    torch.manual_seed(0)
    explainer = BackwardExplainer(SkipNet().eval(), _manifest("conv2"))
    assert explainer.lrp is None
    assert explainer.methods == ("gradcam", "distribution", "distribution_fast")
    assert explainer.bases == ("gradcam", "input_x_gradient")


def test_a_chain_model_offers_every_method() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    explainer = BackwardExplainer(model.eval(), _manifest("1"))
    assert explainer.methods == ("lrp", "lrp_class", "gradcam", "distribution", "distribution_fast")
