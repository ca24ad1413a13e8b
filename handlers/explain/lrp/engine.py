"""The LRP engine: the eager model traced once with torch.fx, one rule per operation, two explicit passes.

Why a traced graph and not rule-modified gradients. LRP needs every operation of the forward, including the
ones that are not modules: the residual ``+`` (proportional split, or relevance doubles), ``torch.cat`` and
``chunk``, ShuffleNet's channel shuffle, a squeeze-excitation ``x * gate``, functional activations and
pooling. ``torch.fx.Tracer`` records them all as graph nodes, whatever the module structure (loops over a
``ModuleDict`` included), and torchvision checks that every classifier it ships traces. Over that graph the
engine runs explicit passes — one forward that keeps what each rule needs, then one relevance pass in
reverse — with no autograd and no hooks, which is cheaper than a modified backward (ResNet-50 at about
3× a plain forward on two CPU cores) and leaves the user's model untouched: tracing only reads it, and
every weight a rule needs is copied (batch norms folded into the convolution before them).

Rules are objects (:mod:`.rules`) chosen per operation through one map: a module type (looked up along
its MRO), a function (``operator.add``, ``torch.cat``, ``F.relu``…) or a ``Tensor`` method name
(``"view"``). :data:`DEFAULT_RULES` is zennit's ``EpsilonPlusFlat`` / ``EpsilonGammaBox`` composite with
``ZPlus`` for convolutions; ``LRP(model, rules={MyGate: Gate()})`` extends or overrides it, and a module
class can carry its own rule as a class attribute ``lrp_rule`` (a :class:`~.rules.Rule` or a name from
:data:`RULE_NAMES`), which also works for a model served from an archive. A module type with a rule is
traced as one operation (a leaf) unless it overrides the ``forward`` of the class the rule was given for.

Transformers: modules whose inside tracing cannot see (``nn.MultiheadAttention``, Swin's window attention)
have rules that re-implement them explicitly, and ``nn.TransformerEncoderLayer`` is traced through a
traceable equivalent of its forward (:mod:`.attention`); label-free LRP at a ViT block seeds the patch tokens
only (:mod:`..tokens` finds the class and register tokens).

What cannot be explained is refused when the engine is built, naming the operation, the module it sits in
and that module's type: an operation without a rule, a forward that cannot be traced (control flow on
values), a padding mode the rules do not cover.
"""

from __future__ import annotations

import copy
import difflib
import functools
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.fx.node import Node, map_aggregate, map_arg

from ...manifest import IMAGENET_MEAN, IMAGENET_STD
from ..tokens import Layout, grid_layout
from .attention import Constant, Inline, MatMul, Softmax, attention_rules
from .rules import (
    ByGroups,
    Epsilon,
    Fixed,
    Flat,
    Gamma,
    Gate,
    LayerNormRule,
    Norm,
    Op,
    Pass,
    Route,
    Rule,
    Selected,
    Unsupported,
    ZBox,
    ZPlus,
    _Folded,
    describe,
)

FIRST_RULES = ("zbox", "flat")
"""Rules available for the first convolution."""

RULE_NAMES: dict[str, Callable[[], Rule]] = {
    "pass": Pass,
    "route": Route,
    "norm": Norm,
    "gate": Gate,
    "epsilon": Epsilon,
    "zplus": ZPlus,
    "gamma": Gamma,
    "flat": Flat,
    "layernorm": LayerNormRule,
    "softmax": Softmax,
    "matmul": MatMul,
    "constant": Constant,
}
"""Rules by name, for a module class's ``lrp_rule`` attribute (no import of this package needed)."""

RuleKey = type | Callable[..., Any] | str
"""A module type, a function, or a ``Tensor`` method name."""

