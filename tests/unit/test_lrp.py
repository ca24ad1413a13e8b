"""LRP: each rule re-derived in matrix form, conservation, zennit 0.5.1 equivalence, model left untouched."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from handlers.explain.lrp import (
    LRP,
    Epsilon,
    Flat,
    Gamma,
    Norm,
    Op,
    Pass,
    Route,
    Unsupported,
    ZBox,
    ZPlus,
    default_rules,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPS = 1e-6
IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
WEIGHTS = Path(__file__).resolve().parents[2] / "demo" / "weights" / "shapes_cnn.pt"


def randomize_bn(model: nn.Module, seed: int = 0, *, zero_shift: bool = False) -> nn.Module:
    """Random positive running stats (so folding errors show); ``zero_shift`` makes every folded bias 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=gen) * 0.5 + 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                if zero_shift:
                    module.running_mean.zero_()
                    module.bias.zero_()
    return model.eval()


def small_vgg11_bn() -> nn.Module:
    """VGG-11-BN with a smaller head (the stock one is 120M parameters, slow to deep-copy for zennit)."""
    model = torchvision.models.vgg11_bn(weights=None)
    model.avgpool = nn.AdaptiveAvgPool2d(2)
    model.classifier = nn.Sequential(
        nn.Linear(2048, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 10),
    )
    return randomize_bn(model)


