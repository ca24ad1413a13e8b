"""Explanation methods' cost as a ratio to one plain forward pass, all measured side by side in one process.

Models: torchvision ResNet-50, EfficientNet-B0 and ConvNeXt-T (``--archs``; ViT-B/16 and other torchvision
classifiers too), random init (batch norms with random running statistics, so that folding them is not a
no-op; a ViT's head, zero at torchvision's init, drawn at random), ``.eval()``, 224x224 inputs, batch
``--batch`` (1). Every figure is a RATIO measured side by side: the method runs in alternation with its
reference (ABAB pairs, the order flipped every pair, one warm-up of each first), and the figure is the median
over ``--pairs`` pairs of time(method) / time(reference of the same pair), so that drift of a noisy machine
hits both alike. The reference is a plain eager forward under ``torch.no_grad()`` unless a row says otherwise.

One-class and label-free methods, on every model (the layer is the model's LaFAM layer,
:func:`export.models.find_default_layer`: ``layer4`` for ResNet-50, ``features`` for the other two):

- LaFAM: forward with the layer captured + :func:`handlers.explain.lafam.lafam` + nearest upsampling;
- LRP label-free (seeded at the layer) and LRP of the top-1 logit, ours (:class:`handlers.explain.lrp.LRP`),
  against the targets of issue 9: ≤ 3× on ResNet-50, ≤ 3.5× on EfficientNet-B0, ConvNeXt-T and ViT-B/16
  (issue 11, AttnLRP);
- input × gradient of the top-1 logit, ours (:class:`handlers.explain.gradients.InputXGradient`), the
  one-class base of the fast input × gradient distribution;
- zennit 0.5.1 LRP of the top-1 logit with our rules (ZPlus convolutions, Epsilon linear layers, ZBox first
  layer, Norm on average pooling, Pass on activations and batch norms) on a deep copy of the model, with
  ``ResNetCanonizer`` on ResNets (batch norms merged, Norm on the residual sums). zennit 0.5.1 has no
  canonizer for EfficientNet or ConvNeXt: it runs there, and the figure is flagged wrong (see :data:`ZENNIT_WRONG`);
- captum 0.9.0 ``captum.attr.LRP`` of the top-1 logit with its default rules, on a deep copy; where it raises,
  the cell holds the exact error;
- Integrated Gradients as TorchServe 0.12's stock vision handler runs it: torchserve 0.12.0,
  ``ts/torch_handler/vision_handler.py``, ``initialize`` (line 26) ``self.ig = IntegratedGradients(self.model)``
  and ``get_insights`` (line 66) ``self.ig.attribute(tensor_data, target=target, n_steps=15).tolist()``. The
  target there comes from the request (default 0); here it is the top-1 class, computed before timing, and
  the ``.tolist()`` serialisation is not timed.

Conservation (not timed): the sum of each LRP implementation's input relevance over what it seeded (the
logit; for label-free LRP the layer's activations), on a copy of each architecture where LRP's rules conserve
exactly (batch norms calibrated on random images, every bias and batch-norm shift zero, ConvNeXt layer scales
1 so that the residual branches carry relevance; a ViT's in-projection biases, class token and position
embedding zero): a correct implementation gives 1, except on a ViT, where AttnLRP's softmax rule does not
conserve (Achtibat et al., ICML 2024, Prop. 3.1).

Attribution distributions (Walter et al., arXiv:2503.07346) on ResNet-50 for K classes, the K most likely of
the plain forward (``--ks``): the fast variants (:func:`handlers.explain.distribution.fast_lrp`,
:func:`~handlers.explain.distribution.fast_input_x_gradient`, with the Grad-CAM decided once as a worker does)
as a ratio to their base's one-class explanation (target ≤ 1.2× for any K); the exact distributions over LRP
(one relevance pass per class on the CPU) and input × gradient (batched vjp, and a Python loop of K backward
passes); Grad-CAM at the layer (closed form, batched vjp, K-loop). The variants whose cost grows with K are
skipped above ``--max-k-slow``; their cells then show a linear extrapolation through the two largest measured
K (with the defaults, K = 1000 from K = 10 and K = 100).

Run (on a quiet machine; a full run takes about 6-9 minutes on 2 CPU cores)::

    python -m benchmarks.explain_speed [--archs resnet50,efficientnet_b0,convnext_tiny] [--size 224]
        [--batch 1] [--pairs 5] [--ks 2,10,100,1000] [--max-k-slow 100] [--threads N] [--device cpu|cuda]
        [--write benchmarks/RESULTS.md]
    python -m benchmarks.explain_speed --quick      # smoke test: 64x64, 1 pair, K = 2, 3, 5, 1 thread

When another process competes for the cores, use ``--threads 1``: with two threads the eager forward slows
down far more than the explainers (80 ms → 2.6 s at batch 1, measured with the former
``benchmarks/lrp_speed.py``), which flatters every ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torchvision
from torch import nn

from benchmarks._models import calibrate_batch_norms, without_biases
from benchmarks._report import cpu_name, package_version, section, write_section
from export.models import find_default_layer
from handlers.explain.distribution import attribution_distribution, explain, fast_input_x_gradient, fast_lrp
from handlers.explain.gradients import GradCAM, InputXGradient, capture, logits_of
from handlers.explain.lafam import lafam, resize_maps
from handlers.explain.lrp import LRP
from handlers.explain.tokens import Layout, grid_layout, to_grid
from handlers.manifest import IMAGENET_MEAN, IMAGENET_STD

START_MARKER = "<!-- explain_speed:start -->"
END_MARKER = "<!-- explain_speed:end -->"

ARCHS = ("resnet50", "efficientnet_b0", "convnext_tiny")
"""Models of the one-class table, in column order."""
DIST_ARCH = "resnet50"
"""The model of the distribution table."""
LRP_TARGETS = {"resnet50": 3.0, "efficientnet_b0": 3.5, "convnext_tiny": 3.5, "vit_b_16": 3.5}
"""Issue 9's targets for our LRP (label-free and one class), × forward."""
FAST_TARGET = 1.2
"""Issue 9's target for the fast distributions, × their base's one-class explanation, for any K."""

