"""What the backward methods share, built once when a worker starts: the decisions that depend only on the model.

:class:`Engines` holds the eager model and everything decided from it at start, never per request:

* whether LRP can explain the model: the engine is built once and one blank image is run through it (a
  model whose forward is not what LRP can follow fails here, at worker start, not on every request); when
  it cannot, the reason is kept, logged once, and given in the 400 of every request that needs it;
* per exported layer, Grad-CAM's closed form (:meth:`handlers.explain.gradients.GradCAM.decide`): the
  head after the layer is traced once here, so requests never trace it again;
* one input × gradient explainer.

:func:`capabilities` turns that into the :class:`Capabilities` the request options are validated with.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..explain.gradients import GradCAM, InputXGradient
from ..explain.lrp import LRP
from ..manifest import Manifest
from .contract import Need

logger = logging.getLogger(__name__)

_ENGINE_ERRORS = (ValueError, TypeError, RuntimeError)


@dataclass(frozen=True)
class Capabilities:
    """What a served model offers the methods.

    Attributes:
        met: the needs this model meets.
        missing: needs it cannot meet, with the reason; a method that needs one stays listed and a request
            for it is a 400 giving the reason. A need in neither is absent: its methods are not offered.
    """

    met: frozenset[Need] = frozenset(Need)
    missing: Mapping[Need, str] = field(default_factory=dict)

    def offers(self, needs: frozenset[Need]) -> bool:
        """Whether a method with these needs is listed (every need met, or missing with a reason)."""
        return needs <= self.met | set(self.missing)

    def why_not(self, needs: frozenset[Need]) -> str | None:
        """The reason a method with these needs cannot run, or ``None`` when it can."""
        absent = [need for need in Need if need in needs and need not in self.met]
        if not absent:
            return None
        return "; ".join(self.missing.get(need, f"it needs {need.value}") for need in absent)


class Engines:
    """The eager model and the explainers built from it once, shared by every backward method.

    Args:
        model: the eager model in eval mode, on its device.
        manifest: the served model's manifest (task, input size, normalisation, exported layers).
    """

    def __init__(self, model: nn.Module, manifest: Manifest) -> None:
        self.model = model
        self.manifest = manifest
        self.device = next(model.parameters()).device
        self.classification = manifest.task == "classification"
        self.lrp: LRP | None = None
        self.lrp_error: str | None = None
        try:
            self.lrp = self._build_lrp()
        except _ENGINE_ERRORS as exc:
            logger.warning("LRP is off for %s: %s", manifest.name, exc)
            self.lrp_error = str(exc)
        self._cams: dict[str, GradCAM | str] = (
            {layer: self._decide_gradcam(layer) for layer in manifest.layer_names} if self.classification else {}
        )
        self.input_x_gradient = InputXGradient(model)

    def _build_lrp(self) -> LRP:
        manifest = self.manifest
        lrp = LRP(self.model, mean=manifest.mean, std=manifest.std)
        # One blank image now: a model LRP cannot follow fails here, at worker start, not on every request.
        blank = torch.zeros(1, 3, *manifest.input_size, device=self.device)
        if self.classification:
            lrp.relevance(blank, classes=torch.zeros(1, dtype=torch.long, device=self.device))
        else:
            lrp.relevance(blank, layer=manifest.layers[0].name)
        return lrp

    def _decide_gradcam(self, layer: str) -> GradCAM | str:
        """Grad-CAM of ``layer`` with its closed form decided on a seeded random image, or why there is none."""
        try:
            cam = GradCAM(self.model, layer, layout=self.manifest.layer(layer).layout)
        except ValueError as exc:
            return str(exc)
        example = torch.randn(1, 3, *self.manifest.input_size, generator=torch.Generator().manual_seed(0))
        try:
            return cam.decide(example.to(self.device))
        except _ENGINE_ERRORS as exc:  # decided per request instead, as before
            logger.warning("Grad-CAM's closed form is undecided for %s at %s: %s", self.manifest.name, layer, exc)
            return cam

    @property
    def missing(self) -> dict[Need, str]:
        """Needs the model cannot meet, with the reason."""
        return {Need.LRP: f"LRP cannot explain it: {self.lrp_error}"} if self.lrp_error is not None else {}

    def require_lrp(self) -> LRP:
        """The LRP engine.

        Raises:
            ValueError: LRP cannot explain this model (the reason, naming the module and its type).
        """
        if self.lrp is None:
            raise ValueError(f"LRP cannot explain {self.manifest.name!r}: {self.lrp_error}")
        return self.lrp

    def gradcam(self, layer: str) -> GradCAM:
        """Grad-CAM of an exported layer, its closed form decided at start.

        Raises:
            ValueError: ``layer`` is not an exported layer of a classifier, or not a submodule of the eager model.
        """
        cam = self._cams.get(layer)
        if cam is None:
            raise ValueError(f"Grad-CAM is decided at start for the exported layers of a classifier, not {layer!r}")
        if isinstance(cam, str):
            raise ValueError(cam)  # noqa: TRY004 - the reason recorded at start, re-raised per request
        return cam


def capabilities(manifest: Manifest, engines: Engines | None) -> Capabilities:
    """What ``manifest``'s model offers the methods, given the engines built at start (``None``: no eager model)."""
    met = {Need.CLASSES} if manifest.task == "classification" else set()
    if engines is None:
        return Capabilities(frozenset(met))
    met.add(Need.EAGER)
    if engines.lrp is not None:
        met.add(Need.LRP)
    return Capabilities(frozenset(met), engines.missing)