def small_net(*, bias: bool = True) -> nn.Module:
    """A plain sequential conv net with every supported layer type."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1, bias=bias),
        nn.BatchNorm2d(12),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2),
        nn.Conv2d(12, 16, 3, stride=2, padding=1, bias=bias),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(16, 5, bias=bias),
    )


def zennit_lrp(model: nn.Module, x: torch.Tensor, seed, canonizers, first: str = "zbox") -> torch.Tensor:
    """zennit 0.5.1 with our rules, on its own deep copy of ``model``; ``seed(output) -> relevance``."""
    from zennit.attribution import Gradient
    from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import Epsilon, Flat, ZBox, ZPlus
    from zennit.types import Convolution

    first_rule = (
        Flat() if first == "flat" else ZBox((0 - IMAGENET_MEAN) / IMAGENET_STD, (1 - IMAGENET_MEAN) / IMAGENET_STD)
    )
    composite = SpecialFirstLayerMapComposite(
        layer_map=[*layer_map_base(), (Convolution, ZPlus()), (nn.Linear, Epsilon(EPS))],
        first_map=[(Convolution, first_rule)],
        canonizers=canonizers,
    )
    with Gradient(model=copy.deepcopy(model), composite=composite) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), seed)
    return relevance.sum(1).detach()


def class_seed(classes: torch.Tensor):
    return lambda out: torch.zeros_like(out).scatter_(1, classes[:, None], out.gather(1, classes[:, None]))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


# --- each rule, re-derived in matrix form --------------------------------------------------------------------


def conv_matrix(conv: nn.Conv2d, shape: tuple[int, int, int]) -> torch.Tensor:
    """Dense ``(out, in)`` matrix of the (bias-free) convolution on inputs of ``shape``, by basis vectors."""
    n_in = int(np.prod(shape))
    basis = torch.eye(n_in, dtype=torch.float64).view(n_in, *shape)
    with torch.no_grad():
        out = nn.functional.conv2d(basis, conv.weight.double(), None, conv.stride, conv.padding)
    return out.flatten(1).T


def make_conv(seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
        conv.bias.copy_(torch.tensor([0.3, -0.2, 0.0]))
    return conv


def apply_rule(rule, module: nn.Module, x: torch.Tensor, r: torch.Tensor | None = None, *, nonnegative=False):
    """Run one rule on one module outside any model: ``(output, input relevance)`` for output relevance ``r``."""
    op = Op("node", "call_module", "m", "module 'm'", module, module, 1, lambda args, kwargs: [args[0]], (nonnegative,))
    rule.setup(op)
    with torch.no_grad():
        y, saved = rule.forward(op, (x,), {})
        r = torch.rand_like(y) if r is None else r
        return y, r, rule.relevance(op, r.clone(), saved)[0]  # a rule owns (may overwrite) its relevance


def slow_rule(z: torch.Tensor, denominator: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """R_i = sum_j z_ij / stab(d_j) R_j with explicit loops over outputs (float64)."""
    out = torch.zeros(z.shape[1], dtype=torch.float64)
    for j in range(z.shape[0]):
        d = denominator[j] + (EPS if denominator[j] >= 0 else -EPS)
        out += z[j] * r[j] / d
    return out


@pytest.mark.parametrize("signed_input", [False, True])
def test_zplus_matches_matrix_form(signed_input):
    conv = make_conv()
    x = torch.rand(1, 2, 5, 5) if not signed_input else torch.randn(1, 2, 5, 5)
    y, r, got = apply_rule(ZPlus(EPS), conv, x, nonnegative=not signed_input)
    m = conv_matrix(conv, (2, 5, 5))
    xf = x.double().flatten()
    b = conv.bias.detach().double().repeat_interleave(y.shape[-1] * y.shape[-2])
    z = xf.clamp(min=0) * m.clamp(min=0) + xf.clamp(max=0) * m.clamp(max=0)  # (out, in)
    expected = slow_rule(z, z.sum(1) + b.clamp(min=0), r.double().flatten())
    torch.testing.assert_close(got.double().flatten(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, conv(x), rtol=1e-5, atol=1e-6)


def test_gamma_matches_matrix_form():
    conv = make_conv(4)
    x = torch.randn(1, 2, 5, 5)
    _, r, got = apply_rule(Gamma(0.25, EPS), conv, x)
    m = conv_matrix(conv, (2, 5, 5))
    xf = x.double().flatten()
    b = conv.bias.detach().double().repeat_interleave(9)
    z = xf.clamp(min=0) * (m + 0.25 * m.clamp(min=0)) + xf.clamp(max=0) * (m + 0.25 * m.clamp(max=0))
    expected = slow_rule(z, z.sum(1) + b + 0.25 * b.clamp(min=0), r.double().flatten())
    torch.testing.assert_close(got.double().flatten(), expected, rtol=1e-5, atol=1e-6)


def test_zbox_matches_matrix_form():
    conv = make_conv(1)
    x = torch.rand(1, 2, 5, 5) * 3 - 1  # inside [low, high] = [-1, 2]
    _, r, got = apply_rule(ZBox(torch.full((2,), -1.0), torch.full((2,), 2.0), EPS), conv, x)
    m = conv_matrix(conv, (2, 5, 5))
    xf = x.double().flatten()
    low, high = torch.full_like(xf, -1), torch.full_like(xf, 2)
    z = xf * m - low * m.clamp(min=0) - high * m.clamp(max=0)  # biases cancel between the three terms
    expected = slow_rule(z, z.sum(1), r.double().flatten())
    torch.testing.assert_close(got.double().flatten(), expected, rtol=1e-5, atol=1e-6)


def test_flat_matches_matrix_form():
    conv = make_conv(2)
    x = torch.randn(2, 2, 5, 5)
    _, r, got = apply_rule(Flat(EPS), conv, x)
    z = (conv_matrix(conv, (2, 5, 5)) != 0).double()  # every weight 1 inside the receptive field
    for n in range(2):
        expected = slow_rule(z, z.sum(1), r[n].double().flatten())
        torch.testing.assert_close(got[n].double().flatten(), expected, rtol=1e-5, atol=1e-6)


def test_epsilon_linear_matches_matrix_form():
    torch.manual_seed(3)
    linear = nn.Linear(6, 4)
    with torch.no_grad():
        linear.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0]))
    x = torch.randn(1, 6)
    _, r, got = apply_rule(Epsilon(0.01), linear, x, torch.randn(1, 4))
    w, b = linear.weight.detach().double(), linear.bias.detach().double()
    z = x.double()[0] * w  # (out, in)
    expected = torch.zeros(6, dtype=torch.float64)
    for j in range(4):
        d = z[j].sum() + b[j]
        expected += z[j] * r[0, j] / (d + 0.01 * (1 if d >= 0 else -1))
    torch.testing.assert_close(got[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_depthwise_convolutions_run_epsilon_and_the_others_zplus():
    """x = (1, 3) under a 1x2 kernel (2, -1): y = -1. ε: R_x = x ⊙ w / y · R = (-2, 3)·R; z⁺: (1, 0)·R."""
    depthwise = nn.Conv2d(2, 2, (1, 2), groups=2, bias=False)
    dense = nn.Conv2d(1, 1, (1, 2), bias=False)
    with torch.no_grad():
        depthwise.weight.copy_(torch.tensor([2.0, -1.0]).view(1, 1, 1, 2).repeat(2, 1, 1, 1))
        dense.weight.copy_(torch.tensor([2.0, -1.0]).view(1, 1, 1, 2))
    rule = default_rules()[nn.Conv2d]
    x = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    _, _, got = apply_rule(rule, depthwise, x.repeat(1, 2, 1, 1), torch.ones(1, 2, 1, 1), nonnegative=True)
    torch.testing.assert_close(got[0, 0, 0], torch.tensor([-2.0, 3.0]), rtol=1e-5, atol=1e-5)
    _, _, got = apply_rule(default_rules()[nn.Conv2d], dense, x, torch.ones(1, 1, 1, 1), nonnegative=True)
    torch.testing.assert_close(got[0, 0, 0], torch.tensor([1.0, 0.0]), rtol=1e-5, atol=1e-5)


def test_avgpool_is_proportional_and_maxpool_is_winner_take_all():
    x = torch.rand(1, 1, 4, 4)
    y, r, got = apply_rule(Norm(EPS), nn.AvgPool2d(2), x)
    for i in range(4):
        for j in range(4):
            window = x[0, 0, i // 2 * 2 : i // 2 * 2 + 2, j // 2 * 2 : j // 2 * 2 + 2]
            expected = x[0, 0, i, j] / (window.sum() / 4 + EPS) / 4 * r[0, 0, i // 2, j // 2]
            torch.testing.assert_close(got[0, 0, i, j], expected, rtol=1e-5, atol=1e-7)
    y, r, got = apply_rule(Route(), nn.MaxPool2d(2), x, r)
    winners = x == nn.functional.interpolate(y, scale_factor=2)
    torch.testing.assert_close(got[winners], r.flatten())
    assert float(got[~winners].abs().max()) == 0.0


class Residual(nn.Module):
    """``relu(2x - 1 + x)``: the residual sum of a linear branch and the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Linear(1, 1)
        with torch.no_grad():
            self.branch.weight.fill_(2.0)
            self.branch.bias.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + x).flatten(1)


