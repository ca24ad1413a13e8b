"""The TorchServe handler: lifecycle only, everything else is delegated to :mod:`handlers.service`.

This is the only module that knows TorchServe's calling convention (``initialize(context)`` and
``handle(data, context)`` with per-request headers and statuses on the context). Archives ship it as
their ``--handler``; TorchServe instantiates the single class defined here.

Requests also come through TorchServe's gRPC API (``Predictions`` and ``StreamPredictions``;
``StreamPredictions2`` reaches only a sequence-batching model) with the same input fields (``data``,
``options``, and ``explain`` in place of the ``/explanations`` route). What differs is TorchServe's, and is
handled here: every gRPC reply carries ``ts_stream_next: false`` (without it the frontend fails on a
``StreamPredictions`` reply and restarts the worker), and since the frontend ignores a per-request status
on gRPC, a failed request alone in its batch is raised as the batch's error, which the frontend turns into
a gRPC status code.

Under KServe's envelopes (``service_envelope=kserve`` or ``kservev2`` in ``config.properties``) TorchServe
calls ``handle`` from the envelope, with the instances (v1) or input tensors (v2) of the request in place of
its parameters, and wraps the returned list in the envelope's response. :mod:`handlers.kserve` maps each one
to the service's JSON body; the request's status is the first failed instance's (200 when none failed), and
each instance's answer, response or error body, sits at its place in the envelope's list.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
from ts.torch_handler.request_envelope.kserve import KServeEnvelope
from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope
from ts.utils.util import PredictionException

from . import kserve, metrics
from .errors import InvalidJSON, ServeError
from .service import LafamService, Reply, Request

logger = logging.getLogger(__name__)

STREAM_NEXT = "ts_stream_next"
"""Reply header the frontend reads on a gRPC StreamPredictions call: ``false`` ends the stream."""
SEQUENCE_KEYS = {
    "header_key_sequence_id": "ts_request_sequence_id",
    "header_key_sequence_start": "ts_request_sequence_start",
    "header_key_sequence_end": "ts_request_sequence_end",
}
"""Context attributes naming the request headers TorchServe adds to sequence requests, with their defaults."""


def select_device(gpu_id: int | None) -> torch.device:
    """Return ``cuda:<gpu_id>`` when TorchServe assigned a GPU and CUDA is usable, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


class LafamHandler:
    """TorchServe entry point serving predictions with a LaFAM explanation."""

    def __init__(self) -> None:
        self.service: LafamService | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Configure the metrics, load the archive's manifest and graph onto the device, start the exporter."""
        metrics.configure()  # from the worker's environment; a no-op when already configured
        properties = context.system_properties
        device = select_device(properties.get("gpu_id"))
        config = (getattr(context, "model_yaml_config", None) or {}).get("lafam") or {}
        self.service = LafamService.from_folder(properties["model_dir"], device, config)
        metrics.start_exporter()
        self.initialized = True
        logger.info(
            "serving %s (%s) on %s; /explanations methods: %s",
            self.service.manifest.name,
            self.service.backend.name,
            device,
            ", ".join(self.service.explain_methods),
        )

    def handle(self, data: list[Any] | None, context: Any) -> list[Any] | None:
        """Answer a batch; each request gets its own status and a compact JSON body.

        Raises:
            PredictionException: a unary or server-streaming gRPC request, alone in its batch, failed; the
                message is its JSON error body and the code its HTTP status.
        """
        envelope = _envelope(sys._getframe(1).f_locals.get("self"))
        if data is None and envelope is None:
            return None
        if self.service is None:
            self.initialize(context)
        if envelope is not None:
            return self._handle_envelope(envelope, data, context)
        calls = [_call(index, item, context) for index, item in enumerate(data)]
        replies = self.service.predict([call.request for call in calls])
        bodies = [json.dumps(reply.body, separators=(",", ":")) for reply in replies]
        if len(calls) == 1 and calls[0].grpc and not calls[0].sequence and replies[0].status >= 400:
            # On gRPC TorchServe ignores a per-request status but maps a whole-batch error to a gRPC status
            # (400 → INVALID_ARGUMENT, …); alone in its batch, this request fails no other by raising. Not on
            # StreamPredictions2: there TorchServe 0.12.0 fails building the error reply and drops the worker.
            raise PredictionException(bodies[0], replies[0].status)
        for index, (call, reply) in enumerate(zip(calls, replies, strict=True)):
            context.set_response_status(reply.status, reply.phrase, index)
            context.set_response_content_type(index, "application/json")
            if call.grpc:  # one reply, then the end of a StreamPredictions stream (REST must not get it)
                context.set_response_header(index, STREAM_NEXT, "false")
        return bodies

    def _handle_envelope(self, envelope: str, items: list[Any] | None, context: Any) -> list[Any]:
        """Answer the instances (v1) or input tensors (v2) of one request that a KServe envelope unpacked."""
        assert self.service is not None
        headers, _ = _headers(context, 0)
        explain = _is_true(headers.get("explain"))
        to_body = kserve.v1_body if envelope == kserve.V1 else kserve.v2_body
        replies: list[Reply | None] = []
        requests: list[Request] = []
        if not items:  # v1 without instances; v2 always has inputs (the envelope fails before otherwise)
            field = '"instances": [...]' if envelope == kserve.V1 else '"inputs": [...]'
            replies.append(self.service.failure(InvalidJSON(f"the request has no images: send {field}")))
        for item in items or ():
            try:
                body = to_body(item)
            except ServeError as exc:
                replies.append(self.service.failure(exc))
                continue
            replies.append(None)
            requests.append(
                Request(
                    parameters={"body": body},
                    headers=headers,
                    content_types={"body": "application/json"},
                    explain=explain,
                )
            )
        answered = iter(self.service.predict(requests) if requests else ())
        done = [reply or next(answered) for reply in replies]
        failed = next((reply for reply in done if reply.status >= 400), None)
        status = failed or Reply(200, {})
        context.set_response_status(status.status, status.phrase, 0)
        context.set_response_content_type(0, "application/json")
        if _came_by_grpc(headers, _sequence_keys(context)):  # end a StreamPredictions stream
            context.set_response_header(0, STREAM_NEXT, "false")
        if envelope == kserve.V1:
            return [reply.body for reply in done]  # the envelope puts them under "predictions"
        return [json.dumps(reply.body, separators=(",", ":")) for reply in done]  # BYTES outputs


