"""Request options: headers and/or a JSON body → one frozen, validated :class:`RequestOptions`.

Query strings never reach a TorchServe handler, so options travel as ``X-LaFAM-<Option>`` headers
(``X-LaFAM-Top-K: 3``) or in the JSON body (``{"image": ..., "options": {"top_k": 3}}``). The body wins
over a header of the same option. Every option is validated once, here; an unknown or malformed one is a
400 listing the valid names or values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import InvalidOption, shown
from .explain.distribution import NORMALIZE, TAU, TEMPERATURE
from .manifest import Manifest
from .methods import registry
from .methods.contract import Method
from .methods.engines import Capabilities
from .sizing import parse_resize

HEADER_PREFIX = "x-lafam-"
FORMATS: tuple[str, ...] = ("png", "array", "none")
UPSAMPLE_MODES: tuple[str, ...] = ("nearest", "bilinear")
SIZE_KEYWORDS: tuple[str, ...] = ("input", "original")
_FLOAT_PATTERN = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
MAX_MAP_SIDE = 4096
# At most 32 digits: more than any bound, and int() refuses a string of over 4300 digits with a ValueError.
_SIZE_PATTERN = re.compile(r"^\s*(\d{1,32})\s*[xX,]\s*(\d{1,32})\s*$")
_INT_PATTERN = re.compile(r"^\s*-?[0-9]{1,32}\s*$")


@dataclass(frozen=True)
class RequestOptions:
    """The validated options of one request.

    Attributes:
        method: explanation method (``lafam`` on ``/predictions``).
        layer: exported layer to explain.
        top_k: number of predictions returned (classification models).
        format: ``png`` (8-bit grayscale, base64), ``array`` (floats at the layer's native size) or ``none``.
        upsample: ``nearest`` (as in the LaFAM paper) or ``bilinear``.
        size: ``input`` (the size the model saw), ``original`` (the posted image's size) or ``(H, W)``.
        resize: the size the image is run at: ``model`` (the manifest's input size), ``none`` (its own size)
            or an integer N (scaled down so that its longer side is at most N, never up); ``none`` and N need
            a model exported with --dynamic-size.
        classes: classes to explain, in order (class methods); ``None`` picks them by probability.
        top_classes: how many of the most likely classes to explain when ``classes`` is ``None``.
        least_likely: distributions add each image's least likely class to the competitors.
        base: base attribution of the distribution methods.
        temperature: softmax temperature T of the distributions.
        tau: threshold τ of the distributions.
        normalize: how the distributions scale the competing maps (``max`` or ``none``); the default
            follows the base whose maps compete (:attr:`~.methods.bases.BaseAttribution.normalize`).
    """

    method: str
    layer: str
    top_k: int
    format: str
    upsample: str
    size: str | tuple[int, int]
    resize: str | int = "model"
    classes: tuple[int, ...] | None = None
    top_classes: int = 1
    least_likely: bool = True
    base: str = "gradcam"
    temperature: float = TEMPERATURE
    tau: float = TAU
    normalize: str = "none"

    @property
    def num_classes(self) -> int:
        """K, the number of classes a class method explains (or that compete, for distributions)."""
        if self.classes is not None:
            return len(self.classes)
        method = registry.find(self.method)
        return self.top_classes + int(self.least_likely and method is not None and method.competes)


OPTION_NAMES: tuple[str, ...] = tuple(RequestOptions.__dataclass_fields__)
DEFAULT_BASE: str = RequestOptions.base
"""The ``base`` of a method that reads none."""


def _choice(name: str, value: Any, valid: tuple[str, ...], hint: str = "") -> str:
    if not isinstance(value, str) or value.strip().lower() not in valid:
        raise InvalidOption(
            f"option {name!r} has invalid value {shown(value)}; valid values: {', '.join(valid)}{hint}",
            option=name,
            valid=list(valid),
        )
    return value.strip().lower()


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return int(value) if _INT_PATTERN.match(value) else None
    return value if isinstance(value, int) else None


def _bounded_int(name: str, value: Any, low: int, high: int, why: str = "") -> int:
    number = _integer(value)
    if number is None or not low <= number <= high:
        raise InvalidOption(
            f"option {name!r} must be an integer from {low} to {high}{why}, got {shown(value)}",
            option=name,
            valid=f"{low}..{high}",
        )
    return number


def _number(name: str, value: Any, valid: Callable[[float], bool], rule: str) -> float:
    number: Any = float(value) if isinstance(value, str) and _FLOAT_PATTERN.match(value) else value
    if isinstance(number, bool) or not isinstance(number, int | float) or not valid(number):
        raise InvalidOption(f"option {name!r} must be a number {rule}, got {shown(value)}", option=name, valid=rule)
    return float(number)


MAX_TEMPERATURE = 1e6
"""Largest T: beyond it T·|A| overflows float32 for ordinary attribution sizes and the maps turn NaN."""


def _temperature(value: float) -> bool:
    return 0 < value <= MAX_TEMPERATURE


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        return _BOOLEANS[value.strip().lower()]
    raise InvalidOption(
        f"option {name!r} must be true or false, got {shown(value)}", option=name, valid=["true", "false"]
    )


def _classes(value: Any, num_outputs: int) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value
    numbers = [_integer(item) for item in items] if isinstance(items, list | tuple) else [None]
    if not numbers or any(n is None or not 0 <= n < num_outputs for n in numbers):
        raise InvalidOption(
            f"option 'classes' must list class indices from 0 to {num_outputs - 1} ([3, 7] or '3,7'), "
            f"got {shown(value)}",
            option="classes",
            valid=f"0..{num_outputs - 1}",
        )
    if len(set(numbers)) != len(numbers):
        raise InvalidOption(f"option 'classes' repeats a class: {shown(value)}", option="classes")
    return tuple(numbers)  # type: ignore[arg-type]  # None excluded above


def _size(value: Any) -> str | tuple[int, int]:
    sides = value
    if isinstance(value, str):
        if value.strip().lower() in SIZE_KEYWORDS:
            return value.strip().lower()
        match = _SIZE_PATTERN.match(value)
        sides = (int(match.group(1)), int(match.group(2))) if match else None
    if (
        isinstance(sides, (list, tuple))
        and len(sides) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in sides)
        and all(1 <= v <= MAX_MAP_SIDE for v in sides)
    ):
        return (sides[0], sides[1])
    raise InvalidOption(
        f"option 'size' must be 'input', 'original', 'HxW' or [H, W] with sides 1..{MAX_MAP_SIDE}, got {shown(value)}",
        option="size",
        valid=["input", "original", "HxW", "[H, W]"],
    )


def _layer(value: Any, manifest: Manifest) -> str:
    if not isinstance(value, str) or value not in manifest.layer_names:
        raise InvalidOption(
            f"option 'layer' has invalid value {shown(value)}; exported layers: {', '.join(manifest.layer_names)}",
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
    methods: tuple[str, ...] | None = None,
    *,
    bases: tuple[str, ...] | None = None,
    max_classes: int = 10,
    hint: str = "",
    capabilities: Capabilities | None = None,
) -> RequestOptions:
    """Merge defaults, headers and body options, and validate them.

    What a method accepts (its bases, whether classes compete, its default number of classes, whether its
    cost grows with K) comes from its registry entry (:mod:`handlers.methods`).

    Args:
        manifest: the served model's manifest (defaults, number of classes, layers).
        headers: request headers, any case; only ``X-LaFAM-*`` ones are read.
        body: the ``options`` object of a JSON request.
        methods: methods valid on this endpoint (registered names); the default is the first one that can
            run. Default: the forward methods (``/predictions``).
        bases: the bases offered (default: every registered base).
        max_classes: the largest K for methods whose cost grows with K (``lrp_class``, distributions over
            input × gradient or LRP); the others accept every class.
        hint: appended to the error for an invalid method (which endpoint serves the others).
        capabilities: what the model offers; a listed method or base whose needs are missing is a 400 that
            gives the reason. Default: every need met.

    Raises:
        InvalidOption: an unknown option, a value of the wrong type or out of range, or a method or base
            this model cannot run.
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
    methods = registry.served(explain=False) if methods is None else methods
    capabilities = capabilities or Capabilities()
    runnable = tuple(m for m in methods if capabilities.why_not(registry.get(m).needs) is None)
    name = _choice("method", raw.get("method", (runnable or methods)[0]), methods, hint)
    method = registry.get(name)
    why_not = capabilities.why_not(method.needs)
    if why_not is not None:
        raise InvalidOption(
            f"method {name!r} is not available for model {manifest.name!r}: {why_not}",
            option="method",
            valid=list(runnable),
        )
    defaults = manifest.defaults
    c = manifest.num_outputs
    options = RequestOptions(
        method=name,
        layer=_layer(raw.get("layer", manifest.layer_names[0]), manifest),
        top_k=_bounded_int("top_k", raw.get("top_k", min(defaults.top_k, c)), 1, c),
        format=_choice("format", raw.get("format", defaults.format), FORMATS),
        upsample=_choice("upsample", raw.get("upsample", defaults.upsample), UPSAMPLE_MODES),
        size=_size(raw.get("size", defaults.size)),
        resize=parse_resize(raw.get("resize", defaults.resize), manifest),
    )
    # Class options are validated whatever the method (a malformed one is a 400 even where it is unused).
    base = _base(raw, method, manifest.name, registry.bases() if bases is None else bases, capabilities)
    least_likely = _boolean("least_likely", raw.get("least_likely", True))
    most = min(c, max_classes) if method.cost_grows_with_k(base) else c
    why = f" (K is capped at {most} for {name} with base {base}: its cost grows with K)" if most < c else ""
    classes = _classes(raw["classes"], c) if "classes" in raw else None
    if classes is not None and len(classes) > most:
        raise InvalidOption(
            f"option 'classes' names {len(classes)} classes; at most {most}{why}", option="classes", valid=f"1..{most}"
        )
    extra = int(least_likely and method.competes)
    top = min(method.default_classes, most - extra)
    return replace(
        options,
        classes=classes,
        top_classes=_bounded_int("top_classes", raw.get("top_classes", top), 1, most - extra, why),
        least_likely=least_likely,
        base=base,
        temperature=_number(
            "temperature", raw.get("temperature", TEMPERATURE), _temperature, "in (0, 1e6] (paper: 10)"
        ),
        tau=_number("tau", raw.get("tau", TAU), lambda v: 0 <= v < 1, "in [0, 1) (paper: 0.01)"),
        normalize=_choice("normalize", raw["normalize"], NORMALIZE) if "normalize" in raw else method.normalize(),
    )


def _base(
    raw: Mapping[str, Any],
    method: Method,
    model: str,
    offered: tuple[str, ...],
    capabilities: Capabilities,
) -> str:
    """The ``base`` option: one of the method's offered bases (the first that can run by default).

    A method that reads no base still gets a known base name validated (and ignored).
    """
    if not method.bases:
        return _choice("base", raw["base"], registry.bases()) if "base" in raw else DEFAULT_BASE
    valid = tuple(b for b in method.bases if b in offered)
    if not valid:
        return DEFAULT_BASE
    runnable = tuple(b for b in valid if capabilities.why_not(method.requires(b)) is None)
    base = _choice("base", raw.get("base", (runnable or valid)[0]), valid)
    why_not = capabilities.why_not(method.requires(base))
    if why_not is not None:
        raise InvalidOption(
            f"base {base!r} of method {method.name!r} is not available for model {model!r}: {why_not}",
            option="base",
            valid=list(runnable),
        )
    return base