def test_residual_sum_splits_in_proportion():
    result = LRP(Residual()).relevance(torch.full((1, 1, 1, 1), 3.0), classes=torch.tensor([0]))
    # main 5, shortcut 3, y 8: main gets 5/8 * 8 = 5 → Epsilon with bias -1: 6/5 * 5 = 6; shortcut gets 3;
    # total 9 (the bias absorbed -1).
    torch.testing.assert_close(result.maps.sum(), torch.tensor(9.0), rtol=1e-5, atol=1e-5)


# --- conservation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_rule", ["zbox", "flat"])
def test_conservation_sequential(first_rule):
    model = randomize_bn(small_net(bias=False), zero_shift=True)
    lrp = LRP(model, first_rule=first_rule)
    x = torch.randn(3, 3, 32, 32).clamp(-2.0, 2.0)
    for result in (lrp.relevance(x, layer="6"), lrp.relevance(x, layer="9")):
        assert torch.all(result.seed > 0)
        torch.testing.assert_close(result.maps.sum((1, 2)), result.seed, rtol=1e-4, atol=1e-5)
    result = lrp.relevance(x, classes=torch.tensor([0, 2, 4]))
    torch.testing.assert_close(result.maps.sum((1, 2)), result.seed, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_conservation_resnet_no_doubling(arch):
    model = randomize_bn(getattr(torchvision.models, arch)(weights=None), zero_shift=True)
    model.fc.bias.data.zero_()
    lrp = LRP(model, first_rule="flat")
    x = torch.randn(2, 3, 32, 32)
    for layer in ("layer1", "layer2.1", "layer4"):
        result = lrp.relevance(x, layer=layer)
        # Relevance that meets a z+ = 0 (negative share of a residual sum) is lost: tolerance 1%.
        torch.testing.assert_close(result.maps.sum((1, 2)), result.seed, rtol=1e-2, atol=1e-5)
    result = lrp.relevance(x, classes=torch.tensor([1, 5]))
    torch.testing.assert_close(result.maps.sum((1, 2)), result.seed, rtol=2e-2, atol=1e-4)


# --- zennit 0.5.1 as the reference ------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "side"), [("resnet18", 64), ("resnet50", 32)])
def test_matches_zennit_resnet(arch, side):
    from zennit.torchvision import ResNetCanonizer

    model = randomize_bn(getattr(torchvision.models, arch)(weights=None))
    x = torch.randn(2, 3, side, side)
    lrp = LRP(model)
    classes = torch.tensor([3, 7])
    ref = zennit_lrp(model, x, class_seed(classes), [ResNetCanonizer()])
    assert rel_err(lrp.for_classes(x, classes), ref) < 1e-3
    trunk = nn.Sequential(*list(model.children())[:-2])  # conv1 … layer4, the same module objects
    ref = zennit_lrp(trunk, x, lambda out: out, [ResNetCanonizer()])
    assert rel_err(lrp.label_free(x, "layer4"), ref) < 1e-3


@pytest.mark.parametrize("small", [0, 10**9])
def test_channels_first_and_channels_last_convolutions_agree(monkeypatch, small):
    """Small outputs run channels-first, the rest channels-last: forcing either everywhere changes nothing."""
    from handlers.explain.lrp.rules import _Layer

    model = randomize_bn(torchvision.models.resnet18(weights=None))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([[3, 7], [1, 2]])
    mixed = LRP(model).relevance(x, classes=classes).maps
    monkeypatch.setattr(_Layer, "SMALL", small)
    forced = LRP(model).relevance(x, classes=classes).maps
    # oneDNN's channels-first and channels-last kernels round differently; random batch norms amplify it.
    assert rel_err(forced, mixed) < 1e-3
    assert corr(forced, mixed) > 0.99999


def test_matches_zennit_vgg11_bn():
    from zennit.canonizers import SequentialMergeBatchNorm

    torch.manual_seed(0)  # the tolerances below hold for this draw; some draws put a denominator nearer 0
    model = small_vgg11_bn()
    x = torch.randn(2, 3, 64, 64)
    lrp = LRP(model)
    classes = torch.tensor([2, 9])
    ref = zennit_lrp(model, x, class_seed(classes), [SequentialMergeBatchNorm()])
    got = lrp.for_classes(x, classes)
    # Epsilon = 1e-6 over three random linear layers amplifies float32 rounding (memory layout, BN folding
    # order) where a denominator is near zero: measured max error 3e-5 of the max, correlation 0.9999999.
    assert rel_err(got, ref) < 1e-3
    assert corr(got, ref) > 0.99999
    ref = zennit_lrp(model.features, x, lambda out: out, [SequentialMergeBatchNorm()])
    assert rel_err(lrp.label_free(x, "features"), ref) < 1e-3


@pytest.mark.parametrize("first_rule", ["zbox", "flat"])
def test_matches_zennit_sequential(first_rule):
    from zennit.canonizers import SequentialMergeBatchNorm

    model = randomize_bn(small_net())
    x = torch.randn(2, 3, 32, 32)
    lrp = LRP(model, first_rule=first_rule)
    classes = torch.tensor([1, 4])
    ref = zennit_lrp(model, x, class_seed(classes), [SequentialMergeBatchNorm()], first_rule)
    assert rel_err(lrp.for_classes(x, classes), ref) < 1e-3
    ref = zennit_lrp(model[:7], x, lambda out: out, [SequentialMergeBatchNorm()], first_rule)
    assert rel_err(lrp.label_free(x, "6"), ref) < 1e-3


# --- batching, classes, the user's model -------------------------------------------------------------------------


def test_batched_equals_per_sample_and_k_classes_equal_single_calls():
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    lrp = LRP(model)
    x = torch.randn(3, 3, 32, 32)
    batched = lrp.label_free(x, "layer3")
    single = torch.cat([lrp.label_free(x[i : i + 1], "layer3") for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4 * float(single.abs().max()))
    classes = torch.tensor([[0, 9], [4, 4], [7, 1]])
    many = lrp.for_classes(x, classes)
    assert many.shape == (3, 2, 32, 32)
    for k in range(2):
        one = lrp.for_classes(x, classes[:, k])
        torch.testing.assert_close(many[:, k], one, rtol=1e-5, atol=1e-5 * float(one.abs().max()))


def test_user_model_untouched():
    model = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()]
    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    grads = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        before = model(x)
    lrp = LRP(model)
    lrp.label_free(x, "layer4")
    lrp.for_classes(x, torch.tensor([1, 2]))
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert names == ([n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()])
    assert attributes == {name: set(vars(m)) for name, m in model.named_modules()}
    assert grads == [p.requires_grad for p in model.parameters()]
    for m in model.modules():
        hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
        assert not any(hooks)
    assert all(p.grad is None for p in model.parameters())


# --- bad arguments ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seq_lrp():
    return LRP(randomize_bn(small_net()))


def test_unknown_layer_suggests_close_matches():
    lrp = LRP(randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)))
    with pytest.raises(ValueError, match=r"layer 'layer5'.*did you mean.*layer4"):
        lrp.label_free(torch.randn(1, 3, 32, 32), "layer5")
    assert "layer4.1" in lrp.layers


class Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.conv(x), dim=1).mean((2, 3))  # softmax has a rule (AttnLRP), log_softmax none


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return y if y.sum() > 0 else -y  # control flow on values: cannot be traced


class Scaled(nn.Module):
    """A user's own activation module (no rule by default: its forward calls torch.erf)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 * (1.0 + torch.erf(x / 1.41421356))


class ScaledWithRule(Scaled):
    lrp_rule = "pass"


def with_act(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


def test_unsupported_operations_name_the_module_and_its_type():
    with pytest.raises(Unsupported, match=r"module '1' of type PReLU has no LRP rule \(add one: rules=\{PReLU"):
        LRP(with_act(nn.PReLU()))
    with pytest.raises(Unsupported, match=r"function torch\.erf in module '1' \(Scaled\) has no LRP rule"):
        LRP(with_act(Scaled()))
    with pytest.raises(Unsupported, match=r"function torch\.log_softmax in the model's own forward \(Softmaxed\)"):
        LRP(Softmaxed())
    with pytest.raises(Unsupported, match=r"forward of the model \(Branching\) cannot be traced"):
        LRP(Branching())
    with pytest.raises(Unsupported, match=r"forward of module 'body' \(Branching\) cannot be traced"):
        LRP(Head(Branching(), [1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(Unsupported, match=r"module '0' \(Conv2d\).*padding_mode='reflect'"):
        LRP(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten()))
    assert issubclass(Unsupported, ValueError)


def test_a_user_rule_explains_what_the_defaults_cannot():
    x = torch.randn(2, 3, 8, 8)
    for lrp in (LRP(with_act(nn.PReLU()), rules={nn.PReLU: Pass()}), LRP(with_act(ScaledWithRule()))):
        result = lrp.relevance(x, classes=torch.tensor([0, 1]))
        assert result.maps.shape == (2, 8, 8)
        assert bool(result.maps.isfinite().all())
    assert LRP(with_act(Scaled()), rules={torch.erf: Pass()}).label_free(x, "1").shape == (2, 8, 8)


def test_bad_arguments(seq_lrp):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="first_rule"):
        LRP(small_net(), first_rule="gamma")
    with pytest.raises(ValueError, match="epsilon"):
        LRP(small_net(), epsilon=0.0)
    with pytest.raises(ValueError, match="std"):
        LRP(small_net(), mean=(0.5,), std=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"x must be a float \(N, C, H, W\)"):
        seq_lrp.label_free(x[0], "6")
    with pytest.raises(ValueError, match="exactly one of layer"):
        seq_lrp.relevance(x)
    with pytest.raises(ValueError, match=r"classes must be in \[0, 4\]"):
        seq_lrp.for_classes(x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"classes must have shape \(2,\)"):
        seq_lrp.for_classes(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="classes must be an integer tensor"):
        seq_lrp.for_classes(x, torch.tensor([0.0, 1.0]))


# --- the demo model ----------------------------------------------------------------------------------------------


def test_demo_label_free_map_favours_the_object():
    from demo.model import LAST_CONV_STAGE, MEAN, STD, preprocess, shapes_cnn
    from scenes.synthetic import generate_scene

    model = shapes_cnn()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    lrp = LRP(model.eval(), mean=MEAN, std=STD)
    scenes = [generate_scene(np.random.default_rng(seed)) for seed in range(10)]
    maps = lrp.label_free(preprocess(np.stack([s.image for s in scenes])), LAST_CONV_STAGE)
    wins = 0
    for scene, relevance in zip(scenes, maps, strict=True):
        mask = torch.from_numpy(scene.masks.any(0))
        wins += bool(relevance[mask].mean() > relevance[~mask].mean())
    assert wins >= 8


# --- batched classes, masks at a layer ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "sequential"])
def test_chunked_classes_equal_one_class_per_pass(arch):
    if arch == "resnet18":
        model, side = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)), 64
    else:
        model, side = randomize_bn(small_net()), 32
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([[0, 3, 1, 4, 2], [4, 2, 0, 1, 3]])  # K = 5: chunks of 3 then 2
    one = LRP(model, chunk_size=1).relevance(x, classes=classes)
    three = LRP(model, chunk_size=3).relevance(x, classes=classes)
    assert three.maps.shape == (2, 5, side, side)
    # Same rules, one tiled pass instead of five: float32 reordering only, 1e-5 relative to the largest value.
    torch.testing.assert_close(three.maps, one.maps, rtol=0.0, atol=1e-5 * float(one.maps.abs().max()))
    torch.testing.assert_close(three.seed, one.seed, rtol=0.0, atol=0.0)


def layer_size(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[int, int]:
    """The spatial size ``(h, w)`` of ``layer``'s output for ``x``."""
    sizes = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[2:]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return tuple(sizes[0])


