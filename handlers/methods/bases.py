"""Base attributions: the per-class maps that attribution distributions let compete.

One :class:`BaseAttribution` per value of the ``base`` option, declared once; a method with bases lists
which of them it accepts (:attr:`~.contract.Method.bases`), and its needs and cost follow the base's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..explain.gradients import Base
from .contract import Need
from .engines import Engines


@dataclass(frozen=True)
class BaseAttribution:
    """One base attribution.

    Attributes:
        name: the value of the ``base`` option.
        title: its name in evaluation tables.
        needs: what it needs besides the method's own needs.
        cost_grows_with_k: one pass per class (input × gradient, LRP) rather than one for all (Grad-CAM).
        at_layer: its maps are at the explained layer's resolution (else at the input's).
        method: the registered method that computes this base alone for one class (compared side by side
            with its distribution in the evaluation), or ``None``.
        build: ``build(engines, layer)`` → the base ``(x, classes) -> (N, K, h, w)``, from the engines built
            at worker start.
    """

    name: str
    title: str
    needs: frozenset[Need]
    cost_grows_with_k: bool
    at_layer: bool
    method: str | None
    build: Callable[[Engines, str], Base]


BASES: dict[str, BaseAttribution] = {
    base.name: base
    for base in (
        BaseAttribution(
            "gradcam",
            "Grad-CAM",
            frozenset(),
            False,
            True,
            "gradcam",
            lambda engines, layer: engines.gradcam(layer),
        ),
        BaseAttribution(
            "input_x_gradient",
            "input×gradient",
            frozenset(),
            True,
            False,
            "input_x_gradient",
            lambda engines, _layer: engines.input_x_gradient,
        ),
        BaseAttribution(
            "lrp",
            "LRP",
            frozenset({Need.LRP}),
            True,
            False,
            "lrp_class",
            lambda engines, _layer: engines.require_lrp().for_classes,
        ),
    )
}
"""Every base, in the order the ``base`` option lists them."""
