"""Explanation methods' cost as a ratio to one plain forward pass, all measured side by side in one process.

Model: torchvision ResNet-50, random init (batch norms with random running statistics, so that folding them
is not a no-op), ``.eval()``, 224x224 inputs, batch ``--batch`` (1). Every figure is a RATIO to a plain eager
forward under ``torch.no_grad()``: each method runs in alternation with that forward (ABAB pairs, the order
flipped every pair, one warm-up of each first), and the figure is the median over ``--pairs`` pairs of
time(method) / time(forward of the same pair), so that drift of a noisy machine hits both alike.

Single-pass methods:

- plain forward (1.00 by definition);
- LaFAM: forward with ``layer4`` captured + :func:`handlers.explain.lafam.lafam` + nearest upsampling;
- LRP label-free and LRP of the top-1 logit, ours (:class:`handlers.explain.lrp.LRP`);
- zennit 0.5.1 LRP of the top-1 logit with the same rules as ours (ZPlus convolutions, Epsilon linear,
  ZBox first layer, Norm on pooling and residual sums via ``ResNetCanonizer``) on a deep copy of the model;
- Integrated Gradients as TorchServe 0.12's stock vision handler runs it: torchserve 0.12.0,
  ``ts/torch_handler/vision_handler.py``, ``initialize`` (line 26) ``self.ig = IntegratedGradients(self.model)``
  and ``get_insights`` (line 66) ``self.ig.attribute(tensor_data, target=target, n_steps=15).tolist()``. The
  target there comes from the request (default 0); here it is the top-1 class, computed before timing, and
  the ``.tolist()`` serialisation is not timed.

Attribution distributions (Walter et al., arXiv:2503.07346) for K classes, the K most likely of the plain
forward (``--ks``): Grad-CAM at ``layer4`` (closed form, batched vjp, and a Python loop of K backward passes),
input × gradient (batched vjp, and a loop of K backward passes), LRP per class (one relevance pass per class
on the CPU, so no separate loop row), and the two fast variants whose cost does not depend on K. The variants
that cost about K backward passes are skipped above ``--max-k-slow``; their cells then show "—" and, where two
K were measured, a linear extrapolation of the ratio. With K = 1 every distribution map is zero by
definition (a class competing with nothing); it is still timed.

Run (on a quiet machine: a full run takes several minutes)::

    python -m benchmarks.explain_speed [--batch 1] [--pairs 5] [--ks 1,2,5,10,100,1000] [--max-k-slow 100]
        [--threads N] [--device cpu|cuda] [--write benchmarks/RESULTS.md]
    python -m benchmarks.explain_speed --quick      # smoke test: resnet18, 64x64, 1 pair, K = 1, 2, 5

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

from benchmarks._report import cpu_name, package_version, section, write_section
from handlers.explain.distribution import attribution_distribution, explain, fast_input_x_gradient, fast_lrp
from handlers.explain.gradients import GradCAM, InputXGradient, capture
from handlers.explain.lafam import lafam, resize_maps
from handlers.explain.lrp import LRP
from handlers.manifest import IMAGENET_MEAN, IMAGENET_STD

START_MARKER = "<!-- explain_speed:start -->"
END_MARKER = "<!-- explain_speed:end -->"
LAYER = "layer4"

FORWARD = "plain forward (no_grad)"
LAFAM = "LaFAM (layer4, nearest upsampling)"
LRP_FREE = "LRP label-free, ours (layer4)"
LRP_CLASS = "LRP top-1 class, ours"
ZENNIT = "LRP top-1 class, zennit 0.5.1"
IG = "Integrated Gradients, captum (TorchServe stock, n_steps=15)"
SINGLE_ROWS = (FORWARD, LAFAM, LRP_FREE, LRP_CLASS, ZENNIT, IG)
"""Rows of the single-pass table, in order."""

CAM_CLOSED = "Grad-CAM, ours (closed form)"
CAM_VJP = "Grad-CAM, ours (batched vjp)"
CAM_LOOP = "Grad-CAM, K-loop"
IXG = "input×gradient, ours (batched vjp)"
IXG_LOOP = "input×gradient, K-loop"
LRP_DIST = "LRP, ours (per class)"
FAST_IXG = "fast input×gradient"
FAST_LRP = "fast LRP"
DIST_ROWS = (CAM_CLOSED, CAM_VJP, CAM_LOOP, IXG, IXG_LOOP, LRP_DIST, FAST_IXG, FAST_LRP)
"""Rows of the distribution table, in order."""
SLOW_ROWS = frozenset({CAM_LOOP, IXG, IXG_LOOP, LRP_DIST})
"""Distribution rows whose cost grows with K: skipped above ``--max-k-slow``."""


@dataclass(frozen=True)
class Settings:
    """What one run measures."""

    arch: str
    """torchvision model builder name."""
    size: int
    """Input side in pixels."""
    batch: int
    """Images per batch."""
    pairs: int
    """Alternating (method, forward) pairs per figure."""
    ks: tuple[int, ...]
    """Numbers of competing classes for the distributions."""
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
        plain: the plain forward pass.
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
    model = getattr(torchvision.models, arch)(weights=None).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.to(device)


def zennit_lrp(model: nn.Module, stack: contextlib.ExitStack) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """zennit 0.5.1 LRP with our rules on a deep copy of ``model``; the hooks stay until ``stack`` closes.

    Same composite as ``tests/unit/test_lrp.py`` (zennit's ``EpsilonGammaBox`` with ``ZPlus`` in place of
    ``Gamma``, as our LRP): ZPlus on convolutions, Epsilon(1e-6) on linear layers, ZBox on the first layer,
    ``layer_map_base`` (Norm on average pooling, pass on activations), ``ResNetCanonizer`` (batch norms merged,
    Norm on the residual sums). zennit registers parameters and hooks on the model it explains, hence the copy.

    Returns:
        ``run(x, classes)``: relevance ``(N, H, W)`` of the logit ``classes[n]`` of each image.
    """
    from zennit.attribution import Gradient
    from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import Epsilon, ZBox, ZPlus
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution

    own = copy.deepcopy(model)
    device = next(own.parameters()).device
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    composite = SpecialFirstLayerMapComposite(
        layer_map=[*layer_map_base(), (Convolution, ZPlus()), (nn.Linear, Epsilon(1e-6))],
        first_map=[(Convolution, ZBox((0 - mean) / std, (1 - mean) / std))],
        canonizers=[ResNetCanonizer()],
    )
    attributor = stack.enter_context(Gradient(model=own, composite=composite))

    def run(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        def seed(out: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(out).scatter_(1, classes[:, None], out.gather(1, classes[:, None]))

        _, relevance = attributor(x.clone().requires_grad_(True), seed)
        return relevance.sum(1)

    return run


def loop_gradcam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM distributions the naive way: one forward, then K single-class backward passes to ``layer4``."""
    with capture(getattr(model, LAYER)) as outs:
        logits = model(x)
    acts = outs[0]
    maps = []
    for k in range(classes.shape[1]):
        (grad,) = torch.autograd.grad(logits.gather(1, classes[:, k : k + 1]).sum(), acts, retain_graph=True)
        maps.append((grad.mean((2, 3), keepdim=True) * acts).sum(1).detach())
    return attribution_distribution(torch.stack(maps, 1))