@pytest.mark.parametrize(("arch", "layer"), [("sequential", "6"), ("sequential", "1"), ("resnet18", "layer3")])
def test_mask_of_ones_is_the_unmasked_relevance(arch, layer):
    if arch == "resnet18":
        model, side = randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)), 64
    else:
        model, side = randomize_bn(small_net()), 32
    lrp = LRP(model)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(5))
    classes = torch.tensor([1, 4])
    plain = lrp.relevance(x, classes=classes)
    ones = torch.ones(2, *layer_size(model, layer, x))
    masked = lrp.relevance(x, classes=classes, mask=(layer, ones))
    # The relevance pass is split in two at the layer: float32 reordering only, 1e-5 of the largest value.
    torch.testing.assert_close(masked.maps, plain.maps, rtol=0.0, atol=1e-5 * float(plain.maps.abs().max()))


def test_masked_relevance_is_conserved_from_the_layer():
    model = randomize_bn(small_net(bias=False), zero_shift=True)
    lrp = LRP(model)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(6)).clamp(-2.0, 2.0)
    mask = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(7))  # layer "6": 12 x 16 x 16 at 32 px
    result = lrp.relevance(x, classes=torch.tensor([0, 2, 4]), mask=("6", mask))
    assert result.maps.shape == (3, 32, 32)
    assert result.seed.shape == (3,)
    # No biases, no BN shift: the relevance kept at the layer reaches the pixels (tolerance as label-free LRP).
    torch.testing.assert_close(result.maps.sum((1, 2)), result.seed, rtol=1e-4, atol=1e-5)
    unmasked = lrp.relevance(x, classes=torch.tensor([0, 2, 4]))
    assert not torch.allclose(result.maps, unmasked.maps)


