"""``distribution_fast``: the classes compete at the layer (Grad-CAM), one base pass for the target only."""

from __future__ import annotations

from ..explain.distribution import fast_input_x_gradient, fast_lrp
from .contract import Endpoint, Explanation, Inputs, Method, Need, distribution_extras
from .registry import register


class FastDistribution(Method):
    """Fast attribution distributions: the competition decided at the layer, one explanation of the target.

    ``M_t = softmax_k(T·|G_k|)[t] ⊙ 1[… − 1/K > τ]`` from the layer-level Grad-CAM maps ``G_k`` (closed form
    decided at worker start), then ONE base pass for the target class t
    masked by ``M_t``: LRP relevance at the layer (:func:`handlers.explain.distribution.fast_lrp`) or input ×
    gradient with the upsampled mask (:func:`~handlers.explain.distribution.fast_input_x_gradient`). Idea from
    Walter et al., arXiv:2503.07346; its cost does not grow with K.
    """

    name = "distribution_fast"
    title = "distribution fast"
    endpoint = Endpoint.BACKWARD
    needs = frozenset({Need.EAGER, Need.CLASSES})
    competes = True
    target_only = True
    default_classes = 2
    reads = ("layer", "classes", "top_classes", "least_likely", "base", "temperature", "tau", "normalize")
    bases = ("lrp", "input_x_gradient")

    def explain(self, inputs: Inputs) -> Explanation:
        """One signed pixel map for the target ``(1, H, W)``; every competitor in ``competitors``."""
        options = inputs.options
        engines = inputs.require_engines()
        layer = options.layer
        common = {
            "classes": inputs.class_tensor(),
            "temperature": options.temperature,
            "tau": options.tau,
            "normalize": options.normalize,
            "cam": engines.gradcam(layer),
        }
        if options.base == "lrp":
            result = fast_lrp(engines.model, engines.require_lrp(), inputs.as_batch(), layer, **common)
        else:
            result = fast_input_x_gradient(engines.model, inputs.as_batch(), layer, **common)
        classes = inputs.classes or ()
        return Explanation(
            result.maps[0],
            classes[:1],
            competitors=classes,
            layer=layer,
            extras=distribution_extras(options),
        )


register(FastDistribution())
