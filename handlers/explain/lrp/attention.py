"""LRP through attention: AttnLRP's softmax and bilinear rules, CP-LRP, and rules for the attention modules.

**AttnLRP** (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers",
ICML 2024) explains the attention weights as well as the values:

- softmax ``s = softmax(x)`` (Prop. 3.1, a Taylor decomposition at ``x`` with a bias):
  ``R_x,i = x_i (R_i − s_i Σ_j R_j)``, with ``−∞`` logits (masked positions) taken as 0. This is input ×
  the softmax's own Jacobianᵀ applied to ``R / s``. It is **not** conservative: the bias absorbs
  ``Σ_i R_i − Σ_i x_i (R_i − s_i Σ_j R_j)``.
- matrix products ``O = A B`` of two input-dependent factors (Prop. 3.3, the uniform rule for a bilinear
  map): every product ``a_ik b_kj`` gives half of its share of ``R_ij`` to each factor,
  ``R_A,ik = Σ_j a_ik b_kj R_ij / (2 stab(O_ij))`` and symmetrically for ``B``; conservative up to ε.
  A product with one constant factor (a weight matrix) is LRP-ε: the other factor takes all.
- LayerNorm with σ treated as a constant (Prop. 3.4, :class:`~.rules.LayerNormRule`), GELU and other
  element-wise activations by the identity (Eq. 9, :class:`~.rules.Pass`), linear layers by LRP-ε (or γ).

**CP-LRP** (Ali et al., "XAI for Transformers: Better Explanations through Conservative Propagation", ICML
2022) treats the attention weights as constants: ``O = A V`` passes all its relevance to ``V`` (LRP-ε with
``A`` as weights) and nothing reaches the queries and keys. Apart from biases (linear biases, LayerNorm's
shift, position embeddings, the class token) it is conservative. Select it with ``cp=True`` on the module
rules or with :func:`transformer_rules` (``cp=True`` also maps every softmax to :class:`Constant`).

Attention inside a module the graph cannot see into (``nn.MultiheadAttention`` passes its weights to
``F.multi_head_attention_forward``; torchvision's Swin calls the fx-wrapped ``shifted_window_attention``) is
re-implemented explicitly by :class:`Attention` and :class:`WindowAttention`: in-projection as one linear
layer, heads split, scaled ``Q Kᵀ`` plus any logit bias (mask, relative-position bias), softmax, ``A V``,
out-projection, each step under the rules above. Two shortcuts, both exact:

- the scale ``d^-½`` is folded into the query rows of the in-projection (a constant factor passes relevance
  unchanged);
- the logit biases (masks, Swin's relative-position bias and −100 shift mask) are added after ``Q Kᵀ``, and
  LRP-ε of that sum followed by the bilinear rule gives ``R_Q = Q ⊙ (G Kᵀ…)/2`` with ``G = R_A − A Σ R_A``
  directly: the softmax rule's factor ``x`` cancels the ε-rule's division by it, so no denominator near 0
  appears and the biases absorb their share (masked entries, where ``A = 0``, pass nothing). The ε of the
  ``Q Kᵀ`` product itself (a factor ``L / (L ± ε)``) is left out.

Sources read for learning, not copied: LXT (``rachtibat/LRP-eXplains-Transformers``, Clear BSD with a
patent notice, see the README's licensing section) and zennit. Layer-wise Relevance Propagation is
patented by Fraunhofer (WO2016150472 and family).
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import swin_transformer
from typing_extensions import override

from .rules import (
    Epsilon,
    Fixed,
    Op,
    Relevances,
    Route,
    Rule,
    Saved,
    Stabilized,
    Unsupported,
    _saved_for_vjp,
    _times_input,
    _vjp,
    describe,
    stabilize,
)

# --- the two AttnLRP rules as functions ---------------------------------------------------------------------------


def softmax_relevance(x: torch.Tensor, s: torch.Tensor, r: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """AttnLRP's softmax rule (Prop. 3.1): ``R_x = x ⊙ (R − s Σ_dim R)``, ``−∞`` logits taken as 0.

    ``x`` and ``s`` may hold one copy per image while ``r`` holds K seeds per image (sample-major); the result
    has ``r``'s shape.
    """
    x, s = _match(x, r), _match(s, r)
    g = r - s * r.sum(dim, keepdim=True)
    return g.mul_(torch.where(torch.isinf(x), 0.0, x))


def _match(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``t`` repeated along the batch to ``r``'s batch (K seeds per image, sample-major)."""
    if t.shape[0] == r.shape[0] or t.dim() == 0:
        return t
    return t.repeat_interleave(r.shape[0] // t.shape[0], dim=0)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``O = softmax(Q Kᵀ + bias) V`` for queries already scaled; returns ``(O, A)``."""
    logits = q @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    a = torch.softmax(logits, dim=-1)
    return a @ v, a


def attention_relevance(
    kept: tuple[torch.Tensor, ...], r: torch.Tensor, *, cp: bool, stabilizer: float
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Relevance of the (scaled) queries, keys and values of ``O = softmax(Q Kᵀ + bias) V`` from ``R_O``.

    AttnLRP: ``A V`` by the uniform rule, the softmax by Prop. 3.1, ``Q Kᵀ`` by the uniform rule (with the
    logit bias absorbing its share; see the module docstring). CP-LRP (``cp``): ``A`` constant, all to ``V``.

    Args:
        kept: ``(Q, K, V, A, O)`` from the forward (``Q`` scaled), batch first.
        r: the relevance of ``O``.
        cp: CP-LRP instead of AttnLRP.
        stabilizer: added to ``O`` with its sign in the denominator.
    """
    q, k, v, a, o = kept
    s = r / stabilize(o, stabilizer)
    if not cp:
        s = s.mul_(0.5)
    r_v = _times_input(a.transpose(-2, -1) @ s, v)
    if cp:
        return None, None, r_v
    r_a = (s @ v.transpose(-2, -1)).mul_(a)
    g = r_a.sub_(a * r_a.sum(-1, keepdim=True)).mul_(0.5)  # softmax rule / logits, then half to each of Q, K
    r_q = _times_input(g @ k, q)
    r_k = _times_input(g.transpose(-2, -1) @ q, k)
    return r_q, r_k, r_v


# --- graph rules: softmax, matrix products, constants -------------------------------------------------------------


def _softmax_dim(op: Op, args: tuple[Any, ...], kwargs: dict[str, Any], ndim: int) -> int:
    given = args[1] if len(args) > 1 else kwargs.get("dim")
    dim = op.module.dim if op.kind == "call_module" else given
    if dim is None:  # torch's legacy implicit dimension
        dim = 0 if ndim in (0, 1, 3) else 1
    return dim % max(ndim, 1)


class Softmax(Rule):
    """AttnLRP's softmax rule (Achtibat et al., ICML 2024, Prop. 3.1): ``R_x = x ⊙ (R − s Σ R)``.

    Not conservative: the softmax is decomposed at its input with a bias that absorbs relevance. ``−∞``
    inputs (masked logits) are taken as 0, so they receive none.
    """

    @override
    def setup(self, op: Op) -> None:
        if op.inputs != 1:
            raise Unsupported(f"{op.where}: {describe(op)} has {op.inputs} relevance-carrying inputs; Softmax needs 1")

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        x = args[0]
        s = op.call(*args, **kwargs)
        return s, (x, s, Fixed(_softmax_dim(op, args, kwargs, x.dim())))

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        x, s, dim = saved
        return [softmax_relevance(x, s, r, dim.value)]

    @override
    def nonnegative(self, op: Op) -> bool:
        return True


class Constant(Rule):
    """The output is a constant to the rules after it: computed, passes no relevance back.

    CP-LRP's attention weights (Ali et al., ICML 2022): map the softmax to this rule and the product
    ``A V`` passes all its relevance to ``V`` (:class:`MatMul`, :class:`~.rules.Gate` read the flag).
    """

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        return [None] * op.inputs

    @override
    def constant(self, op: Op) -> bool:
        return True

    @override
    def nonnegative(self, op: Op) -> bool:
        return op.target in (torch.softmax, F.softmax, "softmax") or isinstance(op.module, nn.Softmax)


class MatMul(Stabilized):
    """Matrix products ``y = a @ b`` (``torch.matmul``, ``@``, ``bmm``): AttnLRP's uniform rule (Prop. 3.3).

    ``R_a = a ⊙ (R / (n·stab(y))) bᵀ`` and ``R_b = b ⊙ aᵀ (R / (n·stab(y)))``, with ``n`` the number of
    factors that carry relevance and are not constants (:meth:`~.rules.Rule.constant`, CP-LRP): two
    input-dependent factors split every product's share in half; with one (a weight matrix, or attention
    weights under CP-LRP) it is LRP-ε and that factor takes all. Conservative up to ε.

    Args:
        stabilizer: added to each denominator with its sign.
    """

    @override
    def setup(self, op: Op) -> None:
        if op.inputs not in (1, 2):
            raise Unsupported(f"{op.where}: {describe(op)} has {op.inputs} inputs that carry relevance")

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        out = op.call(*args, **kwargs)
        a, b = (args + tuple(kwargs.values()))[:2]
        if kwargs or a.dim() < 2 or b.dim() < 2:
            return out, ("vjp", _saved_for_vjp(op, args, kwargs, out), out)
        carriers = op.pick(args, kwargs)
        kept = [t if any(t is c for c in carriers) else Fixed(t) for t in (a, b)]  # constants are not tiled
        return out, ("mm", kept[0], kept[1], out)

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        constant = op.constant or (False,) * op.inputs
        active = max(1, sum(not c for c in constant))
        if saved[0] == "vjp":
            _, kept, y = saved
            grads = _vjp(op, kept, r / stabilize(y, self.stabilizer) / active)
            found = [_times_input(g, x) if g is not None else None for g, x in zip(grads, kept.value[2], strict=True)]
            return [None if c else f for f, c in zip(found, constant, strict=True)]
        _, a, b, y = saved
        s = r / stabilize(y, self.stabilizer)
        if active > 1:
            s = s.div_(active)
        out: Relevances = []
        index = 0
        for which, t in enumerate((a, b)):
            if isinstance(t, Fixed):
                continue
            if constant[index]:
                out.append(None)
            elif which == 0:
                out.append(_times_input(_sum_to(s @ _value(b).transpose(-2, -1), t, s), t))
            else:
                out.append(_times_input(_sum_to(_value(a).transpose(-2, -1) @ s, t, s), t))
            index += 1
        return out


def _value(t: Any) -> torch.Tensor:
    return t.value if isinstance(t, Fixed) else t


def _sum_to(grad: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``grad`` summed over the dimensions ``t`` was broadcast along (keeping ``r``'s K-tiled batch)."""
    if grad.shape[1:] == t.shape[1:] and grad.dim() == t.dim():
        return grad
    return grad.sum_to_size(r.shape[0] if t.shape[0] != 1 else 1, *t.shape[1:])


# --- attention modules ------------------------------------------------------------------------------------------


class _Linear:
    """A private copy of one linear map under a weighted rule, inside a module's rule (the projections)."""

    def __init__(self, rule: Rule, weight: torch.Tensor, bias: torch.Tensor | None, where: str, name: str) -> None:
        module = nn.utils.skip_init(
            nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        module.requires_grad_(False)
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        self.op = Op(name, "call_module", name, where, module, module, 1, lambda a, _k: [a[0]], (False,), (False,))
        self.rule = rule
        rule.setup(self.op)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Saved]:
        return self.rule.forward(self.op, (x,), {})

    def relevance(self, r: torch.Tensor, saved: Saved) -> torch.Tensor:
        return self.rule.relevance(self.op, r, saved)[0]


def _copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


class _Projected(Stabilized):
    """An attention rule with weighted projections: AttnLRP or CP-LRP, and the rule of its linear layers.

    Args:
        cp: CP-LRP (attention weights as constants) instead of AttnLRP.
        linear: the weighted rule of the projections (default: LRP-ε with ``epsilon``).
        epsilon: epsilon of the default linear rule.
        stabilizer: added to the denominator of the ``A V`` product with its sign.
    """

    def __init__(
        self, *, cp: bool = False, linear: Rule | None = None, epsilon: float = 1e-6, stabilizer: float = 1e-6
    ) -> None:
        super().__init__(stabilizer)
        self.cp = cp
        self.linear = Epsilon(epsilon) if linear is None else linear
        if not self.linear.weighted:
            raise ValueError(f"linear must be a weighted rule (Epsilon, Gamma, ZPlus…), got {self.linear!r}")


class Attention(_Projected):
    """``nn.MultiheadAttention`` re-implemented explicitly, under AttnLRP (default) or CP-LRP.

    In-projection (one linear layer when query, key and value are the same tensor), heads split, scaled
    ``Q Kᵀ`` plus the masks as logit biases, softmax, ``A V``, heads merged, out-projection; relevance goes
    back through the same steps (see the module docstring for the rules and their sources). Supports
    ``batch_first`` either way, separate key/value dimensions, ``attn_mask`` (2-D or per head, bool or
    float), ``key_padding_mask`` and ``is_causal``. Returns ``(output, weights)`` as the module does;
    relevance reaching the returned attention weights is not propagated.

    Args:
        cp: CP-LRP (attention weights as constants) instead of AttnLRP.
        linear: the weighted rule of the in- and out-projections (default: LRP-ε with ``epsilon``).
        epsilon: epsilon of the default linear rule.
        stabilizer: added to the denominator of the ``A V`` product with its sign.

    Raises:
        Unsupported: at build time, ``add_bias_kv`` or ``add_zero_attn``; unbatched inputs at run time.
    """

    @override
    def setup(self, op: Op) -> None:
        m = op.module
        if not isinstance(m, nn.MultiheadAttention):
            raise Unsupported(f"{op.where}: Attention is the rule of nn.MultiheadAttention, not {type(m).__name__}")
        if m.bias_k is not None or m.add_zero_attn:
            raise Unsupported(
                f"{op.where}: nn.MultiheadAttention with add_bias_kv or add_zero_attn has no LRP rule here"
            )
        e, h = m.embed_dim, m.num_heads
        scale = (e // h) ** -0.5
        bias = _copy(m.in_proj_bias)
        if m._qkv_same_embed_dim:
            weights = list(m.in_proj_weight.detach().clone().split(e))
        else:
            weights = [m.q_proj_weight.detach().clone(), m.k_proj_weight.detach().clone()]
            weights.append(m.v_proj_weight.detach().clone())
        biases = [None] * 3 if bias is None else list(bias.split(e))
        weights[0] = weights[0] * scale  # the scale folded into the queries (a constant factor)
        if biases[0] is not None:
            biases[0] = biases[0] * scale
        state = op.state
        state["heads"] = h
        state["batch_first"] = m.batch_first
        state["q"], state["k"], state["v"] = (
            _Linear(self.linear, w, b, op.where, f"{op.name}.{n}_proj")
            for w, b, n in zip(weights, biases, "qkv", strict=True)
        )
        if m._qkv_same_embed_dim:
            packed = None if bias is None else torch.cat(biases)
            state["qkv"] = _Linear(self.linear, torch.cat(weights), packed, op.where, f"{op.name}.in_proj")
        out = m.out_proj
        state["out"] = _Linear(self.linear, out.weight.detach(), _copy(out.bias), op.where, f"{op.name}.out_proj")

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        call = _MHA_SIGNATURE.bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        query, key, value = given["query"], given["key"], given["value"]
        if query.dim() != 3:
            raise Unsupported(f"{op.where}: nn.MultiheadAttention on unbatched ({query.dim()}-D) input has no LRP rule")
        state = op.state
        if not state["batch_first"]:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        h = state["heads"]
        n, length, _ = query.shape
        kept: dict[str, Any] = {}
        if given["query"] is given["key"] and given["key"] is given["value"] and "qkv" in state:
            qkv, kept["qkv"] = state["qkv"].forward(query)
            q, k, v = (_heads(t, h) for t in qkv.chunk(3, dim=-1))
        else:
            (q, kept["q"]), (k, kept["k"]), (v, kept["v"]) = (
                state[name].forward(t) for name, t in zip("qkv", (query, key, value), strict=True)
            )
            q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
        bias = _mask_bias(given, (n, h, length, k.shape[2]), q.dtype)
        o, a = attend(q, k, v, bias)
        merged = o.transpose(1, 2).reshape(n, length, -1)
        y, kept["out"] = state["out"].forward(merged)
        if not state["batch_first"]:
            y = y.transpose(0, 1)
        weights = None
        if given["need_weights"]:
            weights = a.mean(1) if given["average_attn_weights"] else a
        carriers = op.pick(args, kwargs)
        roles = _roles(carriers, (given["query"], given["key"], given["value"]))
        return (y, weights), (q, k, v, a, o, kept, Fixed(roles))

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        if isinstance(r, dict):
            r = r.get(0)
        if r is None:
            return [None] * op.inputs
        q, k, v, a, o, kept, roles = saved
        state = op.state
        h = state["heads"]
        if not state["batch_first"]:
            r = r.transpose(0, 1)
        r_o = state["out"].relevance(r, kept["out"])
        r_q, r_k, r_v = attention_relevance((q, k, v, a, o), _heads(r_o, h), cp=self.cp, stabilizer=self.stabilizer)
        merged = [None if t is None else t.transpose(1, 2).flatten(2) for t in (r_q, r_k, r_v)]
        if "qkv" in kept and self.cp:  # only the values carry relevance: the value rows of the packed layer
            x, z, *rest = kept["qkv"]
            width = merged[2].shape[-1]
            found = [state["v"].relevance(merged[2], (x, z[..., 2 * width :], *rest)), None, None]
        elif "qkv" in kept:
            packed = torch.cat(merged, dim=-1)
            found = [state["qkv"].relevance(packed, kept["qkv"]), None, None]
        else:
            found = [
                None if t is None else state[name].relevance(t, kept[name])
                for name, t in zip("qkv", merged, strict=True)
            ]
        if not state["batch_first"]:
            found = [None if t is None else t.transpose(0, 1) for t in found]
        return _to_carriers(found, roles.value)


def _signature(*names: str, **defaults: Any) -> inspect.Signature:
    """A signature to bind a call's arguments with: ``names`` without defaults, then ``defaults`` in order."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter(name, kind) for name in names]
    parameters += [inspect.Parameter(name, kind, default=value) for name, value in defaults.items()]
    return inspect.Signature(parameters)


_MHA_SIGNATURE = _signature(
    "query",
    "key",
    "value",
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
)
"""``nn.MultiheadAttention.forward``'s arguments."""


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(N, L, E)`` → ``(N, heads, L, E / heads)``."""
    n, length, e = t.shape
    return t.view(n, length, heads, e // heads).transpose(1, 2)


def _as_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: may not attend) as ``−∞`` logit biases; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _mask_bias(given: Mapping[str, Any], shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor | None:
    """The attention and key-padding masks as one logit bias broadcastable to ``shape = (N, heads, L, S)``."""
    n, heads, length, source = shape
    attn_mask, padding = given["attn_mask"], given["key_padding_mask"]
    if attn_mask is None and given["is_causal"]:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=given["query"].device).triu_(1)
    bias = None
    if attn_mask is not None:
        bias = _as_bias(attn_mask, dtype)
        if bias.dim() == 3:
            bias = bias.view(n, heads, length, source)
    if padding is not None:
        pad = _as_bias(padding, dtype).view(n, 1, 1, source)
        bias = pad if bias is None else bias + pad
    return bias


def _roles(carriers: list[torch.Tensor], values: tuple[torch.Tensor, ...]) -> tuple[tuple[int, ...], ...]:
    """Per relevance-carrying input, which of the roles (query, key, value) it is.

    A tensor that fills several roles (self-attention) takes them all at its first occurrence.
    """
    taken: list[list[int]] = [[] for _ in carriers]
    for role, value in enumerate(values):
        index = next((i for i, c in enumerate(carriers) if c is value), None)
        if index is not None:
            taken[index].append(role)
    return tuple(tuple(t) for t in taken)


def _to_carriers(found: list[torch.Tensor | None], roles: tuple[tuple[int, ...], ...]) -> Relevances:
    out: Relevances = []
    for taken in roles:
        parts = [found[role] for role in taken if found[role] is not None]
        out.append(None if not parts else functools.reduce(operator.add, parts))
    return out


class ScaledDotProductAttention(Stabilized):
    """``F.scaled_dot_product_attention`` under AttnLRP (default) or CP-LRP (see :class:`Attention`).

    Args:
        cp: CP-LRP (attention weights as constants) instead of AttnLRP.
        stabilizer: added to the denominator of the ``A V`` product with its sign.
    """

    def __init__(self, *, cp: bool = False, stabilizer: float = 1e-6) -> None:
        super().__init__(stabilizer)
        self.cp = cp

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        call = _SDPA_SIGNATURE.bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        if given["enable_gqa"]:
            raise Unsupported(f"{op.where}: scaled_dot_product_attention with enable_gqa has no LRP rule here")
        query, key, value = given["query"], given["key"], given["value"]
        scale = given["scale"] if given["scale"] is not None else query.shape[-1] ** -0.5
        q = query * scale
        mask = given["attn_mask"]
        if mask is None and given["is_causal"]:
            mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril_()
        bias = None
        if mask is not None:  # here True means "may attend"
            bias = _as_bias(~mask, q.dtype) if mask.dtype == torch.bool else mask.to(q.dtype)
        o, a = attend(q, key, value, bias)
        roles = _roles(op.pick(args, kwargs), (query, key, value))
        return o, (q, key, value, a, o, Fixed(roles))

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        q, k, v, a, o, roles = saved
        found = list(attention_relevance((q, k, v, a, o), r, cp=self.cp, stabilizer=self.stabilizer))
        return _to_carriers(found, roles.value)


_SDPA_SIGNATURE = _signature(
    "query", "key", "value", attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
)
"""``F.scaled_dot_product_attention``'s arguments."""


class WindowAttention(_Projected):
    """torchvision Swin's ``ShiftedWindowAttention`` (v1 and v2) re-implemented explicitly.

    The module calls ``shifted_window_attention`` (fx-wrapped): pad to whole windows, cyclic shift, window
    partition, qkv linear, scaled ``Q Kᵀ`` (v2: cosine attention, ``normalize(Q) normalize(K)ᵀ`` times a
    clamped learned scale) plus the relative-position bias and the −100 shift mask, softmax, ``A V``,
    projection, reverse partition and shift, unpad. Pad, roll and partition are permutations (relevance is
    routed back by their inverse); the position bias and the mask are logit biases that absorb their share;
    v2's normalisation of Q and K has its norm treated as a constant (the identity, like LayerNorm's σ) and
    its logit scale is a constant factor. Attention under AttnLRP (default) or CP-LRP (``cp``), see
    :class:`Attention`.

    Args:
        cp: CP-LRP (attention weights as constants) instead of AttnLRP.
        linear: the weighted rule of the qkv and output projections (default: LRP-ε with ``epsilon``).
        epsilon: epsilon of the default linear rule.
        stabilizer: added to the denominator of the ``A V`` product with its sign.
    """

    @override
    def setup(self, op: Op) -> None:
        m = op.module
        if not isinstance(m, swin_transformer.ShiftedWindowAttention):
            raise Unsupported(f"{op.where}: WindowAttention is the rule of Swin's ShiftedWindowAttention")
        state = op.state
        dim, heads = m.qkv.in_features, m.num_heads
        weight, bias = m.qkv.weight.detach().clone(), _copy(m.qkv.bias)
        v2 = isinstance(m, swin_transformer.ShiftedWindowAttentionV2)
        with torch.no_grad():
            state["position"] = op.call.get_relative_position_bias().detach().clone()  # (1, heads, L, L)
            if v2:
                if bias is not None:
                    bias[dim : 2 * dim] = 0.0  # as shifted_window_attention does for cosine attention
                state["logit_scale"] = torch.clamp(m.logit_scale.detach(), max=math.log(100.0)).exp()  # (heads,1,1)
            else:
                scale = (dim // heads) ** -0.5
                weight[:dim] *= scale
                if bias is not None:
                    bias[:dim] *= scale
        state["v2"] = v2
        state["geometry"] = (list(m.window_size), list(m.shift_size), heads)
        state["qkv"] = _Linear(self.linear, weight, bias, op.where, f"{op.name}.qkv")
        state["proj"] = _Linear(self.linear, m.proj.weight.detach(), _copy(m.proj.bias), op.where, f"{op.name}.proj")
        state["masks"] = {}

    def _shift_mask(self, op: Op, size: tuple[int, int], shift: list[int], like: torch.Tensor) -> torch.Tensor:
        """The −100 mask between shifted regions, ``(windows, 1, L, L)``, as ``shifted_window_attention`` builds it."""
        key = (size, tuple(shift), like.device, like.dtype)
        found = op.state["masks"].get(key)
        if found is not None:
            return found
        window = op.state["geometry"][0]
        pad_h, pad_w = size
        regions = like.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                regions[hs[0] : hs[1], ws[0] : ws[1]] = count
                count += 1
        regions = regions.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
        regions = regions.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
        diff = regions.unsqueeze(1) - regions.unsqueeze(2)
        mask = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0).unsqueeze(1)
        op.state["masks"][key] = mask
        return mask

    @override
    def forward(self, op: Op, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Saved]:
        x = args[0] if args else kwargs["x"]
        state = op.state
        window, shift, heads = state["geometry"]
        n, height, width, c = x.shape
        pad_r, pad_b = (window[1] - width % window[1]) % window[1], (window[0] - height % window[0]) % window[0]
        pad_h, pad_w = height + pad_b, width + pad_r
        shift = [0 if window[0] >= pad_h else shift[0], 0 if window[1] >= pad_w else shift[1]]
        geometry = (height, width, pad_r, pad_b, tuple(shift))
        windows = _partition(_shift(F.pad(x, (0, 0, 0, pad_r, 0, pad_b)), shift, -1), window)  # (N, nW, L, C)
        qkv, kept_qkv = state["qkv"].forward(windows)
        nw, length = windows.shape[1], windows.shape[2]
        qkv = qkv.view(n, nw, length, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)  # 3, N, nW, heads, L, d
        q, k, v = qkv[0], qkv[1], qkv[2]
        if state["v2"]:
            q = F.normalize(q, dim=-1) * state["logit_scale"]
            k = F.normalize(k, dim=-1)
        bias = state["position"]
        if sum(shift) > 0:
            bias = bias + self._shift_mask(op, (pad_h, pad_w), shift, x)
        o, a = attend(q, k, v, bias)
        merged = o.transpose(2, 3).reshape(n, nw, length, c)
        y, kept_proj = state["proj"].forward(merged)
        y = _shift(_merge(y, window, (pad_h, pad_w)), shift, 1)[:, :height, :width, :].contiguous()
        return y, (q, k, v, a, o, kept_qkv, kept_proj, Fixed(geometry))

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        q, k, v, a, o, kept_qkv, kept_proj, geometry = saved
        height, width, pad_r, pad_b, shift = geometry.value
        window, _, heads = op.state["geometry"]
        n, c = r.shape[0], r.shape[-1]
        # The forward's last steps (pad, shift back, merge windows) reversed: pad, shift, partition.
        r_windows = _partition(_shift(F.pad(r, (0, 0, 0, pad_r, 0, pad_b)), list(shift), -1), window)
        nw, length = r_windows.shape[1], r_windows.shape[2]
        r_o = op.state["proj"].relevance(r_windows, kept_proj)
        r_o = r_o.view(n, nw, length, heads, c // heads).transpose(2, 3)
        r_q, r_k, r_v = attention_relevance((q, k, v, a, o), r_o, cp=self.cp, stabilizer=self.stabilizer)
        zeros = None if r_q is not None else torch.zeros_like(r_v)
        parts = [zeros if t is None else t for t in (r_q, r_k)] + [r_v]  # v2's normalisation: the identity
        packed = torch.stack(parts, dim=0).permute(1, 2, 4, 0, 3, 5).reshape(n, nw, length, 3 * c)
        r_x = op.state["qkv"].relevance(packed, kept_qkv)
        r_x = _shift(_merge(r_x, window, (height + pad_b, width + pad_r)), list(shift), 1)
        return [r_x[:, :height, :width, :]]


def _shift(x: torch.Tensor, shift: list[int], sign: int) -> torch.Tensor:
    if sum(shift) == 0:
        return x
    return torch.roll(x, shifts=(sign * shift[0], sign * shift[1]), dims=(1, 2))


def _partition(x: torch.Tensor, window: list[int]) -> torch.Tensor:
    """``(N, H, W, C)`` → windows ``(N, nW, wh·ww, C)`` in Swin's order."""
    n, h, w, c = x.shape
    x = x.view(n, h // window[0], window[0], w // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, -1, window[0] * window[1], c)


def _merge(x: torch.Tensor, window: list[int], size: tuple[int, int]) -> torch.Tensor:
    """Windows ``(N, nW, wh·ww, C)`` → ``(N, H, W, C)`` (the inverse of :func:`_partition`)."""
    n, c = x.shape[0], x.shape[-1]
    h, w = size
    x = x.view(n, h // window[0], w // window[1], window[0], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


# --- modules traced through a traceable equivalent of their forward ----------------------------------------------


class Inline(Rule):
    """Trace into a module (even a ``torch.nn`` one, a leaf by default) instead of treating it as one operation.

    Its operations then get their own rules. ``forward(module, *args, **kwargs)``, when given, replaces the
    module's forward while tracing: a traceable equivalent of it (``nn.TransformerEncoderLayer``'s own forward
    branches on tensor properties for its fast path, which tracing cannot follow).

    Args:
        forward: the traceable forward, or ``None`` for the module's own.
    """

    def __init__(self, forward: Callable[..., Any] | None = None) -> None:
        self.forward_function = forward

    @override
    def relevance(self, op: Op, r: Any, saved: Saved) -> Relevances:
        raise Unsupported(f"{op.where}: an inlined module is traced through, it is no operation of the graph")


def encoder_layer_forward(
    layer: nn.TransformerEncoderLayer,
    src: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``nn.TransformerEncoderLayer.forward`` without its fast path (the same computation in eval mode)."""

    def attention(x: torch.Tensor) -> torch.Tensor:
        x = layer.self_attn(
            x,
            x,
            x,
            attn_mask=src_mask,
            key_padding_mask=src_key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return layer.dropout1(x)

    def feed_forward(x: torch.Tensor) -> torch.Tensor:
        return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))

    x = src
    if layer.norm_first:
        x = x + attention(layer.norm1(x))
        return x + feed_forward(layer.norm2(x))
    x = layer.norm1(x + attention(x))
    return layer.norm2(x + feed_forward(x))


def encoder_forward(
    encoder: nn.TransformerEncoder,
    src: torch.Tensor,
    mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
    is_causal: bool | None = None,
) -> torch.Tensor:
    """``nn.TransformerEncoder.forward`` without its fast path (no nested tensors)."""
    x = src
    for layer in encoder.layers:
        x = layer(x, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    return x if encoder.norm is None else encoder.norm(x)


# --- the rule maps ----------------------------------------------------------------------------------------------

SOFTMAX_KEYS: tuple[Any, ...] = (torch.softmax, F.softmax, nn.Softmax, "softmax")
MATMUL_KEYS: tuple[Any, ...] = (torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")


def attention_rules(
    *, cp: bool = False, linear: Rule | None = None, epsilon: float = 1e-6, stabilizer: float = 1e-6
) -> dict[Any, Rule]:
    """The rules for attention: AttnLRP by default, CP-LRP with ``cp``.

    Maps ``nn.MultiheadAttention``, Swin's window attention (v1, v2), ``F.scaled_dot_product_attention``,
    softmax (AttnLRP's rule, or :class:`Constant` under CP-LRP), matrix products, Swin's patch-merging pad
    (a routing) and ``nn.TransformerEncoder(Layer)`` (traced through).

    Args:
        cp: CP-LRP (Ali et al., ICML 2022) instead of AttnLRP (Achtibat et al., ICML 2024).
        linear: the weighted rule of ``nn.Linear`` and of the attention modules' projections (default:
            LRP-ε with ``epsilon``); it is mapped to ``nn.Linear`` too only when given.
        epsilon: epsilon of the default linear rule.
        stabilizer: the other rules' stabilizer.

    Example:
        >>> LRP(vit, rules=attention_rules(cp=True, linear=Gamma(0.25)))   # LXT's choice for torchvision ViT
    """
    projections = Epsilon(epsilon) if linear is None else linear
    modules = Attention(cp=cp, linear=projections, stabilizer=stabilizer)
    windows = WindowAttention(cp=cp, linear=projections, stabilizer=stabilizer)
    softmax: Rule = Constant() if cp else Softmax()
    rules: dict[Any, Rule] = {
        nn.MultiheadAttention: modules,
        swin_transformer.ShiftedWindowAttention: windows,
        swin_transformer.ShiftedWindowAttentionV2: windows,
        F.scaled_dot_product_attention: ScaledDotProductAttention(cp=cp, stabilizer=stabilizer),
        swin_transformer._patch_merging_pad: Route(),
        nn.TransformerEncoderLayer: Inline(encoder_layer_forward),
        nn.TransformerEncoder: Inline(encoder_forward),
    }
    rules.update(dict.fromkeys(SOFTMAX_KEYS, softmax))
    rules.update(dict.fromkeys(MATMUL_KEYS, MatMul(stabilizer)))
    if linear is not None:
        rules[nn.Linear] = linear
    return rules


__all__ = [
    "Attention",
    "Constant",
    "Inline",
    "MatMul",
    "ScaledDotProductAttention",
    "Softmax",
    "WindowAttention",
    "attend",
    "attention_relevance",
    "attention_rules",
    "encoder_forward",
    "encoder_layer_forward",
    "softmax_relevance",
]
