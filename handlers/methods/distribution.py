"""``distribution``: attribution distributions over a base attribution, the classes competing per location."""

from __future__ import annotations

from ..explain.distribution import explain
from .bases import BASES
from .contract import Endpoint, Explanation, Inputs, Method, Need, distribution_extras
from .registry import register


class Distribution(Method):
    """Attribution distributions: K classes' base maps ``A_k`` compete at every location.

    ``M = softmax_k(T·|A_k| / s)``; class c keeps ``A_c ⊙ M_c`` only where ``M_c − 1/K > τ``; ``s`` is 1
    (``normalize=none``, the reference) or the largest ``|A|`` of the image's K maps (``max``, the default:
    raw LRP and input×gradient values, and Grad-CAM's on a token grid, are too small for T = 10). Walter, Vreeken and
    Fischer, "Now you see me! A framework for obtaining class-relevant saliency maps", arXiv:2503.07346
    (formula and defaults in :mod:`handlers.explain.distribution`). The least likely class competes but
    gets no map. Its cost grows with K when its base's does (one pass per class).
    """

    name = "distribution"
    title = "distribution"
    endpoint = Endpoint.BACKWARD
    needs = frozenset({Need.EAGER, Need.CLASSES})
    competes = True
    default_classes = 2
    reads = ("layer", "classes", "top_classes", "least_likely", "base", "temperature", "tau", "normalize")
    bases = tuple(BASES)

    def cost_grows_with_k(self, base: str | None = None) -> bool:
        """As its base's (Grad-CAM: one matmul for all classes; input × gradient and LRP: one pass each)."""
        return base is not None and BASES[base].cost_grows_with_k

    def explain(self, inputs: Inputs) -> Explanation:
        """One signed map per explained class ``(K', h, w)``; every competitor in ``competitors``."""
        options = inputs.options
        engines = inputs.require_engines()
        base = BASES[options.base]
        result = explain(
            engines.model,
            inputs.as_batch(),
            base.build(engines, options.layer),
            classes=inputs.class_tensor(),
            temperature=options.temperature,
            tau=options.tau,
            normalize=options.normalize,
        )
        classes = inputs.classes or ()
        shown = len(classes) if options.classes is not None else options.top_classes  # not the least likely
        return Explanation(
            result.maps[0, :shown],
            classes[:shown],
            competitors=classes,
            layer=options.layer if base.at_layer else None,
            extras=distribution_extras(options),
        )


register(Distribution())