FORWARD = "plain eager forward (`torch.no_grad()`), ms"
LAFAM = "LaFAM (forward with the layer captured + map, nearest upsampling)"
LRP_FREE = "LRP label-free, ours (seeded at the LaFAM layer)"
LRP_CLASS = "LRP one class (top-1), ours"
IXG_CLASS = "input×gradient one class (top-1), ours"
ZENNIT = "LRP one class, zennit 0.5.1 (same composite)"
CAPTUM = "LRP one class, captum 0.9.0 (`captum.attr.LRP`, default rules)"
IG = "Integrated Gradients, captum (TorchServe stock `explain`, n_steps=15)"
SINGLE_ROWS = (FORWARD, LAFAM, LRP_FREE, LRP_CLASS, IXG_CLASS, ZENNIT, CAPTUM, IG)
"""Rows of the one-class table, in order."""
TARGET_ROWS = frozenset({LRP_FREE, LRP_CLASS})
"""Rows printed against :data:`LRP_TARGETS`."""

CONSERVATION_ROWS = (LRP_FREE, LRP_CLASS, ZENNIT, CAPTUM)
"""Rows of the conservation table, in order."""

FAST_LRP = "fast LRP distribution"
FAST_IXG = "fast input×gradient distribution"
LRP_DIST = "exact LRP distribution (K relevance passes)"
IXG_DIST = "exact input×gradient distribution, batched vjp"
IXG_LOOP = "exact input×gradient distribution, K-loop of backward passes"
CAM_CLOSED = "Grad-CAM distribution, closed form (one matmul, no backward)"
CAM_VJP = "Grad-CAM distribution, batched vjp"
CAM_LOOP = "Grad-CAM distribution, K-loop of backward passes"
DIST_ROWS = (FAST_LRP, FAST_IXG, LRP_DIST, IXG_DIST, IXG_LOOP, CAM_CLOSED, CAM_VJP, CAM_LOOP)
"""Rows of the distribution table, in order."""
FAST_ROWS = {FAST_LRP: LRP_CLASS, FAST_IXG: IXG_CLASS}
"""Fast rows and the one-class row they are measured against (side by side, instead of the forward)."""
SLOW_ROWS = frozenset({LRP_DIST, IXG_DIST, IXG_LOOP, CAM_LOOP})
"""Distribution rows whose cost grows with K: skipped above ``--max-k-slow``."""

