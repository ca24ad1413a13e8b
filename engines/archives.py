"""Load a ``.mar`` or an export folder into a :class:`handlers.service.LafamService`, as TorchServe would.

A ``.mar`` is a zip: ``MAR-INF/MANIFEST.json`` names the model and its model-config YAML, whose TorchServe
keys give the batching (``batchSize``, ``maxBatchDelay``) and whose ``lafam`` section the service's
per-deployment settings. It is unpacked into a private folder (the eager model's code runs from there, as in
a TorchServe worker). An export folder (``lafam.json`` and the graph) is served as it is, with TorchServe's
defaults for what only an archive's config says.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from handlers.manifest import MANIFEST_FILE, Manifest
from handlers.service import LafamService

MAR_MANIFEST = "MAR-INF/MANIFEST.json"
DEFAULT_BATCH_SIZE = 8
DEFAULT_BATCH_DELAY_MS = 10


class ArchiveError(ValueError):
    """The path is neither a readable ``.mar`` nor an export folder."""


@dataclass(frozen=True)
class LoadedModel:
    """One served model.

    Attributes:
        name: the model's name in URLs (the archive's ``modelName``, or the manifest's name).
        version: the archive's ``modelVersion`` (``"1"`` for an export folder).
        service: the serving pipeline.
        batch_size: most requests run in one forward pass (the archive's ``batchSize``).
        max_batch_delay_s: longest wait to fill a batch (the archive's ``maxBatchDelay``, in seconds).
        folder: where the model's files are (the unpacked archive).
    """

    name: str
    version: str
    service: LafamService
    batch_size: int
    max_batch_delay_s: float
    folder: Path


@dataclass(frozen=True)
class Unpacked:
    """What an archive or export folder says before anything is loaded."""

    name: str
    version: str
    folder: Path
    config: dict[str, Any]


def unpack(path: str | Path, workdir: str | Path | None = None) -> Unpacked:
    """Unpack a ``.mar`` into ``workdir`` (a new temporary folder when ``None``), or read an export folder.

    Raises:
        ArchiveError: not a ``.mar`` or export folder, a member that would land outside the folder, or an
            unreadable manifest / config.
    """
    source = Path(path)
    if source.is_dir():
        if not (source / MANIFEST_FILE).is_file():
            raise ArchiveError(f"{source} is a folder without {MANIFEST_FILE}: not an export folder")
        return Unpacked(Manifest.load(source).name, "1", source, {})
    if not zipfile.is_zipfile(source):
        raise ArchiveError(f"{source} is neither a .mar archive nor an export folder")
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"lafam-{source.stem}-", dir=workdir))
    with zipfile.ZipFile(source) as archive:
        for member in archive.namelist():
            parts = PurePosixPath(member).parts
            if PurePosixPath(member).is_absolute() or ".." in parts:
                shutil.rmtree(target, ignore_errors=True)
                raise ArchiveError(f"{source}: member {member!r} would be written outside the archive's folder")
        archive.extractall(target)
    try:
        mar = json.loads((target / MAR_MANIFEST).read_text())["model"]
        config_file = mar.get("configFile")
        config = yaml.safe_load((target / config_file).read_text()) if config_file else {}
    except (OSError, KeyError, ValueError, yaml.YAMLError) as exc:
        raise ArchiveError(f"{source}: cannot read {MAR_MANIFEST} or its model config: {exc}") from exc
    return Unpacked(str(mar["modelName"]), str(mar.get("modelVersion") or "1"), target, dict(config or {}))


def load(path: str | Path, device: torch.device | str = "cpu", workdir: str | Path | None = None) -> LoadedModel:
    """Load one archive or export folder onto ``device``, warmed up, with the archive's batching settings.

    A ``.mar`` is unpacked into ``workdir`` (a new temporary folder when ``None``), which the caller removes.

    Raises:
        ArchiveError: see :func:`unpack`.
        ValueError: the model config's ``lafam`` section is invalid (as at a TorchServe worker's start).
    """
    unpacked = unpack(path, workdir)
    config = unpacked.config
    service = LafamService.from_folder(unpacked.folder, device, config.get("lafam") or {})  # warms it up
    return LoadedModel(
        name=unpacked.name,
        version=unpacked.version,
        service=service,
        batch_size=max(1, int(config.get("batchSize", DEFAULT_BATCH_SIZE))),
        max_batch_delay_s=max(0, int(config.get("maxBatchDelay", DEFAULT_BATCH_DELAY_MS))) / 1000,
        folder=unpacked.folder,
    )


def load_all(
    paths: list[str | Path], device: torch.device | str = "cpu", workdir: str | Path | None = None
) -> dict[str, LoadedModel]:
    """Load every archive (``.mar`` files unpacked into ``workdir``, see :func:`load`); their names must differ.

    Raises:
        ArchiveError: two archives serve the same name, or see :func:`load`.
    """
    models: dict[str, LoadedModel] = {}
    for path in paths:
        model = load(path, device, workdir)
        if model.name in models:
            raise ArchiveError(f"two archives serve the model name {model.name!r}: {path}")
        models[model.name] = model
    return models
