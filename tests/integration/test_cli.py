"""The README's own-model path through the ``lafam-serve`` command: export → archive → serve the archive."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from cli.main import main
from handlers.service import LafamService, Request
from tests.unit.conftest import image_bytes


class UserNet(nn.Module):
    """A user's model with its own layer names."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.classifier = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.trunk(x).mean((2, 3)))


def build_net(num_classes: int = 3) -> UserNet:
    torch.manual_seed(0)
    return UserNet(num_classes)


def test_export_archive_and_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(build_net().state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\n\nblue\n")
    status = main(
        [
            "export", f"{__name__}:build_net", "--weights", str(weights), "--labels", str(labels),
            "--input-size", "48x64", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--backend", "both",
            "--name", "user-net", "--out", str(tmp_path / "export"), "--archive",
            "--model-store", str(tmp_path / "store"),
        ]
    )  # fmt: skip
    output = capsys.readouterr().out
    assert status == 0, output
    assert "default layer: trunk (12x12x16 at 48x64)" in output
    folder = tmp_path / "export" / "user-net"
    assert (folder / "onnx" / "lafam.json").exists()
    assert (folder / "torchscript" / "lafam.json").exists()
    assert zipfile.is_zipfile(tmp_path / "store" / "user-net.mar")

    assert main(["archive", str(folder / "torchscript"), "--name", "user-net-ts", "--batch-size", "4",
                 "--model-store", str(tmp_path / "store")]) == 0  # fmt: skip
    with zipfile.ZipFile(tmp_path / "store" / "user-net-ts.mar") as mar:
        assert b"batchSize: 4" in mar.read("model-config.yaml")

    for backend in ("onnx", "torchscript"):
        service = LafamService.from_folder(folder / backend)
        reply = service.predict([Request({"body": image_bytes()}, {}, {})])[0]
        assert reply.status == 200
        assert {p["label"] for p in reply.body["predictions"]} == {"red", "green", "blue"}
        assert reply.body["explanation"]["native_size"] == [12, 16]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "resnet5O"], "resnet50"),
        (["export", "no_such_module:factory"], "no_such_module"),
        (["archive", "/nonexistent"], "manifest not found"),
    ],
)
def test_errors_are_one_clear_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"lafam-serve {argv[0]}: error:")
    assert message in error


def test_bad_sizes_are_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["export", "resnet18", "--input-size", "0x3"])
    assert "positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "resnet18", "--mean", "1,2"])


def test_manifest_is_json_with_provenance(tmp_path: Path) -> None:
    assert main(["export", f"{__name__}:build_net", "--input-size", "32", "--out", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "build_net" / "onnx" / "lafam.json").read_text())
    assert manifest["source"]["spec"] == f"{__name__}:build_net"
    assert manifest["layers"][0]["name"] == "trunk"
