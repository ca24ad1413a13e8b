"""The HTTP contract every engine speaks, without a web framework: request → service calls → response.

Routes (``{m}`` is a model name):

- ``POST /predictions/{m}`` and ``POST /explanations/{m}``: TorchServe's, with the same bodies (raw image
  bytes, JSON ``{"image", "options"}``, multipart or url-encoded forms), ``X-LaFAM-*`` headers and answers.
- ``POST /v1/models/{m}:predict`` and ``:explain``: KServe v1, ``{"instances": [...]}`` →
  ``{"predictions": [...]}`` / ``{"explanations": [...]}``, one response object per instance.
- ``POST /v2/models/{m}/infer`` (also ``/versions/{v}/infer``): the Open Inference Protocol, one ``BYTES``
  input tensor per image → one ``BYTES`` output tensor holding the response as JSON text.
- Health, open to probes: ``GET /ping``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{m}/ready``,
  ``/v1/models/{m}``; ``GET /v1/models`` and ``/v2/models/{m}`` (metadata) need the token.

The instance and tensor shapes are those of TorchServe's KServe envelopes (:mod:`handlers.kserve`), so a
client talks to TorchServe under an envelope, to the KServe engine and to the Ray engine alike. A request's
status is its first failed image's (200 when none failed); each image's answer, response or error body,
sits at its place. Every failure is the service's error JSON ``{"error": {"code", "message"}}``.

:func:`route` turns a request into either an immediate :class:`HttpReply` or a :class:`Call`: the service
requests to run on one model and how to assemble their replies, so that the engine decides how to batch
(an asyncio batcher for KServe, ``@serve.batch`` for Ray).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import re
import urllib.parse
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from handlers import kserve
from handlers.errors import InvalidJSON, ServeError, shown, to_response
from handlers.json_input import parse_json
from handlers.service import LafamService, Reply, Request

from .auth import TokenCheck

MAX_REQUEST_BYTES = 10 * 1024 * 1024
"""As TorchServe's ``max_request_size`` in the shipped config.properties."""
JSON = "application/json"
HEALTHY = {"status": "Healthy"}


class NotFound(ServeError):
    """No such route or model."""

    status = 404
    code = "not_found"


class MethodNotAllowed(ServeError):
    """The route exists for another HTTP method."""

    status = 405
    code = "method_not_allowed"


