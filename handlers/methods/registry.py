"""The registry of explanation methods: the one list that options, service, encoder and evaluation read.

Methods register themselves when :mod:`handlers.methods` is imported, in the order the ``method`` option
lists them. :func:`register` checks that an entry is well formed; :func:`registered` adds one for the
duration of a ``with`` block (tests, plug-ins).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from .bases import BASES
from .contract import Endpoint, Method, Need
from .engines import Capabilities

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_METHODS: dict[str, Method] = {}


def check(method: Method) -> None:
    """Check that ``method`` declares everything the contract asks, consistently.

    Raises:
        TypeError: not a :class:`Method`, or a declaration of the wrong type.
        ValueError: a declaration that contradicts another or the contract.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register a Method instance, got {type(method).__name__}")
    kind = type(method).__name__
    for attribute in ("name", "title", "endpoint", "needs"):
        if not hasattr(method, attribute):
            raise TypeError(f"{kind} must declare {attribute!r}")
    if not isinstance(method.name, str) or not _NAME.match(method.name):
        raise ValueError(f"{kind}.name must match [a-z][a-z0-9_]*, got {method.name!r}")
    if not isinstance(method.endpoint, Endpoint):
        raise TypeError(f"{kind}.endpoint must be an Endpoint, got {method.endpoint!r}")
    if not isinstance(method.needs, frozenset) or not all(isinstance(n, Need) for n in method.needs):
        raise TypeError(f"{kind}.needs must be a frozenset of Need, got {method.needs!r}")
    if (Need.EAGER in method.needs) != (method.endpoint is Endpoint.BACKWARD):
        raise ValueError(f"{kind}: backward methods, and only they, need Need.EAGER")
    if method.competes and Need.CLASSES not in method.needs:
        raise ValueError(f"{kind}: a method whose classes compete needs Need.CLASSES")
    if method.target_only and Need.CLASSES not in method.needs:
        raise ValueError(f"{kind}: target_only needs Need.CLASSES")
    if isinstance(method.default_classes, bool) or not isinstance(method.default_classes, int):
        raise TypeError(f"{kind}.default_classes must be an int, got {method.default_classes!r}")
    if method.default_classes < 1:
        raise ValueError(f"{kind}.default_classes must be at least 1, got {method.default_classes}")
    unknown = [b for b in method.bases if b not in BASES]
    if not isinstance(method.bases, tuple) or unknown:
        raise ValueError(f"{kind}.bases must be a tuple of {', '.join(BASES)}; unknown: {unknown}")
    if bool(method.bases) != ("base" in method.reads):
        raise ValueError(f"{kind}: a method with bases reads 'base', and only such a method does")
    if not isinstance(method.reads, tuple) or not all(isinstance(r, str) for r in method.reads):
        raise TypeError(f"{kind}.reads must be a tuple of option names, got {method.reads!r}")
    if not isinstance(method.signed, bool):
        raise TypeError(f"{kind}.signed must be a bool, got {method.signed!r}")


def register(method: Method) -> Method:
    """Add ``method`` to the registry (after the methods already there) and return it.

    Raises:
        TypeError, ValueError: ``method`` is ill formed (see :func:`check`).
        ValueError: a method of that name is already registered.
    """
    check(method)
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered ({_METHODS[method.name]!r})")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove the method called ``name``.

    Raises:
        KeyError: no such method.
    """
    get(name)
    del _METHODS[name]


@contextmanager
def registered(method: Method) -> Iterator[Method]:
    """Register ``method`` for the duration of the block; it is removed on exit, even on error."""
    register(method)
    try:
        yield method
    finally:
        _METHODS.pop(method.name, None)


def get(name: str) -> Method:
    """The method called ``name``.

    Raises:
        KeyError: no such method (the message lists the registered ones).
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"no method {name!r}; registered: {', '.join(_METHODS)}") from None


def find(name: object) -> Method | None:
    """The method called ``name``, or ``None``."""
    return _METHODS.get(name) if isinstance(name, str) else None


def methods(endpoint: Endpoint | None = None) -> tuple[Method, ...]:
    """Every registered method (of ``endpoint``), in registration order."""
    return tuple(m for m in _METHODS.values() if endpoint is None or m.endpoint is endpoint)


def names(endpoint: Endpoint | None = None) -> tuple[str, ...]:
    """The names of :func:`methods`."""
    return tuple(m.name for m in methods(endpoint))


def bases() -> tuple[str, ...]:
    """Every value of the ``base`` option, in order."""
    return tuple(BASES)


def served(capabilities: Capabilities | None = None, *, explain: bool = True) -> tuple[str, ...]:
    """The ``method`` values of an endpoint: backward methods first, then forward ones.

    Args:
        capabilities: what the model offers (only the methods it offers are listed); ``None``: every method.
        explain: ``/explanations`` (every method) or ``/predictions`` (forward methods only).
    """
    order = (Endpoint.BACKWARD, Endpoint.FORWARD) if explain else (Endpoint.FORWARD,)
    return tuple(m.name for e in order for m in methods(e) if capabilities is None or capabilities.offers(m.needs))
