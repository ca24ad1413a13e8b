"""Export and archive in one call: a model spec in, a served ``.mar`` out (what the demo and benchmarks build)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from export.archive import build_archive
from export.exporter import export_model

logger = logging.getLogger(__name__)


def export_and_archive(
    spec: str,
    out_dir: str | Path,
    model_store: str | Path,
    *,
    backend: str = "onnx",
    name: str | None = None,
    archive_name: str | None = None,
    config: Mapping[str, Any] | None = None,
    log: Callable[[str], None] = logger.info,
    **export_options: Any,
) -> Path:
    """Export ``spec`` to one verified graph (:func:`~export.exporter.export_model`), then archive it.

    Args:
        spec: torchvision model name or ``package.module:factory``.
        out_dir: parent of the export folder; the graph and its manifest go to ``out_dir/<backend>/``.
        model_store: where the archive goes (created if missing).
        backend: ``onnx`` or ``torchscript``.
        name: the model's name (manifest, metrics); defaults to the spec's last component.
        archive_name: the archive's name in TorchServe, ``<model_store>/<archive_name>.mar`` (default ``name``,
            else the manifest's name).
        config: the archive's model-config content (default :func:`export.archive.model_config`).
        log: receives progress lines of both steps.
        **export_options: the other keyword arguments of :func:`export.exporter.export_model` (``weights``,
            ``labels``, ``input_size``, ``mean``, ``std``, ``eager``, ``dynamic_size``, ...).

    Returns:
        The path of the ``.mar``. The archive packs the eager model when the export has one (``eager=True``).

    Raises:
        ExportError, ModelSpecError, VerificationError: from the export (nothing is archived).
        ArchiveError: the export folder cannot be archived.
    """
    folders = export_model(spec, out_dir, backends=(backend,), name=name, log=log, **export_options)
    return build_archive(folders[backend], model_store, name=archive_name or name, config=config, log=log)
