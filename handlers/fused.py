"""LaFAM fused into the served graph: the runtime computes the map's reduction in the same pass as the prediction.

The backends (:mod:`handlers.backends`) add, for each exported activation, one output: its channel mean
``(N, 1, h, w)`` float32, computed by ONNX Runtime (a 1x1 convolution appended to the graph when the session is
built; the archived graph file is left as exported and verified) or by TorchScript (one ``mean`` right after the
module). That is the part of LaFAM that reads the activations, done while they are in the runtime's hands.

The rest (the reference's min-max scaling, the 8-bit grey levels, nearest upsampling, the PNG) is done per
image by the C writer (:func:`handlers.encode.lafam_png_base64`) in one call. It used to be a dozen more graph
nodes: on 49 values each of them costs 4 to 20 µs of dispatch and cold kernel code right after the forward
pass, more than the writer's whole call (``benchmarks.lafam_overhead``). The general path scales the means
with the reference itself (:func:`~handlers.explain.lafam.lafam` of ``(N, 1, h, w)`` means is their min-max
scaling). The service checks the runtime's means
against :func:`~handlers.explain.lafam.lafam` when it loads (:func:`agrees`) and serves the reference instead
when they differ.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .explain.lafam import lafam

MEAN_PREFIX = "lafam_mean:"
AGREEMENT = 1e-4
"""Largest difference between a map from the runtime's means and the reference :func:`~handlers.explain.lafam.lafam`
accepted at load."""
MAX_FUSED_BYTES = 1 << 30
"""ONNX graphs larger than this are served without fused maps: the graph is rebuilt in memory to add them, and
protobuf cannot serialise 2 GiB."""


def fused_output(activation_output: str) -> str:
    """The fused output of one activation output: its channel mean (``act_layer4`` → ``lafam_mean:act_layer4``)."""
    return f"{MEAN_PREFIX}{activation_output}"


def fuse_onnx(model: object, activation_outputs: Mapping[str, int]) -> dict[str, str]:
    """Append the channel mean of each activation output to an ONNX ``ModelProto`` (in place).

    Per output ``A`` ``(N, C, h, w)`` (``activation_outputs`` gives ``C``): a 1x1 convolution with weights
    ``1/C``. ONNX Runtime runs it in its blocked convolution layout: 45-70 µs on ResNet-50's ``layer4`` at
    batch 1, against 120 for a ReduceMean over the channel axis (its profiler).

    Returns:
        ``{activation output: its fused output}``; each is a new graph output, ``(N, 1, h, w)`` float32.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph  # type: ignore[attr-defined]
    fused = {}
    for index, (source, channels) in enumerate(activation_outputs.items()):
        name, weights = fused_output(source), f"lafam__{index}_weights"
        values = np.full((1, channels, 1, 1), 1.0 / channels, np.float32)
        graph.initializer.append(numpy_helper.from_array(values, weights))
        graph.node.append(helper.make_node("Conv", [source, weights], [name], name=name))
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, 1, None, None]))
        fused[source] = name
    return fused


def channel_mean(activations: torch.Tensor) -> torch.Tensor:
    """The fused output of one ``(N, C, h, w)`` activation in torch, as the ONNX node computes it: ``(N, 1, h, w)``."""
    return activations.float().mean(dim=1, keepdim=True)


def agrees(means: torch.Tensor, activations: torch.Tensor) -> bool:
    """Whether the runtime's means give the reference's maps.

    :func:`~handlers.explain.lafam.lafam` of the ``(N, 1, h, w)`` means (their min-max scaling, as the served
    paths compute it) must match it of the ``(N, C, h, w)`` activations within :data:`AGREEMENT`.
    """
    if (
        means.dim() != 4
        or means.shape[1] != 1
        or means.shape[:1] + means.shape[2:] != activations.shape[:1] + activations.shape[2:]
    ):
        return False
    return bool((lafam(means.detach()).cpu() - lafam(activations).cpu()).abs().max() <= AGREEMENT)
