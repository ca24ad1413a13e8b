"""KServe's request envelopes: their instances → the JSON body the service reads, replies → what they wrap.

With ``service_envelope=kserve`` (KServe v1) or ``service_envelope=kservev2`` (KServe v2, the Open Inference
Protocol) TorchServe's envelope unpacks the request before the handler sees it and wraps what the handler
returns. Plain Python (no TorchServe import): the handler tells which envelope called it and maps each item
it got to the service's JSON body ``{"image": "<base64>", "options": {...}}``.

v1 (``POST /v1/models/{name}:predict``, ``{"instances": [...]}``): each instance is one image, given as
``"<base64>"``, ``{"data": "<base64>"}``, ``{"data": {"b64": "<base64>"}}`` or ``{"image": ...}`` (same
forms), with an optional ``"options": {...}``. The envelope answers ``{"predictions": [...]}`` (or
``{"explanations": [...]}`` on ``:explain``), one response object per instance.

v2 (``POST /v2/models/{name}/infer``, ``{"inputs": [...]}``): each input tensor is one image, a ``BYTES``
tensor of shape ``[1]`` holding the base64 image; its ``parameters`` may carry ``"options"`` (an object or
its JSON text). The envelope answers ``{"id", "model_name", "model_version", "outputs": [...]}``, one
output per input under the input's name, a ``BYTES`` tensor of shape ``[1]`` holding the response as JSON
text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import InvalidJSON
from .json_input import parse_json

V1 = "kserve"
V2 = "kservev2"
IMAGE_KEYS = ("data", "image")
INSTANCE_KEYS = (*IMAGE_KEYS, "options")


def v1_body(instance: Any) -> dict[str, Any]:
    """Map one KServe v1 instance to the service's JSON body.

    Raises:
        InvalidJSON: the instance is not one of the accepted shapes.
    """
    if isinstance(instance, str):
        return {"image": instance}
    if not isinstance(instance, Mapping):
        raise InvalidJSON(
            f'each instance must be an object {{"data": "<base64>"}} or a base64 string, got {type(instance).__name__}'
        )
    unknown = sorted(set(instance) - set(INSTANCE_KEYS))
    if unknown:
        raise InvalidJSON(
            f"unknown instance field(s) {', '.join(map(str, unknown))}; valid fields: {', '.join(INSTANCE_KEYS)}"
        )
    keys = [key for key in IMAGE_KEYS if key in instance]
    if len(keys) != 1:
        raise InvalidJSON('each instance needs exactly one of "data" or "image" holding the base64 image')
    body = {"image": _b64(instance[keys[0]], keys[0])}
    if "options" in instance:
        body["options"] = instance["options"]
    return body


def v2_body(tensor: Any) -> dict[str, Any]:
    """Map one KServe v2 input tensor, as the envelope hands it over (``data`` already its first element).

    Raises:
        InvalidJSON: not a one-element ``BYTES`` tensor, or ill-formed ``parameters``.
    """
    if not isinstance(tensor, Mapping):
        raise InvalidJSON(f"each input must be a tensor object, got {type(tensor).__name__}")
    name = tensor.get("name")
    if tensor.get("datatype") != "BYTES":
        raise InvalidJSON(
            f"input {name!r} has datatype {tensor.get('datatype')!r}: send each image as a BYTES tensor of shape [1] "
            "holding the base64 image"
        )
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape) or math.prod(shape) != 1:
        raise InvalidJSON(f"input {name!r} has shape {shape!r}: send one image per input, shape [1]")
    body = {"image": _b64(tensor.get("data"), f"input {name!r}")}
    parameters = tensor.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise InvalidJSON(f"the parameters of input {name!r} must be an object")
    options = (parameters or {}).get("options")
    if isinstance(options, str):
        options = parse_json(options, f"the options of input {name!r}")
    if options is not None:
        body["options"] = options
    return body


def _b64(value: Any, where: str) -> str:
    if isinstance(value, Mapping) and set(value) == {"b64"}:
        value = value["b64"]
    if not isinstance(value, str) or not value:
        raise InvalidJSON(f'{where} must hold the base64 image, as "<base64>" or {{"b64": "<base64>"}}')
    return value
