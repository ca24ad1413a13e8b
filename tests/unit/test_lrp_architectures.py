"""LRP on every torchvision convolutional family and on a user's own module: builds, conserves, leaves it alone.

Random weights, with batch norms calibrated on random images (``reset_running_stats`` + one train-mode
forward) so that activations have ordinary scales, and every bias and batch-norm shift set to zero, so
that the rules conserve relevance exactly up to what LRP-z⁺ loses at outputs without a positive
contribution (stated per family below).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from benchmarks._models import calibrate_batch_norms, without_biases
from export.models import find_default_layer
from handlers.explain.lrp import LRP

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = {
    # name: (input side, relative conservation tolerance for one class and label-free at the default layer)
    "alexnet": (64, 1e-3),
    "vgg11": (32, 1e-3),
    "vgg11_bn": (32, 1e-3),
    "resnet18": (64, 1e-3),
    "resnext50_32x4d": (64, 1e-3),
    "wide_resnet50_2": (64, 1e-3),
    "squeezenet1_1": (64, 1e-3),
    "googlenet": (64, 1e-3),
    "inception_v3": (96, 1e-3),
    "densenet121": (64, 1e-3),
    "mobilenet_v2": (64, 1e-3),
    # LRP-z⁺ loses the relevance that reaches an output with no positive contribution (a 1×1 projection
    # of a few ReLU-sparse channels, no ReLU after it): measured 1-7 % at 224 px.
    "mobilenet_v3_small": (64, 0.1),
    "mnasnet0_5": (64, 0.1),
    "shufflenet_v2_x0_5": (64, 1e-3),
    "efficientnet_b0": (64, 1e-3),
    "efficientnet_v2_s": (64, 1e-3),  # its 40 residual blocks need damped branches (see ``build``)
    "regnet_x_400mf": (64, 1e-3),
    "regnet_y_400mf": (64, 1e-3),
    "convnext_tiny": (64, 1e-3),
}


def calibrated(model: nn.Module, side: int) -> nn.Module:
    """Batch norms set to the statistics of random images, then every bias and shift set to zero."""
    return without_biases(calibrate_batch_norms(model, side))


def build(name: str, side: int) -> nn.Module:
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = calibrated(getattr(torchvision.models, name)(weights=None, num_classes=10, **extra), side)
    if name == "efficientnet_v2_s":
        # Uncentred (zero-shift) activations grow ×10 per stage over 40 residual blocks, to where float32
        # rounding alone moves the logits by half; 0.9 × every batch-norm scale keeps them in range.
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.mul_(0.9)
    return model


def conserved(result, tolerance: float) -> None:
    total = result.maps.flatten(1).sum(1)
    torch.testing.assert_close(total, result.seed, rtol=tolerance, atol=tolerance * float(result.seed.abs().max()))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_torchvision_family(name):
    side, tolerance = FAMILIES[name]
    model = build(name, side)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layer = find_default_layer(model, (side, side))
    lrp = LRP(model)
    assert layer in lrp.layers
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2))
    one = lrp.relevance(x, classes=torch.tensor([3, 7]))
    free = lrp.relevance(x, layer=layer)
    for result in (one, free):
        assert result.maps.shape == (2, side, side)
        assert bool(result.maps.isfinite().all())
        assert float(result.maps.abs().max()) > 0
        conserved(result, tolerance)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class Gate(nn.Module):
    """Squeeze-excitation with a Hardsigmoid gate: ``x * gate(x)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 2, 1)
        self.fc2 = nn.Conv2d(channels // 2, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.silu(self.fc1(g))))


class Stage(nn.Module):
    """conv → LayerNorm (channels last) → GELU, a split branch with Hardswish, cat, shuffle, SE, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.LayerNorm(channels)
        self.act = nn.GELU()
        self.branch = nn.Conv2d(channels // 2, channels // 2, 3, padding=1, groups=channels // 2)
        self.swish = nn.Hardswish()
        self.se = Gate(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 3, 1)
        y = self.act(self.norm(y)).permute(0, 3, 1, 2)
        left, right = y.chunk(2, dim=1)
        y = torch.cat([left, self.swish(self.branch(right))], dim=1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return x + self.se(y)


class UserNet(nn.Module):
    """A user's own module: stages in a ModuleDict looped over in forward, functional ops, max-pooled head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stages = nn.ModuleDict({"a": Stage(8), "b": Stage(8)})
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for stage in self.stages.values():
            x = stage(x)
        return self.head(torch.flatten(self.pool(x), 1))


def test_a_users_own_module():
    torch.manual_seed(0)
    model = calibrated(UserNet(), 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lrp = LRP(model)
    assert {"stem", "stages.a", "stages.b", "stages.b.se", "pool"} <= set(lrp.layers)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for result in (lrp.relevance(x, classes=torch.tensor([0, 2, 4])), lrp.relevance(x, layer="stages.b")):
        assert result.maps.shape == (3, 32, 32)
        assert bool(result.maps.isfinite().all())
        # The LayerNorm and ZPlus lose a little (its centring moves relevance between signs; z⁺ = 0 outputs).
        conserved(result, 0.05)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    for m in model.modules():
        assert not m._forward_hooks
        assert not m._forward_pre_hooks
        assert not m._backward_hooks


def family_or_user(name: str) -> tuple[nn.Module, int]:
    if name == "user":
        torch.manual_seed(0)
        return calibrated(UserNet(), 32), 32
    return build(name, 64), 64


@pytest.mark.parametrize("name", ["user", "efficientnet_b0", "convnext_tiny", "shufflenet_v2_x0_5", "densenet121"])
def test_classes_in_one_tiled_pass_equal_one_class_per_pass(name):
    """Every rule's saved state tiles along the batch (K seeds per image in one pass), as on a GPU."""
    model, side = family_or_user(name)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([[0, 3, 1], [4, 2, 0]])
    one = LRP(model, chunk_size=1).relevance(x, classes=classes)
    tiled = LRP(model, chunk_size=3).relevance(x, classes=classes)
    torch.testing.assert_close(tiled.maps, one.maps, rtol=0.0, atol=1e-5 * float(one.maps.abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["user", "resnet18", "efficientnet_b0", "convnext_tiny", "inception_v3"])
def test_same_maps_on_the_gpu(name):
    """On cuda:0 (8 classes per pass by default) the maps are the CPU's, to float32 reordering."""
    model, side = family_or_user(name)
    side = 96 if name == "inception_v3" else side
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(5))
    classes = torch.tensor([[0, 3, 1], [4, 2, 0]])
    cpu = LRP(model).relevance(x, classes=classes).maps
    layer = find_default_layer(model, (side, side))
    cpu_free = LRP(model).label_free(x, layer)
    gpu_model = model.to("cuda:0")
    lrp = LRP(gpu_model)
    gpu = lrp.relevance(x.to("cuda:0"), classes=classes.to("cuda:0")).maps
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0.0, atol=1e-4 * float(cpu.abs().max()))
    gpu_free = lrp.label_free(x.to("cuda:0"), layer).cpu()
    torch.testing.assert_close(gpu_free, cpu_free, rtol=0.0, atol=1e-4 * float(cpu_free.abs().max()))
