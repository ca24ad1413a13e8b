"""JSON from a request (a body, an ``options`` form field), parsed within limits that make it a 400, never a 500.

Python's parser recurses once per nesting level, so ``[[[[…]]]]`` 100 000 levels deep raises
``RecursionError``; an integer of more than 4300 digits raises ``ValueError`` (the int-string conversion
limit). TorchServe's worker tries ``json.loads`` on an ``application/json`` parameter itself and, when that
fails, hands over the raw bytes instead; when it succeeds, the handler gets the decoded object, possibly
hundreds of levels deep. Both paths go through here: text is checked for depth before it is parsed
(:func:`parse_json`), a decoded object after (:func:`check_depth`), and each problem is an
:class:`~handlers.errors.InvalidJSON` naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidJSON

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted; a request needs 3 (body → options → a list)."""
MAX_DIGITS = 4300
"""Most digits of a JSON integer: Python's default int-string conversion limit, which TorchServe's own
decoding of a JSON parameter also hits."""

_BRACKETS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
"""A whole string (its brackets do not count) or one bracket."""


def parse_json(text: str | bytes | bytearray, what: str) -> Any:
    """Parse JSON text (bytes in any of the encodings :func:`json.loads` detects).

    Args:
        text: the JSON text.
        what: names the text in messages (``the JSON body``).

    Raises:
        InvalidJSON: the text is not JSON, is nested deeper than :data:`MAX_DEPTH`, or holds an integer of
            more than :data:`MAX_DIGITS` digits.
    """
    try:
        if isinstance(text, bytes | bytearray):
            text = bytes(text).decode(json.detect_encoding(text), "surrogatepass")
        _check_text_depth(text, what)
        return json.loads(text, parse_int=lambda digits: _integer(digits, what))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise InvalidJSON(f"{what} cannot be parsed: {exc}") from exc


def check_depth(value: Any, what: str) -> Any:
    """Return ``value`` (decoded JSON) unless arrays and objects nest in it deeper than :data:`MAX_DEPTH`.

    Raises:
        InvalidJSON: naming the depth limit.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            raise _too_deep(what)
        stack.extend((child, depth + 1) for child in children)
    return value


def _check_text_depth(text: str, what: str) -> None:
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # cannot nest deeper (base64 has no brackets)
        return
    depth = 0
    for match in _BRACKETS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise _too_deep(what)
        elif token in ("]", "}"):
            depth -= 1


def _integer(digits: str, what: str) -> int:
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise InvalidJSON(f"{what} holds an integer of {len(digits.lstrip('-'))} digits; at most {MAX_DIGITS}")
    return int(digits)


def _too_deep(what: str) -> InvalidJSON:
    return InvalidJSON(f"{what} is nested deeper than {MAX_DEPTH} levels")
