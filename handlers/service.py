"""The serving pipeline over a whole batch: decode → run once → explain → encode, one reply per request.

Plain Python and torch (no TorchServe import), so it is tested directly; ``handlers.handler`` adapts it
to TorchServe's ``handle(data, context)``. A request that fails (bad bytes, bad option) is answered
alone with its error; the others of the batch are still run together, one forward pass per input size
(a dynamic-size model served with ``resize`` ``none`` or N sees images of several sizes in one batch).
Nothing is kept between calls but the model and its configuration.
"""

from __future__ import annotations

import base64
import binascii
import http
import logging
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics
from .backends import Backend, load_backend
from .drift import map_statistics, mean_statistics
from .eager import load_eager
from .encode import encode_explanation, explanation_header, lafam_png_base64, predictions_json
from .errors import EmptyBody, InvalidJSON, InvalidOption, ServeError, UnsupportedMediaType, to_response
from .explain.lafam import resize_maps
from .fused import agrees
from .images import DecodedImage, open_image, to_tensor
from .json_input import check_depth, parse_json
from .manifest import Defaults, Manifest
from .methods import (
    ContractError,
    Endpoint,
    Engines,
    Explanation,
    Inputs,
    Need,
    capabilities,
    choose_classes,
    once,
    registry,
)
from .methods.lafam import LaFAM
from .options import MAX_MAP_SIDE, RequestOptions, parse_options
from .sizing import MAX_INPUT_PIXELS, input_size

logger = logging.getLogger(__name__)
DriftMap = tuple[torch.Tensor, int, bool] | None
"""The map of the drift statistics, taken on the metrics thread (not on the request's path): a method's
``(K, h, w)`` maps, ``0`` and ``False`` (the first map), or a batch's fused channel means ``(N, 1, h, w)``, the
row and ``True`` (that row's :func:`~handlers.explain.lafam.lafam` map); ``None`` with the statistics off."""

BODY_KEYS = ("body", "data", "image", "file")
JSON_KEYS = ("image", "options")
IMAGE_TYPES = ("image/", "application/octet-stream")
PREDICT_HINT = (
    " (backward-pass methods are served on POST /explanations/{model}, or over gRPC with the input explain=true)"
)
SERVICE_KEYS = ("max_pixels", "max_input_pixels", "max_classes", "eager", "drift", "threads")
"""Keys of the model config's ``lafam`` section besides the option defaults."""


@dataclass(frozen=True)
class Request:
    """One request as the handler sees it.

    Attributes:
        parameters: TorchServe's parameters of the request (``body`` for a raw body, form fields for
            multipart), values as bytes, or a parsed object for a JSON body.
        headers: request headers, names lower-cased.
        content_types: content type per parameter name.
        explain: the request came to ``/explanations`` (backward-pass methods allowed).
    """

    parameters: Mapping[str, Any]
    headers: Mapping[str, str]
    content_types: Mapping[str, str]
    explain: bool = False


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


