"""The demo model exported with its eager model: what the explanation tests serve (one definition)."""

from __future__ import annotations

from pathlib import Path

import demo
from demo.run import EXPORT_OPTIONS, MODEL_NAME, SPEC
from export.exporter import export_model

DEMO = Path(demo.__file__).parent
"""The demo package's folder (labels, weights, the model's source)."""


def export_demo(folder: Path, backend: str = "torchscript") -> Path:
    """Export the shipped demo CNN (128×128, ``block3``, any input size) with its eager model; the backend's folder.

    The export of ``lafam-serve demo`` (:data:`demo.run.EXPORT_OPTIONS`), without the archive.
    """
    folders = export_model(SPEC, folder, backends=(backend,), name=MODEL_NAME, log=lambda _: None, **EXPORT_OPTIONS)
    return folders[backend]
