"""``lafam-serve explain``: the server's ``/explanations`` answer for image files, without a server.

The archive (``.mar``) or export folder is loaded by :class:`evaluation.sources.LocalSource` (as the eval
command does) and every image is sent, one request each, through the same
:meth:`handlers.service.LafamService.predict` a TorchServe worker runs, with the request options given as
flags (generated from :data:`handlers.options.OPTION_NAMES`, so a new option is a new flag). What is
printed (or written with ``--out``) is exactly the JSON the server answers: one object per image, a list
when there are several; a failed image is its error object ``{"error": {"code", "message", ...}}``.
"""

from __future__ import annotations

import argparse
import base64
import inspect
import io
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from handlers.errors import ServeError, to_response
from handlers.manifest import MANIFEST_FILE
from handlers.options import HEADER_PREFIX, OPTION_NAMES, RequestOptions
from handlers.service import Reply, Request

CLI_FLAGS = ("out", "overlay", "device")
"""The command's own flags; every other flag is a request option."""

EXIT_CODES = """exit status:
  0  every image was explained
  2  a client error (HTTP 4xx): a bad option, a bad or missing image file, or a bad command line
  1  anything else: the model could not be loaded, or a server error (HTTP 5xx)"""


class FileMissing(ServeError):
    """An image or archive path that does not exist (the offline counterpart of a request that never came)."""

    status = 404
    code = "file_not_found"


class ModelUnavailable(ServeError):
    """The archive or export folder cannot be loaded."""

    status = 503
    code = "model_unavailable"