def _envelope(caller: Any) -> str | None:
    """Name the KServe envelope that called ``handle`` (it passes itself as ``self``), or ``None``."""
    if isinstance(caller, KServev2Envelope):
        return kserve.V2
    if isinstance(caller, KServeEnvelope):
        return kserve.V1
    return None


@dataclass(frozen=True)
class _Call:
    """A request and the TorchServe API it came through."""

    request: Request
    grpc: bool
    sequence: bool


def _headers(context: Any, index: int) -> tuple[dict[str, str], dict[str, str]]:
    """The request's headers (names lower-cased) and the content type of each of its parameters."""
    headers: dict[str, str] = {}
    content_types: dict[str, str] = {}
    for key, value in (context.get_all_request_header(index) or {}).items():
        if isinstance(value, dict):  # TorchServe puts each parameter's content type here
            content_types[key] = str(value.get("content-type") or "")
        else:
            headers[str(key).lower()] = str(value)
    return headers, content_types


def _call(index: int, item: dict[str, Any], context: Any) -> _Call:
    headers, content_types = _headers(context, index)
    sequence_keys = _sequence_keys(context)
    grpc = _came_by_grpc(headers, sequence_keys)
    # POST /explanations/{model} carries the header explain: True; gRPC has no such route, so an input field
    # says it (over REST a field of that name is an ordinary form field and opens nothing)
    parameters = item or {}
    explain = _is_true(parameters.get("explain") if grpc else headers.get("explain"))
    request = Request(parameters=parameters, headers=headers, content_types=content_types, explain=explain)
    return _Call(request=request, grpc=grpc, sequence=grpc and bool(set(headers) & sequence_keys))


def _came_by_grpc(headers: dict[str, str], sequence_keys: set[str]) -> bool:
    """Whether a request came by gRPC: it has no header but TorchServe's sequence keys.

    A REST request brings its HTTP headers (Netty always sets Content-Length); a gRPC call brings none of its
    metadata, only its input fields, plus TorchServe's sequence keys when it came by StreamPredictions2.
    """
    return not set(headers) - sequence_keys


def _sequence_keys(context: Any) -> set[str]:
    return {str(getattr(context, key, default)).lower() for key, default in SEQUENCE_KEYS.items()}


def _is_true(value: Any) -> bool:
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", errors="replace")
    return str(value or "").strip().lower() == "true"
