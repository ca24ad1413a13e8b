"""The serving pipeline over a whole batch: decode → run once → explain → encode, one reply per request.

Plain Python and torch (no TorchServe import), so it is tested directly; ``handlers.handler`` adapts it
to TorchServe's ``handle(data, context)``. A request that fails (bad bytes, bad option) is answered
alone with its error; the others of the batch are still run together. Nothing is kept between calls
but the model and its configuration.
"""

from __future__ import annotations

import base64
import binascii
import http
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from . import metrics
from .backends import Backend, load_backend
from .encode import explanation_json, predictions_json
from .errors import EmptyBody, InvalidJSON, InvalidOption, ServeError, UnsupportedMediaType, to_response
from .explain.lafam import lafam, resize_maps
from .images import DecodedImage, decode
from .manifest import Defaults, Manifest
from .options import RequestOptions, parse_options

logger = logging.getLogger(__name__)

BODY_KEYS = ("body", "data", "image", "file")
JSON_KEYS = ("image", "options")
IMAGE_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class Request:
    """One request as the handler sees it.

    Attributes:
        parameters: TorchServe's parameters of the request (``body`` for a raw body, form fields for
            multipart), values as bytes, or a parsed object for a JSON body.
        headers: request headers, names lower-cased.
        content_types: content type per parameter name.
    """

    parameters: Mapping[str, Any]
    headers: Mapping[str, str]
    content_types: Mapping[str, str]


@dataclass(frozen=True)
class Reply:
    """One response: an HTTP status and a JSON-serialisable body."""

    status: int
    body: dict[str, Any]

    @property
    def phrase(self) -> str:
        """The reason phrase of ``status``."""
        return http.HTTPStatus(self.status).phrase


@dataclass(frozen=True)
class _Prepared:
    index: int
    image: DecodedImage
    options: RequestOptions


