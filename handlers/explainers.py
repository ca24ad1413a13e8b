"""Backward-pass explanations of one image with the archive's eager model: the ``/explanations`` methods.

One :class:`BackwardExplainer` per worker holds the eager model (on the device TorchServe assigned) and,
when the architecture allows, the LRP layer list built from it once. Each call explains one request with
the options it was validated with; the classes come from the served graph's probabilities, so the maps
explain exactly the classes the response lists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .explain.distribution import explain, fast_input_x_gradient, fast_lrp, select_classes
from .explain.gradients import GradCAM, InputXGradient
from .explain.lrp import LRP
from .manifest import Manifest
from .options import BACKWARD_METHODS, BASES, CLASS_METHODS, RequestOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Maps:
    """What a method returns for one image.

    Attributes:
        maps: ``(K, h, w)`` one map per explained class, or ``(1, h, w)`` for a label-free method.
        classes: the explained classes (``None`` for label-free methods); for distributions the requested
            classes, or the most likely ones (the least likely class competes but gets no map).
        competitors: the classes that competed (distributions), target first.
        layer: the layer the method used, or ``None`` (input-level methods).
    """

    maps: torch.Tensor
    classes: tuple[int, ...] | None
    competitors: tuple[int, ...] | None
    layer: str | None


class BackwardExplainer:
    """Runs the backward-pass methods on one eager model.

    Args:
        model: the eager model in eval mode, on its device.
        manifest: the served model's manifest (task, normalisation).
    """

    def __init__(self, model: nn.Module, manifest: Manifest) -> None:
        self.model = model
        self.manifest = manifest
        self.device = next(model.parameters()).device
        classification = manifest.task == "classification"
        try:
            self.lrp: LRP | None = LRP(model, mean=manifest.mean, std=manifest.std)
            # One blank image now: a model whose forward is not the chain of its modules fails here, at
            # worker start, rather than on every LRP request.
            blank = torch.zeros(1, 3, *manifest.input_size, device=self.device)
            if classification:
                self.lrp.relevance(blank, classes=torch.zeros(1, dtype=torch.long, device=self.device))
            else:
                self.lrp.relevance(blank, layer=manifest.layers[0].name)
        except (ValueError, TypeError, RuntimeError) as exc:
            logger.warning("LRP is off for %s: %s", manifest.name, exc)
            self.lrp = None
        self.methods = tuple(
            m
            for m in BACKWARD_METHODS
            if (classification or m not in CLASS_METHODS) and (self.lrp is not None or m not in ("lrp", "lrp_class"))
        )
        self.bases = tuple(b for b in BASES if b != "lrp" or self.lrp is not None)

    def __call__(self, image: torch.Tensor, options: RequestOptions, probabilities: torch.Tensor | None) -> Maps:
        """Explain one normalised image ``(3, H, W)`` with ``options.method``.

        Args:
            image: the decoded, normalised image.
            options: the request's validated options.
            probabilities: ``(C,)`` class probabilities from the served graph (classification), for
                choosing the classes.
        """
        x = image[None].to(self.device)
        method = options.method
        if method == "lrp":
            return Maps(self._lrp().label_free(x, options.layer)[0][None], None, None, options.layer)
        if probabilities is None:  # validated away for embedding models; kept as a guard for direct callers
            raise ValueError(f"method {method!r} needs class probabilities")
        chosen = select_classes(
            probabilities[None].to(self.device),
            options.top_classes,
            options.least_likely and method.startswith("distribution"),
            options.classes,
        )
        classes = tuple(int(c) for c in chosen[0])
        if method == "lrp_class":
            return Maps(self._lrp().for_classes(x, chosen)[0], classes, None, None)
        if method == "gradcam":
            return Maps(GradCAM(self.model, options.layer).attribute(x, chosen).maps[0], classes, None, options.layer)
        common = {"classes": chosen, "temperature": options.temperature, "tau": options.tau}
        if method == "distribution":
            base = {
                "gradcam": lambda: GradCAM(self.model, options.layer),
                "input_x_gradient": lambda: InputXGradient(self.model),
                "lrp": lambda: self._lrp().for_classes,
            }[options.base]()
            result = explain(self.model, x, base, **common)
            shown = len(classes) if options.classes is not None else options.top_classes  # not the least likely
            layer = options.layer if options.base == "gradcam" else None
            return Maps(result.maps[0, :shown], classes[:shown], classes, layer)
        if options.base == "lrp":
            result = fast_lrp(self.model, self._lrp(), x, options.layer, **common)
        else:
            result = fast_input_x_gradient(self.model, x, options.layer, **common)
        return Maps(result.maps[0], classes[:1], classes, options.layer)

    def _lrp(self) -> LRP:
        if self.lrp is None:  # the method list leaves LRP out then; a guard for direct callers
            raise ValueError(f"LRP does not support {type(self.model).__name__}")
        return self.lrp
