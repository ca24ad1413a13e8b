"""``lrp_class``: LRP seeded at class logits: the pixels that raise each chosen class's score."""

from __future__ import annotations

from .contract import Endpoint, Explanation, Inputs, Method, Need
from .registry import register


class ClassLRP(Method):
    """Per-class LRP: ``R_logits = onehot(c) ⊙ y``, redistributed to the pixels by LRP rules.

    Bach et al., PLoS ONE 2015 (rules in :mod:`handlers.explain.lrp`). One relevance pass per class, so its
    cost grows with the number of classes K.
    """

    name = "lrp_class"
    title = "LRP class"
    endpoint = Endpoint.BACKWARD
    needs = frozenset({Need.EAGER, Need.CLASSES, Need.LRP})
    reads = ("classes", "top_classes")

    def cost_grows_with_k(self, base: str | None = None) -> bool:
        """One relevance pass per class."""
        return True

    def explain(self, inputs: Inputs) -> Explanation:
        """One signed pixel map per chosen class ``(K, H, W)``."""
        lrp = inputs.require_engines().require_lrp()
        return Explanation(lrp.for_classes(inputs.as_batch(), inputs.class_tensor())[0], inputs.classes)


register(ClassLRP())