def option_help() -> dict[str, str]:
    """Each request option's description, from the ``Attributes`` section of :class:`RequestOptions`."""
    doc = inspect.getdoc(RequestOptions) or ""
    section = doc.partition("Attributes:")[2]
    found: dict[str, list[str]] = {}
    current = None
    for line in section.splitlines():
        match = re.match(r"^\s{4}(\w+): (.*)$", line)
        if match and match.group(1) in OPTION_NAMES:
            current = match.group(1)
            found[current] = [match.group(2)]
        elif current and line.strip():
            found[current].append(line.strip())
    return {name: " ".join(parts).replace("``", "").replace("%", "%%") for name, parts in found.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments: the model, the images, one flag per request option, and its own flags."""
    parser.add_argument(
        "model", type=Path, metavar="ARCHIVE_OR_EXPORT_DIR", help="a .mar archive or an export folder (lafam.json)"
    )
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files")
    options = parser.add_argument_group(
        "request options", "as X-LaFAM-<Option> headers or JSON 'options' (README: Request, Explanations)"
    )
    helps = option_help()
    for name in OPTION_NAMES:
        if name in CLI_FLAGS:
            raise ValueError(f"request option {name!r} collides with the explain command's own --{name}")
        options.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="VALUE", help=helps.get(name))
    parser.add_argument("--out", type=Path, help="write the JSON to this file instead of printing it")
    parser.add_argument(
        "--overlay",
        type=Path,
        metavar="DIR",
        help="write one overlay PNG per image (per class for class methods) into DIR; signed maps show their "
        "positive evidence",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda:<index>")


def resolve_model(path: Path) -> Path:
    """A ``.mar``, a backend folder holding ``lafam.json``, or an export folder with exactly one backend folder.

    Raises:
        FileMissing: nothing at ``path``.
        ModelUnavailable: a folder without a manifest, or with several backend folders.
    """
    if not path.exists():
        raise FileMissing(f"no archive or export folder at {str(path)!r}", path=str(path))
    if path.is_file() or (path / MANIFEST_FILE).is_file():
        return path
    found = sorted(p.parent for p in path.glob(f"*/{MANIFEST_FILE}"))
    if len(found) == 1:
        return found[0]
    where = f"several: {', '.join(str(p) for p in found)}; pick one" if found else f"no {MANIFEST_FILE} in it"
    raise ModelUnavailable(f"{path} is not an export folder ({where})", path=str(path))


def run(args: argparse.Namespace) -> int:
    """Explain every image; print or write the JSON; return the exit status (see :data:`EXIT_CODES`)."""
    from evaluation.sources import LocalSource

    headers = {f"{HEADER_PREFIX}{name}": value for name in OPTION_NAMES if (value := getattr(args, name)) is not None}
    try:
        source = LocalSource(resolve_model(args.model), device=args.device)
    except ServeError as exc:
        return _emit([exc.body()], [exc.status], args.out, single=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported as the model's error JSON
        error = ModelUnavailable(f"cannot load {args.model}: {exc}", path=str(args.model))
        return _emit([error.body()], [error.status], args.out, single=True)
    bodies, statuses = [], []
    written: set[Path] = set()
    for path in tqdm(args.images, desc="explain", unit="image", disable=len(args.images) < 2, file=sys.stderr):
        reply = _explain(source, path, headers)
        bodies.append(reply.body)
        statuses.append(reply.status)
        if args.overlay is not None and reply.status == 200:
            written.update(write_overlays(path, reply.body, args.overlay, taken=written))
    return _emit(bodies, statuses, args.out, single=len(args.images) == 1)


def _explain(source: Any, path: Path, headers: dict[str, str]) -> Reply:
    if not path.is_file():
        status, body = to_response(FileMissing(f"no image file at {str(path)!r}", path=str(path)))
        return Reply(status, body)
    request = Request(parameters={"body": path.read_bytes()}, headers=headers, content_types={}, explain=True)
    (reply,) = source.service.predict([request])
    return reply


def _emit(bodies: list[dict[str, Any]], statuses: list[int], out: Path | None, *, single: bool) -> int:
    """Print or write the JSON as the server sends it (compact); return the exit status."""
    text = json.dumps(bodies[0] if single else bodies, separators=(",", ":"))
    if out is None:
        sys.stdout.write(text + "\n")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if any(status >= 500 for status in statuses):
        return 1
    return 2 if any(status >= 400 for status in statuses) else 0


def heatmaps(explanation: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """``(name suffix, (h, w) map in [0, 1])`` per map of an ``explanation`` object (png or array).

    A signed map (``"scale": "signed"``) is shown by its positive evidence, values in [0, 1] of ``max_abs``.
    """
    signed = explanation.get("scale") == "signed"
    method = explanation["method"]
    entries = (
        [(f"{method}_class{c['index']}-{_safe(str(c['label']))}", c) for c in explanation["classes"]]
        if "classes" in explanation
        else [(method, explanation)]
    )
    out = []
    for suffix, entry in entries:
        if explanation["format"] == "png":
            values = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["data"]))), dtype=np.float64) / 255.0
            values = 2.0 * values - 1.0 if signed else values
        else:
            values = np.asarray(entry["data"], dtype=np.float64)
        out.append((suffix, np.clip(values, 0.0, 1.0)))
    return out


def write_overlays(
    image_path: Path, body: dict[str, Any], folder: Path, *, taken: set[Path] | frozenset[Path] = frozenset()
) -> list[Path]:
    """Write ``<stem>_<method>[_class<i>-<label>].png`` overlays (:func:`scenes.overlay.overlay`) into ``folder``.

    Each is the image beside the image with the map in colour. A name in ``taken`` (written earlier in the
    same run, e.g. by another image with the same stem) gets a ``-2``, ``-3``… suffix; older files are
    overwritten. Nothing is written for an answer without an explanation (``format=none``).
    """
    from scenes.overlay import overlay

    explanation = body.get("explanation")
    if not explanation:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(image_path) as opened:
        picture = ImageOps.exif_transpose(opened).convert("RGB")  # as the server decodes it
    written = []
    for suffix, heatmap in heatmaps(explanation):
        target = _unique(folder / f"{image_path.stem}_{suffix}.png", {*taken, *written})
        overlay(picture, heatmap).save(target)
        written.append(target)
    return written


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "class"


def _unique(path: Path, taken: set[Path]) -> Path:
    candidate, number = path, 1
    while candidate in taken:
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate
