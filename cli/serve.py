"""``lafam-serve serve ARCHIVE... --engine torchserve|kserve|ray``: serve archives until stopped.

``torchserve`` (the default) runs TorchServe with the shipped config.properties on the chosen port;
``kserve`` runs KServe's model server (:mod:`engines.kserve_engine`, ``[kserve]`` extra); ``ray`` deploys Ray
Serve replicas on a running Ray cluster (:mod:`engines.ray_engine`, ``[ray]`` extra). Every engine listens on
loopback unless ``--allow-remote`` is given with another ``--host``, and the exporter of the ``lafam_*``
metrics (``LAFAM_METRICS_ADDRESS``) follows the same rule.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("torchserve", "kserve", "ray")
EXIT_CODES = """exit status: 0 stopped by SIGINT/SIGTERM; 1 an archive or the engine failed; 2 bad arguments
(a non-loopback --host without --allow-remote, a token and --no-auth together, an engine's extra missing)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's arguments."""
    parser.add_argument("archives", nargs="+", type=Path, metavar="ARCHIVE", help=".mar files or export folders")
    parser.add_argument("--engine", choices=ENGINES, default="torchserve", help="default: torchserve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a --host (or LAFAM_METRICS_ADDRESS) beyond loopback"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help="kserve/ray: file holding the one bearer token every replica accepts (else $LAFAM_TOKEN, "
        "$LAFAM_TOKEN_FILE, or a generated one written to --workdir/token)",
    )
    parser.add_argument("--no-auth", action="store_true", help="serve without a token (the ingress authenticates)")
    parser.add_argument("--workdir", type=Path, help="logs, generated token, TorchServe's files (default: a temp dir)")
    parser.add_argument("--replicas", type=int, default=1, help="ray: replicas (the minimum with --max-replicas)")
    parser.add_argument("--max-replicas", type=int, help="ray: autoscale on ongoing requests up to this many")
    parser.add_argument("--ray-address", help="ray: the cluster to deploy on (default: auto, a running `ray start`)")
    parser.add_argument("--device", default="cpu", help="kserve: cpu or cuda:N (default cpu)")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit status."""
    from engines.auth import AuthError, BindError, check_bind, resolve_token
    from handlers.metrics import DEFAULT_ADDRESS, parse_address

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lafam-serve-"))
    try:
        check_bind(args.host, allow_remote=args.allow_remote)
        exporter = parse_address(os.environ.get("LAFAM_METRICS_ADDRESS", DEFAULT_ADDRESS))
        if exporter is not None:
            check_bind(exporter[0], allow_remote=args.allow_remote, what="the metrics exporter (LAFAM_METRICS_ADDRESS)")
        _check_engine_arguments(args)
        auth, origin = None, "TorchServe's own keys (key_file.json)"
        if args.engine != "torchserve":
            auth, origin = resolve_token(args.token_file, no_auth=args.no_auth, generated_file=workdir / "token")
    except (AuthError, BindError, ValueError) as exc:
        print(f"lafam-serve serve: error: {exc}", file=sys.stderr)
        return 2
    print(f"lafam-serve serve: {origin}", flush=True)
    archives = [str(path) for path in args.archives]
    try:
        if auth is None:
            return _torchserve(args, workdir, exporter)
        if args.engine == "kserve":
            from engines import kserve_engine

            kserve_engine.serve_forever(archives, host=args.host, port=args.port, auth=auth, device=args.device)
        else:
            from engines import ray_engine

            ray_engine.serve_forever(
                archives,
                host=args.host,
                port=args.port,
                auth=auth,
                replicas=args.replicas,
                max_replicas=args.max_replicas,
                address=args.ray_address,
            )
    except ModuleNotFoundError as exc:
        extra = "kserve" if args.engine == "kserve" else "ray"
        print(f"lafam-serve serve: error: {exc}: pip install 'lafam-serve[{extra}]'", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as exc:  # an archive, the cluster, the port, TorchServe's start
        print(f"lafam-serve serve: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_engine_arguments(args: argparse.Namespace) -> None:
    from engines.auth import AuthError

    if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
        raise ValueError("--replicas must be >= 1 and --max-replicas >= --replicas")
    if args.engine == "torchserve" and args.token_file:
        raise AuthError(
            "TorchServe makes its own key per process (key_file.json) and cannot take --token-file: "
            "use --engine kserve or ray for one shared token"
        )


def _torchserve(args: argparse.Namespace, workdir: Path, exporter: tuple[str, int] | None) -> int:
    from serving.torchserve import TorchServe, free_port

    store = workdir / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    names = []
    for archive in args.archives:
        if archive.suffix != ".mar" or not archive.is_file():
            raise ValueError(f"--engine torchserve serves .mar files; {archive} is not one (lafam-serve archive)")
        (store / archive.name).unlink(missing_ok=True)
        (store / archive.name).symlink_to(archive.resolve())
        names.append(archive.stem)
    config = {"inference_address": f"http://{args.host}:{args.port}"}
    if args.no_auth:
        config["disable_token_authorization"] = "true"  # noqa: S105 - a setting's name, not a password
    ports = {name: free_port() for name in ("management", "metrics", "grpc_inference", "grpc_management")}
    ports |= {"inference": args.port, "lafam_metrics": exporter[1] if exporter else free_port()}
    server = TorchServe(store, names, workdir=workdir / "torchserve", ports=ports, config=config)
    stop = False

    def request_stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server.start()
    try:
        keys = "" if args.no_auth else f"; keys in {server.workdir / 'key_file.json'}"
        print(f"serving {', '.join(names)} with TorchServe on http://{args.host}:{args.port}{keys}", flush=True)
        while not stop and server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()
    return 0
