"""LRP rules: small objects that run one operation of the traced graph forward and redistribute its relevance.

Every rule has the same three methods, called by the engine (:mod:`.engine`) for one node of the graph:

- ``setup(op)`` once when the engine is built (copy and modify weights, fold a batch norm, check arguments);
- ``forward(op, args, kwargs) -> (output, saved)`` in the forward pass, keeping what ``relevance`` needs;
- ``relevance(op, r, saved) -> [R_input, ...]`` in the relevance pass: one entry per relevance-carrying input
  of the node (``op.inputs``, in argument order), ``None`` for an input that receives nothing. ``r`` is the
  rule's own (the engine never hands one tensor to two rules), so a rule may overwrite it, and must not
  overwrite anything in ``saved``, which K-class passes reuse.

Rules are configuration only (a rule object may serve many nodes); per-node state lives on the :class:`Op`.
The rules for layers with weights are composed from :class:`Term` s the way zennit composes its hooks from
input and parameter modifiers (Anders et al., "Software for dataset-wide XAI: from local explanations to
global insights with Zennit, CoRelAy, and ViRelAy", 2021): with ``x`` the input, ``W`` the weights and
``layer(x, W)`` the convolution or matrix product, every weighted rule is::

    z = Σ_t layer(in_t(x), W_t) + b'          s = R_out / stab(z)          R_x = Σ_t in_t(x) ⊙ layerᵀ(W_t, s)

so Epsilon is the single term ``(x, W)`` with the bias, ZPlus the terms ``(x⁺, W⁺)`` and ``(x⁻, W⁻)`` with the
positive bias, Gamma ``(x⁺, W + γW⁺)`` and ``(x⁻, W + γW⁻)``, Flat ``(1, 1)`` (Montavon et al., "Layer-wise
relevance propagation: an overview", 2019). The other rules cover the parameter-free operations:

- :class:`Pass` (identity, ``R_x = R_y``): element-wise activations (ReLU, SiLU, GELU, Hardswish, sigmoid, …),
  dropout, stochastic depth, a batch norm that cannot be folded. An element-wise map has a single input, so
  relevance has nowhere else to go; the apportioning is done by the layer before it (AttnLRP, Achtibat et
  al., ICML 2024, Eq. 9; zennit's ``Pass``). A batch norm that follows no convolution (DenseNet's
  pre-activation ``norm1`` on a concatenation) is passed as zennit passes every batch norm it has not
  folded; Hui & Binder (2019, arXiv:1905.06803) discuss the alternatives.
- :class:`Norm` (proportional, LRP-ε on a bias-free linear map, zennit's ``Norm``): sums, differences, means,
  average pooling, bilinear resizing. ``R_i = x_i ⊙ ∂y/∂x_iᵀ (R / stab(y))``: the residual ``+`` splits
  relevance in proportion to each branch's contribution, never doubles it; a constant operand (a bias)
  absorbs its share.
- :class:`Route` (the gradient, ``R_x = ∂y/∂xᵀ R``): operations whose outputs are copies of inputs —
  concatenation, splits and chunks, slicing, reshapes, permutations (ShuffleNet's channel shuffle), padding,
  max pooling (winner takes all, what zennit's composites do).
- :class:`Gate` (``x * g``): the signal takes all, the gate none — the gate is treated as a constant (Arras
  et al. 2017, arXiv:1706.07206, for LSTM gates; Pahde et al. 2023, arXiv:2211.17174, for EfficientNet's
  squeeze-excitation). Two full-size factors split ``R`` in half (AttnLRP Prop. 3.2); a constant factor
  (ConvNeXt's layer scale) passes ``R`` unchanged.
- :class:`LayerNormRule` (``nn.LayerNorm``, ``F.layer_norm``, ConvNeXt's ``LayerNorm2d``): the standard
  deviation is treated as a constant (Ali et al., ICML 2022, arXiv:2202.07304; AttnLRP Prop. 3.4), so the
  layer is linear in ``x`` (centring and affine map) and runs under LRP-ε; the bias absorbs its share.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.node import map_aggregate
from typing_extensions import override

Saved = Any
Relevances = list[torch.Tensor | None]


class Unsupported(ValueError):
    """A model, or one operation of it, that LRP cannot explain; the message names the module and its type."""


class Selected(NamedTuple):
    """Relevance of one member of a tuple-valued input (``chunk(x)[i]``): the engine files it under ``index``."""

    index: int
    relevance: torch.Tensor


class Fixed(NamedTuple):
    """Saved values that must not be tiled along the batch when K classes run as one batch (see ``tile``)."""

    value: Any


@dataclass
class Op:
    """One operation of the traced graph, as a rule sees it.

    Attributes:
        name: the graph node's name (unique).
        kind: ``call_module``, ``call_function`` or ``call_method``.
        target: the module's qualified name, the function, or the method name.
        where: the module the operation belongs to and its type, for messages (``layer1.0 (Bottleneck)``).
        module: the model's own module (``call_module``), only read: its weights and settings at setup.
        call: runs the operation on resolved arguments, out of place (``call(*args, **kwargs)``; for a
            module, a private eval-mode copy with ``inplace`` off).
        inputs: how many relevance-carrying inputs the node has (``relevance`` returns one entry each).
        pick: the relevance-carrying input values among resolved ``(args, kwargs)``, in order.
        nonnegative: per relevance-carrying input, whether it is known to be ``>= 0`` (after a ReLU…).
        constant: per relevance-carrying input, whether the rules treat it as a constant (CP-LRP's attention
            weights, see :meth:`Rule.constant`): a product with it passes all relevance to the other factor.
        folded: the batch norm folded into this layer, if any.
        state: the rule's per-node state, filled by ``setup``.
    """

    name: str
    kind: str
    target: Any
    where: str
    module: nn.Module | None
    call: Callable[..., Any]
    inputs: int
    pick: Callable[[tuple[Any, ...], dict[str, Any]], list[torch.Tensor]]
    nonnegative: tuple[bool, ...] = ()
    constant: tuple[bool, ...] = ()
    folded: nn.Module | None = None
    state: dict[str, Any] = field(default_factory=dict)


class Rule:
    """Base of every rule; see the module docstring for the contract."""

    weighted: bool = False
    """The rule reads a Conv2d's or Linear's weights (a batch norm after it can be folded in)."""

    def setup(self, op: Op) -> None:
        """Build-time work for ``op`` (copy weights, check arguments); raise :class:`Unsupported` if impossible."""

    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        """Run the operation on resolved arguments; return the output and what ``relevance`` needs."""
        return op.call(*args, **kwargs), None

    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        """Relevance of each relevance-carrying input from the output relevance ``r``."""
        raise NotImplementedError

    def nonnegative(self, op: Op) -> bool:
        """Whether the output is known to be ``>= 0`` given ``op.nonnegative`` (default: not known)."""
        return False

    def constant(self, op: Op) -> bool:
        """Whether the rules after this one treat the output as a constant, given ``op.constant`` (default: no).

        A product with a constant factor passes all its relevance to the other factor (CP-LRP treats
        attention weights so; Ali et al., ICML 2022). Identity and routing rules pass the flag on.
        """
        return False

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + epsilon * sign(z)`` with sign(0) = +1, zennit's stabilizer (a new tensor).

    ``|z| + ε`` with ``z``'s sign: two in-place passes over one new tensor, where ``torch.where`` takes four
    allocations (ten times slower on a 1.2 M-element activation). A ``-0.0`` gets ``-ε``, which changes
    nothing: every rule multiplies ``R / stab(z)`` by contributions that are all zero where ``z`` is.
    """
    return z.abs().add_(epsilon).copysign_(z)