_ACTIVATIONS_SIGNED = (nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Tanh)
_ACTIVATIONS_NONNEGATIVE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
_FUNCTIONS_SIGNED = (F.silu, F.gelu, F.hardswish, F.leaky_relu, F.elu, F.mish, F.softplus, torch.tanh, F.tanh)
_FUNCTIONS_NONNEGATIVE = (F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid)
_PASS_THROUGH = (
    nn.Dropout,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.Identity,
    torchvision.ops.StochasticDepth,
)
_PASS_FUNCTIONS = (F.dropout, F.dropout2d, torchvision.ops.stochastic_depth)
_ROUTE_MODULES = (nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_ROUTE_FUNCTIONS = (
    torch.cat,
    torch.concat,
    torch.stack,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.chunk,
    torch.split,
    torch.unbind,
    torch.roll,
    operator.getitem,
    F.pad,
    F.max_pool2d,
    F.adaptive_max_pool2d,
)
_ROUTE_METHODS = (
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "chunk",
    "split",
    "unbind",
    "expand",
    "repeat",
    "roll",
    "float",
    "to",
    "clone",
)
_NORM_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Upsample)
_NORM_FUNCTIONS = (
    operator.add,
    torch.add,
    operator.sub,
    torch.sub,
    torch.mean,
    torch.sum,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.interpolate,
)
_GATE_FUNCTIONS = (operator.mul, torch.mul, operator.truediv, torch.div)
_META_METHODS = ("size", "dim", "numel")
_RELUS = (F.relu, torch.relu, "relu")
_META_FUNCTIONS = (getattr, len)
_INPLACE_FUNCTIONS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def default_rules(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> dict[RuleKey, Rule]:
    """The default rule map: ZPlus for convolutions, Epsilon for linear layers, the glue rules for the rest.

    Attention runs under AttnLRP (:func:`~.attention.attention_rules`: ``nn.MultiheadAttention``, Swin's window
    attention, ``F.scaled_dot_product_attention``, softmax, matrix products); pass
    ``rules=attention_rules(cp=True)`` to :class:`LRP` for CP-LRP.

    Args:
        epsilon: epsilon of the linear layers' Epsilon rule.
        stabilizer: the other rules' stabilizer, added to each denominator with its sign.
    """
    rules: dict[RuleKey, Rule] = {
        nn.Conv2d: ByGroups(ZPlus(stabilizer), Epsilon(stabilizer)),
        nn.Linear: Epsilon(epsilon),
    }
    # Identity rules differ only in what they say of their output's sign: ">= 0 if the input is" (SiLU, GELU…
    # map [0, ∞) into itself; dropout), ">= 0" (ReLU, sigmoid), or "any sign" (an unfolded, affine batch norm).
    same, nonnegative, signed = Pass(nonnegative=None), Pass(nonnegative=True), Pass(nonnegative=False)
    norm, gate, route = Norm(stabilizer), Gate(), Route()
    rules.update(dict.fromkeys((*_ACTIVATIONS_SIGNED, *_FUNCTIONS_SIGNED, *_PASS_THROUGH, *_PASS_FUNCTIONS), same))
    rules.update(dict.fromkeys((*_ACTIVATIONS_NONNEGATIVE, *_FUNCTIONS_NONNEGATIVE), nonnegative))
    rules.update(dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d), signed))
    rules.update(dict.fromkeys((*_ROUTE_MODULES, *_ROUTE_FUNCTIONS, *_ROUTE_METHODS), route))
    rules.update(dict.fromkeys((*_NORM_MODULES, *_NORM_FUNCTIONS, "add", "sub", "mean", "sum"), norm))
    rules.update(dict.fromkeys((*_GATE_FUNCTIONS, "mul", "div"), gate))
    rules.update({"relu": nonnegative, "sigmoid": nonnegative})
    rules.update({nn.LayerNorm: LayerNormRule(stabilizer), F.layer_norm: LayerNormRule(stabilizer)})
    rules.update(attention_rules(epsilon=epsilon, stabilizer=stabilizer))  # AttnLRP; CP-LRP: attention_rules(cp=True)
    return rules


DEFAULT_RULES: Mapping[RuleKey, Rule] = default_rules()
"""The default rule map (see :func:`default_rules`); pass ``rules=`` to :class:`LRP` to extend it."""


class Relevance(NamedTuple):
    """Input relevance maps and the relevance seeded, per sample (and per class).

    Attributes:
        maps: ``(N, H, W)`` or ``(N, K, H, W)`` relevance per input pixel, summed over colour channels.
        seed: ``(N,)`` or ``(N, K)`` total relevance seeded; ``maps`` sums to about this (conservation).
    """

    maps: torch.Tensor
    seed: torch.Tensor


class _Step(NamedTuple):
    node: Node
    rule: Rule | None  # None: computed plainly (sizes, tensors made from sizes), no relevance
    op: Op | None
    carriers: tuple[Node, ...]
    call: Callable[..., Any]


def _rule_name(value: Any) -> Rule:
    if isinstance(value, Rule):
        return value
    if isinstance(value, str) and value in RULE_NAMES:
        return RULE_NAMES[value]()
    raise ValueError(f"lrp_rule must be a Rule or one of {', '.join(RULE_NAMES)}, got {value!r}")


class _Tracer(fx.Tracer):
    """Records where each module's output is in the graph; modules with a rule are traced as one operation."""

    def __init__(self, rules: Mapping[RuleKey, Rule]) -> None:
        super().__init__()
        self.rules = rules
        self.outputs: dict[str, list[Node]] = {}
        self.inside: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if hasattr(type(m), "lrp_rule"):
            return True
        owner = _rule_owner(type(m), self.rules)
        if owner is not None and isinstance(self.rules[owner], Inline):
            return False
        if owner is not None and type(m).forward is owner.forward:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        owner = None if hasattr(type(m), "lrp_rule") else _rule_owner(type(m), self.rules)
        rule = None if owner is None else self.rules[owner]
        if isinstance(rule, Inline) and rule.forward_function is not None and type(m).forward is owner.forward:
            forward = functools.partial(rule.forward_function, m)  # a traceable equivalent of the module's own
        self.inside.append(f"module {self.path_of_module(m)!r} ({type(m).__name__})")
        out = super().call_module(m, forward, args, kwargs)
        self.inside.pop()  # left in place when tracing fails: the innermost module is the culprit
        if isinstance(out, fx.Proxy):
            self.outputs.setdefault(self.path_of_module(m), []).append(out.node)
        return out


