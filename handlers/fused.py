"""LaFAM fused into the served graph: the runtime computes the map in the same pass as the prediction.

The backends (:mod:`handlers.backends`) add, for each exported activation, the outputs of its LaFAM map
(channel mean then min-max scaling, in float32), computed by ONNX Runtime (nodes appended to the graph when
the session is built; the archived graph file is left as exported and verified) or by TorchScript (a scripted
function run right after the module). The reduction then runs inside the runtime's
own pass instead of as a dozen Python-level operations afterwards, when the forward has left the caches cold
and each of them costs several times its warm time (``benchmarks.lafam_overhead`` measures both parts).

Each activation gets two outputs (:class:`Fused`, ``(N, 1, h, w)``): the map, and its 8-bit grey levels for
the PNG, so the handler's per-image work is the PNG's bytes alone. The runtime follows the reference's
arithmetic (non-finite values clamped, min-max scaled, a constant map all zeros) in float32: within a few
1e-7 of the reference's float64 scaling. The handler keeps :func:`handlers.explain.lafam.lafam` as the
reference: the service checks the fused maps against it when it loads (:func:`agrees`) and serves the
reference instead when they differ.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

MAP_PREFIX = "lafam:"
PIXELS_PREFIX = "lafam_u8:"
AGREEMENT = 1e-4
"""Largest difference between a fused map and the reference :func:`~handlers.explain.lafam.lafam` accepted at load."""
MAX_FUSED_BYTES = 1 << 30
"""ONNX graphs larger than this are served without fused maps: the graph is rebuilt in memory to add them, and
protobuf cannot serialise 2 GiB."""
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class Fused:
    """The two outputs a runtime adds for one activation output: the map and its 8-bit grey levels."""

    map: str
    pixels: str


def fused_outputs(activation_output: str) -> Fused:
    """The fused output names of one activation output (``act_layer4`` → ``lafam:act_layer4``, ``lafam_u8:...``)."""
    return Fused(f"{MAP_PREFIX}{activation_output}", f"{PIXELS_PREFIX}{activation_output}")


def fuse_onnx(model: object, activation_outputs: Mapping[str, int]) -> dict[str, Fused]:
    """Append LaFAM nodes for each activation output to an ONNX ``ModelProto`` (in place).

    Per output ``A`` ``(N, C, h, w)`` (``activation_outputs`` gives ``C``): the channel mean as a 1x1 convolution
    with weights ``1/C`` (ONNX Runtime runs it in its blocked convolution layout: 70 against 120 µs for a
    ReduceMean over the channel axis of ResNet-50's ``layer4``, by its profiler); NaN → 0 and ±inf → ±float32
    max, as the reference clamps; halved, so that no difference of two clamped values overflows; ``lo``, ``hi``
    = its minimum and maximum over ``(h, w)``; the map is ``clip((M - lo) / max(hi - lo, tiny), 0, 1)`` (a
    constant map is all zeros) and its grey levels ``uint8(map * 255 + 0.5)`` (truncated, as
    :func:`handlers.encode.to_pixels` rounds). Float32 throughout: within a few 1e-7 of the reference's float64
    scaling. Reduction axes are an attribute before opset 18 and an input from 18.

    Returns:
        ``{activation output: its Fused outputs}``; each is a new graph output, ``(N, 1, h, w)``.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph  # type: ignore[attr-defined]
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))  # type: ignore[attr-defined]
    prefix = "lafam__"

    def constant(name: str, value: float | np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), prefix + name))
        return prefix + name

    def node(op: str, inputs: list[str], output: str, **attributes: object) -> str:
        graph.node.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def reduce(op: str, source: str, output: str) -> str:  # over (h, w), kept
        if opset >= 18:
            axes = prefix + f"{output}_axes"
            graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes))
            return node(op, [source, axes], output, keepdims=1)
        return node(op, [source], output, axes=[2, 3], keepdims=1)

    zero, one, half = constant("zero", 0.0), constant("one", 1.0), constant("half", 0.5)
    low32, high32 = constant("low32", -_FLOAT32_MAX), constant("high32", _FLOAT32_MAX)
    tiny, levels = constant("tiny", _FLOAT32_TINY), constant("levels", 255.0)
    fused = {}
    for index, (source, channels) in enumerate(activation_outputs.items()):
        step = f"{prefix}{index}_"
        names = fused_outputs(source)
        weights = constant(f"{index}_weights", np.full((1, channels, 1, 1), 1.0 / channels))
        mean = node("Conv", [source, weights], step + "mean")
        finite = node("Where", [node("IsNaN", [mean], step + "nan"), zero, mean], step + "no_nan")
        halved = node("Mul", [node("Clip", [finite, low32, high32], step + "clamped"), half], step + "halved")
        low = reduce("ReduceMin", halved, step + "low")
        span = node("Sub", [reduce("ReduceMax", halved, step + "high"), low], step + "span")
        shifted = node("Sub", [halved, low], step + "shifted")
        scaled = node("Div", [shifted, node("Max", [span, tiny], step + "safe")], step + "scaled")
        maps = node("Clip", [scaled, zero, one], names.map)
        node("Cast", [node("Add", [node("Mul", [maps, levels], step + "x255"), half], step + "rounded")], names.pixels,
             to=TensorProto.UINT8)  # fmt: skip
        graph.output.append(helper.make_tensor_value_info(names.map, TensorProto.FLOAT, [None, 1, None, None]))
        graph.output.append(helper.make_tensor_value_info(names.pixels, TensorProto.UINT8, [None, 1, None, None]))
        fused[source] = names
    return fused


def lafam_map(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused map of one ``(N, C, h, w)`` activation and its grey levels in torch, as the ONNX nodes compute them."""
    mean = activations.float().mean(dim=1, keepdim=True)
    limit = 3.4028234663852886e38  # float32 max
    halved = torch.nan_to_num(mean, nan=0.0, posinf=limit, neginf=-limit) * 0.5
    low = halved.amin(dim=(2, 3), keepdim=True)
    span = halved.amax(dim=(2, 3), keepdim=True) - low
    maps = ((halved - low) / span.clamp_min(1.1754943508222875e-38)).clamp(0.0, 1.0)  # float32 smallest normal
    return maps, (maps * 255.0 + 0.5).to(torch.uint8)


@functools.cache
def lafam_scripted() -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """:func:`lafam_map` compiled by TorchScript (once, on first use): one call runs all its operations."""
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; the served graphs use it anyway
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(lafam_map)


def agrees(fused: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether fused maps match the reference maps within :data:`AGREEMENT` (same shape, every value)."""
    if fused.shape != reference.shape:
        return False
    return bool((fused.detach().float().cpu() - reference.detach().float().cpu()).abs().max() <= AGREEMENT)
