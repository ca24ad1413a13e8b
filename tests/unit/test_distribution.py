"""Attribution distributions and their batched gradient bases, checked against slow loops from the formulas.

Tolerances: ``LOOSE`` (1e-5 absolute) wherever two float32 computations take different paths (batched vs looped
autograd, closed form vs autograd, vectorised vs scalar loops); ``EXACT`` where the same ops run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from handlers.explain.distribution import (
    NORMALIZE,
    TAU,
    TEMPERATURE,
    attribution_distribution,
    class_weights,
    explain,
    fast_input_x_gradient,
    fast_lrp,
    select_classes,
)
from handlers.explain.gradients import GradCAM, InputXGradient, capture, resolve_layer
from handlers.explain.lafam import resize_maps
from handlers.explain.lrp import LRP

LOOSE = {"rtol": 0.0, "atol": 1e-5}
EXACT = {"rtol": 0.0, "atol": 0.0}
WEIGHTS = Path(__file__).resolve().parents[2] / "demo" / "weights" / "shapes_cnn.pt"


class ConvHead(nn.Module):
    """Tiny net whose head is NOT pooling + linear (a conv and a ReLU after the layer): no closed form."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU(), nn.Conv2d(6, 8, 3, 2, 1))
        self.after = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.after(self.body(x)))