def _rule_owner(cls: type, rules: Mapping[RuleKey, Rule]) -> type | None:
    """The class along ``cls``'s MRO that has a rule in ``rules``."""
    return next((c for c in cls.__mro__ if c in rules and c is not nn.Module), None)


def _where(node: Node, model: nn.Module) -> str:
    """The module a node belongs to and its type: ``layer1.0 (Bottleneck)``, or ``the model (ResNet)``."""
    if node.op == "call_module":
        return f"module {node.target!r} ({type(model.get_submodule(node.target)).__name__})"
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        name, kind = list(stack.values())[-1]
        type_name = getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].rstrip("'>"))
        return f"module {name!r} ({type_name})"
    return f"the model's own forward ({type(model).__name__})"


def _leaves(structure: Any) -> list[Any]:
    out: list[Any] = []
    map_aggregate(structure, out.append)
    return out


def _picker(node: Node, carriers: set[Node]) -> tuple[tuple[Node, ...], Callable[..., list[torch.Tensor]]]:
    """The relevance-carrying input nodes of ``node`` and a function that finds their values in resolved args."""
    leaves = _leaves((node.args, node.kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Node) and leaf in carriers]

    def pick(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        values = _leaves((args, kwargs))
        return [values[i] for i in positions]

    return tuple(leaves[i] for i in positions), pick


def _plain_call(node: Node, module: nn.Module | None) -> Callable[..., Any]:
    """Run ``node`` out of place: in-place activations and operators would overwrite values rules keep."""
    if node.op == "call_module":
        private = copy.deepcopy(module).eval()
        for m in private.modules():
            if getattr(m, "inplace", False):
                m.inplace = False
        return private
    if node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.startswith("_"):
            name = name[:-1]

        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, name)(*args, **kwargs)

        return _no_inplace(method)
    return _no_inplace(_INPLACE_FUNCTIONS.get(node.target, node.target))