ZENNIT_WRONG = (
    "zennit 0.5.1 has no canonizer for this architecture, so its result is wrong: a residual `+` sends the full "
    "relevance into both summands (no Norm rule on a functional sum), a squeeze-excitation product `scale * x` "
    "passes relevance × gate to `x` and relevance × `x` into the gate branch, LayerNorm (ConvNeXt's "
    "`LayerNorm2d` and block norms) has no rule and passes its plain gradient, a ConvNeXt layer scale multiplies "
    "the relevance, and batch norms are passed through instead of merged into the convolutions"
)
"""Why zennit's figure on a model without a zennit canonizer is flagged wrong (see the conservation table)."""


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    archs: tuple[str, ...]
    """torchvision model builder names of the one-class table."""
    size: int
    """Input side in pixels."""
    batch: int
    """Images per batch."""
    pairs: int
    """Alternating (method, reference) pairs per figure."""
    ks: tuple[int, ...]
    """Numbers of competing classes for the distributions (on :data:`DIST_ARCH`, if it is in ``archs``)."""
    max_k_slow: int
    """Largest K for the variants whose cost grows with K."""
    device: torch.device
    """Where everything runs."""


@dataclass(frozen=True)
class Measurement:
    """One figure: the median per-pair ratio and the median seconds of both sides."""

    ratio: float
    seconds: float
    forward_seconds: float


@dataclass(frozen=True)
class Cell:
    """One cell of the one-class table: a measurement and/or a note (``not run: …``, ``wrong …``)."""

    measurement: Measurement | None = None
    note: str = ""


@dataclass
class Results:
    """Everything one run measured."""

    layers: dict[str, str]
    """The LaFAM layer of each model."""
    single: dict[str, dict[str, Cell]]
    """``{row: {arch: cell}}`` of the one-class table."""
    conservation: dict[str, dict[str, str]]
    """``{row: {arch: cell text}}`` of the conservation table."""
    dist: dict[str, dict[int, Measurement | None]]
    """``{row: {K: measurement or None (skipped)}}`` of the distribution table (empty without ResNet-50)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(run: Callable[[], object], plain: Callable[[], object], pairs: int, device: torch.device) -> Measurement:
    """Time ``run`` against ``plain`` in alternating pairs (ABAB..., order flipped each pair) after a warm-up.

    Args:
        run: the method, a call with no arguments.
        plain: the reference (the plain forward pass, or a base explanation).
        pairs: number of pairs (≥ 1).
        device: synchronised around each call when it is a GPU.

    Returns:
        The median of the per-pair ratios time(run) / time(plain), and the median seconds of each.
    """
    run()
    plain()
    ratios, run_times, plain_times = [], [], []
    for index in range(pairs):
        if index % 2 == 0:
            t_run = _seconds(run, device)
            t_plain = _seconds(plain, device)
        else:
            t_plain = _seconds(plain, device)
            t_run = _seconds(run, device)
        ratios.append(t_run / t_plain)
        run_times.append(t_run)
        plain_times.append(t_plain)
    return Measurement(statistics.median(ratios), statistics.median(run_times), statistics.median(plain_times))


def build_model(arch: str, device: torch.device) -> nn.Module:
    """A random-init torchvision classifier in eval mode, its batch norms given random running statistics."""
    torch.manual_seed(0)
    model = _random_head(getattr(torchvision.models, arch)(weights=None).eval())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.to(device)


def _random_head(model: nn.Module) -> nn.Module:
    """A ViT's head drawn at random: torchvision initialises it to zero, so every logit would be 0."""
    head = getattr(getattr(model, "heads", None), "head", None)
    if isinstance(head, nn.Linear) and not bool(head.weight.any()):
        with torch.no_grad():
            head.weight.normal_(0.0, 0.02)
    return model


def conserving_model(arch: str, size: int, device: torch.device) -> nn.Module:
    """The architecture where LRP's rules conserve exactly: no bias or shift anywhere, layer scales 1.

    Batch norms are calibrated on four random images (``reset_running_stats`` + one train-mode forward) so
    that activations have ordinary scales, then their means and shifts, and every convolution's, linear
    layer's and LayerNorm's bias, are set to zero; ConvNeXt's layer scales (1e-6 at torchvision's init,
    which makes every block nearly the identity) are set to 1 so that the residual branches carry relevance.
    """
    torch.manual_seed(0)
    model = _random_head(getattr(torchvision.models, arch)(weights=None))
    model = without_biases(calibrate_batch_norms(model, size))
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # a ViT's biases that are no module's ``bias``
            if name.rsplit(".", 1)[-1] in ("in_proj_bias", "class_token", "pos_embedding"):
                parameter.zero_()
    return model.to(device)


def zennit_canonizers(arch: str) -> list | None:
    """zennit 0.5.1's canonizers for a torchvision architecture, or ``None`` where it has none."""
    if arch.startswith(("resnet", "resnext", "wide_resnet")):
        from zennit.torchvision import ResNetCanonizer

        return [ResNetCanonizer()]
    if arch.startswith("vgg"):
        from zennit.torchvision import VGGCanonizer

        return [VGGCanonizer()]
    return None