class TupleNet(nn.Module):
    """GAP + linear head written functionally, returning (logits, activations) like the tests' TinyNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = self.stage(x)
        return self.head(acts.mean((2, 3))), acts


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def shapes() -> nn.Module:
    from demo.model import shapes_cnn

    model = shapes_cnn()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def convhead() -> nn.Module:
    torch.manual_seed(1)
    return ConvHead().eval()


def _x(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _stub_base(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """A deterministic callable base: a class-dependent signed map at input resolution."""
    return x.sum(1, keepdim=True) * (classes[..., None, None].to(x.dtype) - 2.5)


# ---- slow references straight from the formulas ------------------------------------------------------------


def _slow_distribution(attributions: torch.Tensor, temperature: float, tau: float) -> torch.Tensor:
    """Var_c = A_c M_c 1[M_c - 1/K > tau], M = softmax_k(T |A_k|), with explicit loops over n, k and pixels."""
    a = attributions.double().tolist()
    n, k, h, w = attributions.shape
    out = torch.zeros(n, k, h, w, dtype=torch.float64)
    for i in range(n):
        for r in range(h):
            for s in range(w):
                scores = [temperature * abs(a[i][c][r][s]) for c in range(k)]
                top = max(scores)
                exps = [math.exp(v - top) for v in scores]
                total = sum(exps)
                for c in range(k):
                    m = exps[c] / total
                    if m - 1.0 / k > tau:
                        out[i, c, r, s] = a[i][c][r][s] * m
    return out.float()


def _looped_grads(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, layer: str | None) -> torch.Tensor:
    """Per-class autograd in a Python loop: Grad-CAM (layer given) or input x gradient (layer None)."""
    maps = []
    for k in range(classes.shape[1]):
        inputs = x.detach().requires_grad_(True)
        if layer is None:
            logits = model(inputs)
            (grad,) = torch.autograd.grad(logits.gather(1, classes[:, k : k + 1]).sum(), inputs)
            maps.append((grad * x).sum(1))
        else:
            with capture(resolve_layer(model, layer)) as outs:
                logits = model(inputs)
            (grad,) = torch.autograd.grad(logits.gather(1, classes[:, k : k + 1]).sum(), outs[0])
            maps.append((grad.mean((2, 3), keepdim=True) * outs[0]).sum(1).detach())
    return torch.stack(maps, 1)


# ---- the distribution ----------------------------------------------------------------------------------------


def test_paper_defaults() -> None:
    assert TEMPERATURE == 10.0
    assert TAU == 0.01


def test_docstring_example() -> None:
    out = attribution_distribution(torch.tensor([[[[1.0]], [[0.0]]]]))
    torch.testing.assert_close(out, torch.tensor([[[[1 / (1 + math.exp(-10))]], [[0.0]]]]), **LOOSE)


@pytest.mark.parametrize(("temperature", "tau"), [(TEMPERATURE, TAU), (1.0, 0.0), (50.0, 0.2)])
def test_distribution_equals_slow_loop_on_random_maps(temperature: float, tau: float) -> None:
    a = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(3)) * 0.3
    torch.testing.assert_close(
        attribution_distribution(a, temperature, tau), _slow_distribution(a, temperature, tau), **LOOSE
    )


@pytest.mark.parametrize(("temperature", "tau"), [(TEMPERATURE, TAU), (50.0, 0.2)])
def test_normalize_none_is_the_reference_and_max_divides_by_the_joint_peak(temperature: float, tau: float) -> None:
    a = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(5)) * 1e-4  # LRP-like magnitudes
    reference = _slow_distribution(a, temperature, tau)
    torch.testing.assert_close(attribution_distribution(a, temperature, tau, normalize="none"), reference, **LOOSE)
    peak = a.abs().amax(dim=(1, 2, 3), keepdim=True)  # per image, over the K maps together
    scaled = _slow_distribution(a / peak, temperature, tau) * peak  # competition on A / peak, raw A kept
    got = attribution_distribution(a, temperature, tau, normalize="max")
    torch.testing.assert_close(got, scaled, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("factor", [1e-6, 1e-3, 7.0, 1e4])
def test_normalize_max_is_invariant_to_scaling_every_map(factor: float) -> None:
    a = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(class_weights(a * factor, normalize="max"), class_weights(a, normalize="max"))
    torch.testing.assert_close(
        attribution_distribution(a * factor, normalize="max"),
        attribution_distribution(a, normalize="max") * factor,
        rtol=1e-5,
        atol=0.0,
    )


def test_normalize_none_empties_tiny_attributions_and_max_does_not() -> None:
    a = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 1e-5
    assert not attribution_distribution(a, normalize="none").any()  # softmax(10·|A|) stays uniform
    assert attribution_distribution(a, normalize="max")[0].flatten(1).any(dim=1).all()  # every class keeps some


def test_normalize_max_of_all_zero_maps_is_uniform() -> None:
    a = torch.zeros(1, 3, 2, 2)
    torch.testing.assert_close(class_weights(a, normalize="max"), torch.full_like(a, 1 / 3))
    assert NORMALIZE == ("max", "none")
    with pytest.raises(ValueError, match="normalize must be one of max, none"):
        class_weights(a, normalize="peak")


def test_weights_sum_to_one_over_classes() -> None:
    a = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(class_weights(a).sum(1), torch.ones(3, 4, 4), **LOOSE)


def test_single_class_gives_empty_maps() -> None:
    a = torch.randn(2, 1, 3, 3)
    assert torch.equal(class_weights(a), torch.ones_like(a))
    assert not attribution_distribution(a).any()


def test_high_tau_empties_and_zero_tau_keeps_the_winner() -> None:
    a = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    assert not attribution_distribution(a, tau=1 - 1 / 3).any()
    kept = attribution_distribution(a, temperature=1e4, tau=0.0) != 0
    winner = a.abs().argmax(1, keepdim=True)
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, winner, True))


def test_higher_temperature_sharpens_the_weights() -> None:
    a = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    assert (class_weights(a, 20.0).amax(1) >= class_weights(a, 2.0).amax(1) - 1e-7).all()
    torch.testing.assert_close(class_weights(a, 1e-6), torch.full_like(a, 1 / 3), **LOOSE)


# ---- class selection --------------------------------------------------------------------------------------------


def test_select_top_k_then_least_likely() -> None:
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.35], [0.4, 0.1, 0.3, 0.2]])
    assert select_classes(probs).tolist() == [[1, 3, 2], [0, 2, 1]]
    assert select_classes(probs, top_k=1, add_least_likely=False).tolist() == [[1], [0]]


def test_select_never_duplicates_with_ties() -> None:
    probs = torch.full((2, 3), 1 / 3)
    chosen = select_classes(probs, top_k=2)
    assert all(len(set(row)) == 3 for row in chosen.tolist())


def test_select_explicit_classes() -> None:
    probs = torch.rand(2, 6)
    assert select_classes(probs, classes=[4, 0]).tolist() == [[4, 0], [4, 0]]
    assert select_classes(probs, classes=torch.tensor([[1, 2], [3, 5]])).tolist() == [[1, 2], [3, 5]]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 4}, ValueError, "top_k"),  # 4 + least likely > C = 4
        ({"top_k": 2.0}, ValueError, "top_k"),
        ({"add_least_likely": 1}, TypeError, "add_least_likely"),
        ({"classes": [1, 1]}, ValueError, "classes"),
        ({"classes": [4]}, ValueError, "classes"),
        ({"classes": [-1]}, ValueError, "classes"),
        ({"classes": [0.5]}, ValueError, "classes"),
        ({"classes": []}, ValueError, "classes"),
        ({"classes": torch.tensor([[0, 1]] * 3)}, ValueError, "classes"),
    ],
)
def test_select_rejects_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        select_classes(torch.rand(2, 4), **kwargs)


def test_select_rejects_bad_probabilities() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        select_classes(torch.rand(4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"temperature": 0.0}, "temperature"), ({"temperature": math.inf}, "temperature"), ({"tau": 1.0}, "tau")],
)
def test_distribution_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attribution_distribution(torch.rand(1, 2, 3, 3), **kwargs)
    with pytest.raises(ValueError, match=match):
        explain(nn.Identity(), torch.rand(1, 3, 4, 4), _stub_base, **kwargs)


@pytest.mark.parametrize("bad", [torch.rand(2, 3, 3), torch.zeros(1, 2, 3, 3, dtype=torch.long), "maps"])
def test_distribution_rejects_bad_attributions(bad: object) -> None:
    with pytest.raises(ValueError, match="attributions"):
        attribution_distribution(bad)  # type: ignore[arg-type]


# ---- bases: batched == looped, closed form == autograd, chunking ------------------------------------------------


def test_gradcam_batched_autograd_equals_loop(convhead: nn.Module) -> None:
    x, classes = _x(2, 16), torch.tensor([[0, 3, 4], [2, 1, 0]])
    batched = GradCAM(convhead, "body", chunk_size=2)(x, classes)
    torch.testing.assert_close(batched, _looped_grads(convhead, x, classes, "body"), **LOOSE)


def test_input_x_gradient_batched_equals_loop(resnet: nn.Module) -> None:
    x, classes = _x(1, 32), torch.tensor([[0, 3, 9]])
    batched = InputXGradient(resnet, chunk_size=2)(x, classes)
    torch.testing.assert_close(batched, _looped_grads(resnet, x, classes, None), **LOOSE)


@pytest.mark.parametrize("which", ["resnet", "shapes"])
def test_closed_form_equals_autograd(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    layer, size, classes = ("layer4", 64, 10) if which == "resnet" else ("block3", 128, 6)
    x = _x(1, size) * (0.5 if which == "shapes" else 1.0)
    every = torch.arange(classes).expand(1, -1)
    closed = GradCAM(model, layer, closed_form=True)
    with torch.no_grad():
        assert closed.forward(x)[2] is not None
    fast, slow = closed(x, every), GradCAM(model, layer, closed_form=False)(x, every)
    assert fast.abs().max() > 0
    torch.testing.assert_close(fast, slow, **LOOSE)
    if which == "shapes":  # batched == looped on a second architecture (resnet: see the explain tests)
        torch.testing.assert_close(slow, _looped_grads(model, x, every, layer), **LOOSE)


def test_closed_form_detection(convhead: nn.Module) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        assert GradCAM(convhead, "body").forward(_x(1, 16))[2] is None
        assert GradCAM(TupleNet().eval(), "stage").forward(_x(1, 16))[2] is not None  # functional mean
    with pytest.raises(ValueError, match="closed_form"):
        GradCAM(convhead, "body", closed_form=True)(_x(1, 16), torch.tensor([[0]]))
    x, classes = _x(2, 16), torch.tensor([[0, 1], [4, 3]])
    torch.testing.assert_close(GradCAM(convhead, "body")(x, classes), _looped_grads(convhead, x, classes, "body"))


@pytest.mark.parametrize("closed_form", [None, False])
def test_gradcam_chunking_does_not_change_the_result(resnet: nn.Module, closed_form: bool | None) -> None:
    x, every = _x(2, 32), torch.arange(10).expand(2, -1)
    one = GradCAM(resnet, "layer4", closed_form=closed_form, chunk_size=1)(x, every)
    torch.testing.assert_close(one, GradCAM(resnet, "layer4", closed_form=closed_form, chunk_size=100)(x, every))


def test_input_x_gradient_chunking_does_not_change_the_result(convhead: nn.Module) -> None:
    x, classes = _x(2, 16), torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    one = InputXGradient(convhead, chunk_size=1)(x, classes)
    torch.testing.assert_close(one, InputXGradient(convhead, chunk_size=3)(x, classes), **LOOSE)
    torch.testing.assert_close(one, InputXGradient(convhead, chunk_size=5)(x, classes), **LOOSE)


def test_gradcam_relu_option(resnet: nn.Module) -> None:
    x, classes = _x(1, 64), torch.tensor([[1, 2]])
    signed = GradCAM(resnet, "layer4")(x, classes)
    assert torch.equal(GradCAM(resnet, "layer4", relu=True)(x, classes), signed.clamp_min(0))


# ---- explain(): every base against the slow reference ------------------------------------------------------------


def test_explain_gradcam_equals_slow_reference(resnet: nn.Module) -> None:
    x = _x(2, 64)
    result = explain(resnet, x, GradCAM(resnet, "layer4"))
    with torch.no_grad():
        expected_classes = select_classes(torch.softmax(resnet(x), 1))
    assert torch.equal(result.classes, expected_classes)
    reference = _slow_distribution(_looped_grads(resnet, x, expected_classes, "layer4"), TEMPERATURE, TAU)
    torch.testing.assert_close(result.maps, reference, **LOOSE)


def test_explain_input_x_gradient_equals_slow_reference(convhead: nn.Module) -> None:
    x = _x(2, 16)
    result = explain(convhead, x, InputXGradient(convhead), top_k=3, temperature=200.0)
    reference = _slow_distribution(_looped_grads(convhead, x, result.classes, None), 200.0, TAU)
    assert result.maps.shape == (2, 4, 16, 16)
    torch.testing.assert_close(result.maps, reference, **LOOSE)


def test_explain_callable_base_equals_slow_reference(convhead: nn.Module) -> None:
    x = _x(2, 8)
    result = explain(convhead, x, _stub_base, classes=[4, 0, 2], temperature=3.0, tau=0.05)
    reference = _slow_distribution(_stub_base(x, result.classes), 3.0, 0.05)
    torch.testing.assert_close(result.maps, reference, **LOOSE)
    torch.testing.assert_close(result.probabilities.sum(1), torch.ones(2), **LOOSE)


def test_explain_rejects_bad_base(convhead: nn.Module) -> None:
    with pytest.raises(TypeError, match="base"):
        explain(convhead, _x(1, 8), "gradcam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base must return"):
        explain(convhead, _x(1, 8), lambda x, c: x[:, :1])


# ---- the fast variant -----------------------------------------------------------------------------------------


def test_fast_input_x_gradient_is_the_upsampled_layer_mask_times_one_backward(resnet: nn.Module) -> None:
    x = _x(1, 64)
    result = fast_input_x_gradient(resnet, x, "layer4", mode="bilinear")
    cam = GradCAM(resnet, "layer4")(x, result.classes)
    weights = torch.softmax(TEMPERATURE * cam.abs(), 1)[:, 0]
    mask = resize_maps(weights * (weights - 1 / 3 > TAU), (64, 64), "bilinear")
    ixg = _looped_grads(resnet, x, result.classes[:, :1], None)[:, 0]
    assert result.maps.shape == (1, 1, 64, 64)
    torch.testing.assert_close(result.maps[:, 0], ixg * mask, **LOOSE)
    assert not fast_input_x_gradient(resnet, x, "layer4", tau=0.99).maps.any()


def test_fast_variant_rejects_bad_arguments(resnet: nn.Module) -> None:
    with pytest.raises(ValueError, match="mode"):
        fast_input_x_gradient(resnet, _x(1, 32), "layer4", mode="cubic")
    with pytest.raises(ValueError, match="layer"):
        fast_input_x_gradient(resnet, _x(1, 32), "layer9")
    with pytest.raises(ValueError, match="x must"):
        fast_input_x_gradient(resnet, torch.rand(3, 32, 32), "layer4")


# ---- the model is left untouched ---------------------------------------------------------------------------------


def test_model_left_untouched(resnet: nn.Module) -> None:
    x = _x(1, 32)
    with torch.no_grad():
        before = resnet(x)
    flags = [p.requires_grad for p in resnet.parameters()]
    explain(resnet, x, GradCAM(resnet, "layer4"))
    explain(resnet, x, GradCAM(resnet, "layer4", closed_form=False))
    explain(resnet, x, InputXGradient(resnet))
    fast_input_x_gradient(resnet, x, "layer4")
    with torch.no_grad():
        assert torch.equal(resnet(x), before)
    assert [p.requires_grad for p in resnet.parameters()] == flags
    assert all(p.grad is None for p in resnet.parameters())
    for module in resnet.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
        assert not module._backward_hooks
    assert not resnet.training


# ---- bad arguments to the bases ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer": "nope"}, "layer"),
        ({"layer": nn.Linear(2, 2)}, "layer"),
        ({"layer": "layer4", "chunk_size": 0}, "chunk_size"),
        ({"layer": "layer4", "chunk_size": True}, "chunk_size"),
        ({"layer": "layer4", "closed_form": "yes"}, "closed_form"),
    ],
)
def test_gradcam_rejects_bad_construction(resnet: nn.Module, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradCAM(resnet, **kwargs)


def test_bases_reject_bad_model_and_chunk() -> None:
    with pytest.raises(TypeError, match="model"):
        GradCAM("resnet", "layer4")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        InputXGradient("resnet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        InputXGradient(nn.Identity(), chunk_size=-1)


@pytest.mark.parametrize(
    ("x", "classes", "match"),
    [
        (torch.rand(3, 32, 32), torch.tensor([[0]]), "x must"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.long), torch.tensor([[0]]), "x must"),
        (torch.rand(1, 3, 32, 32), torch.tensor([0]), "classes"),
        (torch.rand(1, 3, 32, 32), torch.tensor([[10]]), "classes"),
        (torch.rand(1, 3, 32, 32), torch.tensor([[0.0]]), "classes"),
        (torch.rand(1, 3, 32, 32), torch.zeros(1, 0, dtype=torch.long), "classes"),
        (torch.rand(2, 3, 32, 32), torch.tensor([[0]]), "classes"),
    ],
)
def test_bases_reject_bad_inputs(resnet: nn.Module, x: torch.Tensor, classes: torch.Tensor, match: str) -> None:
    for base in (GradCAM(resnet, "layer4"), GradCAM(resnet, "layer4", closed_form=False), InputXGradient(resnet)):
        with pytest.raises(ValueError, match=match):
            base(x, classes)


def test_model_must_return_logits() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 1))
    with pytest.raises(ValueError, match="logits"):
        InputXGradient(model)(torch.rand(1, 3, 4, 4), torch.tensor([[0]]))


def test_layer_must_run_once(convhead: nn.Module) -> None:
    cam = GradCAM(convhead, "body.1")  # this ReLU object runs once; a module reused twice is rejected
    shared = nn.ReLU()
    twice = nn.Sequential(nn.Conv2d(3, 2, 1), shared, nn.Conv2d(2, 2, 1), shared, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="exactly once"):
        GradCAM(twice, shared)(torch.rand(1, 3, 4, 4), torch.tensor([[0]]))
    assert cam(_x(1, 16), torch.tensor([[0]])).shape == (1, 1, 8, 8)


def test_explain_with_lrp_base_equals_slow_reference(resnet: nn.Module) -> None:
    x = _x(1, 32)
    lrp = LRP(resnet)
    result = explain(resnet, x, lrp.for_classes, top_k=2)
    reference = _slow_distribution(lrp.for_classes(x, result.classes), TEMPERATURE, TAU)
    assert result.maps.shape == (1, 3, 32, 32)
    torch.testing.assert_close(result.maps, reference, **LOOSE)


# ---- fast LRP distribution ---------------------------------------------------------------------------------------


def _slow_fast_lrp(
    model: nn.Module, lrp: LRP, x: torch.Tensor, layer: str, classes: torch.Tensor, temperature: float, tau: float
) -> torch.Tensor:
    """The docstring's formula: K looped Grad-CAM maps, M_t with explicit loops, then ONE masked LRP pass."""
    cams = _looped_grads(model, x, classes, layer).double()
    n, k, h, w = cams.shape
    mask = torch.zeros(n, h, w, dtype=torch.float64)
    for i in range(n):
        for r in range(h):
            for s in range(w):
                scores = [temperature * abs(float(cams[i, c, r, s])) for c in range(k)]
                exps = [math.exp(v - max(scores)) for v in scores]
                m = exps[0] / sum(exps)
                mask[i, r, s] = m if m - 1.0 / k > tau else 0.0
    return lrp.relevance(x, classes=classes[:, 0], mask=(layer, mask.float())).maps[:, None]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("layer", ["layer4", "layer3"])  # closed-form Grad-CAM at layer4, autograd at layer3