def test_mask_rejects_wrong_shapes_and_k_classes(seq_lrp):
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"mask for layer '6' must have shape \(2, 16, 16\)"):
        seq_lrp.relevance(x, classes=torch.tensor([0, 1]), mask=("6", torch.ones(2, 4, 4)))
    with pytest.raises(ValueError, match=r"mask for layer '6' must have shape"):
        seq_lrp.relevance(x, classes=torch.tensor([0, 1]), mask=("6", torch.ones(1, 16, 16)))
    with pytest.raises(ValueError, match=r"mask for layer '6' must have shape"):
        seq_lrp.relevance(x, classes=torch.tensor([0, 1]), mask=("6", [[1.0]]))
    with pytest.raises(ValueError, match=r"mask needs classes of shape \(N,\)"):
        seq_lrp.relevance(x, classes=torch.tensor([[0, 1], [1, 2]]), mask=("6", torch.ones(2, 16, 16)))
    with pytest.raises(ValueError, match=r"mask needs classes of shape \(N,\)"):
        seq_lrp.relevance(x, layer="6", mask=("6", torch.ones(2, 16, 16)))
    with pytest.raises(ValueError, match=r"layer 'nope' is not a module LRP can seed at"):
        seq_lrp.relevance(x, classes=torch.tensor([0, 1]), mask=("nope", torch.ones(2, 16, 16)))


