"""The KServe engine: each archive as a ``kserve.Model`` behind KServe's own model server (``[kserve]`` extra).

KServe's REST server answers its v1 (``/v1/models/{m}:predict``, ``:explain``) and v2
(``/v2/models/{m}/infer``) routes through :class:`LafamModel`, which maps the instances and tensors as
:mod:`engines.protocol` does and runs them through the shared :class:`engines.asgi.Batcher`; TorchServe's
``/predictions`` and ``/explanations`` routes are added to the same app (:class:`engines.asgi.ProtocolApp`),
so clients of either keep working. What KServe would answer in its own shape is answered in ours: a failed
image gives the service's error JSON and status (not KServe's ``{"error": "..."}`` 500), a body KServe
cannot parse a 400 ``invalid_json``. Every route but health needs the token (:class:`engines.asgi.Guard`).

Differences from TorchServe, all KServe's: v2 ``parameters`` must be scalars, so a tensor's ``options`` is
JSON text here (TorchServe's envelope also takes an object); the ``/versions/{v}/infer`` route answers 501.
KServe's gRPC server is not started. Metrics: the same ``lafam_*`` series on ``LAFAM_METRICS_ADDRESS``
(KServe's own request histograms stay on ``/metrics`` of the serving port).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

from handlers.errors import InvalidJSON

from . import archives, protocol
from .asgi import Batcher, Guard, ProtocolApp, start_metrics
from .auth import TokenCheck

logger = logging.getLogger(__name__)


def _import_kserve() -> Any:
    """Import kserve with this process's own arguments hidden: ``kserve.model_server`` parses ``sys.argv``."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        import kserve
        import kserve.model_server
    finally:
        sys.argv = argv
    return kserve


kserve = _import_kserve()
from fastapi.exceptions import RequestValidationError  # noqa: E402  (kserve's dependency)
from kserve.errors import InvalidInput  # noqa: E402
from kserve.protocol.infer_type import InferRequest  # noqa: E402
from kserve.protocol.rest.server import RESTServer  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402
from starlette.requests import Request as StarletteRequest  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402


class ReplyError(Exception):
    """A response that is not 200: KServe's app turns it into that status and body (see :func:`install`)."""

    def __init__(self, reply: protocol.HttpReply) -> None:
        super().__init__(reply.status)
        self.reply = reply


class LafamModel(kserve.Model):
    """One archive as a KServe model: v1 instances and v2 tensors → the service, batched."""

    def __init__(self, served: protocol.Served, batcher: Batcher) -> None:
        super().__init__(served.name)
        self.served = served
        self.batcher = batcher
        self.ready = True

    def load(self) -> bool:
        """The archive is loaded before the model is made."""
        self.ready = True
        return True

    async def predict(self, payload: Any, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """KServe v1 ``:predict`` (``payload`` a dict) or v2 ``/infer`` (an ``InferRequest``)."""
        return await self._run(payload, headers or {}, explain=False)

    async def explain(self, payload: Any, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """KServe v1 ``:explain``: the instances run as on ``/explanations`` (backward-pass methods allowed)."""
        return await self._run(payload, headers or {}, explain=True)

    async def _run(self, payload: Any, headers: Mapping[str, str], *, explain: bool) -> dict[str, Any]:
        headers = {str(k).lower(): str(v) for k, v in headers.items()}
        if isinstance(payload, InferRequest):
            call = protocol.v2_call(self.served, _as_dict(payload), headers, request_id=payload.id)
        elif isinstance(payload, bytes | bytearray | str):
            raise ReplyError(protocol.error_reply(InvalidJSON('send {"instances": [...]} as application/json')))
        else:
            call = protocol.v1_call(self.served, payload, headers, explain=explain)
        reply = await self.batcher(call)
        if reply.status != 200:
            raise ReplyError(reply)
        return json.loads(reply.body)


def _as_dict(request: InferRequest) -> dict[str, Any]:
    """The v2 request as the JSON the protocol reads."""
    return {
        "id": request.id,
        "inputs": [
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape or []),
                "data": tensor.data.tolist() if hasattr(tensor.data, "tolist") else tensor.data,
                "parameters": dict(tensor.parameters or {}),
            }
            for tensor in request.inputs
        ],
    }


