"""Explanation methods behind one contract, one file each, listed in one registry.

* :mod:`.contract`: :class:`Method` (the declarations and ``explain``), :class:`Inputs`, :class:`Explanation`,
  :class:`Endpoint`, :class:`Need`;
* :mod:`.registry`: :func:`register`, :func:`get`, :func:`served`… — what options, service, encoder and
  evaluation read;
* :mod:`.engines`: :class:`Engines`, what backward methods share, decided once at worker start, and the
  :class:`Capabilities` of a served model;
* :mod:`.bases`: the base attributions of the distribution methods;
* one module per method, in the order the ``method`` option lists them.

Adding a method: one module here that subclasses :class:`Method` and calls :func:`register`, its import
below, and one test file.
"""

from __future__ import annotations

from . import registry
from .contract import ContractError, Endpoint, Explanation, Inputs, Method, Need, choose_classes, once
from .engines import Capabilities, Engines, capabilities

# Registration order is the order of the ``method`` option's values.
from . import lafam, lrp, lrp_class, gradcam, input_x_gradient, distribution, distribution_fast  # noqa: F401  isort: skip

__all__ = [
    "Capabilities",
    "ContractError",
    "Endpoint",
    "Engines",
    "Explanation",
    "Inputs",
    "Method",
    "Need",
    "capabilities",
    "choose_classes",
    "once",
    "registry",
]
