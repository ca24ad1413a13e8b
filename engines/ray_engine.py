"""The archives behind Ray Serve: replicas with ``@serve.batch`` batching, autoscaling and replacement.

One Serve application, ``lafam``, at route prefix ``/``, of one deployment, :class:`LafamDeployment`: each
replica (a Ray actor process, titled ``ray::ServeReplica:lafam:LafamDeployment``) loads every archive and
answers every route of :mod:`engines.protocol` behind Serve's HTTP proxy. Calls that reach a replica within
the first archive's ``maxBatchDelay`` are gathered, up to its ``batchSize`` images, into one forward pass
per model, run on the replica's one compute thread (as in a TorchServe worker, one batch at a time). A call
of more images than ``batchSize`` runs alone, on the same thread.

Two ways to start it:

- :func:`serve_forever` (``lafam-serve serve ARCHIVE... --engine ray``): connects to a running Ray cluster
  (``ray start --head`` first), starts Serve's proxy on ``host:port`` and blocks until SIGINT/SIGTERM, then
  deletes the application and leaves the cluster running.
- :func:`build`, the application builder of a Serve config file or a KubeRay ``RayService``
  (``import_path: engines.ray_engine:build``, ``args: {archives: [...], token_file: ..., no_auth: false,
  metrics_dir: ..., metrics_address: ...}``); replicas and autoscaling are then the config's.

Metrics: every replica of a node records into one prometheus-client multiprocess folder, and every replica
competes for the exporter address; the one that binds it serves the sum of all, and when it dies another
takes over within :data:`handlers.metrics.RETRY_SECONDS` (the TorchServe workers' design). The folder and
the address are passed to the replicas explicitly: Ray workers inherit the raylet's environment, not the
caller's.

Paths (archives, metrics folder) must exist on every node that runs a replica, and the ``engines`` and
``handlers`` packages must be importable there (installed, or on the workers' ``PYTHONPATH``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import signal
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response

from handlers import metrics
from handlers.manifest import MANIFEST_FILE

from . import asgi, auth, protocol
from .archives import DEFAULT_BATCH_DELAY_MS, DEFAULT_BATCH_SIZE, ArchiveError, load_all

logger = logging.getLogger(__name__)

APP_NAME = "lafam"
REPLICA_CPUS = 0.5
"""CPUs Ray reserves per replica: two replicas fit a 2-CPU node (torch and ONNX Runtime use what they find)."""
MAX_ONGOING_REQUESTS = 16
"""Requests one replica takes at a time before Serve's router queues them (or sends them to another)."""
DEFAULT_BATCH_WAIT_S = DEFAULT_BATCH_DELAY_MS / 1000


def _images(calls: Sequence[protocol.Call]) -> int:
    """The batch size of calls as TorchServe counts it: their images."""
    return sum(len(call.requests) for call in calls)


