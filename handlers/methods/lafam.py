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

        From the channel means the runtime computed in the same pass (:mod:`handlers.fused`; ``(N, 1, h, w)``,
        whose :func:`~handlers.explain.lafam.lafam` is the reference's scaling of those means), when it did;
        else from the activations. The whole batch's maps are computed once per batch and layer
        (:meth:`Inputs.once`).
        """
        layer, row = inputs.options.layer, inputs.row
        source = inputs.batch_maps.get(layer)
        if source is None:
            source = inputs.batch_activations[layer]
        maps = inputs.once((self.name, layer), lambda: lafam(source))
        return Explanation(maps[row][None], layer=layer, signed=False)


register(LaFAM())