def test_fast_lrp_equals_slow_reference(resnet: nn.Module, layer: str) -> None:
    x = _x(2, 64, seed=3)
    lrp = LRP(resnet)
    result = fast_lrp(resnet, lrp, x, layer)
    assert result.maps.shape == (2, 1, 64, 64)
    assert result.classes.shape == (2, 3)
    with torch.no_grad():
        logits = resnet(x)
    torch.testing.assert_close(result.probabilities, torch.softmax(logits, 1), **LOOSE)
    order = logits.argsort(1, descending=True)
    assert torch.equal(result.classes, torch.cat([order[:, :2], order[:, -1:]], 1))  # target first
    reference = _slow_fast_lrp(resnet, lrp, x, layer, result.classes, TEMPERATURE, TAU)
    assert reference.abs().max() > 0
    # Closed form / batched autograd vs looped autograd decide the same mask; 1e-5 of the largest relevance.
    torch.testing.assert_close(result.maps, reference, rtol=0.0, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.usefixtures("one_torch_thread")
def test_fast_lrp_with_a_decided_grad_cam_runs_one_forward_and_gives_the_same_maps(resnet: nn.Module) -> None:
    """With the closed form decided at start, the competition is read from LRP's own forward."""
    x = _x(2, 64, seed=5)
    lrp = LRP(resnet)
    cam = GradCAM(resnet, "layer4").decide(x[:1])
    assert cam.head is resnet.fc
    lrp.label_free(x[:1], "layer4")  # the engine's one-time check runs the model once
    calls = []
    handle = resnet.register_forward_hook(lambda *_: calls.append(1))
    try:
        shared = fast_lrp(resnet, lrp, x, "layer4", cam=cam)
    finally:
        handle.remove()
    assert calls == []  # no eager forward of the model: only LRP's graph ran
    separate = fast_lrp(resnet, lrp, x, "layer4")
    assert torch.equal(shared.classes, separate.classes)
    torch.testing.assert_close(shared.probabilities, separate.probabilities, **LOOSE)
    torch.testing.assert_close(shared.maps, separate.maps, rtol=0.0, atol=1e-5 * float(separate.maps.abs().max()))


@pytest.mark.usefixtures("one_torch_thread")
def test_fast_lrp_explicit_classes_and_parameters(resnet: nn.Module) -> None:
    x = _x(1, 64, seed=4)
    lrp = LRP(resnet)
    classes = torch.tensor([[7, 2, 5, 0]])
    result = fast_lrp(resnet, lrp, x, "layer4", classes=classes[0].tolist(), temperature=3.0, tau=0.05)
    assert torch.equal(result.classes, classes)
    reference = _slow_fast_lrp(resnet, lrp, x, "layer4", classes, 3.0, 0.05)
    torch.testing.assert_close(result.maps, reference, rtol=0.0, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.usefixtures("one_torch_thread")
def test_fast_lrp_single_class_is_empty(resnet: nn.Module) -> None:
    # K = 1: M = 1 and M - 1/K = 0 is never > tau, so the mask (and the map) is zero everywhere (exact).
    result = fast_lrp(resnet, LRP(resnet), _x(1, 64), "layer4", classes=[3])
    assert result.maps.shape == (1, 1, 64, 64)
    assert not result.maps.any()
    result = fast_lrp(resnet, LRP(resnet), _x(1, 64), "layer4", top_k=1, add_least_likely=False)
    assert not result.maps.any()


@pytest.mark.usefixtures("one_torch_thread")
def test_fast_lrp_leaves_the_model_untouched(resnet: nn.Module) -> None:
    x = _x(2, 64, seed=5)
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    with torch.no_grad():
        before = resnet(x)
    fast_lrp(resnet, LRP(resnet), x, "layer4")
    fast_lrp(resnet, LRP(resnet), x, "layer3", classes=[1, 2])
    with torch.no_grad():
        assert torch.equal(resnet(x), before)
    assert state.keys() == resnet.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in resnet.state_dict().items())
    assert all(p.grad is None for p in resnet.parameters())
    for module in resnet.modules():
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
        assert not any(hooks)
    assert not resnet.training


@pytest.mark.usefixtures("one_torch_thread")
def test_fast_lrp_rejects_bad_arguments(resnet: nn.Module) -> None:
    lrp = LRP(resnet)
    with pytest.raises(ValueError, match="temperature"):
        fast_lrp(resnet, lrp, _x(1, 32), "layer4", temperature=0.0)
    with pytest.raises(ValueError, match="tau"):
        fast_lrp(resnet, lrp, _x(1, 32), "layer4", tau=1.0)
    with pytest.raises(ValueError, match="layer"):
        fast_lrp(resnet, lrp, _x(1, 32), "layer9")
    with pytest.raises(ValueError, match="repeat"):
        fast_lrp(resnet, lrp, _x(1, 32), "layer4", classes=[1, 1])