def loop_input_x_gradient(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Input × gradient distributions the naive way: one forward, then K single-class backward passes."""
    inputs = x.detach().requires_grad_(True)
    logits = model(inputs)
    maps = []
    for k in range(classes.shape[1]):
        (grad,) = torch.autograd.grad(logits.gather(1, classes[:, k : k + 1]).sum(), inputs, retain_graph=True)
        maps.append((grad * x).sum(1))
    return attribution_distribution(torch.stack(maps, 1))


def _lafam(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), capture(getattr(model, LAYER)) as outs:
        model(x)
    return resize_maps(lafam(outs[0]), tuple(x.shape[-2:]), "nearest")


def _plain(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _fmt(ratio: float) -> str:
    if ratio >= 100:
        return f"{ratio:.0f}"
    return f"{ratio:.1f}" if ratio >= 10 else f"{ratio:.2f}"


def _skipped(measured: dict[int, float], k: int) -> str:
    """'—', with a linear extrapolation from the two largest measured K when there are two."""
    known = sorted(measured)
    if len(known) < 2:
        return "—"
    k1, k2 = known[-2], known[-1]
    slope = (measured[k2] - measured[k1]) / (k2 - k1)
    return f"— (≈ {_fmt(measured[k2] + slope * (k - k2))})"


def run_benchmark(settings: Settings, log: Callable[[str], None] = print) -> tuple[Measurement, dict, dict]:
    """Measure every method; return the forward, the single-pass figures and the distribution figures.

    Args:
        settings: what to measure.
        log: receives one progress line per figure.

    Returns:
        ``(forward, single, dist)``: the forward's own figure (ratio 1), ``{row: Measurement}`` for the
        single-pass rows, and ``{row: {K: Measurement | None}}`` (``None``: skipped) for the distributions.
    """
    device = settings.device
    model = build_model(settings.arch, device)
    torch.manual_seed(1)
    x = torch.randn(settings.batch, 3, settings.size, settings.size, device=device)
    plain = functools.partial(_plain, model, x)
    top = plain().topk(max(settings.ks), dim=1).indices  # (N, max K), most likely first
    top1 = top[:, 0].contiguous()
    lrp = LRP(model)
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)  # as TorchServe's VisionHandler.initialize
    single: dict[str, Measurement] = {}
    dist: dict[str, dict[int, Measurement | None]] = {row: {} for row in DIST_ROWS}
    with contextlib.ExitStack() as stack:
        zennit = zennit_lrp(model, stack)
        methods: dict[str, Callable[[], object]] = {
            LAFAM: functools.partial(_lafam, model, x),
            LRP_FREE: functools.partial(lrp.label_free, x, LAYER),
            LRP_CLASS: functools.partial(lrp.for_classes, x, top1),
            ZENNIT: functools.partial(zennit, x, top1),
            IG: functools.partial(ig.attribute, x, target=top1, n_steps=15),
        }
        forward = measure(plain, plain, settings.pairs, device)
        forward = Measurement(1.0, forward.seconds, forward.forward_seconds)
        single[FORWARD] = forward
        log(f"{FORWARD}: {forward.seconds * 1e3:.1f} ms")
        for row, fn in methods.items():
            single[row] = measure(fn, plain, settings.pairs, device)
            log(f"{row}: {_fmt(single[row].ratio)}× ({single[row].seconds * 1e3:.1f} ms)")

    closed, vjp = GradCAM(model, LAYER), GradCAM(model, LAYER, closed_form=False)
    ixg = InputXGradient(model)
    for k in settings.ks:
        classes = top[:, :k].contiguous()
        variants: dict[str, Callable[[], object]] = {
            CAM_CLOSED: functools.partial(explain, model, x, closed, classes=classes),
            CAM_VJP: functools.partial(explain, model, x, vjp, classes=classes),
            CAM_LOOP: functools.partial(loop_gradcam, model, x, classes),
            IXG: functools.partial(explain, model, x, ixg, classes=classes),
            IXG_LOOP: functools.partial(loop_input_x_gradient, model, x, classes),
            LRP_DIST: functools.partial(explain, model, x, lrp.for_classes, classes=classes),
            FAST_IXG: functools.partial(fast_input_x_gradient, model, x, LAYER, classes=classes),
            FAST_LRP: functools.partial(fast_lrp, model, lrp, x, LAYER, classes=classes),
        }
        for row, fn in variants.items():
            if row in SLOW_ROWS and k > settings.max_k_slow:
                dist[row][k] = None
                continue
            dist[row][k] = measure(fn, plain, settings.pairs, device)
            log(f"K={k} {row}: {_fmt(dist[row][k].ratio)}×")
    return forward, single, dist


def report(settings: Settings, forward: Measurement, single: dict, dist: dict) -> str:
    """The markdown section (without markers): a header, the single-pass table, the distribution table, notes."""
    device = settings.device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"## Explanation cost as a ratio to one forward ({settings.arch}, random init, "
        f"{settings.size}x{settings.size}, batch {settings.batch})",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {cpu_name()} ({platform.machine()}), "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; device {where}; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, zennit {package_version('zennit')}, "
        f"captum {package_version('captum')}. Each ratio is the median over {settings.pairs} alternating pairs of "
        f"time(method) / time(plain `torch.no_grad()` forward); the plain forward takes "
        f"{forward.seconds * 1e3:.1f} ms. Regenerate with `make bench`.",
        "",
        "| method | × forward | ms |",
        "|---|---|---|",
    ]
    lines += [f"| {row} | {_fmt(single[row].ratio)} | {single[row].seconds * 1e3:.1f} |" for row in SINGLE_ROWS]
    ks = settings.ks
    lines += [
        "",
        f"Attribution distributions, × forward, for K competing classes (the K most likely; batch {settings.batch}):",
        "",
        "| variant | " + " | ".join(f"K={k}" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for row in DIST_ROWS:
        measured = {k: m.ratio for k, m in dist[row].items() if m is not None}
        cells = [_fmt(dist[row][k].ratio) if dist[row][k] is not None else _skipped(measured, k) for k in ks]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Top-1 targets are computed before timing. IG: `IntegratedGradients(model).attribute(x, target, "
        f"n_steps=15)` as in torchserve 0.12.0 `ts/torch_handler/vision_handler.py` (`get_insights`), "
        f"without its `.tolist()`. zennit runs on a deep copy of the model with our rules. K=1: the maps are "
        f"all zero by definition, still timed. LRP per class runs one relevance pass per class on the CPU "
        f"(hence no separate loop row). The fast variants explain the top class with layer-level competition: "
        f"their cost does not depend on K. — : skipped (K > {settings.max_k_slow}, cost ∝ K); ≈ : linear "
        f"extrapolation from the two largest measured K.",
    ]
    return "\n".join(lines)


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--ks must list integers >= 1, got {text!r}")
    return ks


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """Parse the command line into :class:`Settings` (``--quick`` fills in what was not given)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="images per batch (default 1)")
    parser.add_argument("--pairs", type=int, help="alternating pairs per figure (default 5; --quick: 1)")
    parser.add_argument("--ks", type=_ks, help="K for the distributions (default 1,2,5,10,100,1000; --quick: 1,2,5)")
    parser.add_argument("--max-k-slow", type=int, help="largest K of the variants ∝ K (default 100; --quick: 5)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--write", type=Path, help="update this markdown file's explain_speed section")
    parser.add_argument("--quick", action="store_true", help="smoke test: resnet18, 64x64, 1 pair, K=1,2,5")
    args = parser.parse_args(argv)
    if args.batch < 1 or (args.pairs is not None and args.pairs < 1):
        parser.error("--batch and --pairs must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    quick = args.quick
    settings = Settings(
        arch="resnet18" if quick else "resnet50",
        size=64 if quick else 224,
        batch=args.batch,
        pairs=args.pairs if args.pairs is not None else (1 if quick else 5),
        ks=args.ks if args.ks is not None else ((1, 2, 5) if quick else (1, 2, 5, 10, 100, 1000)),
        max_k_slow=args.max_k_slow if args.max_k_slow is not None else (5 if quick else 100),
        device=device,
    )
    if max(settings.ks) > 1000:
        parser.error("--ks: the model has 1000 classes")
    return settings, args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the section and optionally write it into a results file; return the exit status."""
    settings, args = parse_settings(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    forward, single, dist = run_benchmark(settings, log=lambda line: print(line, flush=True))
    body = report(settings, forward, single, dist)
    marked = section(body, START_MARKER, END_MARKER)
    print(marked)
    if args.write:
        write_section(args.write, marked, START_MARKER, END_MARKER)
    if not all(math.isfinite(m.ratio) for m in single.values()):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
