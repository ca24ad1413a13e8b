"""``lrp``: label-free LRP, seeded with the activations of the LaFAM layer and propagated to the pixels."""

from __future__ import annotations

from .contract import Endpoint, Explanation, Inputs, Method, Need
from .registry import register


class LabelFreeLRP(Method):
    """Label-free LRP: the layer's activations are the relevance, redistributed to the pixels by LRP rules.

    ``R_layer = A`` (so the map explains the sum of the layer's activations, LaFAM's quantity), then each
    layer passes its relevance to its inputs in proportion to their contributions (Bach et al., "On
    Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise Relevance Propagation", PLoS
    ONE 2015; rules in :mod:`handlers.explain.lrp`). No label: it explains encoders too.
    """

    name = "lrp"
    title = "LRP label-free"
    endpoint = Endpoint.BACKWARD
    needs = frozenset({Need.EAGER, Need.LRP})
    reads = ("layer",)

    def explain(self, inputs: Inputs) -> Explanation:
        """One signed pixel map ``(1, H, W)`` seeded at ``options.layer``."""
        layer = inputs.options.layer
        lrp = inputs.require_engines().require_lrp()
        return Explanation(lrp.label_free(inputs.as_batch(), layer)[0][None], layer=layer)


register(LabelFreeLRP())
