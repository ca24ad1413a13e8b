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

from .errors import InvalidOption
from .explain.distribution import TAU, TEMPERATURE
from .manifest import Manifest

HEADER_PREFIX = "x-lafam-"
FORMATS: tuple[str, ...] = ("png", "array", "none")
UPSAMPLE_MODES: tuple[str, ...] = ("nearest", "bilinear")
SIZE_KEYWORDS: tuple[str, ...] = ("input", "original")
FORWARD_METHODS: tuple[str, ...] = ("lafam",)
"""Methods of ``/predictions``: computed from the graph's forward pass."""
BACKWARD_METHODS: tuple[str, ...] = ("lrp", "lrp_class", "gradcam", "distribution", "distribution_fast")
"""Methods that need the archive's eager model; served on ``/explanations`` only."""
CLASS_METHODS: tuple[str, ...] = ("lrp_class", "gradcam", "distribution", "distribution_fast")
"""Methods that explain chosen classes (classification models only)."""
BASES: tuple[str, ...] = ("gradcam", "input_x_gradient", "lrp")
"""Base attributions of the ``distribution`` methods (``distribution_fast``: ``lrp`` or ``input_x_gradient``)."""
FAST_BASES: tuple[str, ...] = ("lrp", "input_x_gradient")
DEFAULT_TOP_CLASSES: dict[str, int] = {"lrp_class": 1, "gradcam": 1, "distribution": 2, "distribution_fast": 2}
"""Classes chosen by probability when the request names none (the paper's top-2 for distributions)."""
_FLOAT_PATTERN = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
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
        classes: classes to explain, in order (class methods); ``None`` picks them by probability.
        top_classes: how many of the most likely classes to explain when ``classes`` is ``None``.
        least_likely: distributions add each image's least likely class to the competitors.
        base: base attribution of the distribution methods.
        temperature: softmax temperature T of the distributions.
        tau: threshold τ of the distributions.
    """

    method: str
    layer: str
    top_k: int
    format: str
    upsample: str
    size: str | tuple[int, int]
    classes: tuple[int, ...] | None = None
    top_classes: int = 1
    least_likely: bool = True
    base: str = "gradcam"
    temperature: float = TEMPERATURE
    tau: float = TAU

    @property
    def num_classes(self) -> int:
        """K, the number of classes a class method explains (or that compete, for distributions)."""
        if self.classes is not None:
            return len(self.classes)
        return self.top_classes + int(self.least_likely and self.method.startswith("distribution"))


OPTION_NAMES: tuple[str, ...] = tuple(RequestOptions.__dataclass_fields__)


def _choice(name: str, value: Any, valid: tuple[str, ...], hint: str = "") -> str:
    if not isinstance(value, str) or value.strip().lower() not in valid:
        raise InvalidOption(
            f"option {name!r} has invalid value {value!r}; valid values: {', '.join(valid)}{hint}",
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
            f"option {name!r} must be an integer from {low} to {high}{why}, got {value!r}",
            option=name,
            valid=f"{low}..{high}",
        )
    return number


def _number(name: str, value: Any, valid: Callable[[float], bool], rule: str) -> float:
    number: Any = float(value) if isinstance(value, str) and _FLOAT_PATTERN.match(value) else value
    if isinstance(number, bool) or not isinstance(number, int | float) or not valid(number):
        raise InvalidOption(f"option {name!r} must be a number {rule}, got {value!r}", option=name, valid=rule)
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
    raise InvalidOption(f"option {name!r} must be true or false, got {value!r}", option=name, valid=["true", "false"])


def _classes(value: Any, num_outputs: int) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value
    numbers = [_integer(item) for item in items] if isinstance(items, list | tuple) else [None]
    if not numbers or any(n is None or not 0 <= n < num_outputs for n in numbers):
        raise InvalidOption(
            f"option 'classes' must list class indices from 0 to {num_outputs - 1} ([3, 7] or '3,7'), got {value!r}",
            option="classes",
            valid=f"0..{num_outputs - 1}",
        )
    if len(set(numbers)) != len(numbers):
        raise InvalidOption(f"option 'classes' repeats a class: {value!r}", option="classes")
    return tuple(numbers)  # type: ignore[arg-type]  # None excluded above


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
    *,
    bases: tuple[str, ...] = BASES,
    max_classes: int = 10,
    hint: str = "",
) -> RequestOptions:
    """Merge defaults, headers and body options, and validate them.

    Args:
        manifest: the served model's manifest (defaults, number of classes, layers).
        headers: request headers, any case; only ``X-LaFAM-*`` ones are read.
        body: the ``options`` object of a JSON request.
        methods: methods valid on this endpoint, the default first.
        bases: distribution bases this model supports.
        max_classes: the largest K for bases whose cost grows with K (input × gradient, LRP, ``lrp_class``);
            Grad-CAM distributions accept every class.
        hint: appended to the error for an invalid method (which endpoint serves the others).

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
    c = manifest.num_outputs
    options = RequestOptions(
        method=_choice("method", raw.get("method", methods[0]), methods, hint),
        layer=_layer(raw.get("layer", manifest.layer_names[0]), manifest),
        top_k=_bounded_int("top_k", raw.get("top_k", min(defaults.top_k, c)), 1, c),
        format=_choice("format", raw.get("format", defaults.format), FORMATS),
        upsample=_choice("upsample", raw.get("upsample", defaults.upsample), UPSAMPLE_MODES),
        size=_size(raw.get("size", defaults.size)),
    )
    # Class options are validated whatever the method (a malformed one is a 400 even where it is unused).
    class_method = options.method in CLASS_METHODS
    fast = options.method == "distribution_fast"
    valid_bases = tuple(b for b in (FAST_BASES if fast else BASES) if b in bases or not class_method)
    base = _choice("base", raw.get("base", valid_bases[0]), valid_bases) if valid_bases else "gradcam"
    least_likely = _boolean("least_likely", raw.get("least_likely", True))
    costly = options.method == "lrp_class" or (options.method.startswith("distribution") and base != "gradcam")
    most = min(c, max_classes) if costly and not fast else c
    why = f" (K is capped at {most} for {options.method} with base {base}: its cost grows with K)" if most < c else ""
    classes = _classes(raw["classes"], c) if "classes" in raw else None
    if classes is not None and len(classes) > most:
        raise InvalidOption(
            f"option 'classes' names {len(classes)} classes; at most {most}{why}", option="classes", valid=f"1..{most}"
        )
    extra = int(least_likely and options.method.startswith("distribution"))
    top = min(DEFAULT_TOP_CLASSES.get(options.method, 1), most - extra)
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
    )
