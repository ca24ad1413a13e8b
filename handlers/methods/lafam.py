"""``lafam``: the Label-free Activation Map of the served graph's own activations (forward method).

``LaFAM = minmax(mean_c A_c)`` at the exported layer, from the very run that produced the prediction;
see :mod:`handlers.explain.lafam` for the formula and the paper.
"""

from __future__ import annotations

from ..explain.lafam import lafam
from .contract import Endpoint, Explanation, Inputs, Method
from .registry import register


class LaFAM(Method):
    """LaFAM (Label-free Activation Map): channel mean of the layer's activations, min-max scaled to [0, 1].

    No label and no backward pass: one reduction over activations the forward pass already computed, so it
    explains classifiers and encoders alike and is served on ``/predictions``.
    """

    name = "lafam"
    title = "LaFAM"
    endpoint = Endpoint.FORWARD
    needs = frozenset()
    reads = ("layer",)
    signed = False

    def explain(self, inputs: Inputs) -> Explanation:
        """The map of the requested layer's activations, ``(1, h, w)`` in [0, 1].

        The whole batch's maps are computed in one reduction, once per batch and layer (:meth:`Inputs.once`).
        """
        layer = inputs.options.layer
        maps = inputs.once((self.name, layer), lambda: lafam(inputs.batch_activations[layer]))
        return Explanation(maps[inputs.row][None], layer=layer, signed=False)


register(LaFAM())