# --- parameter-free operations ---------------------------------------------------------------------------------


class Pass(Rule):
    """Identity: ``R_x = R_y`` for an operation with one relevance-carrying input of the output's shape.

    Args:
        nonnegative: the output is ``>= 0`` whatever the input (ReLU, sigmoid); ``None``: as the input.
    """

    def __init__(self, nonnegative: bool | None = None) -> None:
        self.nonnegative_output = nonnegative

    @override
    def setup(self, op: Op) -> None:
        if op.inputs != 1:
            raise Unsupported(f"{op.where}: {describe(op)} has {op.inputs} inputs that carry relevance; Pass needs 1")

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        return [r]

    @override
    def nonnegative(self, op: Op) -> bool:
        return op.nonnegative[0] if self.nonnegative_output is None else self.nonnegative_output

    @override
    def constant(self, op: Op) -> bool:
        return bool(op.constant) and op.constant[0]


class _Folded(Pass):
    """A batch norm folded into the layer before it: the layer already applies it, so both passes are the identity."""

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        return args[0], None

    @override
    def nonnegative(self, op: Op) -> bool:
        return False


def _vjp(op: Op, saved: Saved, grads: Any) -> Relevances:
    """``∂y/∂x_iᵀ grads`` for every relevance-carrying input, by re-running the operation with autograd.

    ``saved`` is ``Fixed((args, kwargs, carriers, outs))`` from :func:`_saved_for_vjp`. When ``grads`` holds K
    seeds per image (the batch is K times the saved one, sample-major), the seeds run one K-slice at a time.
    The batch need not be the first dimension (``qkv[0]`` of a ``(3, N, …)`` tensor in attention): it is the
    dimension where the relevance is larger than the saved output, found again in each input.
    """
    args, kwargs, carriers, outs = saved.value[:4]
    grad_list = grads if isinstance(grads, list) else [grads]
    pair = next(((g, o) for g, o in zip(grad_list, outs, strict=False) if g is not None), None)
    if pair is None or pair[0].shape == pair[1].shape or not carriers:
        return _vjp_once(op, args, kwargs, carriers, grads)
    grad, out = pair
    axis = next(d for d, (a, b) in enumerate(zip(grad.shape, out.shape, strict=True)) if a != b)
    batch = out.shape[axis]
    times = grad.shape[axis] // batch
    parts = [
        _vjp_once(op, args, kwargs, carriers, _slice_k(grads, k, times, axis, batch)) for k in range(times)
    ]  # one K-slice at a time: the saved arguments hold one copy of each image
    found: Relevances = []
    for i, carrier in enumerate(carriers):
        if parts[0][i] is None:
            found.append(None)
            continue
        where = _input_batch_axis(op, args, carrier, axis=axis, ndim=out.dim(), batch=batch)
        found.append(torch.stack([p[i] for p in parts], dim=where + 1).flatten(where, where + 1))
    return found


def _slice_k(grads: Any, k: int, times: int, axis: int, batch: int) -> Any:
    """Seed ``k`` of every image: ``grads`` viewed as ``(…, batch, times, …)`` at ``axis``, then index ``k``."""
    if isinstance(grads, list):
        return [None if g is None else _slice_k(g, k, times, axis, batch) for g in grads]
    return grads.unflatten(axis, (batch, times)).select(axis + 1, k)