def _response(reply: protocol.HttpReply) -> Response:
    return Response(
        content=reply.body, status_code=reply.status, media_type=reply.content_type, headers=dict(reply.headers)
    )


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": REPLICA_CPUS})
class LafamDeployment:
    """One replica: every archive loaded, every route of :mod:`engines.protocol` answered.

    Args:
        archives: ``.mar`` files or export folders, as paths on the replica's node.
        token_digest: SHA-256 (hex) of the accepted bearer token; ``None`` serves without authentication.
        metrics_dir: the multiprocess folder shared by the node's replicas; ``None``:
            :func:`handlers.metrics.default_directory` (``LAFAM_METRICS_DIR``, else one per raylet).
        metrics_address: ``host:port`` the replicas compete to serve the metrics on, or ``off``; ``None``:
            ``LAFAM_METRICS_ADDRESS`` of the replica's environment, else ``127.0.0.1:8083``.
    """

    def __init__(
        self,
        archives: list[str],
        token_digest: str | None,
        metrics_dir: str | None,
        metrics_address: str | None,
    ) -> None:
        # Metrics first: configuring drops what was recorded in memory before, and loading warms the models up.
        metrics.configure(metrics_dir, address=metrics_address)
        metrics.start_exporter()
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        loaded = load_all(list(archives), device)
        if not loaded:
            raise ValueError("no archive to serve")
        self.models = {name: protocol.Served(name, m.version, m.service) for name, m in loaded.items()}
        self.auth = auth.TokenCheck(token_digest)
        first = next(iter(loaded.values()))
        self.batch_size = first.batch_size
        self.run_batch.set_max_batch_size(first.batch_size)
        self.run_batch.set_batch_wait_timeout_s(first.max_batch_delay_s)
        self._compute = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lafam-compute")
        self._app = asgi.ProtocolApp(self.models, self.auth, self._dispatch)  # body limit, routes, errors
        given = {Path(path).absolute() for path in archives}
        self._unpacked = [m.folder for m in loaded.values() if m.folder.absolute() not in given]  # .mar → temp
        logger.info("replica %d serves %s", os.getpid(), ", ".join(sorted(self.models)))

    def __del__(self) -> None:
        """Serve calls this when it stops the replica gracefully: remove the unpacked archives."""
        compute = getattr(self, "_compute", None)
        if compute is not None:
            compute.shutdown(wait=False, cancel_futures=True)
        for folder in getattr(self, "_unpacked", []):
            shutil.rmtree(folder, ignore_errors=True)

    async def __call__(self, request: Request) -> Response:
        """Answer one HTTP request routed by Serve's proxy."""
        return _response(await self._app.respond(request.scope, request.receive))

    async def _dispatch(self, call: protocol.Call) -> protocol.HttpReply:
        if not call.requests:  # every image failed before the model
            return call.answer([])
        if len(call.requests) > self.batch_size:  # larger than a batch: runs alone, on the same thread
            return (await self._run(protocol.run_calls, self.models, [call]))[0]
        return await self.run_batch(call)

    @serve.batch(max_batch_size=DEFAULT_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S, batch_size_fn=_images)
    async def run_batch(self, calls: list[protocol.Call]) -> list[protocol.HttpReply]:
        """Run the gathered calls: one forward pass per model (set to the first archive's batching)."""
        return await self._run(protocol.run_calls, self.models, calls)

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._compute, function, *args)


def _token_digest(token_file: str | None, no_auth: bool) -> str | None:
    """The digest of ``token_file`` (else of ``LAFAM_TOKEN`` / ``LAFAM_TOKEN_FILE``); ``None`` with ``no_auth``.

    Raises:
        auth.AuthError: no token and no ``no_auth``, both, or an unusable token.
    """
    given = token_file or os.environ.get(auth.TOKEN_ENV) or os.environ.get(auth.TOKEN_FILE_ENV)
    if not given and not no_auth:
        raise auth.AuthError(
            "the Ray engine needs a token: give args.token_file (a mounted Secret), set "
            f"{auth.TOKEN_ENV} or {auth.TOKEN_FILE_ENV}, or set args.no_auth: true when the ingress authenticates"
        )
    check, _ = auth.resolve_token(token_file, no_auth=no_auth, generated_file=Path(os.devnull))
    return check.token_digest


def _archive_list(value: Any) -> list[str]:
    paths = [value] if isinstance(value, str | os.PathLike) else list(value or [])
    if not paths:
        raise ValueError("args.archives must name at least one .mar or export folder")
    return [str(Path(p).absolute()) for p in paths]