def _no_inplace(function: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("inplace"):
            kwargs = {**kwargs, "inplace": False}
        return function(*args, **kwargs)

    return call


def _resolver(node: Node) -> Callable[[dict], tuple[tuple, dict]]:
    """Read ``node``'s arguments from the values: a flat tuple of nodes and constants without ``map_arg``."""
    args, kwargs = node.args, node.kwargs
    if kwargs or any(isinstance(a, list | tuple | dict | slice) for a in args):
        return lambda env: (map_arg(args, env.__getitem__), map_arg(kwargs, env.__getitem__))
    picks = tuple((isinstance(a, Node), a) for a in args)
    return lambda env: (tuple(env[a] if is_node else a for is_node, a in picks), {})


def _key(node: Node) -> RuleKey:
    if node.op == "call_method":
        name = node.target
        return name[:-1] if name.endswith("_") and not name.startswith("_") else name
    return _INPLACE_FUNCTIONS.get(node.target, node.target)


class Graph:
    """The traced model with one rule per relevance-carrying operation; built once, only read afterwards.

    Args:
        model: the eager model (only read).
        rules: the rule map (module types, functions, method names).
        first_rule: a rule for the first convolution seen from the input (``None``: its mapped rule).

    Raises:
        Unsupported: an operation without a rule, a forward that cannot be traced, or a rule that cannot
            run on its operation; the message names the operation, its module and the module's type.
    """

    def __init__(self, model: nn.Module, rules: Mapping[RuleKey, Rule], first_rule: Rule | None) -> None:
        tracer = _Tracer(rules)
        modes = {m: m.training for m in model.modules()}
        model.eval()  # trace eval semantics (dropout off, batch-norm statistics); the modes are put back below
        try:
            graph = tracer.trace(model)
        except Exception as exc:
            where = tracer.inside[-1] if tracer.inside else f"the model ({type(model).__name__})"
            raise Unsupported(
                f"LRP cannot explain {type(model).__name__}: the forward of {where} cannot be traced with torch.fx "
                f"({type(exc).__name__}: {exc}); give that module a rule (rules={{ItsType: rule}} or an "
                "lrp_rule class attribute) so that it is treated as one operation"
            ) from exc
        finally:
            for m, mode in modes.items():
                m.training = mode
        self.model = model
        nodes = list(graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        self.input = placeholders[0]
        output = next(n for n in nodes if n.op == "output")
        logits = next((leaf for leaf in _leaves(output.args) if isinstance(leaf, Node)), None)
        if logits is None:
            raise Unsupported(f"{type(model).__name__}'s forward returns no tensor")
        self.logits = logits

        dependent, meta = self._classify(nodes)
        carriers = {n for n in dependent if n not in meta}
        self.constants = self._constants(nodes, dependent, placeholders)
        self.steps: list[_Step] = []
        self.position: dict[Node, int] = {}
        problems: list[str] = []
        for node in nodes:
            if node not in dependent or node.op in ("placeholder", "output"):
                continue
            module = model.get_submodule(node.target) if node.op == "call_module" else None
            inputs, pick = _picker(node, carriers)
            if node in meta:
                self.steps.append(_Step(node, None, None, (), _plain_call(node, module)))
                continue
            rule = self._rule(node, module, rules)
            if rule is None:
                problems.append(self._no_rule(node, module))
                continue
            call = module if rule.weighted else _plain_call(node, module)
            op = Op(node.name, node.op, node.target, _where(node, model), module, call, len(inputs), pick)
            self.position[node] = len(self.steps)
            self.steps.append(_Step(node, rule, op, inputs, call))
        if problems:
            raise Unsupported(
                f"LRP cannot explain {type(model).__name__}: {problems[0]}"
                + (f" (and {len(problems) - 1} more operation(s) without a rule)" if len(problems) > 1 else "")
            )
        self.layers = {
            name: found[0]
            for name, found in tracer.outputs.items()
            if len(found) == 1 and found[0] in self.position and name
        }
        self.layers = dict(sorted(self.layers.items(), key=lambda item: self.position[item[1]]))
        self._fold_batch_norms()
        self.first = next((s for s in self.steps if s.op is not None and s.rule.weighted), None)
        if self.first is not None and first_rule is not None and isinstance(self.first.op.module, nn.Conv2d):
            index = self.steps.index(self.first)
            self.first = self.first._replace(rule=first_rule)
            self.steps[index] = self.first
        nonnegative: dict[Node, bool] = {self.input: False}
        constant: dict[Node, bool] = {}
        for step in self.steps:
            if step.op is None:
                continue
            step.op.nonnegative = tuple(nonnegative.get(n, False) for n in step.carriers)
            step.op.constant = tuple(constant.get(n, False) for n in step.carriers)
            try:
                step.rule.setup(step.op)
            except Unsupported:
                raise
            except Exception as exc:
                raise Unsupported(f"{step.op.where}: {describe(step.op)} under {step.rule!r}: {exc}") from exc
            nonnegative[step.node] = step.rule.nonnegative(step.op)
            constant[step.node] = step.rule.constant(step.op)
        self.plans = self._plans()

    @staticmethod
    def _classify(nodes: list[Node]) -> tuple[set[Node], set[Node]]:
        """Nodes that depend on the input, and among them those that carry sizes, not relevance."""
        dependent: set[Node] = set()
        meta: set[Node] = set()
        for node in nodes:
            if node.op == "placeholder":
                if not dependent:
                    dependent.add(node)
                continue
            sources = [n for n in node.all_input_nodes if n in dependent]
            if not sources:
                continue
            dependent.add(node)
            if (
                (node.op == "call_method" and node.target in _META_METHODS)
                or (node.op == "call_function" and node.target in _META_FUNCTIONS)
                or all(n in meta for n in sources)
            ):
                meta.add(node)
        return dependent, meta

    def _constants(self, nodes: list[Node], dependent: set[Node], placeholders: list[Node]) -> dict[Node, Any]:
        """Values that do not depend on the input (parameters, buffers, what is made of them), copied once."""
        values: dict[Node, Any] = {}
        for node in placeholders[1:]:
            values[node] = node.args[0] if node.args else None  # extra forward arguments keep their defaults
        with torch.no_grad():
            for node in nodes:
                if node in dependent or node.op in ("placeholder", "output"):
                    continue
                if node.op == "get_attr":
                    value: Any = self.model
                    for part in node.target.split("."):
                        value = getattr(value, part)
                else:
                    args = map_arg(node.args, values.__getitem__)
                    kwargs = map_arg(node.kwargs, values.__getitem__)
                    module = self.model.get_submodule(node.target) if node.op == "call_module" else None
                    value = _plain_call(node, module)(*args, **kwargs)
                values[node] = map_aggregate(value, lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v)
        return values

    def _rule(self, node: Node, module: nn.Module | None, rules: Mapping[RuleKey, Rule]) -> Rule | None:
        if module is not None:
            own = getattr(type(module), "lrp_rule", None)
            if own is not None:
                return _rule_name(own)
            owner = _rule_owner(type(module), rules)
            return None if owner is None else rules[owner]
        key = _key(node)
        try:
            return rules.get(key)
        except TypeError:  # an unhashable target
            return None

    def _no_rule(self, node: Node, module: nn.Module | None) -> str:
        if module is not None:
            what = f"module {node.target!r} of type {type(module).__name__}"
            how = f"rules={{{type(module).__name__}: rule}} or an lrp_rule attribute on {type(module).__name__}"
        elif node.op == "call_method":
            what = f"method Tensor.{node.target} in {_where(node, self.model)}"
            how = f"rules={{{_key(node)!r}: rule}}"
        else:
            name = getattr(node.target, "__name__", str(node.target))
            what = f"function {getattr(node.target, '__module__', '')}.{name} in {_where(node, self.model)}"
            how = f"rules={{{name}: rule}}"
        return f"{what} has no LRP rule (add one: {how})"

    def _fold_batch_norms(self) -> None:
        """Fold each batch norm that directly follows a Conv2d (Linear) used only by it into that layer."""
        for index, step in enumerate(self.steps):
            module = step.op.module if step.op is not None else None
            if not isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) or len(step.carriers) != 1:
                continue
            source = step.carriers[0]
            if source not in self.position or len(source.users) != 1:
                continue
            producer = self.steps[self.position[source]]
            layer = producer.op.module
            pair = (isinstance(layer, nn.Conv2d) and isinstance(module, nn.BatchNorm2d)) or (
                isinstance(layer, nn.Linear) and isinstance(module, nn.BatchNorm1d)
            )
            if not pair or not producer.rule.weighted or module.running_var is None:
                continue
            producer.op.folded = module
            self.steps[index] = step._replace(rule=_Folded())

    def run(self, x: torch.Tensor, stop: int | None = None, keep: Iterable[Node] = ()) -> tuple[dict, dict]:
        """The forward pass up to step ``stop``: the values of ``keep`` (and the last step) and what rules saved."""
        env: dict[Node, Any] = dict(self.constants)
        env[self.input] = x
        saved: dict[Node, Any] = {}
        steps = self.steps if stop is None else self.steps[: stop + 1]
        keep = set(keep)
        for step, (resolve, free, inplace) in zip(steps, self.plans, strict=False):
            args, kwargs = resolve(env)
            if inplace and keep.isdisjoint(inplace):  # a ReLU on a value only it reads
                env[step.node], saved[step.node] = torch.relu_(args[0]), None
            elif step.rule is None:
                env[step.node] = step.call(*args, **kwargs)
            else:
                env[step.node], saved[step.node] = step.rule.forward(step.op, args, kwargs)
            for node in free:  # values no later step reads: freed now, as the forward goes
                if node not in keep:
                    env.pop(node, None)
        return env, saved

    def _plans(self) -> list[tuple[Callable[[dict], tuple[tuple, dict]], tuple[Node, ...], tuple[Node, ...]]]:
        """Per step: how to read its arguments, what to free after it, and what a ReLU may overwrite.

        Arguments of flat calls are read without ``map_arg``; overwriting saves one large allocation per
        convolution–batch norm–ReLU.
        """
        last: dict[Node, int] = {}
        for index, step in enumerate(self.steps):
            for node in step.node.all_input_nodes:
                last[node] = index
        plans = []
        for index, step in enumerate(self.steps):
            node = step.node
            free = tuple(n for n in node.all_input_nodes if last[n] == index and n not in self.constants)
            plans.append((_resolver(node), free, self._overwritable(step)))
        return plans

    def _overwritable(self, step: _Step) -> tuple[Node, ...]:
        """The nodes whose value a ReLU may overwrite (empty: none): a layer's output nothing else reads.

        A convolution's (or linear layer's) output, through the batch norms folded into it, is read only by
        the ReLU after it, and weighted rules keep their input and denominators, never their output.
        """
        module = step.op.module if step.op is not None else None
        relu = isinstance(module, nn.ReLU) or (module is None and step.op is not None and _key(step.node) in _RELUS)
        if not relu or len(step.carriers) != 1 or not isinstance(step.rule, Pass):
            return ()
        chain = [step.carriers[0]]
        while True:
            node = chain[-1]
            if len(node.users) != 1 or node not in self.position:
                return ()
            producer = self.steps[self.position[node]]
            if not isinstance(producer.rule, _Folded):
                return tuple(chain) if producer.rule.weighted else ()
            chain.append(producer.carriers[0])

    def propagate(
        self, pending: dict[Node, Any], saved: dict[Node, Any], low: int = 0, high: int | None = None
    ) -> dict[Node, Any]:
        """The relevance pass over steps ``high`` down to ``low``; returns the relevance left below ``low``.

        Every relevance tensor handed to a rule is its own (fresh, or a view no other rule receives), so a
        rule may overwrite it; the seeds in ``pending`` must not be shared with saved values.
        """
        high = len(self.steps) - 1 if high is None else high
        for index in range(high, low - 1, -1):
            step = self.steps[index]
            r = pending.pop(step.node, None)
            if r is None or step.rule is None:
                continue
            found = step.rule.relevance(step.op, r, saved[step.node])
            for source, rel in zip(step.carriers, found, strict=True):
                if rel is None:
                    continue
                if isinstance(rel, Selected):
                    parts = pending.setdefault(source, {})
                    parts[rel.index] = rel.relevance if rel.index not in parts else parts[rel.index] + rel.relevance
                elif source in pending:
                    pending[source] = pending[source] + rel
                else:
                    pending[source] = rel
        return pending


class LRP:
    """Layer-wise Relevance Propagation on any traceable eager model, label-free or per class.

    LRP redistributes a relevance ``R`` seeded at some layer back to the input pixels, operation by
    operation, with one rule per operation (see :mod:`.rules` for the rules and their sources). Label-free
    LRP seeds ``R = A`` at a layer's activations ``A`` (it explains the sum of that layer's activations; the
    LaFAM layer by default when served); per-class LRP seeds the chosen logit.

    Bach et al., "On pixel-wise explanations for non-linear classifier decisions by layer-wise relevance
    propagation", PLoS ONE 2015; Montavon et al., "Layer-wise relevance propagation: an overview", 2019.

    Args:
        model: the classifier or encoder. It is only read, never modified: tracing puts the modules' train/eval
            flags back as they were, no hooks, parameters, buffers or attributes are added. Batch norms are
            used with their running statistics (eval semantics) whatever ``model.training`` is.
        first_rule: rule of the first convolution seen from the input, ``zbox`` (bounded pixel range) or
            ``flat``, or a :class:`~.rules.Rule`.
        epsilon: epsilon of the linear layers' Epsilon rule.
        stabilizer: the other rules' stabilizer, added to each denominator with its sign.
        mean: per-channel mean of the input normalisation (on [0, 1] pixels), for ZBox's bounds.
        std: per-channel standard deviation of the input normalisation, for ZBox's bounds.
        chunk_size: classes per batched relevance pass of :meth:`for_classes` (memory ∝ chunk_size × the
            activations kept by one forward). ``None``: 1 on the CPU, where tiling the kept activations costs
            more than it saves (ResNet-50, 8 classes: 1.4 s batched against 0.85 s one by one, 2 cores), and
            8 on a GPU, where one-image passes leave the device idle between kernel launches.
        rules: additions to or overrides of :data:`DEFAULT_RULES`, keyed by module type, function or
            ``Tensor`` method name, e.g. ``{MyGate: Gate(), nn.Linear: ZPlus()}``.

    Raises:
        ValueError: unknown ``first_rule``, non-positive ``epsilon``/``stabilizer``/``std``, bad
            ``chunk_size``; :class:`~.rules.Unsupported` (a ``ValueError``) for a model or an operation LRP
            cannot explain, naming the module and its type.

    Example:
        >>> lrp = LRP(torchvision.models.resnet18().eval())
        >>> lrp.label_free(images, "layer4").shape        # (N, H, W)
        >>> lrp.for_classes(images, torch.tensor([3, 7])).shape
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        first_rule: str | Rule = "zbox",
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        chunk_size: int | None = None,
        rules: Mapping[RuleKey, Rule] | None = None,
    ) -> None:
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"chunk_size must be a positive int (classes per batched relevance pass), got {chunk_size!r}"
            )
        if not isinstance(first_rule, Rule) and first_rule not in FIRST_RULES:
            raise ValueError(f"first_rule must be one of {', '.join(FIRST_RULES)} or a Rule, got {first_rule!r}")
        if not epsilon > 0 or not stabilizer > 0:
            raise ValueError(f"epsilon and stabilizer must be > 0, got epsilon={epsilon}, stabilizer={stabilizer}")
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean and std must have the same length and std > 0, got mean={mean}, std={std}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        merged = {**default_rules(epsilon, stabilizer), **(rules or {})}
        if first_rule == "zbox":
            mean_t, std_t = torch.tensor(mean), torch.tensor(std)
            first: Rule | None = ZBox((0 - mean_t) / std_t, (1 - mean_t) / std_t, stabilizer)
        elif first_rule == "flat":
            first = Flat(stabilizer)
        else:
            first = first_rule
        self._model = model
        self.chunk_size = chunk_size
        with torch.no_grad():
            self._graph = Graph(model, merged, first)
        if self._graph.first is None:
            raise Unsupported(f"{type(model).__name__} has no Conv2d or Linear layer to explain")
        self._checked = False

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the modules whose output can seed label-free LRP, in forward order."""
        return tuple(self._graph.layers)

    def label_free(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """Label-free LRP: input relevance of the sum of ``layer``'s activations.

        Args:
            x: ``(N, C, H, W)`` normalised images.
            layer: module name as in ``model.named_modules()`` (see :attr:`layers`), e.g. ``layer4``.

        Returns:
            ``(N, H, W)`` relevance per pixel.
        """
        return self.relevance(x, layer=layer).maps

    def for_classes(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Per-class LRP: input relevance of each chosen logit.

        Args:
            x: ``(N, C, H, W)`` normalised images.
            classes: ``(N,)`` one class per sample, or ``(N, K)`` K classes per sample.

        Returns:
            ``(N, H, W)`` or ``(N, K, H, W)`` relevance per pixel.
        """
        return self.relevance(x, classes=classes).maps

    def relevance(
        self,
        x: torch.Tensor,
        *,
        layer: str | None = None,
        classes: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
        mask: tuple[str, torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
    ) -> Relevance:
        """Run LRP seeded at ``layer``'s activations or at the logits of ``classes`` (exactly one of them).

        The forward runs once; per-class seeds reuse it (the relevance pass is linear in the seed).

        Args:
            x: ``(N, C, H, W)`` normalised images.
            layer: module name to seed with its own activations (label-free); at a ViT block the patch
                tokens only, not the class and register tokens.
            classes: ``(N,)`` or ``(N, K)`` integer class indices to seed with their logits, or
                ``select(logits) -> classes`` to choose them from this very forward pass.
            mask: ``(layer, m)`` with ``m`` of shape ``(N, h, w)`` (``layer``'s spatial size), for ``(N,)``
                classes only: the relevance reaching ``layer``'s output is multiplied by ``m`` (broadcast
                over channels) before it goes on to the pixels. At a transformer block ``(h, w)`` is its
                patch grid (:func:`~..tokens.grid_layout`): a channel-last map ``(N, h, w, C)`` is masked
                alike, and of tokens ``(N, T, C)`` the patch tokens are, the class and register tokens
                dropped (at a ViT's last block a class's relevance sits on its class token alone). The
                returned ``seed`` is then the relevance kept at ``layer``, which the maps conserve. ``m`` may
                be ``m(activations, logits)``, computed from this forward's activations at ``layer`` and
                logits (one forward for both).

        Returns:
            The maps and the seeded totals (see :class:`Relevance`).

        Raises:
            ValueError: bad ``x``, unknown ``layer`` (with close matches), ``classes`` of the wrong shape,
                dtype or out of range, both or neither of ``layer`` and ``classes``, a ``mask`` with ``(N, K)``
                classes or of the wrong shape, or a model whose traced forward does not reproduce its output.
        """
        if (layer is None) == (classes is None):
            raise ValueError("pass exactly one of layer (label-free) or classes (per class)")
        if mask is not None and (classes is None or (isinstance(classes, torch.Tensor) and classes.dim() != 1)):
            raise ValueError("mask needs classes of shape (N,): one masked class per image")
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a float (N, C, H, W) tensor, got {shape}")
        graph = self._graph
        with torch.no_grad():
            if not self._checked:
                self._check(x[:1])
            if layer is not None:
                node = self._node(layer)
                env, saved = graph.run(x, stop=graph.position[node], keep=[node])
                out = env[node]
                several = isinstance(out, tuple | list)  # nn.MultiheadAttention: (output, weights)
                seed = _label_free_seed(out[0] if several else out, x)
                total = seed.flatten(1).sum(1)  # before the relevance pass, whose rules may overwrite the seed
                pending = {node: {0: seed} if several else seed}
                maps = self._to_input(graph.propagate(pending, saved, 0, graph.position[node]), x)
                return Relevance(maps, total)
            at = self._node(mask[0]) if mask is not None else None
            env, saved = graph.run(x, keep=[graph.logits] if at is None else [graph.logits, at])
            logits = _logits(env[graph.logits])
            classes = self._check_classes(classes(logits) if callable(classes) else classes, logits)
            if mask is not None:
                if classes.dim() != 1:
                    raise ValueError("mask needs classes of shape (N,): one masked class per image")
                m = mask[1](env[at], logits) if callable(mask[1]) else mask[1]
                return self._masked(logits, saved, classes, mask[0], m, x=x)
            single = classes.dim() == 1
            classes = classes.view(classes.shape[0], -1)
            seeds = logits.gather(1, classes)
            n, k = classes.shape
            maps = []
            chunk = self.chunk_size or (1 if x.device.type == "cpu" else 8)
            for start in range(0, k, chunk):  # chunks of classes, each ONE batched relevance pass
                part = classes[:, start : start + chunk]
                width = part.shape[1]
                r = torch.zeros(n, width, logits.shape[1], dtype=logits.dtype, device=logits.device)
                r.scatter_(2, part[..., None], seeds[:, start : start + width, None])
                tiled = saved if width == 1 else _tile(saved, width)
                pending = graph.propagate({graph.logits: r.view(n * width, -1)}, tiled)
                maps.append(self._to_input(pending, x, width).view(n, width, *x.shape[2:]))
            stacked = torch.cat(maps, 1)
            return Relevance(stacked[:, 0], seeds[:, 0]) if single else Relevance(stacked, seeds)

    def _to_input(self, pending: dict[Node, Any], x: torch.Tensor, times: int = 1) -> torch.Tensor:
        """The input relevance, summed over channels: ``(N·times, H, W)``; zeros where none arrived."""
        found = pending.get(self._graph.input)
        if found is None:
            return x.new_zeros(x.shape[0] * times, *x.shape[2:])
        return found.sum(1)

    def _node(self, layer: str) -> Node:
        layers = self._graph.layers
        if layer not in layers:
            close = difflib.get_close_matches(layer, layers, n=3)
            valid = ", ".join(close) if close else ", ".join(layers)
            hint = f"; did you mean {valid}?" if close else f"; valid layers: {valid}"
            raise ValueError(f"layer {layer!r} is not a module LRP can seed at{hint}")
        return layers[layer]

    def _masked(
        self,
        logits: torch.Tensor,
        saved: dict,
        classes: torch.Tensor,
        layer: str,
        mask: torch.Tensor,
        *,
        x: torch.Tensor,
    ) -> Relevance:
        graph = self._graph
        node = self._node(layer)
        stop = graph.position[node]
        r = torch.zeros_like(logits).scatter_(1, classes[:, None], logits.gather(1, classes[:, None]))
        pending = graph.propagate({graph.logits: r}, saved, stop + 1)
        at_layer = pending.get(node)
        if at_layer is None:
            at_layer = torch.zeros(1)
        expected = (at_layer.shape[0], *at_layer.shape[2:])
        layout = None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected or at_layer.dim() != 4:
            layout = _token_layout(at_layer, x)  # tokens (N, T, C) or a channel-last map (N, h, w, C)
            if layout is not None:
                expected = (at_layer.shape[0], *layout.grid)
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected:
            raise ValueError(
                f"mask for layer {layer!r} must have shape {expected}, "
                f"got {getattr(mask, 'shape', type(mask).__name__)}"
            )
        mask = mask.to(at_layer)
        if layout is None:
            pending[node] = at_layer * mask[:, None]
        elif layout.kind == "nhwc":
            pending[node] = at_layer * mask[..., None]
        else:  # tokens: the patch tokens masked, the class and register tokens dropped (as label-free LRP seeds)
            masked = torch.zeros_like(at_layer)
            masked[:, layout.extra :] = at_layer[:, layout.extra :] * mask.flatten(1)[..., None]
            pending[node] = masked
        kept = pending[node].flatten(1).sum(1)
        return Relevance(self._to_input(graph.propagate(pending, saved, 0, stop), x), kept)

    @staticmethod
    def _check_classes(classes: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        n, c = logits.shape[0], logits.shape[-1]
        if not isinstance(classes, torch.Tensor) or classes.is_floating_point() or classes.is_complex():
            raise ValueError("classes must be an integer tensor of shape (N,) or (N, K)")
        if classes.dim() not in (1, 2) or classes.shape[0] != n or classes.numel() == 0:
            raise ValueError(f"classes must have shape ({n},) or ({n}, K), got {tuple(classes.shape)}")
        if int(classes.min()) < 0 or int(classes.max()) >= c:
            low, high = int(classes.min()), int(classes.max())
            raise ValueError(f"classes must be in [0, {c - 1}], got values from {low} to {high}")
        return classes.to(device=logits.device, dtype=torch.long)

    def _check(self, x: torch.Tensor) -> None:
        """Once: the traced graph, run by the rules, must reproduce the model's output."""
        if self._model.training:
            return
        expected = _logits(self._model(x))
        env, _ = self._graph.run(x, keep=[self._graph.logits])
        got = _logits(env[self._graph.logits])
        tolerance = 1e-3 * float(expected.abs().max()) + 1e-4
        if got.shape != expected.shape or float((got - expected).abs().max()) > tolerance:
            difference = float((got - expected).abs().max()) if got.shape == expected.shape else "shape"
            raise Unsupported(
                f"the traced forward of {type(self._model).__name__} does not reproduce its output (max "
                f"difference {difference}): its forward depends on values tracing cannot see"
            )
        self._checked = True


def _token_layout(value: torch.Tensor, x: torch.Tensor) -> Layout | None:
    """The layout of a transformer layer's output (:func:`~..tokens.grid_layout`), if it is one.

    Tokens ``(N, T, C)`` or a channel-last map ``(N, h, w, C)``; ``None`` for a channel-first map or a shape
    that is no grid.
    """
    if value.dim() not in (3, 4):
        return None
    return _layout_of(tuple(value.shape[1:]), (int(x.shape[-2]), int(x.shape[-1])))


@functools.lru_cache(maxsize=256)
def _layout_of(shape: tuple[int, ...], input_size: tuple[int, int]) -> Layout | None:
    """:func:`_token_layout` for one per-sample shape and input size (the search runs once)."""
    try:
        layout = grid_layout((1, *shape), input_size)
    except ValueError:
        return None
    return None if layout.kind == "nchw" else layout


def _label_free_seed(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The label-free seed at a layer: its activations, with a ViT's class and register tokens set to 0.

    Those tokens are no image region: seeding them would explain the class token's features as well. A
    channel-first or channel-last map is seeded whole.
    """
    seed = out.clone()
    if out.dim() == 3:
        layout = _token_layout(out, x)
        if layout is not None and layout.extra:
            seed[:, : layout.extra] = 0
    return seed


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, tuple | list):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"model must return a tensor (or a tuple starting with one), got {type(output).__name__}")
    return output


def _tile(saved: Any, times: int) -> Any:
    """Repeat every saved batch tensor ``times`` times along the batch (sample-major), to run K seeds at once."""
    if isinstance(saved, torch.Tensor):
        tiled = saved.repeat_interleave(times, dim=0)
        if saved.dim() == 4 and saved.is_contiguous(memory_format=torch.channels_last):
            tiled = tiled.contiguous(memory_format=torch.channels_last)  # the convolutions' fast layout
        return tiled
    if isinstance(saved, Fixed):
        return saved
    if isinstance(saved, dict):
        return {key: _tile(value, times) for key, value in saved.items()}
    if isinstance(saved, list | tuple) and not isinstance(saved, torch.Size):
        return type(saved)(_tile(item, times) for item in saved)
    return saved  # None, strings, or a shape whose batch size is taken from the relevance
