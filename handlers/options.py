"""Request options: headers and/or a JSON body → one frozen, validated :class:`RequestOptions`.

Query strings never reach a TorchServe handler, so options travel as ``X-LaFAM-<Option>`` headers
(``X-LaFAM-Top-K: 3``) or in the JSON body (``{"image": ..., "options": {"top_k": 3}}``). The body wins
over a header of the same option. Every option is validated once, here; an unknown or malformed one is a
400 listing the valid names or values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidOption
from .manifest import Manifest

HEADER_PREFIX = "x-lafam-"
FORMATS: tuple[str, ...] = ("png", "array", "none")
UPSAMPLE_MODES: tuple[str, ...] = ("nearest", "bilinear")
SIZE_KEYWORDS: tuple[str, ...] = ("input", "original")
FORWARD_METHODS: tuple[str, ...] = ("lafam",)
MAX_MAP_SIDE = 4096
_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[xX,]\s*(\d+)\s*$")
_INT_PATTERN = re.compile(r"^\s*-?[0-9]+\s*$")


@dataclass(frozen=True)
class RequestOptions:
    """The validated options of one request.

    Attributes:
        method: explanation method (``lafam`` on ``/predictions``).
        layer: exported layer to explain.
        top_k: number of predictions returned (classification models).
        format: ``png`` (8-bit grayscale, base64), ``array`` (floats at the layer's native size) or ``none``.
        upsample: ``nearest`` (as in the LaFAM paper) or ``bilinear``.
        size: ``input`` (model input size), ``original`` (the posted image's size) or ``(H, W)``.
    """

    method: str
    layer: str
    top_k: int
    format: str
    upsample: str
    size: str | tuple[int, int]


OPTION_NAMES: tuple[str, ...] = tuple(RequestOptions.__dataclass_fields__)


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.strip().lower() not in valid:
        raise InvalidOption(
            f"option {name!r} has invalid value {value!r}; valid values: {', '.join(valid)}",
            option=name,
            valid=list(valid),
        )
    return value.strip().lower()


def _top_k(value: Any, num_outputs: int) -> int:
    number = value
    if isinstance(value, bool):
        number = None
    elif isinstance(value, str):
        number = int(value) if _INT_PATTERN.match(value) else None
    if not isinstance(number, int) or not 1 <= number <= num_outputs:
        raise InvalidOption(
            f"option 'top_k' must be an integer from 1 to {num_outputs}, got {value!r}",
            option="top_k",
            valid=f"1..{num_outputs}",
        )
    return number


def _size(value: Any) -> str | tuple[int, int]:
    if isinstance(value, str):
        if value.strip().lower() in SIZE_KEYWORDS:
            return value.strip().lower()
        match = _SIZE_PATTERN.match(value)
        value = (int(match.group(1)), int(match.group(2))) if match else None
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and all(1 <= v <= MAX_MAP_SIDE for v in value)
    ):
        return (value[0], value[1])
    raise InvalidOption(
        f"option 'size' must be 'input', 'original', 'HxW' or [H, W] with sides 1..{MAX_MAP_SIDE}, got {value!r}",
        option="size",
        valid=["input", "original", "HxW", "[H, W]"],
    )


def _layer(value: Any, manifest: Manifest) -> str:
    if not isinstance(value, str) or value not in manifest.layer_names:
        raise InvalidOption(
            f"option 'layer' has invalid value {value!r}; exported layers: {', '.join(manifest.layer_names)}",
            option="layer",
            valid=list(manifest.layer_names),
        )
    return value


def headers_to_options(headers: Mapping[str, str]) -> dict[str, str]:
    """Pick the ``X-LaFAM-*`` headers (any case) and name them as options: ``X-LaFAM-Top-K`` → ``top_k``."""
    picked = {}
    for key, value in headers.items():
        lowered = key.lower()
        if lowered.startswith(HEADER_PREFIX):
            picked[lowered[len(HEADER_PREFIX) :].replace("-", "_")] = value
    return picked


def parse_options(
    manifest: Manifest,
    headers: Mapping[str, str] | None = None,
    body: Mapping[str, Any] | None = None,
    methods: tuple[str, ...] = FORWARD_METHODS,
) -> RequestOptions:
    """Merge defaults, headers and body options, and validate them.

    Args:
        manifest: the served model's manifest (defaults, number of classes, layers).
        headers: request headers, any case; only ``X-LaFAM-*`` ones are read.
        body: the ``options`` object of a JSON request.
        methods: methods valid on this endpoint.

    Raises:
        InvalidOption: an unknown option, or a value of the wrong type or out of range.
    """
    raw: dict[str, Any] = {}
    raw.update(headers_to_options(headers or {}))
    if body is not None:
        if not isinstance(body, Mapping):
            raise InvalidOption(f"'options' must be a JSON object, got {type(body).__name__}", option="options")
        raw.update(body)
    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        raise InvalidOption(
            f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(OPTION_NAMES)} "
            f"(as JSON 'options' keys or X-LaFAM-<Name> headers)",
            option=unknown[0],
            valid=list(OPTION_NAMES),
        )
    defaults = manifest.defaults
    return RequestOptions(
        method=_choice("method", raw.get("method", methods[0]), methods),
        layer=_layer(raw.get("layer", manifest.layer_names[0]), manifest),
        top_k=_top_k(raw.get("top_k", min(defaults.top_k, manifest.num_outputs)), manifest.num_outputs),
        format=_choice("format", raw.get("format", defaults.format), FORMATS),
        upsample=_choice("upsample", raw.get("upsample", defaults.upsample), UPSAMPLE_MODES),
        size=_size(raw.get("size", defaults.size)),
    )