def _input_batch_axis(op: Op, args: tuple[Any, ...], carrier: torch.Tensor, *, axis: int, ndim: int, batch: int) -> int:
    """The batch dimension of an input, given the output's: the same one, or mapped through an index."""
    where: int | None = axis
    if op.target is operator.getitem and len(args) > 1:
        where = _indexed_axis(args[1], carrier.dim(), axis)
    elif op.target in (torch.unbind, "unbind"):
        dim = (args[1] if len(args) > 1 else 0) % carrier.dim()
        where = axis + (axis >= dim)
    elif carrier.dim() != ndim:
        where = None
    if where is None or where >= carrier.dim() or carrier.shape[where] != batch:
        sized = [d for d, size in enumerate(carrier.shape) if size == batch]
        if len(sized) != 1:
            raise Unsupported(
                f"{op.where}: {describe(op)} moves the batch dimension in a way the K-class pass cannot follow; "
                "use chunk_size=1"
            )
        where = sized[0]
    return where


def _indexed_axis(index: Any, ndim: int, axis: int) -> int | None:
    """The input dimension that output dimension ``axis`` of ``x[index]`` comes from (basic indexing only)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(not (item is None or item is Ellipsis or isinstance(item, int | slice)) for item in items):
        return None
    used = sum(1 for item in items if item is not None and item is not Ellipsis)
    expanded: list[Any] = []
    for item in items:
        expanded.extend([slice(None)] * (ndim - used) if item is Ellipsis else [item])
    expanded.extend([slice(None)] * (ndim - sum(1 for item in expanded if item is not None)))
    source, target = 0, 0
    for item in expanded:
        if item is None:
            target += 1
        elif isinstance(item, int):
            source += 1
        else:
            if target == axis:
                return source
            source, target = source + 1, target + 1
    return None


def _vjp_once(op: Op, args: Any, kwargs: Any, carriers: list[torch.Tensor], grads: Any) -> Relevances:
    # Inference tensors (a caller's torch.inference_mode) cannot be saved for backward: work on clones.
    with torch.inference_mode(False), torch.enable_grad():
        leaves = {id(t): t.detach().clone().requires_grad_(True) for t in carriers}
        swap = lambda v: leaves.get(id(v), v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        out = op.call(*map_aggregate(args, swap), **map_aggregate(kwargs, swap))
        outs = list(out) if isinstance(out, tuple | list) else [out]
        grad_list = grads if isinstance(grads, list) else [grads]
        pairs = [(o, g) for o, g in zip(outs, grad_list, strict=True) if g is not None]
        wrt = [leaves[id(t)] for t in carriers]
        found = torch.autograd.grad([o for o, _ in pairs], wrt, grad_outputs=[g for _, g in pairs], allow_unused=True)
    return list(found)


class Route(Rule):
    """The gradient: ``R_x = ∂y/∂xᵀ R``, right for operations whose outputs are copies of inputs.

    Concatenation, chunks and splits, slicing, reshapes, permutations, padding, rolling, max pooling (the
    window's winner takes its relevance). Reshapes, permutations, concatenation and max pooling have direct
    implementations; anything else re-runs the operation with autograd.
    """

    @override
    def setup(self, op: Op) -> None:
        op.state["fast"] = _route_kind(op)

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        fast = op.state["fast"]
        if fast == "maxpool":
            x = args[0]
            y, indices = _max_pool_with_indices(op, x, args, kwargs)
            return y, (x, indices)
        out = op.call(*args, **kwargs)
        if fast == "reshape":
            return out, args[0].shape
        if fast == "permute":
            return out, Fixed(_permutation(op, args, kwargs, out.dim()))
        if fast == "cat":
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            carriers = op.pick(args, kwargs)
            carried = [any(t is c for c in carriers) for t in tensors]
            return out, Fixed((dim % out.dim(), [t.shape[dim % out.dim()] for t in tensors], carried))
        if fast == "select" and isinstance(args[0], tuple | list):
            return out, Fixed(args[1])
        return out, _saved_for_vjp(op, args, kwargs, out)

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        fast = op.state["fast"]
        if fast == "reshape":
            return [r.reshape(-1, *saved[1:])]
        if fast == "permute":
            inverse = [0] * len(saved.value)
            for position, dim in enumerate(saved.value):
                inverse[dim] = position
            return [r.permute(inverse)]
        if fast == "cat":
            dim, sizes, carried = saved.value
            parts = r.split(sizes, dim=dim)
            return [part for part, keep in zip(parts, carried, strict=True) if keep]
        if fast == "maxpool":
            x, indices = saved
            return [_max_unpool(op, r, x, indices)]
        if fast == "select" and isinstance(saved, Fixed) and not isinstance(saved.value, tuple):
            return [Selected(saved.value, r)]
        return _vjp(op, saved, _dense(r, saved))

    @override
    def nonnegative(self, op: Op) -> bool:
        return all(op.nonnegative)

    @override
    def constant(self, op: Op) -> bool:
        return bool(op.constant) and all(op.constant)


def _dense(r: Any, saved: Saved) -> Any:
    """A tuple output's relevance (``{index: R}``) as a list, ``None`` where nothing arrived."""
    if not isinstance(r, dict):
        return r
    outs = saved.value[3]
    return [r.get(i) if isinstance(o, torch.Tensor) else None for i, o in enumerate(outs)]


def _saved_for_vjp(op: Op, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Fixed:
    carriers = op.pick(args, kwargs)
    outs = list(out) if isinstance(out, tuple | list) else [out]
    return Fixed((args, kwargs, carriers, outs))


def _route_kind(op: Op) -> str:
    t = op.target
    if op.kind == "call_module":
        if isinstance(op.module, nn.Flatten | nn.Unflatten):
            return "reshape"
        if isinstance(op.module, nn.MaxPool2d) and not op.module.return_indices:
            return "maxpool"
        return "vjp"
    if t in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze) or t in (
        "view",
        "reshape",
        "flatten",
        "contiguous",
        "squeeze",
        "unsqueeze",
    ):
        return "reshape"
    if t in (torch.permute, torch.transpose, "permute", "transpose"):
        return "permute"
    if t in (torch.cat, torch.concat) and op.inputs > 0:
        return "cat"
    if t is F.max_pool2d:
        return "maxpool"
    if t is operator.getitem:
        return "select"
    return "vjp"


def _permutation(op: Op, args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> list[int]:
    rest = list(args[1:])
    if op.target in (torch.transpose, "transpose"):
        a, b = [*rest, kwargs.get("dim0"), kwargs.get("dim1")][:2]
        order = list(range(ndim))
        order[a % ndim], order[b % ndim] = order[b % ndim], order[a % ndim]
        return order
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], list | tuple) else rest or kwargs["dims"]
    return [d % ndim for d in dims]


