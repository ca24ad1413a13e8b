"""One bearer token for every replica of an engine, and the loopback rule for binding.

TorchServe makes a random key per process, so a client's key opens one replica only. The KServe and Ray
engines take one token instead, from a file (``--token-file``, a mounted Kubernetes Secret) or the
environment (``LAFAM_TOKEN``, or ``LAFAM_TOKEN_FILE`` naming a file), and every replica accepts it. Replicas
hold its SHA-256 only, compared in constant time, so the token itself is never written into Ray's object
store or a log. With no token given the command makes one and writes it, owner-readable only, to a file it
names (as TorchServe's ``key_file.json``); ``--no-auth`` serves without one, for when the ingress
authenticates.

Health routes (``/ping``, ``/v2/health/*``, ``/v1/models/{name}``) stay open for the orchestrator's probes;
every inference route needs ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "LAFAM_TOKEN"  # noqa: S105 - the variable's name
TOKEN_FILE_ENV = "LAFAM_TOKEN_FILE"  # noqa: S105 - the variable's name
MIN_TOKEN_CHARACTERS = 16


class AuthError(ValueError):
    """The token configuration is unusable (empty or short token, unreadable file)."""


class BindError(ValueError):
    """A server was asked to listen beyond loopback without ``--allow-remote``."""


def digest(token: str) -> str:
    """The hex SHA-256 of a token: what replicas keep and compare."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenCheck:
    """Checks the ``Authorization`` header of a request against one token's digest.

    Attributes:
        token_digest: hex SHA-256 of the accepted token; ``None`` serves without authentication.
    """

    token_digest: str | None

    @property
    def enabled(self) -> bool:
        """Whether requests need the token."""
        return self.token_digest is not None

    def allows(self, headers: Mapping[str, str]) -> bool:
        """Whether ``headers`` (names lower-cased) carry ``Authorization: Bearer <the token>``."""
        if self.token_digest is None:
            return True
        scheme, _, presented = str(headers.get("authorization", "")).strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return False
        return hmac.compare_digest(digest(presented.strip()), self.token_digest)


def read_token(path: str | Path) -> str:
    """Read a token file (surrounding whitespace ignored).

    Raises:
        AuthError: the file cannot be read, or holds fewer than :data:`MIN_TOKEN_CHARACTERS` characters.
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthError(f"cannot read the token file {path}: {exc}") from exc
    return _checked(token, f"the token file {path}")


def _checked(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_CHARACTERS or any(ch.isspace() for ch in token):
        raise AuthError(f"{where} must hold one token of at least {MIN_TOKEN_CHARACTERS} characters, no spaces")
    return token


def resolve_token(
    token_file: str | Path | None, *, no_auth: bool, generated_file: Path, environ: Mapping[str, str] | None = None
) -> tuple[TokenCheck, str | None]:
    """Decide the engine's token: ``--token-file``, else ``LAFAM_TOKEN``, else ``LAFAM_TOKEN_FILE``, else a new one.

    Args:
        token_file: ``--token-file``.
        no_auth: ``--no-auth``: serve without a token (the ingress authenticates).
        generated_file: where a generated token is written (mode 0600).
        environ: the environment (default ``os.environ``).

    Returns:
        The check, and a line telling the operator where the token came from.

    Raises:
        AuthError: a token and ``--no-auth`` were both given, or the token is unusable.
    """
    env = os.environ if environ is None else environ
    given = token_file or env.get(TOKEN_ENV) or env.get(TOKEN_FILE_ENV)
    if no_auth:
        if given:
            raise AuthError(f"--no-auth and a token (--token-file, {TOKEN_ENV} or {TOKEN_FILE_ENV}) were both given")
        return TokenCheck(None), "authentication is off (--no-auth): authenticate at the ingress"
    if token_file:
        return TokenCheck(digest(read_token(token_file))), f"token from {token_file}"
    if env.get(TOKEN_ENV):
        return TokenCheck(digest(_checked(env[TOKEN_ENV].strip(), TOKEN_ENV))), f"token from ${TOKEN_ENV}"
    if env.get(TOKEN_FILE_ENV):
        path = env[TOKEN_FILE_ENV]
        return TokenCheck(digest(read_token(path))), f"token from {path} (${TOKEN_FILE_ENV})"
    token = secrets.token_urlsafe(32)
    generated_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(generated_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    return TokenCheck(digest(token)), f"generated a token into {generated_file} (send Authorization: Bearer <it>)"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) resolves to loopback addresses only."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_bind(host: str, *, allow_remote: bool, what: str = "the server") -> None:
    """Refuse a non-loopback ``host`` unless ``--allow-remote`` was given.

    Raises:
        BindError: ``host`` is not loopback and ``allow_remote`` is false.
    """
    if not allow_remote and not is_loopback(host):
        raise BindError(
            f"{what} would listen on {host}, beyond loopback: pass --allow-remote to do that on purpose "
            "(and keep authentication on, or authenticate at the ingress)"
        )
