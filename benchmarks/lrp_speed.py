"""LRP's cost as a ratio to a plain forward pass, ours vs zennit's, measured side by side in one process.

ResNet-50 (random init, batch norms with random running statistics), 224x224, CPU. Variants, run in
alternation (ABCD ABCD ...) so that drift of a noisy machine hits all alike:

- ``forward``: the eager model under ``torch.inference_mode`` (the baseline, ratio 1);
- ``lrp label-free``: :class:`handlers.explain.lrp.LRP` seeded at ``layer4``;
- ``lrp one class``: the same, seeded at one logit per sample;
- ``zennit``: zennit 0.5.1's hook-based LRP with the same rules (ZPlus conv, Epsilon linear, ZBox first,
  Norm on average pooling and residual sums, ResNet canonizer), one logit per sample.

Each figure is the median over repeats of (variant time / forward time of the same round).
Run: ``python -m benchmarks.lrp_speed [--repeats 7] [--threads 2] [--batches 1 8]``. When another process
competes for the cores, use ``--threads 1``: two-thread runs then slow the eager (contiguous-layout) forward far
more than the others (80 ms → 2.6 s at batch 1 measured), which flatters every ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from handlers.explain.lrp import LRP
from handlers.manifest import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def _zennit(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from zennit.attribution import Gradient
    from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import Epsilon, ZBox, ZPlus
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Convolution

    own = copy.deepcopy(model)
    composite = SpecialFirstLayerMapComposite(
        layer_map=[*layer_map_base(), (Convolution, ZPlus()), (torch.nn.Linear, Epsilon())],
        first_map=[(Convolution, ZBox((0 - MEAN) / STD, (1 - MEAN) / STD))],
        canonizers=[ResNetCanonizer()],
    )
    attributor = Gradient(model=own, composite=composite)
    attributor.__enter__()  # kept registered for the benchmark's lifetime

    def run(x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        def seed(out: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(out).scatter_(1, classes[:, None], out.gather(1, classes[:, None]))

        _, relevance = attributor(x.requires_grad_(True), seed)
        return relevance.sum(1)

    return run


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-zennit", action="store_true", help="skip the (slow) zennit reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = _model()
    lrp = LRP(model)
    zennit = None if args.no_zennit else _zennit(model)
    print(f"resnet50 224x224, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.repeats} alternating repeats, ratio to the plain forward")  # fmt: skip
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224)
        classes = torch.arange(batch) % 1000

        def forward(x: torch.Tensor = x) -> object:
            with torch.inference_mode():
                return model(x)

        variants: dict[str, Callable[[], object]] = {
            "lrp label-free": lambda x=x: lrp.label_free(x, "layer4"),
            "lrp one class": lambda x=x, c=classes: lrp.for_classes(x, c),
        }
        if zennit is not None:
            variants["zennit one class"] = lambda x=x, c=classes: zennit(x.clone(), c)
        for fn in (forward, *variants.values()):  # warm-up
            fn()
        ratios: dict[str, list[float]] = {name: [] for name in variants}
        base: list[float] = []
        for _ in range(args.repeats):
            t0 = _time(forward)
            base.append(t0)
            for name, fn in variants.items():
                ratios[name].append(_time(fn) / t0)
        line = f"batch {batch}: forward {statistics.median(base) * 1000:.0f} ms = 1.00x"
        for name, values in ratios.items():
            line += f" | {name} {statistics.median(values):.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