class Unauthorized(ServeError):
    """No token, or a wrong one."""

    status = 401
    code = "unauthorized"


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP request as the engine's web server received it.

    Attributes:
        method: ``GET``, ``POST``...
        path: the URL path, without the query string (which never carries options, as on TorchServe).
        headers: names lower-cased.
        body: the raw body.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class HttpReply:
    """One HTTP response: status, JSON body bytes, extra headers."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = JSON


def json_reply(status: int, body: Any) -> HttpReply:
    """A compact JSON response."""
    return HttpReply(status, json.dumps(body, separators=(",", ":")).encode())


def error_reply(exc: ServeError | BaseException) -> HttpReply:
    """The error JSON and status of ``exc`` (unexpected exceptions are a 500 naming the type only)."""
    return json_reply(*to_response(exc))


@dataclass(frozen=True)
class Served:
    """What the protocol needs of a loaded model."""

    name: str
    version: str
    service: LafamService


@dataclass
class Call:
    """Service requests to run on one model, and how their replies become the HTTP response.

    Attributes:
        model: the model's name.
        requests: the requests to run, in order, in one ``service.predict`` call or spread over batches.
        assemble: the replies of ``requests`` (same order) → the response.
    """

    model: str
    requests: list[Request]
    assemble: Callable[[list[Reply]], HttpReply]

    def answer(self, replies: Sequence[Reply]) -> HttpReply:
        """Assemble the response, or a 500 if assembling fails (it never should)."""
        try:
            return self.assemble(list(replies))
        except Exception as exc:  # noqa: BLE001 - the request fails alone, the engine keeps serving
            return error_reply(exc)


PREDICTIONS = re.compile(r"^/(predictions|explanations)/([^/]+)(?:/[^/]+)?/?$")
V1_VERB = re.compile(r"^/v1/models/([^/:]+):(predict|explain)$")
V1_MODEL = re.compile(r"^/v1/models/([^/:]+)$")
V2_INFER = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
V2_READY = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/ready$")
V2_MODEL = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?$")
OPEN_PATHS = ("/ping", "/v2/health/live", "/v2/health/ready", "/v2", "/")


def route(request: HttpRequest, models: Mapping[str, Served], auth: TokenCheck) -> HttpReply | Call:
    """Answer ``request`` at once (health, errors, metadata) or return the :class:`Call` to run."""
    try:
        return _route(request, models, auth)
    except ServeError as exc:
        return error_reply(exc)


def _route(request: HttpRequest, models: Mapping[str, Served], auth: TokenCheck) -> HttpReply | Call:
    path = urllib.parse.unquote(request.path) or "/"
    method = request.method.upper()
    if path in OPEN_PATHS:
        _expect(method, "GET", path)
        if path == "/ping":
            return json_reply(200, HEALTHY)
        if path == "/v2":
            return json_reply(200, {"name": "lafam-serve", "extensions": []})
        return json_reply(200, {"live": True} if path.endswith("live") or path == "/" else {"ready": True})
    if (match := V2_READY.match(path)) or (match := V1_MODEL.match(path)):
        _expect(method, "GET", path)
        name = _model(models, match.group(1)).name
        return json_reply(200, {"name": name, "ready": True})
    if not auth.allows(request.headers):
        raise Unauthorized("this route needs the header Authorization: Bearer <token>")
    if path == "/v1/models":
        _expect(method, "GET", path)
        return json_reply(200, {"models": sorted(models)})
    if match := V2_MODEL.match(path):
        _expect(method, "GET", path)
        return json_reply(200, _metadata(_model(models, match.group(1))))
    if match := PREDICTIONS.match(path):
        _expect(method, "POST", path)
        served = _model(models, match.group(2))
        return predictions_call(served, request, explain=match.group(1) == "explanations")
    if match := V1_VERB.match(path):
        _expect(method, "POST", path)
        served = _model(models, match.group(1))
        return v1_call(served, _json_body(request), request.headers, explain=match.group(2) == "explain")
    if match := V2_INFER.match(path):
        _expect(method, "POST", path)
        served = _model(models, match.group(1))
        return v2_call(served, _json_body(request), request.headers)
    raise NotFound(f"no route {method} {shown(path)}")


def _expect(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise MethodNotAllowed(f"{shown(path)} takes {allowed}, not {method}")


def _model(models: Mapping[str, Served], name: str) -> Served:
    if name not in models:
        raise NotFound(f"no model {shown(name)}; served: {', '.join(sorted(models))}")
    return models[name]


def _metadata(served: Served) -> dict[str, Any]:
    return {
        "name": served.name,
        "versions": [served.version],
        "platform": f"lafam-serve ({served.service.backend.name})",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
    }


def _json_body(request: HttpRequest) -> Any:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and content_type not in (JSON, "application/cloudevents+json", "text/plain"):
        raise InvalidJSON(f"send the KServe request as application/json, not {shown(content_type)}")
    if not request.body:
        raise InvalidJSON("the request has no JSON body")
    return parse_json(request.body, "the JSON body")


# TorchServe's routes: the body decoded as TorchServe's frontend and Python worker decode it


def predictions_call(served: Served, request: HttpRequest, *, explain: bool) -> Call:
    """One image, as TorchServe's ``/predictions`` and ``/explanations`` take it."""
    parameters, content_types = decode_body(request.headers, request.body)
    service_request = Request(
        parameters=parameters, headers=dict(request.headers), content_types=content_types, explain=explain
    )
    return Call(served.name, [service_request], lambda replies: json_reply(replies[0].status, replies[0].body))


def decode_body(headers: Mapping[str, str], body: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """The request's parameters and their content types, as TorchServe hands them to ``handle``.

    A multipart form gives one parameter per field, an url-encoded form one per key (text), anything else
    one ``body`` parameter; ``text/*`` values are text, the rest bytes (the service parses JSON itself,
    within its depth and digit limits).
    """
    content_type = headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return _multipart(content_type, body)
    if kind == "application/x-www-form-urlencoded":
        fields = urllib.parse.parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        return dict(fields), {key: "text/plain" for key, _ in fields}
    return {"body": _typed(body, kind)}, {"body": content_type}


def _typed(value: bytes, content_type: str) -> bytes | bytearray | str:
    if content_type.startswith("text/"):
        return value.decode("utf-8", errors="replace")
    return bytearray(value)


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", errors="replace") + b"\r\n\r\n" + body
    )
    parameters: dict[str, Any] = {}
    content_types: dict[str, str] = {}
    if not message.is_multipart():
        return parameters, content_types
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        kind = part.get_content_type() if part.get("content-type") else ""
        if not kind:
            kind = "application/octet-stream" if part.get_filename() else "text/plain"
        parameters[str(name)] = _typed(payload, kind)
        content_types[str(name)] = kind
    return parameters, content_types


# KServe v1 and v2: the instance and tensor shapes of TorchServe's envelopes