def _max_pool_with_indices(op: Op, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if op.kind == "call_module":
        m = op.module
        params = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    else:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        defaults = (None, None, 0, 1, False)
        values = list(args[1:]) + [
            kwargs.get(n, d) for n, d in zip(names[len(args) - 1 :], defaults[len(args) - 1 :], strict=True)
        ]
        params = tuple(values[:5])
    kernel, stride, padding, dilation, ceil_mode = params
    op.state["pool"] = (_pair(kernel), _pair(stride) or _pair(kernel), _pair(padding), _pair(dilation), ceil_mode)
    return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)


def _max_unpool(op: Op, r: torch.Tensor, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    kernel, stride, padding, dilation, ceil_mode = op.state["pool"]
    return torch.ops.aten.max_pool2d_with_indices_backward(r, x, kernel, stride, padding, dilation, ceil_mode, indices)


def _pair(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [value, value] if isinstance(value, int) else list(value)


_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
_SUB = (operator.sub, operator.isub, torch.sub, "sub", "sub_")


class Stabilized(Rule):
    """A rule that divides by a stabilised output.

    Args:
        stabilizer: added to each denominator with its sign.
    """

    def __init__(self, stabilizer: float = 1e-6) -> None:
        if not stabilizer > 0:
            raise ValueError(f"stabilizer must be > 0, got {stabilizer!r}")
        self.stabilizer = stabilizer


class Norm(Stabilized):
    """Proportional redistribution over a bias-free linear map (zennit's ``Norm``; LRP-ε with every input).

    ``R_i = x_i ⊙ ∂y/∂x_iᵀ (R / stab(y))`` for each relevance-carrying input ``x_i``; a constant operand
    absorbs its share. Sums, differences and means have a direct implementation (the residual ``+``,
    global average pooling), the rest (average pooling, resizing) re-runs the operation with autograd.

    Args:
        stabilizer: added to each denominator with its sign.
    """

    @override
    def setup(self, op: Op) -> None:
        op.state["sign"] = 1.0 if op.target in _ADD else -1.0 if op.target in _SUB else None

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        # The output itself is kept and stabilised in the relevance pass: a short-lived tensor there is
        # cheaper on a CPU than one more kept from the forward (the allocator reuses it).
        out = op.call(*args, **kwargs)
        if op.state["sign"] is not None and not kwargs:
            carriers = op.pick(args, kwargs)
            a, b = (arg if any(arg is c for c in carriers) else None for arg in args[:2])
            return out, ("sum", a, b, out)
        dims = _mean_dims(op, args, kwargs, out)
        if dims is not None:
            return out, ("mean", args[0], out, Fixed(dims))
        return out, ("vjp", _saved_for_vjp(op, args, kwargs, out), out)

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        kind = saved[0]
        if kind == "sum":
            _, a, b, y = saved
            s = stabilize(y, self.stabilizer)
            s = torch.div(r, s, out=s) if s.shape == r.shape else r / s  # R / stab(y), in the new buffer
            ra = None if a is None else (a * s).sum_to_size(a.shape)
            if b is None:
                return [ra]
            rb = s.mul_(b) if s.shape == b.shape else (s * b).sum_to_size(b.shape)  # s is not read again
            if op.state["sign"] < 0:
                rb = rb.neg_()
            return [rb] if a is None else [ra, rb]
        if kind == "mean":
            _, x, y, dims = saved
            axes, keepdim = dims.value
            s = r / stabilize(y, self.stabilizer)
            if not keepdim:
                for axis in sorted(axes):
                    s = s.unsqueeze(axis)
            count = math.prod(x.shape[a] for a in axes)
            return [x * s / count]
        _, kept, y = saved
        carriers = kept.value[2]
        grads = _vjp(op, kept, r / stabilize(y, self.stabilizer))
        return [None if g is None else _times_input(g, x) for g, x in zip(grads, carriers, strict=True)]

    @override
    def nonnegative(self, op: Op) -> bool:
        return all(op.nonnegative) and op.state.get("sign") != -1.0


def _mean_dims(op: Op, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> tuple[tuple[int, ...], bool] | None:
    """``(axes, keepdim)`` when the operation is a mean over some axes of a batch (global average pooling)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or op.inputs != 1 or x.dim() < 2:
        return None
    if isinstance(op.module, nn.AdaptiveAvgPool2d) or op.target is F.adaptive_avg_pool2d:
        return ((x.dim() - 2, x.dim() - 1), True) if tuple(out.shape[-2:]) == (1, 1) else None
    if op.target in (torch.mean, "mean"):
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
        if dim is None or kwargs.get("dtype") is not None:
            return None
        axes = tuple(sorted(d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)))
        return (axes, keepdim) if 0 not in axes else None
    return None


def _times_input(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x ⊙ grad`` (in place: ``grad`` is always a fresh tensor) where ``grad`` may hold K seeds per image."""
    if grad.shape == x.shape:
        return grad.mul_(x)
    if grad.shape[0] == x.shape[0]:
        return grad * x
    return (grad.view(x.shape[0], -1, *x.shape[1:]) * x[:, None]).flatten(0, 1)


_DIV = (operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_", "true_divide")


class Gate(Rule):
    """Products ``a * b`` (and ``a / b``): the signal takes all, the gate none.

    With one relevance-carrying factor (the other a constant, e.g. a layer scale) ``R`` passes unchanged.
    With two, the factor of the output's shape is the signal and the broadcast one (a squeeze-excitation
    gate of shape ``(N, C, 1, 1)``) the gate, treated as a constant; two full-size factors split ``R`` in
    half (AttnLRP's uniform rule), unless one is flagged constant (:meth:`Rule.constant`, CP-LRP): then the
    other takes all. In a quotient the dividend takes all.
    """

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        out = op.call(*args, **kwargs)
        carriers = op.pick(args, kwargs)
        return out, Fixed(tuple(tuple(c.shape) for c in carriers))

    @override
    def setup(self, op: Op) -> None:
        if op.inputs not in (1, 2):
            raise Unsupported(f"{op.where}: {describe(op)} has {op.inputs} inputs that carry relevance")

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        shapes = saved.value
        if len(shapes) == 1:
            return [_to_shape(r, shapes[0])]
        if op.target in _DIV:
            return [_to_shape(r, shapes[0]), None]
        if any(op.constant):
            keep = 1 if op.constant[0] else 0
            return [_to_shape(r, shapes[0]), None] if keep == 0 else [None, _to_shape(r, shapes[1])]
        full = [shape[1:] == tuple(r.shape[1:]) for shape in shapes]
        if full[0] and full[1]:
            return [r / 2, r / 2]
        if full[1]:
            return [None, r]
        return [_to_shape(r, shapes[0]), None]

    @override
    def nonnegative(self, op: Op) -> bool:
        return False


def _to_shape(r: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(r.shape[1:]) == tuple(shape[1:]):
        return r
    return r.sum_to_size(r.shape[0], *shape[1:])


class LayerNormRule(Stabilized):
    """Layer normalisation with its standard deviation treated as a constant, under LRP-ε.

    ``y = (x − μ)/σ ⊙ w + b`` is linear in ``x`` once σ is fixed; with ``g = w/σ ⊙ R/stab(y)`` over the
    normalised dimensions, ``R_x = x ⊙ (g − mean(g))``. ``R_x`` sums to ``Σ (y − b)/stab(y) R``: the bias
    absorbs its share. Ali et al., "XAI for Transformers: Better Explanations through Conservative
    Propagation", ICML 2022; Achtibat et al., "AttnLRP", ICML 2024 (Prop. 3.4).

    Args:
        stabilizer: added to each denominator with its sign.
    """

    @override
    def setup(self, op: Op) -> None:
        if op.kind == "call_module":
            m = op.module
            op.state["norm"] = (len(m.normalized_shape), m.eps)
            op.state["affine"] = (_copy(m.weight), _copy(m.bias))

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        x = args[0]
        if op.kind == "call_module":
            dims, eps = op.state["norm"]
            weight, bias = op.state["affine"]
        else:
            names = ("normalized_shape", "weight", "bias", "eps")
            given = dict(zip(names, args[1:], strict=False)) | kwargs
            dims, eps = len(_pair(given["normalized_shape"])), given.get("eps", 1e-5)
            weight, bias = given.get("weight"), given.get("bias")
        axes = tuple(range(-dims, 0))
        # Three kernels, not eight: few element-wise passes matter on a busy CPU (each one is a thread barrier).
        sigma = torch.var_mean(x, axes, correction=0, keepdim=True)[0].add_(eps).sqrt_()
        y = F.layer_norm(x, x.shape[x.dim() - dims :], weight, bias, eps)
        return y, (x, sigma, y, Fixed((axes, weight)))

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        x, sigma, y, fixed = saved
        axes, weight = fixed.value
        s = stabilize(y, self.stabilizer)
        g = r.div_(s) if r.shape == s.shape else r / s  # the engine hands every rule its own relevance
        g = g.div_(sigma)
        if weight is not None:
            g = g.mul_(weight)
        return [_times_input(g.sub_(g.mean(axes, keepdim=True)), x)]


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


# --- layers with weights ---------------------------------------------------------------------------------------


class Term(NamedTuple):
    """One term of a weighted rule: what the input and the weights become (zennit's modifiers)."""

    input: str
    """``x``, ``pos`` (x⁺), ``neg`` (x⁻) or ``ones``."""
    weight: Callable[[torch.Tensor], torch.Tensor]
    """The weights' modifier."""


def _pos(w: torch.Tensor) -> torch.Tensor:
    return w.clamp(min=0)


def _neg(w: torch.Tensor) -> torch.Tensor:
    return w.clamp(max=0)


def _same(w: torch.Tensor) -> torch.Tensor:
    return w


def _ones(w: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(w)


class _ConvSpec(NamedTuple):
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


class _Layer:
    """``layer(x, W, b)`` and its transpose for one Conv2d or Linear, with the fast paths of a 2-core CPU.

    Convolutions run channels-last (oneDNN then skips its layout reorders) except on small outputs, where
    oneDNN's channels-first kernels are faster (ResNet-50's layer4 3×3 at 7×7: 1.24 against 1.52 ms forward,
    1.36 against 1.71 ms transposed; 1.37 against 1.99 ms for its stride-2 14→7, on 2 cores); a 1×1
    convolution without padding is one matrix product over the pixels each way, without the im2col copies of
    the generic path, on the subsampled pixels when strided (ResNet's downsampling: 1.8 against 4.1 ms for
    oneDNN's 1024→2048 at 14×14, stride 2, on 2 cores).
    """

    SMALL = 64
    """Output pixels up to which a (non-1×1) convolution runs channels-first."""

    def __init__(self, op: Op) -> None:
        m = op.module
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise Unsupported(f"{op.where}: Conv2d with padding_mode={m.padding_mode!r} has no LRP rule here")
            padding = m.padding
            if isinstance(padding, str):
                if padding == "valid":
                    padding = (0, 0)
                elif all(d * (k - 1) % 2 == 0 for d, k in zip(m.dilation, m.kernel_size, strict=True)):
                    padding = tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size, strict=True))
                else:
                    raise Unsupported(f"{op.where}: Conv2d with asymmetric padding='same' has no LRP rule here")
            self.conv: _ConvSpec | None = _ConvSpec(m.stride, tuple(padding), m.dilation, m.groups)
            self.kernel = tuple(m.weight.shape[2:])
            spec = self.conv
            self.pointwise = self.kernel == (1, 1) and (spec.padding, spec.dilation, spec.groups) == ((0, 0), (1, 1), 1)
        elif isinstance(m, nn.Linear):
            self.conv = None
            self.pointwise = False
        else:
            raise Unsupported(f"{op.where}: weighted rules apply to Conv2d and Linear, not {type(m).__name__}")

        # id of a prepared weight → (that weight, kept alive so the id stays its own; its channels-first copy)
        self._channels_first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight as the layer keeps it (channels-last for convolutions; a channels-first copy on demand)."""
        return weight.contiguous(memory_format=torch.channels_last) if self.conv is not None else weight

    def _small(self, x: torch.Tensor) -> bool:
        """Whether this convolution's output on ``x`` is small enough to run channels-first."""
        s = self.conv
        if s is None or self.pointwise:
            return False
        pixels = 1
        for size, k, p, d, st in zip(x.shape[2:], self.kernel, s.padding, s.dilation, s.stride, strict=True):
            pixels *= (size + 2 * p - d * (k - 1) - 1) // st + 1
        return pixels <= self.SMALL

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory layout this layer runs on (no copy when it already is)."""
        if self.conv is None:
            return x
        small = self._small(x)
        return x.contiguous() if small else x.contiguous(memory_format=torch.channels_last)

    def _weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` in ``x``'s layout: oneDNN follows the weight's layout when it is channels-last."""
        if not self._small(x):
            return weight
        kept = self._channels_first.get(id(weight))
        if kept is None or kept[0] is not weight:
            kept = self._channels_first[id(weight)] = (weight, weight.contiguous())
        return kept[1]

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        s = self.conv
        if s is None:
            return F.linear(x, weight, bias)
        if self.pointwise:
            if s.stride != (1, 1):
                x = x[:, :, :: s.stride[0], :: s.stride[1]]
            n, c, h, w = x.shape
            pixels = x.permute(0, 2, 3, 1).reshape(-1, c)
            matrix = weight.reshape(weight.shape[0], c).T
            out = pixels @ matrix if bias is None else torch.addmm(bias, pixels, matrix)
            return out.view(n, h, w, -1).permute(0, 3, 1, 2)
        return F.conv2d(x, self._weight(x, weight), bias, s.stride, s.padding, s.dilation, s.groups)

    def transpose(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``∂ layer(x, W)/∂x ᵀ grad`` (the transposed convolution or matrix product)."""
        s = self.conv
        if s is None:
            return grad @ weight
        if self.pointwise:
            n, c, h, w = grad.shape
            out = (grad.permute(0, 2, 3, 1).reshape(-1, c) @ weight.reshape(c, -1)).view(n, h, w, -1)
            if s.stride == (1, 1):
                return out.permute(0, 3, 1, 2)
            full = torch.zeros((n, x.shape[1], *x.shape[2:]), dtype=out.dtype, device=out.device)
            full = full.contiguous(memory_format=torch.channels_last)
            full[:, :, :: s.stride[0], :: s.stride[1]] = out.permute(0, 3, 1, 2)
            return full
        weight = self._weight(x, weight)
        if self._small(x):
            grad = grad.contiguous()
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, s.stride, s.padding, s.dilation, False, [0, 0], s.groups, [True, False, False]
        )[0]


def _fold(layer: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights and bias of ``layer`` with the eval-mode batch norm ``bn`` after it folded in (copies)."""
    weight = layer.weight.detach().clone()
    bias = None if layer.bias is None else layer.bias.detach().clone()
    if bn is None:
        return weight, bias
    scale = (bn.running_var.detach() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    shift = -bn.running_mean.detach() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    bias = shift if bias is None else bias * scale + shift
    return weight, bias


class Weighted(Rule):
    """A rule for Conv2d and Linear composed of :class:`Term` s (see the module docstring).

    Args:
        terms: the (input, weight) modifier pairs whose contributions make ``z``.
        bias: the bias modifier (its share is absorbed), or ``None`` to leave the bias out of ``z``.
        stabilizer: added to each denominator with its sign.
        positive: every term and the bias are ``>= 0`` by construction (z⁺, Flat), so ``z + ε`` in place.
    """

    weighted = True

    def __init__(
        self,
        terms: Sequence[Term],
        bias: Callable[[torch.Tensor], torch.Tensor] | None = _same,
        stabilizer: float = 1e-6,
        *,
        positive: bool = False,
    ) -> None:
        if not terms:
            raise ValueError("a weighted rule needs at least one term")
        if not stabilizer > 0:
            raise ValueError(f"stabilizer must be > 0, got {stabilizer!r}")
        self.terms = tuple(terms)
        self.bias = bias
        self.stabilizer = stabilizer
        self.positive = positive
        # z is the output itself when the only term is (x, W) with the whole bias (Epsilon): no extra pass.
        self._reuse = len(self.terms) == 1 and self.terms[0] == Term("x", _same) and bias is _same

    @override
    def setup(self, op: Op) -> None:
        layer = _Layer(op)
        weight, bias = _fold(op.module, op.folded)
        op.state["layer"] = layer
        op.state["weight"] = layer.prepare(weight)
        op.state["bias"] = bias
        op.state["terms"] = [(t.input, layer.prepare(t.weight(weight))) for t in self.terms]
        op.state["z_bias"] = None if bias is None or self.bias is None else self.bias(bias)

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        state = op.state
        layer: _Layer = state["layer"]
        x = layer.layout(args[0])
        y = layer.apply(x, state["weight"], state["bias"])
        if self._reuse:
            return y, (x, stabilize(y, self.stabilizer), None, None)
        # Inputs after a ReLU are known to be >= 0 (no x⁻ terms); check the others (one cheap pass).
        signed = not op.nonnegative[0] and float(x.amin()) < 0
        inputs = {"x": x}
        if signed:
            inputs["pos"], inputs["neg"] = x.clamp(min=0), x.clamp(max=0)
        else:
            inputs["pos"] = x
        z = None
        for kind, weight in state["terms"]:
            if kind == "neg" and not signed:
                continue
            term_input = torch.ones_like(x[:1]) if kind == "ones" else inputs[kind]
            bias = state["z_bias"] if z is None else None  # the bias joins the first term computed
            part = layer.apply(term_input, weight, bias)
            z = part if z is None else z + part
        z = z.add_(self.stabilizer) if self.positive else stabilize(z, self.stabilizer)  # z >= 0: stab(z) = z + ε
        return y, (x, z, inputs.get("pos"), inputs.get("neg"))

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        state = op.state
        layer: _Layer = state["layer"]
        x, z, pos, neg = saved
        s = r.div_(z) if r.shape == z.shape else r / z  # the engine hands every rule its own relevance
        if self._reuse:
            return [_times_input(layer.transpose(s, x, state["weight"]), x)]
        inputs = {"x": x, "pos": pos, "neg": neg}
        out = None
        for kind, weight in state["terms"]:
            if kind == "neg" and neg is None:
                continue
            grad = layer.transpose(s, x, weight)
            part = grad if kind == "ones" else _times_input(grad, inputs[kind])
            out = part if out is None else out.add_(part)
        return [out]


class Epsilon(Weighted):
    """LRP-ε: ``z = x W + b``; ``epsilon`` absorbs weak or contradictory relevance (Bach et al. 2015)."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        super().__init__([Term("x", _same)], _same, epsilon)
        self.epsilon = epsilon


class ZPlus(Weighted):
    """LRP-z⁺ (α1β0): ``z = x⁺W⁺ + x⁻W⁻ + b⁺``, only positive contributions (zennit's ``ZPlus``)."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__([Term("pos", _pos), Term("neg", _neg)], _pos, stabilizer, positive=True)


class Gamma(Weighted):
    """LRP-γ: ``z = x⁺(W + γW⁺) + x⁻(W + γW⁻) + b + γb⁺``; favours positive contributions by γ."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.gamma = gamma
        super().__init__(
            [Term("pos", lambda w: w + gamma * w.clamp(min=0)), Term("neg", lambda w: w + gamma * w.clamp(max=0))],
            lambda b: b + gamma * b.clamp(min=0),
            stabilizer,
        )


class Flat(Weighted):
    """Flat: ``z_ij = 1``: relevance spread evenly over each output's receptive field (first layers)."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__([Term("ones", _ones)], None, stabilizer, positive=True)


class ZBox(Weighted):
    """LRP-z^B for the first layer: ``z = xW − lW⁺ − hW⁻`` with the input bounded in ``[l, h]``.

    Montavon et al., "Explaining nonlinear classification decisions with deep Taylor decomposition", 2017.
    The bounds are per input channel, ``(N, C, 1, 1)``-broadcastable; for normalised pixels in [0, 1],
    ``l = (0 − mean)/std`` and ``h = (1 − mean)/std``. Convolutions only.

    Args:
        low: lower bound per input channel.
        high: upper bound per input channel.
        stabilizer: added to each denominator with its sign.
    """

    def __init__(self, low: torch.Tensor, high: torch.Tensor, stabilizer: float = 1e-6) -> None:
        super().__init__([Term("x", _same)], None, stabilizer)
        self.low = torch.as_tensor(low, dtype=torch.float32).view(1, -1, 1, 1)
        self.high = torch.as_tensor(high, dtype=torch.float32).view(1, -1, 1, 1)

    @override
    def setup(self, op: Op) -> None:
        super().setup(op)
        layer: _Layer = op.state["layer"]
        weight = op.state["weight"]
        if layer.conv is None or layer.conv.groups != 1 or weight.shape[1] != self.low.shape[1]:
            raise Unsupported(
                f"{op.where}: ZBox needs a Conv2d with groups=1 and {self.low.shape[1]} input channels (one per "
                f"bound), got {type(op.module).__name__} with {weight.shape[1]} input channels; "
                "fix mean/std or use first_rule='flat'"
            )
        low, high = self.low.to(weight), self.high.to(weight)
        bounded = weight.clamp(min=0) * low + weight.clamp(max=0) * high  # l_c W⁺ + h_c W⁻ per input channel
        # R_x = x ⊙ Wᵀs − (l W⁺ + h W⁻)ᵀs: l and h are constant per channel, so the two bound terms are one
        # transposed convolution, stacked with the first along the input channels (one call).
        op.state["box_weight"] = layer.prepare(torch.cat([weight, bounded], dim=1))
        # conv(l, W⁺) + conv(h, W⁻) does not depend on x: one single-channel convolution of ones (zero padding
        # included), computed once per input size.
        op.state["bounds_weight"] = layer.prepare(bounded.sum(1, keepdim=True))
        op.state["bounds"] = {}

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        state = op.state
        layer: _Layer = state["layer"]
        x = args[0].contiguous(memory_format=torch.channels_last)
        y = layer.apply(x, state["weight"], state["bias"])
        key = (tuple(x.shape[2:]), x.device, x.dtype)
        bounds = state["bounds"].get(key)
        if bounds is None:
            bounds = state["bounds"][key] = layer.apply(torch.ones_like(x[:1, :1]), state["bounds_weight"])
        z = (y if state["bias"] is None else y - state["bias"].view(1, -1, 1, 1)) - bounds
        return y, (x, stabilize(z, self.stabilizer))

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        x, z = saved
        layer: _Layer = op.state["layer"]
        s = r / z
        n, c, h, w = s.shape[0], x.shape[1], x.shape[2], x.shape[3]
        shape = torch.empty((n, 2 * c, h, w), dtype=x.dtype, device=x.device)
        shape = shape.contiguous(memory_format=torch.channels_last)
        grads = layer.transpose(s, shape, op.state["box_weight"]).split(c, dim=1)
        return [_times_input(grads[0], x) - grads[1]]


class ByGroups(Rule):
    """One rule for depthwise convolutions, another for the rest (dense and grouped).

    A depthwise output sees k² inputs of one channel: after a ReLU, LRP-z⁺'s denominator is zero wherever the
    few positive contributions are, while relevance still reaches negative outputs through the next layer,
    so z⁺ loses it. The default runs depthwise convolutions under LRP-ε, whose denominator is the output
    itself (Pahde et al., "Optimizing explanations by network canonization and hyperparameter search",
    CVPRW 2023, tune the rule per layer type for the same reason).

    Args:
        dense: the rule of ordinary and grouped convolutions.
        depthwise: the rule of convolutions with ``groups == in_channels > 1``.
    """

    weighted = True

    def __init__(self, dense: Rule, depthwise: Rule) -> None:
        self.dense = dense
        self.depthwise = depthwise

    @override
    def setup(self, op: Op) -> None:
        m = op.module
        depthwise = isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
        op.state["rule"] = self.depthwise if depthwise else self.dense
        op.state["rule"].setup(op)

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        return op.state["rule"].forward(op, args, kwargs)

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        return op.state["rule"].relevance(op, r, saved)

    @override
    def nonnegative(self, op: Op) -> bool:
        return op.state["rule"].nonnegative(op)


def describe(op: Op) -> str:
    """How an operation is named in messages: the module and its type, or the function or method."""
    if op.kind == "call_module":
        return f"module {op.target!r} of type {type(op.module).__name__}"
    if op.kind == "call_method":
        return f"method Tensor.{op.target}"
    return f"function {getattr(op.target, '__module__', '')}.{getattr(op.target, '__name__', op.target)}"


__all__ = [
    "ByGroups",
    "Epsilon",
    "Fixed",
    "Flat",
    "Gamma",
    "Gate",
    "LayerNormRule",
    "Norm",
    "Op",
    "Pass",
    "Route",
    "Rule",
    "Selected",
    "Term",
    "Unsupported",
    "Weighted",
    "ZBox",
    "ZPlus",
]
