"""Sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): cascading randomisation.

The eager model's parameterised stages are re-initialised one after another from the top (head first)
down to the input; after each step every method explains the same images again (the same classes), and
its map is compared with the trained model's map by Spearman rank correlation and SSIM. A faithful method
changes as the model is destroyed; a method whose map still looks the same after the whole model is
random explains the image (edges, contrast), not the model, and is flagged.

It needs the eager model, so it runs on a local archive or export folder (:class:`~.sources.LocalSource`),
on copies of the model: the served one is never touched.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from handlers.errors import InvalidOption
from handlers.explain.gradients import capture, logits_of, resolve_layer
from handlers.explain.lafam import resize_maps
from handlers.images import decode
from handlers.manifest import Manifest
from handlers.methods import Endpoint, Engines, Inputs, Need, capabilities, choose_classes, registry
from handlers.options import parse_options

from . import metrics
from .data import Sample
from .runner import METHODS, Method, class_options
from .sources import LocalSource, png_bytes

FLAG_THRESHOLD = 0.5
"""A method whose mean Spearman rank correlation with the trained model's map is still at least this once
every stage is random is flagged as insensitive to the model. SSIM is reported beside it but does not flag:
it is high between two mostly-empty maps (a sparse map and an all-zero one), which says nothing about the
model."""


@dataclass(frozen=True)
class SanityResult:
    """Per method, the mean similarity to the trained model's map after each randomisation step."""

    steps: tuple[str, ...]
    spearman: dict[str, list[float]]
    ssim: dict[str, list[float]]

    @property
    def flagged(self) -> dict[str, str]:
        """Methods whose maps barely change with a fully random model, with the reason."""
        out = {}
        for method, values in self.spearman.items():
            rho, ssim = values[-1], self.ssim[method][-1]
            if rho >= FLAG_THRESHOLD:
                out[method] = f"fully random model: Spearman {rho:.2f} ≥ {FLAG_THRESHOLD} (SSIM {ssim:.2f})"
        return out


def stages(model: nn.Module) -> list[str]:
    """Top-level children that hold parameters, from the output back to the input (randomisation order)."""
    return [name for name, child in reversed(list(model.named_children())) if any(True for _ in child.parameters())]


def _randomise(module: nn.Module) -> None:
    for child in module.modules():
        reset = getattr(child, "reset_parameters", None)
        if callable(reset) and any(True for _ in child.parameters(recurse=False)):
            reset()
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.reset_running_stats()


class _LocalMethods:
    """Every registered method computed directly on a given eager model (the same code the worker runs).

    The eager model stands in for the served graph: forward methods get its activations at the exported
    layers, backward methods the :class:`~handlers.methods.Engines` built from it.
    """

    def __init__(self, model: nn.Module, manifest: Manifest) -> None:
        self.model = model.eval()
        self.manifest = manifest
        self.engines = Engines(self.model, manifest)
        self.capabilities = capabilities(manifest, self.engines)

    def map(self, x: torch.Tensor, method: Method, target: int | None, ranking: list[int]) -> np.ndarray:
        entry = registry.get(method.options["method"])
        body = {**method.options, **(class_options(method, target, ranking) if method.per_class else {})}
        options = parse_options(
            self.manifest, body=body, methods=registry.names(), max_classes=1000, capabilities=self.capabilities
        )
        layers = self.manifest.layer_names if entry.endpoint is Endpoint.FORWARD else ()
        with torch.no_grad(), contextlib.ExitStack() as stack:
            captured = {
                name: stack.enter_context(
                    capture(
                        resolve_layer(self.model, name),
                        input_size=tuple(x.shape[-2:]),
                        hint=None if self.manifest.layer(name).layout == "tokens" else self.manifest.layer(name).layout,
                    )
                )
                for name in layers
            }
            logits = logits_of(self.model(x[None]))
        probabilities = torch.softmax(logits.float(), dim=1)[0] if self.manifest.task == "classification" else None
        classes = choose_classes(entry, options, probabilities) if Need.CLASSES in entry.needs else None
        activations = {name: outs[0] for name, outs in captured.items()}
        inputs = Inputs(x, options, probabilities, classes, batch_activations=activations, engines=self.engines)
        result = entry.explain(inputs)
        native = result.maps[0].detach().float().cpu()
        return resize_maps(native[None], self.manifest.input_size, method.upsample)[0].double().numpy()


def sanity_check(
    source: LocalSource, samples: Sequence[Sample], methods: Sequence[Method] = METHODS, *, progress: bool = True
) -> SanityResult:
    """Cascading randomisation of the source's eager model; see the module docstring.

    Raises:
        ValueError: the archive carries no eager model (export it with ``--eager``).
    """
    if source.service.engines is None:
        raise ValueError("the sanity check needs the eager model: export with --eager")
    manifest = source.manifest
    trained = source.service.engines.model
    size, mean, std, limit = manifest.input_size, manifest.mean, manifest.std, manifest.max_pixels
    inputs = [decode(png_bytes(s.image), size, mean, std, limit).tensor for s in samples]
    reference = _LocalMethods(copy.deepcopy(trained), manifest)
    with torch.no_grad():
        rankings = [torch.argsort(reference.model(x[None])[0], descending=True).tolist() for x in inputs]
    targets = [s.label if s.label is not None else r[0] for s, r in zip(samples, rankings, strict=True)]
    usable = [m for m in methods if m.name not in _unavailable(reference, inputs[0], targets[0], rankings[0], methods)]
    originals = {
        m.name: [reference.map(x, m, t, r) for x, t, r in zip(inputs, targets, rankings, strict=True)] for m in usable
    }
    torch.manual_seed(0)
    randomised = copy.deepcopy(trained)
    names = stages(randomised)
    spearman: dict[str, list[float]] = {m.name: [] for m in usable}
    ssim: dict[str, list[float]] = {m.name: [] for m in usable}
    for name in tqdm(names, desc="sanity", unit="stage", disable=not progress):
        _randomise(randomised.get_submodule(name))
        current = _LocalMethods(randomised, manifest)
        for method in usable:
            maps = [current.map(x, method, t, r) for x, t, r in zip(inputs, targets, rankings, strict=True)]
            pairs = list(zip(originals[method.name], maps, strict=True))
            spearman[method.name].append(statistics.fmean(metrics.spearman(a, b) for a, b in pairs))
            ssim[method.name].append(statistics.fmean(metrics.ssim(a, b) for a, b in pairs))
    return SanityResult(tuple(names), spearman, ssim)


def _unavailable(
    local: _LocalMethods, x: torch.Tensor, target: int, ranking: list[int], methods: Sequence[Method]
) -> set[str]:
    missing = set()
    for method in methods:
        try:
            local.map(x, method, target, ranking)
        except (ValueError, InvalidOption):  # e.g. LRP cannot explain this model
            missing.add(method.name)
    return missing
