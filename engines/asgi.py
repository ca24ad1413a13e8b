"""The contract of :mod:`engines.protocol` as plain ASGI, and the batcher the KServe engine runs calls through.

No web framework is imported here: uvicorn (under KServe's model server) and Ray Serve's proxy both speak
ASGI. :class:`ProtocolApp` answers every route of the protocol; :class:`Guard` wraps another app (KServe's
own v1/v2 routes) with the same token check and body limit; :class:`Batcher` gathers the calls that arrive
within a model's ``maxBatchDelay`` (up to its ``batchSize`` images) into one forward pass, run on one
compute thread so that, as in a TorchServe worker, one batch runs at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from handlers import metrics
from handlers.errors import PayloadTooLarge

from .auth import TokenCheck
from .protocol import (
    MAX_REQUEST_BYTES,
    OPEN_PATHS,
    V1_MODEL,
    V2_READY,
    Call,
    HttpReply,
    HttpRequest,
    Served,
    Unauthorized,
    error_reply,
    route,
    run_calls,
)

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Dispatch = Callable[[Call], Awaitable[HttpReply]]


class BodyTooLarge(Exception):
    """The client sent more than the limit."""


async def read_body(receive: Receive, limit: int = MAX_REQUEST_BYTES) -> bytes:
    """Read a request body, stopping at ``limit`` bytes.

    Raises:
        BodyTooLarge: the body is longer than ``limit``.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def headers_of(scope: Scope) -> dict[str, str]:
    """The request's headers, names lower-cased (repeated headers joined by commas)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


async def send_reply(send: Send, reply: HttpReply) -> None:
    """Send an :class:`HttpReply`."""
    headers = [(b"content-type", reply.content_type.encode()), (b"content-length", str(len(reply.body)).encode())]
    headers += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


def too_large() -> HttpReply:
    """The 413 of a body over the limit."""
    return error_reply(
        PayloadTooLarge(f"the request body has more than {MAX_REQUEST_BYTES} bytes", limit=MAX_REQUEST_BYTES)
    )


def declared_too_large(headers: Mapping[str, str]) -> bool:
    """Whether the ``Content-Length`` header alone exceeds the limit."""
    length = headers.get("content-length", "")
    return length.isdigit() and (len(length) > 19 or int(length) > MAX_REQUEST_BYTES)


def is_open(method: str, path: str) -> bool:
    """Whether a route is open without the token: health and readiness, for the orchestrator's probes."""
    if method.upper() != "GET":
        return False
    return path in (*OPEN_PATHS, "/metrics") or bool(V2_READY.match(path) or V1_MODEL.match(path))


class ProtocolApp:
    """Every route of :mod:`engines.protocol`, as an ASGI app.

    Args:
        models: the served models by name.
        auth: the token check.
        dispatch: runs a :class:`Call` (batched as the engine sees fit) and returns its response.
    """

    def __init__(self, models: Mapping[str, Served], auth: TokenCheck, dispatch: Dispatch) -> None:
        self.models = models
        self.auth = auth
        self.dispatch = dispatch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one ASGI connection (HTTP; lifespan events are acknowledged)."""
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        await send_reply(send, await self.respond(scope, receive))

    async def respond(self, scope: Scope, receive: Receive) -> HttpReply:
        """The response to one HTTP request."""
        headers = headers_of(scope)
        if declared_too_large(headers):
            return too_large()
        try:
            body = await read_body(receive)
        except BodyTooLarge:
            return too_large()
        request = HttpRequest(scope["method"], scope["path"], headers, body)
        routed = route(request, self.models, self.auth)
        if isinstance(routed, HttpReply):
            return routed
        try:
            return await self.dispatch(routed)
        except Exception as exc:  # noqa: BLE001 - the request fails alone; the engine keeps serving
            return error_reply(exc)


class Guard:
    """Wrap an ASGI app (KServe's routes) with the token check and the body limit of :class:`ProtocolApp`.

    The body is read (up to the limit) before the wrapped app sees the request, then replayed to it.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], auth: TokenCheck) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the token and read the body, then hand the request to the wrapped app."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = headers_of(scope)
        if not is_open(scope["method"], scope["path"]) and not self.auth.allows(headers):
            await send_reply(
                send, error_reply(Unauthorized("this route needs the header Authorization: Bearer <token>"))
            )
            return
        if declared_too_large(headers):
            await send_reply(send, too_large())
            return
        try:
            body = await read_body(receive)
        except BodyTooLarge:
            await send_reply(send, too_large())
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@dataclass
class _Pending:
    call: Call
    future: asyncio.Future[HttpReply]


class Batcher:
    """Gather calls to the models into batches and run them on one compute thread.

    A batch for a model closes when its images reach the model's ``batch_size`` or its
    ``max_batch_delay_s`` has passed since the first call of the batch; a call larger than the batch size
    runs alone. Batches of different models run one after the other on the same thread.

    Args:
        models: the served models by name.
        sizes: ``(batch_size, max_batch_delay_s)`` per model name.
    """

    def __init__(self, models: Mapping[str, Served], sizes: Mapping[str, tuple[int, float]]) -> None:
        self.models = models
        self.sizes = dict(sizes)
        self._queues: dict[str, asyncio.Queue[_Pending]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lafam-compute")

    async def __call__(self, call: Call) -> HttpReply:
        """Run ``call`` in the next batch of its model."""
        if not call.requests:  # nothing to run: every image failed before the model
            return call.answer([])
        queue = self._queue(call.model)
        future: asyncio.Future[HttpReply] = asyncio.get_running_loop().create_future()
        await queue.put(_Pending(call, future))
        return await future

    def _queue(self, name: str) -> asyncio.Queue[_Pending]:
        if name not in self._queues:
            self._queues[name] = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._loop(name), name=f"lafam-batcher-{name}"))
        return self._queues[name]

    async def _loop(self, name: str) -> None:
        queue = self._queues[name]
        size, delay = self.sizes.get(name, (1, 0.0))
        loop = asyncio.get_running_loop()
        carried: _Pending | None = None
        while True:
            batch = [carried or await queue.get()]
            carried = None
            images = len(batch[0].call.requests)
            deadline = time.monotonic() + delay
            while images < size:
                timeout = deadline - time.monotonic()
                try:
                    pending = await asyncio.wait_for(queue.get(), timeout) if timeout > 0 else queue.get_nowait()
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if images + len(pending.call.requests) > size:
                    carried = pending  # opens the next batch
                    break
                batch.append(pending)
                images += len(pending.call.requests)
            calls = [pending.call for pending in batch]
            try:
                replies = await loop.run_in_executor(self._executor, run_calls, self.models, calls)
            except Exception as exc:  # noqa: BLE001 - the batch fails, the batcher keeps serving
                replies = [error_reply(exc)] * len(batch)
            for pending, reply in zip(batch, replies, strict=True):
                if not pending.future.done():
                    pending.future.set_result(reply)

    def close(self) -> None:
        """Stop the batching tasks and the compute thread."""
        for task in self._tasks:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def start_metrics() -> None:
    """Record into the multiprocess folder and compete for the exporter address, as a TorchServe worker does."""
    metrics.configure()
    metrics.start_exporter()
