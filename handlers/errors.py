"""Error types and their HTTP mapping, in one place.

Every failure a client can cause is a :class:`ServeError` subclass carrying a stable machine-readable
``code``; :func:`to_response` turns any exception into ``(status, body)`` so that the handler never lets
an exception escape to TorchServe (which would answer 500 for the whole batch and may restart the
worker).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class ServeError(Exception):
    """Base class of the errors a request can cause.

    Attributes:
        status: HTTP status code sent back.
        code: stable machine-readable error code, also the ``code`` label of the error counter.
    """

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        """Return the JSON body ``{"error": {"code", "message", ...details}}``."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        error.update(self.details)
        return {"error": error}


class EmptyBody(ServeError):
    """The request carried no bytes."""

    code = "empty_body"


class InvalidImage(ServeError):
    """The bytes are not a decodable image (unknown format, truncated, corrupt)."""

    code = "invalid_image"


class ImageTooLarge(ServeError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""

    status = 413
    code = "image_too_large"


class PayloadTooLarge(ServeError):
    """The request body is larger than the configured limit."""

    status = 413
    code = "payload_too_large"


class InvalidJSON(ServeError):
    """A JSON body that cannot be parsed or misses the ``image`` field."""

    code = "invalid_json"


class InvalidOption(ServeError):
    """An unknown, ill-typed or out-of-range request option."""

    code = "invalid_option"


class UnsupportedMediaType(ServeError):
    """A Content-Type the handler does not accept."""

    status = 415
    code = "unsupported_media_type"


class InternalError(ServeError):
    """An unexpected failure inside the handler; the request fails alone, the worker survives."""

    status = 500
    code = "internal_error"


SHOWN_CHARACTERS = 80
"""How much of a client's value an error message repeats."""


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, cut to :data:`SHOWN_CHARACTERS` characters.

    A 5000-character header is not echoed back whole.
    """
    text = repr(value)
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return f"{text[: SHOWN_CHARACTERS - 1]}… ({len(text)} characters)"


def to_response(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """Map any exception to an HTTP status and a JSON error body.

    Args:
        exc: the exception raised while serving one request.

    Returns:
        ``(status, body)``; unexpected exceptions become a 500 ``internal_error`` whose message names
        the exception type only (no stack trace or internals leak to the client).
    """
    if isinstance(exc, ServeError):
        return exc.status, exc.body()
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return 500, InternalError(f"internal error ({type(exc).__name__})").body()