def _payload(request: Request) -> tuple[bytes | bytearray, Mapping[str, Any] | None]:
    """Find the image bytes and the JSON options of a request.

    Accepted: a raw image body (``Content-Type: image/*``, ``application/octet-stream`` or ``curl -T``);
    a JSON body ``{"image": "<base64>", "options": {...}}``; a multipart form with an ``image``, ``data``
    or ``file`` field and an optional ``options`` field holding JSON.
    """
    parameters = request.parameters
    key = next((k for k in BODY_KEYS if k in parameters), None)
    if key is None:
        raise EmptyBody(
            "no image in the request: send the image bytes as the body (Content-Type image/*) "
            'or JSON {"image": "<base64>"}',
            fields=sorted(parameters),
        )
    value = parameters[key]
    content_type = request.content_types.get(key, "").split(";")[0].strip().lower()
    if isinstance(value, Mapping):
        return _from_json(value)
    if isinstance(value, str) or content_type == "application/json":
        try:
            parsed = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            if content_type == "application/json":
                raise InvalidJSON(f"the JSON body cannot be parsed: {exc}") from exc
            raise UnsupportedMediaType(
                f"Content-Type {content_type!r} is not accepted: send image/* bytes or application/json"
            ) from exc
        if not isinstance(parsed, Mapping):
            raise InvalidJSON('the JSON body must be an object {"image": "<base64>", "options": {...}}')
        return _from_json(parsed)
    if content_type and not content_type.startswith(IMAGE_TYPES) and not content_type.startswith("multipart/"):
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not accepted: send image/* bytes, "
            "application/octet-stream or application/json"
        )
    options = parameters.get("options")
    if options is not None and not isinstance(options, Mapping):
        try:
            options = json.loads(options)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidJSON(f"the 'options' form field is not valid JSON: {exc}") from exc
    return value, options


def _from_json(body: Mapping[str, Any]) -> tuple[bytes, Mapping[str, Any] | None]:
    unknown = sorted(set(body) - set(JSON_KEYS))
    if unknown:
        raise InvalidJSON(f"unknown JSON field(s) {', '.join(unknown)}; valid fields: {', '.join(JSON_KEYS)}")
    encoded = body.get("image")
    if not isinstance(encoded, str) or not encoded:
        raise InvalidJSON("the JSON body needs a non-empty string field 'image' holding the base64 image")
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidJSON(f"field 'image' is not valid base64: {exc}") from exc
    return data, body.get("options")


class LafamService:
    """Serve one exported model: predictions plus a LaFAM map from the same forward pass.

    Args:
        manifest: the model's manifest.
        backend: the loaded graph.
    """

    def __init__(self, manifest: Manifest, backend: Backend) -> None:
        self.manifest = manifest
        self.backend = backend
        self._labels = {"model": manifest.name}

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: torch.device | str = "cpu", config: Mapping[str, Any] | None = None
    ) -> LafamService:
        """Load the manifest and graph in ``folder``, with per-deployment overrides.

        Args:
            folder: folder holding ``lafam.json`` and the graph (TorchServe's ``model_dir``).
            device: ``cpu`` or the ``cuda:<gpu_id>`` TorchServe assigned.
            config: the ``lafam`` section of the archive's model-config YAML: ``max_pixels`` and any
                option default (``top_k``, ``format``, ``upsample``, ``size``).
        """
        manifest = Manifest.load(folder)
        config = dict(config or {})
        unknown = sorted(set(config) - {"max_pixels", *Defaults.__dataclass_fields__})
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(unknown)} in the model config's 'lafam' section; valid: "
                f"max_pixels, {', '.join(Defaults.__dataclass_fields__)}"
            )
        if config:
            max_pixels = int(config.pop("max_pixels", manifest.max_pixels))
            manifest = replace(manifest, max_pixels=max_pixels, defaults=replace(manifest.defaults, **config))
            try:
                parse_options(manifest)  # a bad default fails the worker's start, not every request
            except InvalidOption as exc:
                raise ValueError(f"invalid default in the model config's 'lafam' section: {exc.message}") from exc
        service = cls(manifest, load_backend(manifest, folder, device))
        service.warm_up()
        return service

    def warm_up(self, runs: int = 2) -> None:
        """Run a blank batch so that the first request does not pay for graph optimisation.

        TorchScript's profiling executor specialises the graph on its first two calls, and ONNX Runtime
        allocates its arenas on the first; neither should land on a client's latency.
        """
        blank = torch.zeros(1, 3, *self.manifest.input_size)
        for _ in range(runs):
            self.backend.run(blank)

    def predict(self, requests: Sequence[Request]) -> list[Reply]:
        """Answer a batch: one :class:`Reply` per request, in order; never raises."""
        metrics.observe(metrics.BATCH_SIZE, len(requests), **self._labels)
        replies: list[Reply | None] = [None] * len(requests)
        prepared: list[_Prepared] = []
        for index, request in enumerate(requests):
            try:
                prepared.append(self._prepare(index, request))
            except Exception as exc:  # noqa: BLE001 - one bad request fails alone
                replies[index] = self._failure(exc)
        if prepared:
            try:
                for item, reply in zip(prepared, self._run(prepared), strict=True):
                    replies[item.index] = reply
            except Exception as exc:  # noqa: BLE001 - answered as 500 each, the worker keeps serving
                for item in prepared:
                    replies[item.index] = self._failure(exc)
        done = [reply or self._failure(RuntimeError("request left unanswered")) for reply in replies]
        for reply in done:
            metrics.count(metrics.REQUESTS, status=f"{reply.status // 100}xx", **self._labels)
        return done

    def _prepare(self, index: int, request: Request) -> _Prepared:
        with metrics.timed(metrics.PREPROCESS_SECONDS, **self._labels):
            data, body_options = _payload(request)
            options = parse_options(self.manifest, request.headers, body_options)
            m = self.manifest
            image = decode(data, m.input_size, m.mean, m.std, m.max_pixels)
        return _Prepared(index=index, image=image, options=options)

    def _run(self, prepared: list[_Prepared]) -> list[Reply]:
        manifest = self.manifest
        batch = torch.stack([item.image.tensor for item in prepared])
        with metrics.timed(metrics.INFERENCE_SECONDS, backend=self.backend.name, **self._labels):
            outputs = self.backend.run(batch)
        main = outputs[manifest.main_output]
        probabilities = torch.softmax(main.float(), dim=1) if manifest.task == "classification" else None

        native_maps: dict[int, torch.Tensor] = {}
        reduce_seconds: dict[int, float] = {}
        wanted: dict[str, list[int]] = {}
        for row, item in enumerate(prepared):
            if item.options.format != "none":
                wanted.setdefault(item.options.layer, []).append(row)
        for layer, rows in wanted.items():
            start = time.perf_counter()
            activations = outputs[manifest.layer(layer).output]
            maps = lafam(activations if len(rows) == len(prepared) else activations[rows])
            elapsed = (time.perf_counter() - start) / len(rows)
            for position, row in enumerate(rows):
                native_maps[row] = maps[position]
                reduce_seconds[row] = elapsed

        replies = []
        for row, item in enumerate(prepared):
            body: dict[str, Any] = {"model": manifest.name}
            if probabilities is not None:
                body["predictions"] = predictions_json(probabilities[row], item.options.top_k, manifest.labels)
            else:
                body["embedding"] = main[row].detach().float().cpu().tolist()
            body["explanation"] = None
            if row in native_maps:
                start = time.perf_counter()
                body["explanation"] = self._explanation(native_maps[row], item)
                seconds = reduce_seconds[row] + time.perf_counter() - start
                metrics.observe(metrics.EXPLANATION_SECONDS, seconds, method=item.options.method, **self._labels)
                metrics.count(metrics.EXPLANATIONS, method=item.options.method, **self._labels)
            replies.append(Reply(200, body))
        return replies

    def _explanation(self, native: torch.Tensor, item: _Prepared) -> dict[str, Any]:
        options = item.options
        if options.size == "input":
            size = self.manifest.input_size
        elif options.size == "original":
            size = item.image.original_size
        else:
            size = options.size
        resized = resize_maps(native.unsqueeze(0), size, options.upsample)[0] if options.format == "png" else None
        return explanation_json(
            method=options.method,
            layer=options.layer,
            fmt=options.format,
            native=native,
            size=size,
            upsample=options.upsample,
            resized=resized,
        )

    def _failure(self, exc: BaseException) -> Reply:
        status, body = to_response(exc)
        code = exc.code if isinstance(exc, ServeError) else "internal_error"
        metrics.count(metrics.ERRORS, code=code, **self._labels)
        return Reply(status, body)
