"""Layer-wise Relevance Propagation for eager image models: an open rule engine over the traced graph.

:class:`LRP` explains any model torch.fx can trace, label-free (seeded at a layer's activations) or per
class; :mod:`.rules` holds the rules and :mod:`.engine` the engine and the default rule map. Extend the map
for your own modules: ``LRP(model, rules={MyGate: Gate()})``, or give the module class an ``lrp_rule``
attribute (a rule or a name from :data:`RULE_NAMES`). :mod:`.attention` holds the transformer rules (AttnLRP by
default; CP-LRP with ``rules=attention_rules(cp=True)``).
"""

from .attention import (
    Attention,
    Constant,
    Inline,
    MatMul,
    ScaledDotProductAttention,
    Softmax,
    WindowAttention,
    attention_rules,
)
from .engine import DEFAULT_RULES, FIRST_RULES, LRP, RULE_NAMES, Relevance, default_rules
from .rules import (
    Epsilon,
    Flat,
    Gamma,
    Gate,
    LayerNormRule,
    Norm,
    Op,
    Pass,
    Route,
    Rule,
    Term,
    Unsupported,
    Weighted,
    ZBox,
    ZPlus,
)

__all__ = [
    "DEFAULT_RULES",
    "FIRST_RULES",
    "LRP",
    "RULE_NAMES",
    "Attention",
    "Constant",
    "Epsilon",
    "Flat",
    "Gamma",
    "Gate",
    "Inline",
    "LayerNormRule",
    "MatMul",
    "Norm",
    "Op",
    "Pass",
    "Relevance",
    "Route",
    "Rule",
    "ScaledDotProductAttention",
    "Softmax",
    "Term",
    "Unsupported",
    "Weighted",
    "WindowAttention",
    "ZBox",
    "ZPlus",
    "attention_rules",
    "default_rules",
]
