"""The demo model exported with its eager model: what the explanation tests serve (one definition)."""

from __future__ import annotations

from pathlib import Path

import demo
from export.exporter import export_model

DEMO = Path(demo.__file__).parent


def export_demo(folder: Path, backend: str = "torchscript") -> Path:
    """Export the shipped demo CNN (128×128, ``block3``, any input size) with its eager model; the backend's folder."""
    folders = export_model(
        "demo.model:shapes_cnn",
        folder,
        backends=(backend,),
        weights=DEMO / "weights" / "shapes_cnn.pt",
        labels=DEMO / "labels.txt",
        input_size=(128, 128),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        name="shapes",
        eager=True,
        dynamic_size=True,
        log=lambda _: None,
    )
    return folders[backend]
