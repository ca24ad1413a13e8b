"""``lafam``: the Label-free Activation Map of the served graph's own activations (forward method).

``LaFAM = minmax(mean_c A_c)`` at the exported layer, from the very run that produced the prediction;
see :mod:`handlers.explain.lafam` for the formula and the paper.
"""

from __future__ import annotations

import torch

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

        Taken from the runtime, which computed the batch's maps and their grey levels in the same pass
        (:mod:`handlers.fused`), when it did; else the whole batch's maps are computed here in one reduction,
        once per batch and layer (:meth:`Inputs.once`).
        """
        layer, row = inputs.options.layer, inputs.row
        fused = inputs.batch_maps.get(layer)
        if fused is None:
            maps = inputs.once((self.name, layer), lambda: lafam(inputs.batch_activations[layer]))
            return Explanation(maps[row][None], layer=layer, signed=False)
        maps, pixels = fused
        grey = inputs.once((self.name, layer, "pixels"), lambda: _bytes(pixels))
        size = maps.shape[-2] * maps.shape[-1]  # (N, 1, h, w): maps[row] is this image's (1, h, w)
        return Explanation(maps[row], layer=layer, signed=False, pixels=grey[row * size : (row + 1) * size])


def _bytes(pixels: torch.Tensor) -> bytes:
    """The batch's grey levels as bytes, row-major (from the GPU when the runtime ran there)."""
    return pixels.cpu().numpy().tobytes()


register(LaFAM())
