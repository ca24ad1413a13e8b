"""``lafam-serve demo``: export → archive → serve → query → overlays → metrics → stop, in one command."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from demo import model as demo_model
from export.pipeline import export_and_archive
from scenes.overlay import montage, overlay
from scenes.synthetic import save_samples
from serving.torchserve import TorchServe

DEMO_DIR = Path(__file__).resolve().parent
WEIGHTS = DEMO_DIR / "weights" / "shapes_cnn.pt"
LABELS = DEMO_DIR / "labels.txt"
MODEL_NAME = "shapes"
SPEC = "demo.model:shapes_cnn"
EXPORT_OPTIONS: dict[str, Any] = {
    "weights": WEIGHTS,
    "labels": LABELS,
    "input_size": demo_model.INPUT_SIZE,
    "mean": demo_model.MEAN,
    "std": demo_model.STD,
    "eager": True,
    "dynamic_size": True,
}
"""How the demo CNN is exported (keyword arguments of :func:`export.exporter.export_model` besides the spec,
folder, backends and name): shipped weights and labels, 128-pixel scale, eager model, any input size."""


def build_demo_archive(
    out: Path,
    model_store: Path,
    backend: str = "onnx",
    name: str = MODEL_NAME,
    log: Callable[[str], None] = print,
) -> Path:
    """Export the demo CNN (``block3`` activations, eager model too) into ``<model_store>/<name>.mar``.

    The graph takes any input size (``dynamic_size``): ShapesCNN is fully convolutional with global average
    pooling, so a request may ask for ``resize=none`` and be run at its own size (the 128-pixel training scale
    is the default, ``resize=model``).
    """
    return export_and_archive(
        SPEC, out / "export" / name, model_store, backend=backend, name=name, log=log, **EXPORT_OPTIONS
    )


def post_image(server: TorchServe, path: Path, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """POST an image file to ``/predictions/shapes`` with the inference token; return status and JSON."""
    request = urllib.request.Request(  # noqa: S310 - loopback URL built here
        f"{server.url()}/predictions/{MODEL_NAME}",
        data=path.read_bytes(),
        method="POST",
        headers={"Authorization": f"Bearer {server.token()}", "Content-Type": "image/png", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _shorten(body: dict[str, Any]) -> dict[str, Any]:
    explanation = body.get("explanation")
    if isinstance(explanation, dict) and isinstance(explanation.get("data"), str):
        data = explanation["data"]
        body = {**body, "explanation": {**explanation, "data": f"{data[:24]}... ({len(data)} base64 chars)"}}
    return body


def run_demo(out: Path = Path("out"), model_store: Path = Path("model_store"), samples: int = 6) -> None:
    """Run the whole demo; the server is always stopped at the end."""
    out.mkdir(parents=True, exist_ok=True)
    print("== 1. export the demo model with its last conv stage as an extra output, verify, archive")
    archive = build_demo_archive(out, model_store)
    print(f"== 2. sample scenes from the project's generator → {out / 'samples'}")
    sample_dir = out / "samples"
    save_samples(sample_dir, samples, seed=2026)
    index = json.loads((sample_dir / "index.json").read_text())
    images = [sample_dir / sample["image"] for sample in index["samples"]]
    print(f"== 3. start TorchServe with config.properties (token auth on), model store {archive.parent}")
    server = TorchServe(model_store, [MODEL_NAME], workdir=out / "torchserve", ports=TorchServe.configured_ports())
    started = time.monotonic()
    server.start()
    try:
        print(f"   ready in {time.monotonic() - started:.1f} s; inference key read from {server.workdir}/key_file.json")
        key_file = server.workdir / "key_file.json"
        print(f"""   while it runs, from a shell:
     TOKEN=$(python -c 'import json; print(json.load(open("{key_file}"))["inference"]["key"])')
     curl -H "Authorization: Bearer $TOKEN" -T {images[0]} {server.url()}/predictions/{MODEL_NAME}""")
        print("== 4. predictions + LaFAM maps (overlays → out/overlays/)")
        overlay_dir = out / "overlays"
        overlay_dir.mkdir(parents=True, exist_ok=True)
        panels = []
        for path in images:
            status, body = post_image(server, path, {"X-LaFAM-Size": "original"})
            print(f"-- {path.name}: HTTP {status}")
            print(json.dumps(_shorten(body), indent=1))
            if status == 200 and body.get("explanation"):
                heatmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["explanation"]["data"]))))
                target = overlay_dir / f"{path.stem}_lafam.png"
                panels.append(overlay(Image.open(path), heatmap / 255.0))
                panels[-1].save(target)
                print(f"   overlay → {target}")
        if panels:
            montage(panels).save(overlay_dir / "montage.png")
            print(f"   all overlays → {overlay_dir / 'montage.png'}")
        status, body = post_image(server, images[0], {"X-LaFAM-Top-K": "100"})
        print(f"-- a bad option is a 400 naming it: HTTP {status} {json.dumps(body)}")
        print(f"== 5. explanation metrics from {server.url('lafam_metrics')}/metrics")
        with urllib.request.urlopen(server.url("lafam_metrics") + "/metrics", timeout=10) as response:  # noqa: S310
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(("lafam_explanation_seconds", "lafam_explanations_total", "lafam_errors_total")):
                print("  ", line)
    finally:
        print("== 6. stop TorchServe (waiting until its ports are closed)")
        server.stop()
    print("done.")
