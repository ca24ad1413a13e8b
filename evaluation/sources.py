"""Where explanations come from during an evaluation: a running server (REST) or a local archive.

Both answer :meth:`Source.explain` with the response body the server sends for
``POST /explanations/{model}``, so the evaluation measures exactly what clients get. The local source runs
the same serving code in process (:class:`handlers.service.LafamService`) on an extracted ``.mar`` or
export folder, and also exposes the eager model for the sanity check.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from PIL import Image

from handlers.manifest import Manifest
from handlers.service import LafamService, Request


class SourceError(RuntimeError):
    """A request the evaluation sent was refused; the message holds the server's error."""


class Source(Protocol):
    """What the evaluation needs from a model server."""

    name: str

    def explain(self, image: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
        """The ``/explanations`` response body for an ``(H, W, 3)`` uint8 image and these options."""
        ...


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 image as PNG (lossless: the server sees exactly these pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class LocalSource:
    """An archive (``.mar``) or export folder served in process by the project's serving code.

    Args:
        path: a ``.mar`` file or a folder holding ``lafam.json``.
        config: the model config's ``lafam`` section (e.g. ``{"max_classes": 10}``); default: the archive's
            own (its ``model-config.yaml``, as TorchServe reads it), none for an export folder.
        device: ``cpu`` or ``cuda:<index>``.
    """

    def __init__(
        self, path: str | Path, config: dict[str, Any] | None = None, device: torch.device | str = "cpu"
    ) -> None:
        path = Path(path)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if path.suffix == ".mar":
            self._tmp = tempfile.TemporaryDirectory(prefix="lafam-eval-")
            with zipfile.ZipFile(path) as archive:
                archive.extractall(self._tmp.name)
            path = Path(self._tmp.name)
            if config is None:
                config = archive_config(path)
        self.folder = path
        self.service = LafamService.from_folder(path, device, config)
        self.manifest: Manifest = self.service.manifest
        self.name = self.manifest.name

    def explain(self, image: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
        """Answer as the server would (see :class:`Source`)."""
        body = {"image": base64.b64encode(png_bytes(image)).decode("ascii"), "options": options}
        (reply,) = self.service.predict(
            [Request(parameters={"body": body}, headers={}, content_types={}, explain=True)]
        )
        if reply.status != 200:
            raise SourceError(f"{self.name}: {reply.status} {reply.body.get('error')}")
        return reply.body


def archive_config(folder: Path) -> dict[str, Any] | None:
    """The ``lafam`` section of an extracted archive's model config (``MAR-INF/MANIFEST.json`` names it)."""
    manifest = folder / "MAR-INF" / "MANIFEST.json"
    name = json.loads(manifest.read_text()).get("model", {}).get("configFile") if manifest.is_file() else None
    if not name or not (folder / name).is_file():
        return None
    config = yaml.safe_load((folder / name).read_text()) or {}
    return config.get("lafam") if isinstance(config, dict) else None


class RestSource:
    """A running TorchServe serving the model, reached over its inference API with a token.

    Args:
        url: inference API root, e.g. ``http://127.0.0.1:8080``.
        model: the model name.
        token: the inference key (``key_file.json``'s ``inference.key``), or ``None`` with token auth off.
        timeout: seconds per request.
    """

    def __init__(self, url: str, model: str, token: str | None, timeout: float = 120.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url={url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.name = model
        self.token = token
        self.timeout = timeout

    def explain(self, image: np.ndarray, options: dict[str, Any]) -> dict[str, Any]:
        """POST the image as JSON to ``/explanations/{model}`` (see :class:`Source`)."""
        payload = {"image": base64.b64encode(png_bytes(image)).decode("ascii"), "options": options}
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked to be http(s) in __init__
            f"{self.url}/explanations/{self.name}", json.dumps(payload).encode(), headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - see above
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise SourceError(f"{self.name}: {error.code} {error.read()[:500]!r}") from error


def read_token(key_file: str | Path) -> str:
    """The inference key from TorchServe's ``key_file.json``."""
    return str(json.loads(Path(key_file).read_text())["inference"]["key"])