def zennit_lrp(
    model: nn.Module, stack: contextlib.ExitStack, canonizers: Sequence[object] = ()
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """zennit 0.5.1 LRP with our rules on a deep copy of ``model``; the hooks stay until ``stack`` closes.

    Same composite as ``tests/unit/test_lrp.py`` (zennit's ``EpsilonGammaBox`` with ``ZPlus`` in place of
    ``Gamma``, as our LRP): ZPlus on convolutions, Epsilon(1e-6) on linear layers, ZBox on the first layer,
    ``layer_map_base`` (Norm on average pooling, Pass on activations and batch norms), and ``canonizers``
    (``ResNetCanonizer`` for ResNets: batch norms merged, Norm on the residual sums). zennit registers
    parameters and hooks on the model it explains, hence the copy.

    Returns:
        ``run(x, classes)``: relevance ``(N, H, W)`` of the logit ``classes[n]`` of each image.
    """
    from zennit.attribution import Gradient
    from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import Epsilon, ZBox, ZPlus
    from zennit.types import Convolution

    own = copy.deepcopy(model)
    device = next(own.parameters()).device
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    composite = SpecialFirstLayerMapComposite(
        layer_map=[*layer_map_base(), (Convolution, ZPlus()), (nn.Linear, Epsilon(1e-6))],
        first_map=[(Convolution, ZBox((0 - mean) / std, (1 - mean) / std))],
        canonizers=list(canonizers),
    )
    attributor = stack.enter_context(Gradient(model=own, composite=composite))

    def run(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        def seed(out: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(out).scatter_(1, classes[:, None], out.gather(1, classes[:, None]))

        _, relevance = attributor(x.clone().requires_grad_(True), seed)
        return relevance.sum(1)

    return run


def captum_lrp(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """captum 0.9.0's ``captum.attr.LRP`` with its default rules, on a deep copy of ``model``.

    Its defaults: ``EpsilonRule`` (ε = 1e-9) on every ``Conv2d``, ``Linear``, ``BatchNorm2d`` and pooling
    layer, relevance passed through ``ReLU``, ``Dropout`` and ``Tanh``; any other leaf module raises
    ``TypeError`` when ``attribute`` is called, and functional operations (a residual ``+``) get their plain
    gradient. captum attaches rules to the model it explains (and leaves them there when it raises), hence
    the copy. It has no z⁺ rule for signed inputs and no z^B rule, so the composite cannot match ours; the
    cost of a rule does not depend on which rule it is.

    Returns:
        ``run(x, classes)``: relevance ``(N, H, W)`` of the logit ``classes[n]`` of each image.
    """
    from captum import attr as captum_attr

    attributor = captum_attr.LRP(copy.deepcopy(model))

    def run(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        inputs = x.detach().clone().requires_grad_(True)  # as captum wants it (else it warns every call)
        return attributor.attribute(inputs, target=classes).detach().sum(1)

    return run


def loop_gradcam(model: nn.Module, layer: str, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM distributions the naive way: one forward, then K single-class backward passes to ``layer``."""
    with capture(model.get_submodule(layer)) as outs:
        logits = logits_of(model(x))
    acts = outs[0]
    maps = []
    for k in range(classes.shape[1]):
        (grad,) = torch.autograd.grad(logits.gather(1, classes[:, k : k + 1]).sum(), acts, retain_graph=True)
        maps.append((grad.mean((2, 3), keepdim=True) * acts).sum(1).detach())
    return attribution_distribution(torch.stack(maps, 1))


def loop_input_x_gradient(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Input × gradient distributions the naive way: one forward, then K single-class backward passes."""
    inputs = x.detach().requires_grad_(True)
    logits = logits_of(model(inputs))
    maps = []
    for k in range(classes.shape[1]):
        (grad,) = torch.autograd.grad(logits.gather(1, classes[:, k : k + 1]).sum(), inputs, retain_graph=True)
        maps.append((grad * x).sum(1))
    return attribution_distribution(torch.stack(maps, 1))


def _lafam(model: nn.Module, layer: str, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    with torch.no_grad(), capture(model.get_submodule(layer)) as outs:
        model(x)
    return resize_maps(lafam(to_grid(outs[0], layout)), tuple(x.shape[-2:]), "nearest")


def _layout(model: nn.Module, layer: str, x: torch.Tensor) -> Layout:
    """How ``layer``'s output becomes a map (tokens, channel-last or a map already), decided once."""
    with torch.no_grad(), capture(model.get_submodule(layer)) as outs:
        model(x)
    return grid_layout(tuple(outs[0].shape), (int(x.shape[-2]), int(x.shape[-1])))


def _plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(model(x))


def _fmt(ratio: float) -> str:
    if not math.isfinite(ratio):
        return str(ratio)
    if ratio >= 100:
        return f"{ratio:.0f}"
    return f"{ratio:.1f}" if ratio >= 10 else f"{ratio:.2f}"


def _error(exc: BaseException) -> str:
    """The exception as a one-line markdown code span, exactly as raised (type and message)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split()).replace("`", "'").replace("|", "\\|")
    return f"`{text}`"


def _skipped(measured: dict[int, float], k: int) -> str:
    """'—', with a linear extrapolation from the two largest measured K when there are two."""
    known = sorted(measured)
    if len(known) < 2:
        return "—"
    k1, k2 = known[-2], known[-1]
    slope = (measured[k2] - measured[k1]) / (k2 - k1)
    return f"— (≈ {_fmt(measured[k2] + slope * (k - k2))})"


def _conservation(total: torch.Tensor, seed: torch.Tensor) -> str:
    """Σ relevance ÷ seed, the median over the batch, to 3 significant digits."""
    ratio = float((total.double() / seed.double()).median())
    return f"{ratio:.3f}" if math.isfinite(ratio) and 0.01 <= abs(ratio) < 1000 else f"{ratio:.3g}"


def check_conservation(arch: str, settings: Settings) -> dict[str, str]:
    """One call of each LRP implementation on :func:`conserving_model`: Σ relevance ÷ seed, per row."""
    device = settings.device
    model = conserving_model(arch, settings.size, device)
    x = torch.randn(settings.batch, 3, settings.size, settings.size, generator=torch.Generator().manual_seed(2))
    x = x.to(device)
    logits = _plain(model, x)
    top1 = logits.argmax(1)
    seed = logits.gather(1, top1[:, None])[:, 0]
    layer = find_default_layer(model, (settings.size, settings.size))
    lrp = LRP(model)
    free = lrp.relevance(x, layer=layer)
    one = lrp.relevance(x, classes=top1)
    cells = {
        LRP_FREE: _conservation(free.maps.flatten(1).sum(1), free.seed),
        LRP_CLASS: _conservation(one.maps.flatten(1).sum(1), seed),
    }
    canonizers = zennit_canonizers(arch)
    try:
        with contextlib.ExitStack() as stack:
            relevance = zennit_lrp(model, stack, canonizers or ())(x, top1)
    except (TypeError, RuntimeError, ValueError):
        cells[ZENNIT] = "not run (see above)"
    else:
        wrong = " (wrong †)" if canonizers is None else ""
        cells[ZENNIT] = _conservation(relevance.flatten(1).sum(1), seed) + wrong
    try:
        relevance = captum_lrp(model)(x, top1)
    except (TypeError, RuntimeError, ValueError):
        cells[CAPTUM] = "not run (see above)"
    else:
        cells[CAPTUM] = _conservation(relevance.flatten(1).sum(1), seed)
    return cells


@dataclass(frozen=True)
class Subject:
    """One model under test, with what every table measures on it."""

    arch: str
    model: nn.Module
    layer: str
    """Its LaFAM layer."""
    x: torch.Tensor
    plain: Callable[[], torch.Tensor]
    """The plain forward of ``x``, the reference of most figures."""
    lrp: LRP
    ixg: InputXGradient

    @classmethod
    def build(cls, arch: str, settings: Settings) -> Subject:
        """The random-init model, its LaFAM layer at the run's input size, a seeded input batch, its explainers."""
        device = settings.device
        model = build_model(arch, device)
        layer = find_default_layer(model, (settings.size, settings.size))
        torch.manual_seed(1)
        x = torch.randn(settings.batch, 3, settings.size, settings.size, device=device)
        return cls(arch, model, layer, x, functools.partial(_plain, model, x), LRP(model), InputXGradient(model))


def run_single(subject: Subject, settings: Settings, log: Callable[[str], None]) -> dict[str, Cell]:
    """Measure the one-class table's column of one model: ``{row: cell}``."""
    device, arch = settings.device, subject.arch
    model, layer, x, plain, lrp, ixg = subject.model, subject.layer, subject.x, subject.plain, subject.lrp, subject.ixg
    top1 = plain().argmax(1)
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)  # as TorchServe's VisionHandler.initialize
    cells: dict[str, Cell] = {}
    canonizers = zennit_canonizers(arch)
    with contextlib.ExitStack() as stack:
        methods: dict[str, Callable[[], object]] = {
            LAFAM: functools.partial(_lafam, model, layer, x, _layout(model, layer, x)),
            LRP_FREE: functools.partial(lrp.label_free, x, layer),
            LRP_CLASS: functools.partial(lrp.for_classes, x, top1),
            IXG_CLASS: functools.partial(ixg, x, top1[:, None]),
            ZENNIT: functools.partial(zennit_lrp(model, stack, canonizers or ()), x, top1),
            CAPTUM: functools.partial(captum_lrp(model), x, top1),
            IG: functools.partial(ig.attribute, x, target=top1, n_steps=15),
        }
        forward = measure(plain, plain, settings.pairs, device)
        cells[FORWARD] = Cell(Measurement(1.0, forward.seconds, forward.forward_seconds))
        log(f"{arch} {FORWARD}: {forward.seconds * 1e3:.1f}")
        for row, fn in methods.items():
            try:
                figure = measure(fn, plain, settings.pairs, device)
            except (TypeError, RuntimeError, ValueError) as exc:
                if row not in (CAPTUM, ZENNIT):  # zennit 0.5.1's hooks fail on nn.MultiheadAttention (ViT)
                    raise
                cells[row] = Cell(note=f"not run: {_error(exc)}")
                log(f"{arch} {row}: {cells[row].note}")
                continue
            note = ""
            if row in TARGET_ROWS:
                target = LRP_TARGETS.get(arch)
                if target is not None:
                    note = f"{'✓' if figure.ratio <= target else '✗'} (target ≤ {target:g})"
            elif row == ZENNIT and canonizers is None:
                note = "wrong †"
            elif row == CAPTUM:
                note = "wrong ‡"
            cells[row] = Cell(figure, note)
            log(f"{arch} {row}: {_fmt(figure.ratio)}× ({figure.seconds * 1e3:.1f} ms) {note}")
    return cells


def run_distributions(
    subject: Subject, settings: Settings, log: Callable[[str], None]
) -> dict[str, dict[int, Measurement | None]]:
    """Measure the distribution table on one model: ``{row: {K: measurement or None (skipped)}}``."""
    device = settings.device
    model, layer, x, plain, lrp, ixg = subject.model, subject.layer, subject.x, subject.plain, subject.lrp, subject.ixg
    top = plain().topk(max(settings.ks), dim=1).indices  # (N, max K), most likely first
    cam = GradCAM(model, layer).decide(x)  # decided once, as a worker does at start
    closed, vjp = GradCAM(model, layer), GradCAM(model, layer, closed_form=False)
    bases = {
        LRP_CLASS: functools.partial(lrp.for_classes, x, top[:, 0].contiguous()),
        IXG_CLASS: functools.partial(ixg, x, top[:, :1].contiguous()),
    }
    dist: dict[str, dict[int, Measurement | None]] = {row: {} for row in DIST_ROWS}
    for k in settings.ks:
        classes = top[:, :k].contiguous()
        variants: dict[str, Callable[[], object]] = {
            FAST_LRP: functools.partial(fast_lrp, model, lrp, x, layer, classes=classes, cam=cam),
            FAST_IXG: functools.partial(fast_input_x_gradient, model, x, layer, classes=classes, cam=cam),
            LRP_DIST: functools.partial(explain, model, x, lrp.for_classes, classes=classes),
            IXG_DIST: functools.partial(explain, model, x, ixg, classes=classes),
            IXG_LOOP: functools.partial(loop_input_x_gradient, model, x, classes),
            CAM_CLOSED: functools.partial(explain, model, x, closed, classes=classes),
            CAM_VJP: functools.partial(explain, model, x, vjp, classes=classes),
            CAM_LOOP: functools.partial(loop_gradcam, model, layer, x, classes),
        }
        for row, fn in variants.items():
            if row in SLOW_ROWS and k > settings.max_k_slow:
                dist[row][k] = None
                continue
            reference = bases[FAST_ROWS[row]] if row in FAST_ROWS else plain
            dist[row][k] = measure(fn, reference, settings.pairs, device)
            log(f"K={k} {row}: {_fmt(dist[row][k].ratio)}×")
    return dist


def run_benchmark(settings: Settings, log: Callable[[str], None] = print) -> Results:
    """Measure every method on every model, check conservation, then the distributions.

    Args:
        settings: what to measure.
        log: receives one progress line per figure.

    Returns:
        The :class:`Results`.
    """
    layers: dict[str, str] = {}
    single: dict[str, dict[str, Cell]] = {row: {} for row in SINGLE_ROWS}
    conservation: dict[str, dict[str, str]] = {row: {} for row in CONSERVATION_ROWS}
    dist: dict[str, dict[int, Measurement | None]] = {}
    for arch in settings.archs:
        subject = Subject.build(arch, settings)
        layers[arch] = subject.layer
        for row, cell in run_single(subject, settings, log).items():
            single[row][arch] = cell
        if arch == DIST_ARCH:
            dist = run_distributions(subject, settings, log)
        del subject
        for row, text in check_conservation(arch, settings).items():
            conservation[row][arch] = text
            log(f"{arch} conservation, {row}: {text}")
    return Results(layers, single, conservation, dist)


def _single_cell(row: str, cell: Cell) -> str:
    figure = cell.measurement
    if figure is None:
        return cell.note
    value = f"{figure.seconds * 1e3:.1f}" if row == FORWARD else _fmt(figure.ratio)
    return f"{value} {cell.note}".strip()


def _fast_cell(figure: Measurement) -> str:
    return f"{_fmt(figure.ratio)} {'✓' if figure.ratio <= FAST_TARGET else '✗'}"


def report(settings: Settings, results: Results) -> str:
    """The markdown section (without markers): header, one-class table, conservation, distributions, notes."""
    device = settings.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    archs = settings.archs
    columns = [f"{arch} (`{results.layers[arch]}`)" for arch in archs]
    size = f"{settings.size}x{settings.size}"
    lines = [
        f"## Explanation cost as a ratio to one forward (random init, {size}, batch {settings.batch})",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {cpu_name()} ({platform.machine()}), "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; device {where}; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, zennit {package_version('zennit')}, "
        f"captum {package_version('captum')}. Each ratio is the median over {settings.pairs} alternating pairs of "
        f"time(method) / time(reference) in the same process; the reference is one plain `torch.no_grad()` "
        f"forward of the same model unless stated. Regenerate with `make bench`.",
        "",
        "One class or label-free, × forward (column: model and its LaFAM layer):",
        "",
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(archs),
    ]
    for row in SINGLE_ROWS:
        cells = [_single_cell(row, results.single[row][arch]) for arch in archs]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Conservation, Σ input relevance ÷ what was seeded (the top-1 logit; label-free: Σ of the layer's "
        "activations), median over the batch, on the same architectures with no bias or shift anywhere (batch "
        "norms calibrated on random images, ConvNeXt layer scales 1), where the rules conserve exactly; a "
        "correct implementation gives 1 on the CNNs. A ViT's default rules (AttnLRP) do not conserve at the "
        "softmax, whose bias term absorbs relevance (Achtibat et al. 2024, Prop. 3.1), so its figure is below 1 "
        "by design; CP-LRP there conserves within 3e-4 of the seed (tests/unit/test_lrp_transformers.py):",
        "",
        "| implementation | " + " | ".join(archs) + " |",
        "|---|" + "---|" * len(archs),
    ]
    for row in CONSERVATION_ROWS:
        lines.append(f"| {row} | " + " | ".join(results.conservation[row][arch] for arch in archs) + " |")
    if results.dist:
        ks = settings.ks
        lines += [
            "",
            f"Attribution distributions on {DIST_ARCH} (`{results.layers[DIST_ARCH]}`), K competing classes (the "
            f"K most likely); the fast variants as a ratio to their base's one-class explanation, measured side "
            f"by side with it (target ≤ {FAST_TARGET:g} for any K), the others × forward:",
            "",
            "| variant | ratio to | " + " | ".join(f"K={k}" for k in ks) + " |",
            "|---|---|" + "---|" * len(ks),
        ]
        for row in DIST_ROWS:
            measured = {k: m.ratio for k, m in results.dist[row].items() if m is not None}
            cells = []
            for k in ks:
                figure = results.dist[row][k]
                if figure is None:
                    cells.append(_skipped(measured, k))
                else:
                    cells.append(_fast_cell(figure) if row in FAST_ROWS else _fmt(figure.ratio))
            reference = FAST_ROWS[row].split(",")[0] if row in FAST_ROWS else "forward"
            lines.append(f"| {row} | {reference} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Top-1 targets are computed before timing. zennit runs on a deep copy of the model with our composite "
        "(ZPlus convolutions, Epsilon(1e-6) linear layers, ZBox first layer, Norm on average pooling, Pass on "
        "activations and batch norms) and `ResNetCanonizer` on ResNets. † " + ZENNIT_WRONG + ". captum's "
        "`LRP` runs on a deep copy with its default rules (Epsilon 1e-9 on Conv2d, Linear, BatchNorm2d and "
        "pooling; relevance passed through ReLU, Dropout, Tanh; any other leaf module is refused, the exact "
        "error is in the cell). ‡ It runs on ResNet-50 but gives a residual `+` its plain gradient, so both "
        "summands receive the full relevance and the total grows at every residual block instead of being "
        "conserved (see the conservation table). IG: `IntegratedGradients(model).attribute(x, target, "
        "n_steps=15)` as in torchserve 0.12.0 `ts/torch_handler/vision_handler.py` (`get_insights`), without "
        "its `.tolist()`.",
    ]
    if results.dist:
        passes = "one relevance pass per class" if device.type == "cpu" else "8 classes per batched relevance pass"
        lines[-1] += (
            " Distributions: the fast variants explain the top class with the competition decided at the layer "
            "by Grad-CAM (decided once, as a worker does at start); the exact LRP distribution runs the K "
            f"classes' relevance passes ({passes} on this device), the exact input×gradient one K backward "
            f"passes (batched: 16 classes per vjp). — : not measured (cost ∝ K, K > {settings.max_k_slow}); "
            "≈ : linear extrapolation through the two largest measured K."
        )
    return "\n".join(lines)


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--ks must list integers >= 1, got {text!r}")
    return ks


def _archs(text: str) -> tuple[str, ...]:
    archs = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [arch for arch in archs if not callable(getattr(torchvision.models, arch, None))]
    if not archs or unknown:
        raise argparse.ArgumentTypeError(f"--archs must name torchvision models, got {text!r}")
    return archs


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """Parse the command line into :class:`Settings` (``--quick`` fills in what was not given)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=_archs, default=ARCHS, help=f"models (default {','.join(ARCHS)})")
    parser.add_argument("--size", type=int, help="input side in pixels (default 224; --quick: 64)")
    parser.add_argument("--batch", type=int, default=1, help="images per batch (default 1)")
    parser.add_argument("--pairs", type=int, help="alternating pairs per figure (default 5; --quick: 1)")
    parser.add_argument("--ks", type=_ks, help="K for the distributions (default 2,10,100,1000; --quick: 2,3,5)")
    parser.add_argument("--max-k-slow", type=int, help="largest K of the variants ∝ K (default 100; --quick: 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own; --quick: 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--write", type=Path, help="update this markdown file's explain_speed section")
    parser.add_argument("--quick", action="store_true", help="smoke test: 64x64, 1 pair, K=2,3,5, 1 thread")
    args = parser.parse_args(argv)
    if args.batch < 1 or (args.pairs is not None and args.pairs < 1):
        parser.error("--batch and --pairs must be >= 1")
    if args.threads is not None and args.threads < 0:
        parser.error("--threads must be >= 0 (0: torch's own default)")
    if args.size is not None and args.size < 64:
        parser.error("--size must be >= 64 (the LaFAM layer must keep a spatial size above 1x1)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    quick = args.quick
    settings = Settings(
        archs=args.archs,
        size=args.size if args.size is not None else (64 if quick else 224),
        batch=args.batch,
        pairs=args.pairs if args.pairs is not None else (1 if quick else 5),
        ks=args.ks if args.ks is not None else ((2, 3, 5) if quick else (2, 10, 100, 1000)),
        max_k_slow=args.max_k_slow if args.max_k_slow is not None else (3 if quick else 100),
        device=device,
    )
    if max(settings.ks) > 1000:
        parser.error("--ks: the models have 1000 classes")
    return settings, args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the section and optionally write it into a results file; return the exit status."""
    settings, args = parse_settings(argv)
    threads = args.threads if args.threads is not None else (1 if args.quick else 0)
    if threads:
        torch.set_num_threads(threads)
    results = run_benchmark(settings, log=lambda line: print(line, flush=True))
    marked = section(report(settings, results), START_MARKER, END_MARKER)
    print(marked)
    if args.write:
        write_section(args.write, marked, START_MARKER, END_MARKER)
    figures = [cell.measurement for cells in results.single.values() for cell in cells.values()]
    figures += [figure for by_k in results.dist.values() for figure in by_k.values()]
    if not all(math.isfinite(figure.ratio) for figure in figures if figure is not None):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