def build(args: dict[str, Any]) -> Application:
    """The application of a Serve config file or KubeRay ``RayService`` (``import_path: engines.ray_engine:build``).

    Args:
        args: ``archives`` (list of paths on every node), ``token_file`` (read here, on the node that builds
            the application; only its SHA-256 reaches the replicas), ``no_auth``, ``metrics_dir``,
            ``metrics_address``. Without ``token_file`` the token is ``LAFAM_TOKEN`` or ``LAFAM_TOKEN_FILE``.

    Raises:
        auth.AuthError: no token and no ``no_auth: true``, or an unusable token.
        ValueError: no archives, an unknown key, or a ``no_auth`` that is not a boolean.

    Serve's own settings go beside ``args`` in the config: ``route_prefix: /`` (the protocol's routes are
    absolute), and under ``deployments: [{name: LafamDeployment, ...}]`` ``num_replicas`` or
    ``autoscaling_config``, ``max_ongoing_requests`` (default 16: keep it at least the archive's
    ``batchSize``, or batches never fill) and ``ray_actor_options`` (default ``num_cpus: 0.5``).
    """
    known = {"archives", "token_file", "no_auth", "metrics_dir", "metrics_address"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown args {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    no_auth = args.get("no_auth", False)
    if not isinstance(no_auth, bool):  # a quoted "false" must not turn authentication off
        raise ValueError(f"args.no_auth must be true or false, got {no_auth!r}")  # noqa: TRY004 - a config value
    digest = _token_digest(args.get("token_file"), no_auth)
    return LafamDeployment.bind(
        _archive_list(args.get("archives")), digest, args.get("metrics_dir"), args.get("metrics_address")
    )


def application(
    archives: list[str],
    token_digest: str | None,
    metrics_dir: str | None,
    metrics_address: str | None,
    *,
    replicas: int = 1,
    max_replicas: int | None = None,
    target_ongoing_requests: float = 2.0,
) -> Application:
    """The application :func:`serve_forever` deploys: ``replicas`` replicas, or autoscaling up to ``max_replicas``."""
    if max_replicas is None:
        scaling: dict[str, Any] = {"num_replicas": replicas}
    else:
        scaling = {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                          "target_ongoing_requests": target_ongoing_requests}}  # fmt: skip
    return LafamDeployment.options(
        max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": REPLICA_CPUS}, **scaling
    ).bind(archives, token_digest, metrics_dir, metrics_address)


class _Stop(BaseException):
    """SIGINT or SIGTERM arrived."""


def serve_forever(
    archives: list[str],
    *,
    host: str,
    port: int,
    auth: auth.TokenCheck,
    replicas: int = 1,
    max_replicas: int | None = None,
    target_ongoing_requests: float = 2.0,
    address: str | None = None,
    metrics_dir: str | None = None,
    metrics_address: str | None = None,
) -> None:
    """Serve ``archives`` with Ray Serve on ``host:port`` until SIGINT or SIGTERM.

    Connects to the running cluster at ``address`` (``None``: ``auto``, the local node's), starts Serve's
    HTTP proxy there if Serve is not running yet, deploys the application and waits until it runs. On the
    signal it deletes the application, shuts Serve down if it started it, and disconnects; the cluster keeps
    running. A second signal during that ends the process at once.

    Args:
        archives: ``.mar`` files or export folders (paths on every node).
        host: the proxy's address (Serve's ``http_options``; ignored when Serve already runs).
        port: the proxy's port.
        auth: the token check; replicas receive its digest only.
        replicas: fixed replica count, or the autoscaling minimum when ``max_replicas`` is given.
        max_replicas: autoscale between ``replicas`` and this.
        target_ongoing_requests: autoscaling target per replica.
        address: the Ray cluster (``ray://...`` or ``host:port`` of the GCS); ``None``: ``auto``.
        metrics_dir: the replicas' shared metrics folder; ``None``: a new one in the temp dir, removed at exit.
        metrics_address: the exporter's ``host:port`` or ``off``; ``None``: ``LAFAM_METRICS_ADDRESS``, else
            ``127.0.0.1:8083``.

    Raises:
        FileNotFoundError: an archive does not exist.
        ArchiveError: a path is neither a ``.mar`` (zip) nor an export folder.
        ValueError: bad replica counts or metrics address.
        RuntimeError: the application failed to deploy (Serve's message).
    """
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise ValueError(f"need 1 <= replicas <= max_replicas, got {replicas} and {max_replicas}")
    paths = _archive_list(archives)
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no such archive: {', '.join(missing)}")
    for path in paths:  # here, at once: a replica that cannot load fails the deployment only after retries
        if not (zipfile.is_zipfile(path) or (Path(path) / MANIFEST_FILE).is_file()):
            raise ArchiveError(f"{path} is neither a .mar archive nor an export folder")
    exporter = metrics_address or os.environ.get("LAFAM_METRICS_ADDRESS", metrics.DEFAULT_ADDRESS)
    metrics.parse_address(exporter)  # fail here, not in every replica
    made_folder = metrics_dir is None
    folder = tempfile.mkdtemp(prefix="lafam-ray-metrics-") if metrics_dir is None else str(Path(metrics_dir).absolute())

    started_serve = False
    deployed = False
    previous: dict[int, Any] = {}

    def stop(signum: int, _frame: object) -> None:
        for sig, handler in previous.items():  # a second signal ends the process as it would have before
            signal.signal(sig, handler)
        raise _Stop(signum)

    try:
        ray.init(address=address or "auto", logging_level=logging.WARNING)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own SIGTERM handler
            previous[sig] = signal.signal(sig, stop)
        running = serve.status()
        started_serve = not (running.proxies or running.applications)
        if not started_serve:
            logger.warning("Serve already runs on this cluster: its proxy keeps its own host and port")
        serve.start(http_options={"host": host, "port": port})
        app = application(
            paths, auth.token_digest, folder, exporter,
            replicas=replicas, max_replicas=max_replicas, target_ongoing_requests=target_ongoing_requests,
        )  # fmt: skip
        deployed = True
        serve.run(app, name=APP_NAME, route_prefix="/")  # returns once the application is RUNNING
        names = ", ".join(Path(p).name for p in paths)
        described = f"{replicas} replica{'s' if replicas != 1 else ''}"
        if max_replicas is not None:
            described = f"{replicas} to {max_replicas} replicas, autoscaling"
        print(f"serving {names} with Ray Serve on http://{host}:{port} ({described})", flush=True)
        while True:
            signal.pause()  # until the handler raises
    except _Stop:
        logger.info("stopping: deleting the application %s", APP_NAME)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _tear_down(deployed=deployed, shutdown_serve=started_serve)
        if made_folder:
            shutil.rmtree(folder, ignore_errors=True)


def _tear_down(*, deployed: bool, shutdown_serve: bool) -> None:
    if not ray.is_initialized():
        return
    try:
        if shutdown_serve:
            serve.shutdown()  # deletes the application too
        elif deployed:
            serve.delete(APP_NAME)
    except Exception:  # the cluster may be gone already; disconnect anyway
        logger.exception("could not delete the Serve application %s", APP_NAME)
    finally:
        ray.shutdown()


def _main(argv: list[str] | None = None) -> None:
    """``python -m engines.ray_engine ARCHIVE... [--replicas N] ...``, until the CLI's ``--engine ray``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engines.ray_engine", description=_main.__doc__)
    parser.add_argument("archives", nargs="+")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int)
    parser.add_argument("--ray-address")
    parser.add_argument("--token-file")
    parser.add_argument("--no-auth", action="store_true")
    parser.add_argument("--metrics-dir")
    options = parser.parse_args(argv)
    auth.check_bind(options.host, allow_remote=False)
    check = auth.TokenCheck(_token_digest(options.token_file, options.no_auth))
    serve_forever(options.archives, host=options.host, port=options.port, auth=check, replicas=options.replicas,
                  max_replicas=options.max_replicas, address=options.ray_address,
                  metrics_dir=options.metrics_dir)  # fmt: skip


if __name__ == "__main__":
    # Run the importable module's copy: classes defined in __main__ would be pickled by value for the replicas.
    import importlib

    importlib.import_module("engines.ray_engine")._main()