def v1_call(served: Served, body: Any, headers: Mapping[str, str], *, explain: bool) -> Call:
    """``{"instances": [...]}`` → one request per instance; ``{"predictions" | "explanations": [...]}``."""
    instances = body.get("instances") if isinstance(body, Mapping) else None
    if not isinstance(body, Mapping) or not isinstance(instances, list) or not instances:
        problem = InvalidJSON('the request has no images: send {"instances": [...]}, one image per instance')
        return _instances_call(served, [problem], headers, explain, lambda done: _v1_reply(done, explain))
    return _instances_call(served, [_body_or_error(kserve.v1_body, i) for i in instances], headers, explain,
                           lambda done: _v1_reply(done, explain))  # fmt: skip


def v2_call(served: Served, body: Any, headers: Mapping[str, str], request_id: str | None = None) -> Call:
    """``{"inputs": [...]}`` → one request per ``BYTES`` tensor; one output tensor per input."""
    inputs = body.get("inputs") if isinstance(body, Mapping) else None
    if not isinstance(body, Mapping) or not isinstance(inputs, list) or not inputs:
        problem = InvalidJSON('the request has no images: send {"inputs": [...]}, one BYTES tensor per image')
        return _instances_call(served, [problem], headers, False, _v2_error)
    names = [str(tensor.get("name", f"input-{i}")) if isinstance(tensor, Mapping) else f"input-{i}"
             for i, tensor in enumerate(inputs)]  # fmt: skip
    identifier = request_id or (str(body["id"]) if body.get("id") else str(uuid.uuid4()))
    bodies = [_body_or_error(kserve.v2_body, _unwrapped(tensor)) for tensor in inputs]
    return _instances_call(served, bodies, headers, False, lambda done: _v2_reply(served, identifier, names, done))


def _unwrapped(tensor: Any) -> Any:
    """A BYTES tensor's ``data`` as TorchServe's v2 envelope hands it over: its one element."""
    if isinstance(tensor, Mapping) and isinstance(tensor.get("data"), list) and len(tensor["data"]) == 1:
        return {**tensor, "data": tensor["data"][0]}
    return tensor


def _body_or_error(to_body: Callable[[Any], dict[str, Any]], item: Any) -> dict[str, Any] | ServeError:
    try:
        return to_body(item)
    except ServeError as exc:
        return exc


def _instances_call(
    served: Served,
    bodies: list[dict[str, Any] | ServeError],
    headers: Mapping[str, str],
    explain: bool,
    reply: Callable[[list[Reply]], HttpReply],
) -> Call:
    requests = [
        Request(parameters={"body": body}, headers=dict(headers), content_types={"body": JSON}, explain=explain)
        for body in bodies
        if not isinstance(body, ServeError)
    ]

    def assemble(answered: list[Reply]) -> HttpReply:
        replies = iter(answered)
        done = [served.service.failure(b) if isinstance(b, ServeError) else next(replies) for b in bodies]
        return reply(done)

    return Call(served.name, requests, assemble)


def status_of(done: Sequence[Reply]) -> int:
    """The first failure's status, else 200."""
    return next((reply.status for reply in done if reply.status >= 400), 200)


def _v1_reply(done: list[Reply], explain: bool) -> HttpReply:
    return json_reply(status_of(done), {"explanations" if explain else "predictions": [r.body for r in done]})


def _v2_error(done: list[Reply]) -> HttpReply:
    return json_reply(done[0].status, done[0].body)


def v2_outputs(names: Sequence[str], done: Sequence[Reply]) -> list[dict[str, Any]]:
    """One ``BYTES`` output per input, under the input's name, holding the response as JSON text."""
    return [
        {"name": name, "datatype": "BYTES", "shape": [1], "data": [json.dumps(reply.body, separators=(",", ":"))]}
        for name, reply in zip(names, done, strict=True)
    ]


def _v2_reply(served: Served, identifier: str, names: list[str], done: list[Reply]) -> HttpReply:
    body = {"id": identifier, "model_name": served.name, "model_version": served.version,
            "outputs": v2_outputs(names, done)}  # fmt: skip
    return json_reply(status_of(done), body)


def run_calls(models: Mapping[str, Served], calls: Sequence[Call]) -> list[HttpReply]:
    """Run calls together: one ``service.predict`` per model over all their requests, then assemble each.

    What an engine's batcher calls with the calls it gathered; a failure fails its model's calls alone.
    """
    replies: dict[int, list[Reply]] = {}
    by_model: dict[str, list[int]] = {}
    for index, call in enumerate(calls):
        by_model.setdefault(call.model, []).append(index)
    for name, indices in by_model.items():
        requests = [request for i in indices for request in calls[i].requests]
        try:
            answered = models[name].service.predict(requests) if requests else []
        except Exception as exc:  # noqa: BLE001 - predict answers bad requests itself: a bug, not a client's
            status, body = to_response(exc)
            answered = [Reply(status, body)] * len(requests)
        cursor = 0
        for i in indices:
            count = len(calls[i].requests)
            replies[i] = answered[cursor : cursor + count]
            cursor += count
    return [call.answer(replies[i]) for i, call in enumerate(calls)]