@dataclass
class _BatchOutputs:
    """What one forward pass gives every image of its batch.

    Attributes:
        activations: ``(N, C, h, w)`` per exported layer name.
        maps: the runtime's fused channel means, ``(N, 1, h, w)``, per layer name (:mod:`handlers.fused`).
        seen: the ``(H, W)`` the batch ran at.
        memo: work shared by the batch's images (:func:`~.methods.once`, as the methods' :meth:`Inputs.once`).
    """

    activations: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    seen: tuple[int, int]
    memo: dict[Hashable, Any] = field(default_factory=dict)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as a C-contiguous numpy array on the CPU.

    One call for the runtimes' contiguous CPU outputs (the same memory as ONNX Runtime's own arrays): right after
    the forward pass each further call costs microseconds.
    """
    try:
        values = tensor.numpy()
    except (TypeError, RuntimeError):  # on a GPU, or part of a graph
        values = tensor.detach().cpu().numpy()
    return np.ascontiguousarray(values)  # the same array when it already is (both runtimes' means are)


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
        return _from_json(check_depth(value, "the JSON body"))
    if not isinstance(value, str | bytes | bytearray):  # TorchServe already parsed a JSON array/number/null
        raise InvalidJSON(f'the JSON body must be an object {{"image": "<base64>", ...}}, got {type(value).__name__}')
    if isinstance(value, str) or content_type == "application/json":
        try:
            parsed = parse_json(value, "the JSON body")
        except InvalidJSON as exc:
            if content_type == "application/json":
                raise
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
    if isinstance(options, str | bytes | bytearray):
        options = parse_json(options, "the 'options' form field")
    elif options is not None:  # TorchServe decoded an application/json field
        check_depth(options, "the 'options' form field")
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
    encoded = "".join(encoded.split())  # line-wrapped base64 (the base64 tool, MIME) is still base64
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidJSON(f"field 'image' is not valid base64: {exc}") from exc
    return data, body.get("options")


class LafamService:
    """Serve one exported model: predictions plus a LaFAM map from the same forward pass.

    With an eager model (``engines``), requests to ``/explanations`` may also ask for the backward-pass
    methods (LRP, Grad-CAM, attribution distributions), run on the eager model per request. Every method
    comes from the registry (:mod:`handlers.methods`); the service names none.

    Args:
        manifest: the model's manifest.
        backend: the loaded graph.
        engines: what the backward-pass methods share, built at worker start, or ``None`` (``/explanations``
            then serves the forward methods only).
        max_classes: the largest K of methods whose cost grows with K.
        drift: record the drift statistics of every served map (:mod:`handlers.drift`).
        max_input_pixels: the largest input (H x W) a dynamic-size model runs at (``resize`` ``none`` or N).
    """

    def __init__(
        self,
        manifest: Manifest,
        backend: Backend,
        engines: Engines | None = None,
        max_classes: int = 10,
        *,
        drift: bool = True,
        max_input_pixels: int = MAX_INPUT_PIXELS,
    ) -> None:
        self.manifest = manifest
        self.backend = backend
        self.engines = engines
        self.max_classes = max_classes
        self.drift = drift
        self.max_input_pixels = max_input_pixels
        self._labels = {"model": manifest.name}
        self.capabilities = capabilities(manifest, engines)
        self.predict_methods = registry.served(self.capabilities, explain=False)
        self.explain_methods = registry.served(self.capabilities)
        self._explain_hint = (
            "" if engines else " (this archive has no eager model: export with --eager for backward-pass methods)"
        )
        fused = getattr(backend, "maps", {})
        self._fused = {layer.name: fused[layer.output] for layer in manifest.layers if layer.output in fused}
        """Layer name → the backend outputs carrying its fused LaFAM map (:mod:`handlers.fused`), once checked."""

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: torch.device | str = "cpu", config: Mapping[str, Any] | None = None
    ) -> LafamService:
        """Load the manifest and graph in ``folder``, with per-deployment overrides.

        Args:
            folder: folder holding ``lafam.json`` and the graph (TorchServe's ``model_dir``).
            device: ``cpu`` or the ``cuda:<gpu_id>`` TorchServe assigned.
            config: the ``lafam`` section of the archive's model-config YAML: ``max_pixels``,
                ``max_input_pixels``, ``max_classes``, ``eager``, ``drift``, ``threads`` (the worker's torch
                and ONNX Runtime intra-op threads; absent: the runtimes' defaults) and any option default
                (``top_k``, ``format``, ``upsample``, ``size``, ``resize``).
        """
        manifest = Manifest.load(folder)
        config = dict(config or {})
        unknown = sorted(set(config) - {*SERVICE_KEYS, *Defaults.__dataclass_fields__})
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(unknown)} in the model config's 'lafam' section; valid: "
                f"{', '.join(SERVICE_KEYS)}, {', '.join(Defaults.__dataclass_fields__)}"
            )
        max_classes = config.pop("max_classes", 10)
        max_input_pixels = config.pop("max_input_pixels", MAX_INPUT_PIXELS)
        threads = config.pop("threads", None)
        checked = (
            ("max_classes", max_classes),
            ("max_input_pixels", max_input_pixels),
            ("threads", 1 if threads is None else threads),
        )
        for key, value in checked:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} in the model config's 'lafam' section must be a positive int: {value!r}")
        if threads is not None:  # the worker's compute threads: torch (TorchScript, eager methods) and ORT
            torch.set_num_threads(threads)
        engines = None
        if manifest.eager is not None and config.pop("eager", True) is not False:
            engines = Engines(load_eager(manifest.eager, folder, device), manifest)
        config.pop("eager", None)
        drift = config.pop("drift", True)
        if not isinstance(drift, bool):
            raise ValueError(  # noqa: TRY004 - a bad config value, reported like the others
                f"drift in the model config's 'lafam' section must be true or false: {drift!r}"
            )
        if config:
            max_pixels = int(config.pop("max_pixels", manifest.max_pixels))
            manifest = replace(manifest, max_pixels=max_pixels, defaults=replace(manifest.defaults, **config))
            try:
                parse_options(manifest)  # a bad default fails the worker's start, not every request
            except InvalidOption as exc:
                raise ValueError(f"invalid default in the model config's 'lafam' section: {exc.message}") from exc
        backend = load_backend(manifest, folder, device, threads or 0, fuse_maps=True)
        service = cls(manifest, backend, engines, max_classes, drift=drift, max_input_pixels=max_input_pixels)
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
        self._check_fused()

    def _check_fused(self) -> None:
        """Serve a fused map only if it matches :func:`~handlers.explain.lafam.lafam` on a random batch.

        A layer whose runtime means differ (a runtime's reduction gone wrong) is logged and served by the
        reference instead: the map a client gets never depends on the runtime computing it.
        """
        if not self._fused:
            return
        probe = torch.randn(2, 3, *self.manifest.input_size, generator=torch.Generator().manual_seed(0))
        outputs = self.backend.run(probe)
        for layer in self.manifest.layers:
            name = self._fused.get(layer.name)
            if name is not None and not agrees(outputs[name], outputs[layer.output]):
                logger.warning("the runtime's fused LaFAM map of %s differs from the reference: not used", layer.name)
                del self._fused[layer.name]

    def predict(self, requests: Sequence[Request]) -> list[Reply]:
        """Answer a batch: one :class:`Reply` per request, in order; never raises."""
        metrics.observe(metrics.BATCH_SIZE, len(requests), **self._labels)
        replies: list[Reply | None] = [None] * len(requests)
        prepared: list[_Prepared] = []
        for index, request in enumerate(requests):
            try:
                prepared.append(self._prepare(index, request))
            except Exception as exc:  # noqa: BLE001 - one bad request fails alone
                replies[index] = self.failure(exc)
        if prepared:
            try:
                for item, reply in zip(prepared, self._run(prepared), strict=True):
                    replies[item.index] = reply
            except Exception as exc:  # noqa: BLE001 - answered as 500 each, the worker keeps serving
                for item in prepared:
                    replies[item.index] = self.failure(exc)
        done = [reply or self.failure(RuntimeError("request left unanswered")) for reply in replies]
        for reply in done:
            metrics.count(metrics.REQUESTS, status=f"{reply.status // 100}xx", **self._labels)
        return done

    def _prepare(self, index: int, request: Request) -> _Prepared:
        with metrics.timed(metrics.PREPROCESS_SECONDS, **self._labels):
            data, body_options = _payload(request)
            if request.explain:
                methods, hint = self.explain_methods, self._explain_hint
            else:
                methods, hint = self.predict_methods, PREDICT_HINT
            options = parse_options(
                self.manifest,
                request.headers,
                body_options,
                methods,
                max_classes=self.max_classes,
                hint=hint,
                capabilities=self.capabilities,
            )
            m = self.manifest
            picture = open_image(data, m.max_pixels)
            original = (picture.height, picture.width)
            size = input_size(options.resize, original, m, self.max_input_pixels)
            image = DecodedImage(tensor=to_tensor(picture, size, m.mean, m.std), original_size=original)
        return _Prepared(index=index, image=image, options=options)

    def _run(self, prepared: list[_Prepared]) -> list[Reply]:
        """Answer the prepared requests: one forward pass per input size (images of one size share a batch).

        With ``resize`` ``none`` or N on a dynamic-size model, a batch may hold several sizes; they are never
        stacked into one tensor. A failure of one size's pass fails only that size's requests.
        """
        groups: dict[tuple[int, ...], list[_Prepared]] = {}
        for item in prepared:
            groups.setdefault(tuple(item.image.tensor.shape), []).append(item)
        replies: dict[int, Reply] = {}
        for group in groups.values():
            try:
                answered = self._run_group(group)
            except Exception as exc:  # noqa: BLE001 - answered as 500 each, the other sizes are still run
                answered = [self.failure(exc) for _ in group]
            replies.update((item.index, reply) for item, reply in zip(group, answered, strict=True))
        return [replies[item.index] for item in prepared]

    def _run_group(self, prepared: list[_Prepared]) -> list[Reply]:
        """Run one batch of images of the same size and answer each of them."""
        manifest = self.manifest
        batch = torch.stack([item.image.tensor for item in prepared])
        seen = (int(batch.shape[-2]), int(batch.shape[-1]))
        with metrics.timed(metrics.INFERENCE_SECONDS, backend=self.backend.name, **self._labels):
            outputs = self.backend.run(batch)
        main = outputs[manifest.main_output]
        probabilities = torch.softmax(main.float(), dim=1) if manifest.task == "classification" else None

        batch_outputs = _BatchOutputs(
            activations={layer.name: outputs[layer.output] for layer in manifest.layers},
            maps={layer: outputs[name] for layer, name in self._fused.items()},
            seen=seen,
        )
        replies = []
        for row, item in enumerate(prepared):
            body: dict[str, Any] = {"model": manifest.name, "input_size": list(seen)}
            row_probabilities = probabilities[row] if probabilities is not None else None
            if row_probabilities is not None:
                body["predictions"] = predictions_json(row_probabilities, item.options.top_k, manifest.labels)
            else:
                body["embedding"] = main[row].detach().float().cpu().tolist()
            body["explanation"] = None
            try:
                if item.options.format != "none":
                    body["explanation"] = self._explanation(item, row, row_probabilities, batch_outputs)
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                replies.append(self.failure(exc))
                continue
            replies.append(Reply(200, body))
        return replies

    def _explanation(
        self, item: _Prepared, row: int, probabilities: torch.Tensor | None, batch: _BatchOutputs
    ) -> dict[str, Any]:
        """One image's ``explanation`` object; its metrics and drift statistics are recorded after the answer.

        The time recorded is the explanation's alone. The recording itself (histograms written into the
        multiprocess files, the drift statistics) runs on the metrics thread (:func:`metrics.later`): right
        after a forward pass each value written costs several cold-cache microseconds the client need not wait for.
        """
        start = time.perf_counter()
        options = item.options
        answer = self._fused_png(options, row, batch, item.image.original_size)
        if answer is None:
            inputs = Inputs(
                item.image.tensor,
                options,
                probabilities,
                batch_activations=batch.activations,
                batch_maps=batch.maps,
                row=row,
                engines=self.engines,
                memo=batch.memo,
            )
            answer = self._explain(inputs, item.image.original_size)
        explanation, drift_map = answer
        metrics.later(self._record, options.method, time.perf_counter() - start, drift_map if self.drift else None)
        return explanation

    def _fused_png(
        self, options: RequestOptions, row: int, batch: _BatchOutputs, original_size: tuple[int, int]
    ) -> tuple[dict[str, Any], DriftMap] | None:
        """The LaFAM PNG straight from the channel means the runtime computed, or ``None`` when not asked for that.

        The served default (LaFAM, PNG, nearest) on a layer whose map the runtime fused: the same object as
        :meth:`_explain` gives, written by one call of the C writer (:func:`~.encode.lafam_png_base64`). Right
        after the forward pass every torch or numpy call costs several times its warm time, and this path makes
        one per batch (``benchmarks.lafam_overhead``). With it, the map for the drift statistics (:data:`DriftMap`).
        """
        if options.method != LaFAM.name or options.format != "png" or options.upsample != "nearest":
            return None
        means = batch.maps.get(options.layer)
        if means is None:
            return None
        values = once(batch.memo, ("fused means", options.layer), lambda: _numpy(means))
        native = (values.shape[-2], values.shape[-1])
        size = self._size(options, original_size, batch.seen)
        data, empty = lafam_png_base64(values, row, native, size)
        header = explanation_header(
            method=options.method, layer=options.layer, fmt="png", native_size=native, size=size, upsample="nearest"
        )
        return {**header, "empty": empty, "data": data}, (means, row, True)

    @staticmethod
    def _size(options: RequestOptions, original_size: tuple[int, int], seen: tuple[int, int]) -> tuple[int, int]:
        if options.size == "input":
            return seen
        if options.size == "original":
            height, width = original_size
            scale = min(1.0, MAX_MAP_SIDE / max(height, width))  # a huge image must not mean a huge map
            return max(1, round(height * scale)), max(1, round(width * scale))
        return options.size

    def _explain(self, inputs: Inputs, original_size: tuple[int, int]) -> tuple[dict[str, Any], DriftMap]:
        """Run the requested method on one image and encode its map(s) (see ``encode``).

        Returns:
            The ``explanation`` object, and its first map for the drift statistics (:data:`DriftMap`).
        """
        options = inputs.options
        method = registry.get(options.method)
        backward = method.endpoint is Endpoint.BACKWARD
        if backward and self.engines is None:  # options only admit these methods with an eager model
            raise InvalidOption(f"method {options.method!r} needs the eager model{self._explain_hint}")
        probabilities = inputs.probabilities
        try:
            classes = choose_classes(method, options, probabilities) if Need.CLASSES in method.needs else None
            result = method.explain(inputs if classes == inputs.classes else replace(inputs, classes=classes))
        except ValueError as exc:  # an option this model cannot honour (e.g. a layer LRP cannot seed at)
            if not backward:
                raise
            raise InvalidOption(f"method {options.method!r} cannot run with these options: {exc}") from exc
        if result.signed is not method.signed:
            raise ContractError(f"method {method.name!r} declares signed={method.signed} but returned the other kind")
        seen = (int(inputs.image.shape[-2]), int(inputs.image.shape[-1]))
        return self._encode(result, options, original_size, seen, probabilities)

    def _encode(
        self,
        result: Explanation,
        options: RequestOptions,
        original_size: tuple[int, int],
        seen: tuple[int, int],
        probabilities: torch.Tensor | None,
    ) -> tuple[dict[str, Any], DriftMap]:
        maps = result.maps
        if maps.requires_grad or maps.dtype is not torch.float32 or maps.device.type != "cpu":
            maps = maps.detach().float().cpu()
        size = self._size(options, original_size, seen)
        # nearest (the default) is upsampled on the 8-bit pixels while encoding; bilinear needs the float maps
        bilinear = options.format == "png" and options.upsample != "nearest"
        resized = resize_maps(maps, size, options.upsample) if bilinear else None
        explanation = encode_explanation(
            result,
            maps=maps,
            method=options.method,
            fmt=options.format,
            size=size,
            upsample=options.upsample,
            resized=resized,
            label=self.manifest.label,
            probabilities=probabilities,
        )
        return explanation, (maps, 0, False)

    def _record(self, method: str, seconds: float, drift_map: DriftMap) -> None:
        """Record one served explanation: its time, its count, its map's drift statistics (the metrics thread).

        ``drift_map``: see :data:`DriftMap`. Never raises: a failure is logged.
        """
        labels = {"method": method, **self._labels}
        metrics.observe(metrics.EXPLANATION_SECONDS, seconds, **labels)
        metrics.count(metrics.EXPLANATIONS, **labels)
        if drift_map is None:
            return
        try:
            maps, index, means = drift_map
            statistics = mean_statistics(maps[index, 0]) if means else map_statistics(maps[index])
        except Exception:
            logger.exception("drift statistics failed")
            return
        if statistics is not None:
            metrics.observe(metrics.MAP_ENTROPY, statistics.entropy, **labels)
            metrics.observe(metrics.MAP_BORDER, statistics.border_share, **labels)
            metrics.observe(metrics.MAP_PEAK_OFFSET, statistics.peak_offset, **labels)

    def failure(self, exc: BaseException) -> Reply:
        """The reply to a request that failed, counted as an error (also for one rejected before :meth:`predict`)."""
        status, body = to_response(exc)
        code = exc.code if isinstance(exc, ServeError) else "internal_error"
        metrics.count(metrics.ERRORS, code=code, **self._labels)
        return Reply(status, body)
