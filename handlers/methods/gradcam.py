"""``gradcam``: signed Grad-CAM at the exported layer, its closed form decided at worker start."""

from __future__ import annotations

from .contract import Endpoint, Explanation, Inputs, Method, Need
from .registry import register


class GradCAMMethod(Method):
    """Grad-CAM: ``map_k = Σ_c mean_ij(∂y_k/∂A_c) A_c``, without the ReLU (signed).

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
    ICCV 2017 (:class:`handlers.explain.gradients.GradCAM`). One forward and one batched backward for every
    class, or one matmul when the head is global average pooling + linear: its cost does not grow with K.
    """

    name = "gradcam"
    title = "Grad-CAM"
    endpoint = Endpoint.BACKWARD
    needs = frozenset({Need.EAGER, Need.CLASSES})
    reads = ("layer", "classes", "top_classes")

    def explain(self, inputs: Inputs) -> Explanation:
        """One signed map per chosen class ``(K, h, w)`` at the layer's resolution."""
        layer = inputs.options.layer
        cam = inputs.require_engines().gradcam(layer)
        return Explanation(cam.attribute(inputs.as_batch(), inputs.class_tensor()).maps[0], inputs.classes, layer=layer)


register(GradCAMMethod())
