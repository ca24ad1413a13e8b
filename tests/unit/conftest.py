"""Tiny seeded models exported by hand (independent of ``export``) and a stand-in TorchServe context."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from handlers.manifest import LayerSpec, Manifest, sha256_file

INPUT = (32, 40)  # (H, W): not square, so that height/width mix-ups show
LABELS = ("cat", "dog", "bird", "fish")


class TinyNet(nn.Module):
    """Two conv stages (stride 2 each) → GAP → linear; returns (logits, stage2 activations)."""

    def __init__(self, outputs: int = 4) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 6, 3, 2, 1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(6, 8, 3, 2, 1), nn.ReLU())
        self.head = nn.Linear(8, outputs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acts = self.stage2(self.stage1(x))
        return self.head(acts.mean((2, 3))), acts


def write_export(folder: Path, *, task: str = "classification", backend: str = "torchscript") -> Manifest:
    """Trace TinyNet into ``folder`` with its manifest; return the manifest."""
    torch.manual_seed(0)
    outputs = 4 if task == "classification" else 5
    model = TinyNet(outputs).eval()
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, 3, *INPUT)
    if backend == "torchscript":
        model_file = "model.pt"
        torch.jit.trace(model, example).save(str(folder / model_file))
    else:
        model_file = "model.onnx"
        main = "logits" if task == "classification" else "embedding"
        torch.onnx.export(
            model,
            (example,),
            str(folder / model_file),
            input_names=["input"],
            output_names=[main, "act_stage2"],
            dynamic_axes={"input": {0: "batch"}, main: {0: "batch"}, "act_stage2": {0: "batch"}},
            dynamo=False,
        )
    manifest = Manifest(
        name=f"tiny-{task}",
        task=task,  # type: ignore[arg-type]
        backend=backend,  # type: ignore[arg-type]
        model_file=model_file,
        input_size=INPUT,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        main_output="logits" if task == "classification" else "embedding",
        layers=(LayerSpec("stage2", "act_stage2", (8, 8, 10)),),
        num_outputs=outputs,
        labels=LABELS if task == "classification" else (),
        checksums={model_file: sha256_file(folder / model_file)},
    )
    manifest.dump(folder / "lafam.json")
    return manifest


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-classifier")
    write_export(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-encoder")
    write_export(folder, task="embedding")
    return folder


def image_bytes(size: tuple[int, int] = (64, 48), fmt: str = "PNG", mode: str = "RGB", **save: Any) -> bytes:
    """Return an encoded image of ``size = (W, H)`` with a gradient so resizing is visible."""
    width, height = size
    gradient = Image.linear_gradient("L").resize((width, height))
    image = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient))
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@dataclass
class FakeContext:
    """What the handler uses of TorchServe's ``Context``, with the same calling convention.

    Requests come over REST unless ``grpc``: TorchServe then forwards each request's HTTP headers, which
    always include Content-Length; a gRPC request has only the headers given here.
    """

    model_dir: str
    headers: list[dict[str, Any]] = field(default_factory=list)
    gpu_id: int | None = None
    model_yaml_config: dict[str, Any] = field(default_factory=dict)
    grpc: bool = False
    statuses: dict[int, tuple[int, str]] = field(default_factory=dict)
    content_types: dict[int, str] = field(default_factory=dict)
    response_headers: dict[int, dict[str, str]] = field(default_factory=dict)

    @property
    def system_properties(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "gpu_id": self.gpu_id, "batch_size": 8}

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        headers = self.headers[idx] if idx < len(self.headers) else {}
        return dict(headers) if self.grpc else {"content-length": "0", **headers}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.content_types[idx] = value

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self.response_headers.setdefault(idx, {})[key] = value
