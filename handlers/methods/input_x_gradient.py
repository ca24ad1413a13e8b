"""``input_x_gradient``: input × gradient of each chosen class logit, summed over the colour channels."""

from __future__ import annotations

from .contract import Endpoint, Explanation, Inputs, Method, Need
from .registry import register


class InputXGradientMethod(Method):
    """Input × gradient: ``map_k = Σ_ch x ⊙ ∂y_k/∂x``, signed, at the input's resolution.

    Shrikumar et al., "Not Just a Black Box: Learning Important Features Through Propagating Activation
    Differences", arXiv:1605.01713 (:class:`handlers.explain.gradients.InputXGradient`). The plain base of the
    input × gradient distributions, served alone so that the two can be compared. One backward per class
    (batched), so its cost grows with the number of classes K.
    """

    name = "input_x_gradient"
    title = "input×gradient"
    endpoint = Endpoint.BACKWARD
    needs = frozenset({Need.EAGER, Need.CLASSES})
    reads = ("classes", "top_classes")

    def cost_grows_with_k(self, base: str | None = None) -> bool:
        """One backward pass per class."""
        return True

    def explain(self, inputs: Inputs) -> Explanation:
        """One signed pixel map per chosen class ``(K, H, W)``."""
        base = inputs.require_engines().input_x_gradient
        return Explanation(base(inputs.as_batch(), inputs.class_tensor())[0], inputs.classes)


register(InputXGradientMethod())