@pytest.mark.parametrize("chunk_size", [0, -1, True, 1.5, "2"])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        LRP(small_net(), chunk_size=chunk_size)


# --- each glue rule on a tiny hand-set model with exact values ---------------------------------------------------


class Head(nn.Module):
    """``body(x)`` flattened, then a bias-free Linear with hand-set weights (Epsilon seeds R = its inputs' shares)."""

    def __init__(self, body: nn.Module, weights: list[float]) -> None:
        super().__init__()
        self.body = body
        self.fc = nn.Linear(len(weights), 1, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([weights]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def input_relevance(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-feature input relevance of logit 0 for x of shape (1, C, 1, W), as (C, W)."""
    graph_lrp = LRP(model)
    with torch.no_grad():
        env, saved = graph_lrp._graph.run(x, keep=[graph_lrp._graph.logits])
        pending = graph_lrp._graph.propagate({graph_lrp._graph.logits: env[graph_lrp._graph.logits]}, saved)
    return pending[graph_lrp._graph.input][0, :, 0]


def test_gate_the_signal_takes_all():
    """y = x ⊙ sigmoid(mean x): logit = Σ y, so R_y = y and the signal gets it all: R_x = x·g, the gate none."""

    def se(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))

    x = torch.tensor([2.0, 3.0]).view(1, 1, 1, 2)
    gate = torch.sigmoid(torch.tensor(2.5))
    got = input_relevance(Head(Lambda(se), [1.0, 1.0]), x)
    torch.testing.assert_close(got[0], torch.tensor([2.0, 3.0]) * gate, rtol=1e-5, atol=1e-6)
    # A constant factor (a layer scale) passes relevance unchanged: R_x = R_y = 3x.
    got = input_relevance(Head(Lambda(lambda x: x * 3.0), [1.0, 1.0]), x)
    torch.testing.assert_close(got[0], torch.tensor([6.0, 9.0]), rtol=1e-5, atol=1e-6)


class FunctionalNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, (3,), self.norm.weight, self.norm.bias, 0.0)


def test_layer_norm_treats_sigma_as_constant():
    """x = (1, 2, 6): μ = 3, σ = √(14/3); w = (1, 2, 1), b = (0, 0, 0.5). R_y = y (Σ-head), g = w/σ,
    R_x = x ⊙ (g − mean g) = (−1/3, 4/3, −2)/σ; the bias absorbs its share (Σ R_x = Σ (y − b))."""
    norm = nn.LayerNorm(3, eps=0.0)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 1.0]))
        norm.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    sigma = (14 / 3) ** 0.5
    x = torch.tensor([1.0, 2.0, 6.0]).view(1, 1, 1, 3)
    got = input_relevance(Head(norm, [1.0, 1.0, 1.0]), x)
    # The logit is small (Σ y = 0.037), so the head's ε = 1e-6 shifts every value by 3e-5 relative.
    torch.testing.assert_close(got[0], torch.tensor([-1 / 3, 4 / 3, -2.0]) / sigma, rtol=1e-4, atol=1e-6)
    # The functional form (ConvNeXt's LayerNorm2d calls F.layer_norm) gives the same.
    functional = FunctionalNorm(norm)
    torch.testing.assert_close(input_relevance(Head(functional, [1.0, 1.0, 1.0]), x), got, rtol=1e-6, atol=1e-6)


def test_route_follows_chunk_cat_and_channel_shuffle():
    """Channels (a, b, c, d) → chunk → cat(second half, first half) → shuffle of 2 groups: (c, a, d, b).
    With head weights w, each input channel gets w at its new place times itself."""

    def shuffle(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=1)
        y = torch.cat([second, first], dim=1)
        n, c, h, w = y.size()
        return torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, -1, h, w)

    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    weights = [10.0, 20.0, 30.0, 40.0]
    assert shuffle(x).flatten().tolist() == [3.0, 1.0, 4.0, 2.0]
    got = input_relevance(Head(Lambda(shuffle), weights), x)
    torch.testing.assert_close(got[:, 0], torch.tensor([1 * 20.0, 2 * 40.0, 3 * 10.0, 4 * 30.0]), rtol=1e-6, atol=1e-6)


def test_norm_splits_sums_and_means_in_proportion():
    """s = 3x + x = 4x → R of both branches in proportion (3/4, 1/4), back to x: R_x = s; the mean over the
    width splits its relevance in proportion to each value."""

    def body(x: torch.Tensor) -> torch.Tensor:
        return (x * 3.0 + x).mean(3)

    x = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    got = input_relevance(Head(Lambda(body), [1.0]), x)
    torch.testing.assert_close(got[0], torch.tensor([4.0, 12.0]) / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.Hardswish(), nn.ReLU6(), nn.functional.silu])
def test_activations_pass_relevance_unchanged(act):
    """logit = Σ act(x) (identity Linear before): R at the activation's output is act(x) and passes as is."""
    first = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
    body = nn.Sequential(first, act if isinstance(act, nn.Module) else Lambda(act))
    x = torch.tensor([-0.5, 2.0]).view(1, 1, 1, 2)
    got = input_relevance(Head(body, [1.0, 1.0]), x)
    torch.testing.assert_close(got[0], act(x)[0, 0, 0], rtol=1e-5, atol=1e-5)


def test_adaptive_max_pooling_winner_takes_all():
    x = torch.tensor([[1.0, 4.0], [3.0, 2.0]]).view(1, 1, 2, 2)
    model = Head(nn.AdaptiveMaxPool2d(1), [2.0])
    graph_lrp = LRP(model)
    result = graph_lrp.relevance(x, classes=torch.tensor([0]))
    torch.testing.assert_close(result.maps[0], torch.tensor([[0.0, 8.0], [0.0, 0.0]]), rtol=1e-6, atol=1e-6)


# --- the chain engine's results, kept -------------------------------------------------------------------------


REFERENCE = Path(__file__).resolve().parents[1] / "data" / "lrp_chain_reference.pt"


def reference_model(name: str) -> nn.Module:
    """The models ``tests/data/lrp_chain_reference.pt`` was made with (the chain engine of commit ac60442)."""
    torch.manual_seed(0)
    if name != "vgg11_bn":
        return randomize_bn(getattr(torchvision.models, name)(weights=None, num_classes=10))
    return small_vgg11_bn()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11_bn"])
def test_same_results_as_the_chain_engine(name):
    """ResNet and VGG: the graph engine gives the chain engine's maps to 1e-5 of their largest value."""
    expected = torch.load(REFERENCE, weights_only=True)[name]
    lrp = LRP(reference_model(name))
    x = expected["x"]
    checks = {"classes_maps": lrp.for_classes(x, expected["classes"])}
    checks |= {key: lrp.label_free(x, key[6:]) for key in expected if key.startswith("layer:")}
    for key, got in checks.items():
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(got, expected[key], rtol=0.0, atol=1e-5 * scale, msg=key)


def test_a_batch_norm_after_a_relu_makes_the_next_input_signed():
    """ReLU → BatchNorm (not folded: no convolution before it) → Conv: the convolution's z⁺ needs its x⁻ term."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3), nn.Flatten())
    randomize_bn(model)
    lrp = LRP(model)
    last = next(step for step in lrp._graph.steps if step.node.target == "3")
    assert last.op.nonnegative == (False,)
    assert bool(lrp.relevance(torch.randn(2, 3, 8, 8), classes=torch.tensor([0, 5])).maps.isfinite().all())