class _Server(RESTServer):
    """KServe's REST server with this engine's routes, error mapping and host."""

    def __init__(self, *args: Any, host: str, extra: ProtocolApp, auth: TokenCheck, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = host
        self._extra = extra
        self._auth = auth

    def _register_endpoints(self, app: Any) -> None:
        for path in ("/predictions/{rest:path}", "/explanations/{rest:path}", "/ping"):
            app.router.routes.append(Route(path, endpoint=self._extra, methods=["GET", "POST"]))
        super()._register_endpoints(app)

    def _add_exception_handlers(self, app: Any) -> None:
        super()._add_exception_handlers(app)
        app.add_exception_handler(ReplyError, _reply_error)
        app.add_exception_handler(InvalidInput, _invalid_input)
        app.add_exception_handler(RequestValidationError, _invalid_request)
        app.add_exception_handler(StarletteHTTPException, _http_error)

    def _add_middlewares(self, app: Any) -> None:
        super()._add_middlewares(app)
        app.add_middleware(Guard, auth=self._auth)  # outermost: before KServe reads a body


def _response(reply: protocol.HttpReply) -> Response:
    return Response(reply.body, status_code=reply.status, media_type=reply.content_type, headers=dict(reply.headers))


async def _reply_error(_: StarletteRequest, exc: Exception) -> Response:
    assert isinstance(exc, ReplyError)
    return _response(exc.reply)


async def _invalid_input(_: StarletteRequest, exc: Exception) -> Response:
    return _response(protocol.error_reply(InvalidJSON(f"KServe could not read the request: {exc}")))


async def _invalid_request(_: StarletteRequest, exc: Exception) -> Response:
    problems = "; ".join(
        f"{'.'.join(map(str, error.get('loc', ())))}: {error.get('msg')}"
        for error in getattr(exc, "errors", list)()[:5]
    )
    message = f"the v2 request is not an inference request ({problems}); a tensor's options go as JSON text"
    return _response(protocol.error_reply(InvalidJSON(message)))


async def _http_error(request: StarletteRequest, exc: Exception) -> Response:
    """FastAPI's own 404 / 405 in the service's error JSON."""
    status = getattr(exc, "status_code", 500)
    if status == 405:
        return _response(protocol.error_reply(protocol.MethodNotAllowed(f"{request.method} is not allowed here")))
    if status == 404:
        return _response(protocol.error_reply(protocol.NotFound(f"no route {request.method} {request.url.path}")))
    return _response(protocol.json_reply(status, {"error": {"code": "http_error", "message": str(exc)}}))


def serve_forever(archive_paths: list[str], *, host: str, port: int, auth: TokenCheck, device: str = "cpu") -> None:
    """Load the archives and serve them with KServe's model server on ``host:port`` until SIGINT/SIGTERM.

    Raises:
        archives.ArchiveError: an archive cannot be loaded.
    """
    start_metrics()
    with tempfile.TemporaryDirectory(prefix="lafam-kserve-") as unpacked:  # the .mar files, removed at exit
        _serve(archives.load_all(list(archive_paths), device, unpacked), host=host, port=port, auth=auth)


def _serve(loaded: dict[str, archives.LoadedModel], *, host: str, port: int, auth: TokenCheck) -> None:
    models = {name: protocol.Served(m.name, m.version, m.service) for name, m in loaded.items()}
    batcher = Batcher(models, {name: (m.batch_size, m.max_batch_delay_s) for name, m in loaded.items()})
    server = kserve.ModelServer(http_port=port, enable_grpc=False, workers=1)
    kserve_models = [LafamModel(served, batcher) for served in models.values()]
    for model in kserve_models:
        server.register_model(model)
    rest = _Server(
        "kserve.model_server:app",
        server.dataplane,
        server.model_repository_extension,
        port,
        host=host,
        extra=ProtocolApp(models, auth, batcher),
        auth=auth,
        grace_period=10,
    )
    print(f"serving {', '.join(models)} with KServe on http://{host}:{port}", flush=True)
    try:
        rest.run()
    finally:
        batcher.close()
