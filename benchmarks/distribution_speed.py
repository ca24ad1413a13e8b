"""Attribution distributions: cost as a ratio to one plain forward pass, for K competing classes.

ResNet-50 (random init, eval), 224x224. For each K the variants below run alternately with a plain
``torch.no_grad()`` forward (ABAB...), and each figure is the median of the per-pair ratios:

- ``closed``   Grad-CAM distributions, closed form (one no-grad forward + one contraction, no backward);
- ``cam-vjp``  Grad-CAM distributions via one forward + batched vector-Jacobian products (``closed_form=False``);
- ``cam-loop`` Grad-CAM, a Python loop of K single-class backward passes through the head (the naive way);
- ``ixg``      input x gradient distributions, one forward + batched vjp in chunks;
- ``ixg-loop`` input x gradient, a loop of K single-class backward passes;
- ``fast``     :func:`fast_input_x_gradient` (layer-level competition, one backward) — independent of K.

Run: ``python -m benchmarks.distribution_speed [--batch 1] [--ks 1,2,5,10,100,1000] [--pairs 5]``
(``--slow-max-k`` / ``--ixg-max-k`` bound the K of the autograd variants, which cost about K backward passes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from handlers.explain.distribution import attribution_distribution, explain, fast_input_x_gradient
from handlers.explain.gradients import GradCAM, InputXGradient, capture


def _loop_gradcam(model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    with capture(model.layer4) as outs:
        logits = model(x)
    acts = outs[0]
    maps = []
    for k in range(classes.shape[1]):
        (grad,) = torch.autograd.grad(logits.gather(1, classes[:, k : k + 1]).sum(), acts, retain_graph=True)
        maps.append((grad.mean((2, 3), keepdim=True) * acts).sum(1).detach())
    return attribution_distribution(torch.stack(maps, 1))


def _loop_ixg(model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    inputs = x.detach().requires_grad_(True)
    logits = model(inputs)
    maps = []
    for k in range(classes.shape[1]):
        (grad,) = torch.autograd.grad(logits.gather(1, classes[:, k : k + 1]).sum(), inputs, retain_graph=True)
        maps.append((grad * x).sum(1))
    return attribution_distribution(torch.stack(maps, 1))


def ratio(run: Callable[[], object], plain: Callable[[], object], pairs: int) -> float:
    """Median over alternating pairs of time(run) / time(plain)."""
    run()
    plain()
    ratios = []
    for index in range(pairs):
        times = {}
        for name, fn in (("run", run), ("plain", plain)) if index % 2 == 0 else (("plain", plain), ("run", run)):
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        ratios.append(times["run"] / times["plain"])
    return statistics.median(ratios)


def main() -> None:
    """Print the ratio table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ks", default="1,2,5,10,100,1000")
    parser.add_argument("--slow-max-k", type=int, default=100, help="largest K for the Grad-CAM autograd variants")
    parser.add_argument("--ixg-max-k", type=int, default=100, help="largest K for the input x gradient variants")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=16, help="classes per batched input x gradient backward")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(args.batch, 3, 224, 224)

    def plain() -> object:
        with torch.no_grad():
            return model(x)

    start = time.perf_counter()
    plain()
    print(f"ResNet-50 random init, batch {args.batch}, 224x224, {torch.get_num_threads()} threads; ")
    print(f"plain forward ≈ {1000 * (time.perf_counter() - start):.0f} ms; ratios = median of {args.pairs} pairs")
    columns = ("closed", "cam-vjp", "cam-loop", "ixg", "ixg-loop", "fast")
    print(f"{'K':>5} " + " ".join(f"{c:>9}" for c in columns))
    closed, vjp = GradCAM(model, "layer4"), GradCAM(model, "layer4", closed_form=False, chunk_size=256)
    ixg = InputXGradient(model, chunk_size=args.chunk)
    for k in (int(v) for v in args.ks.split(",")):
        classes = torch.arange(k).expand(args.batch, -1).contiguous()
        rows = {"closed": ratio(lambda c=classes: explain(model, x, closed, classes=c), plain, args.pairs)}
        if k <= args.slow_max_k:
            rows["cam-vjp"] = ratio(lambda c=classes: explain(model, x, vjp, classes=c), plain, args.pairs)
            rows["cam-loop"] = ratio(lambda c=classes: _loop_gradcam(model, x, c), plain, args.pairs)
        if k <= args.ixg_max_k:
            rows["ixg"] = ratio(lambda c=classes: explain(model, x, ixg, classes=c), plain, args.pairs)
            rows["ixg-loop"] = ratio(lambda c=classes: _loop_ixg(model, x, c), plain, args.pairs)
        if k > 1:
            rows["fast"] = ratio(lambda c=classes: fast_input_x_gradient(model, x, "layer4", classes=c), plain, 3)
        print(f"{k:>5} " + " ".join(f"{rows[c]:>9.2f}" if c in rows else f"{'-':>9}" for c in columns), flush=True)


if __name__ == "__main__":
    main()
