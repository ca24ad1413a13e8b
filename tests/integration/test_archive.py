"""The .mar is self-contained: its own serving code answers a request with this repository out of reach."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

from export.archive import RUNTIME_PACKAGE, ArchiveError, build_archive, model_config
from tests.unit.conftest import image_bytes, write_export


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    write_export(root / "export")
    config = model_config(batch_size=4, max_batch_delay_ms=5, lafam={"top_k": 2})
    return build_archive(root / "export", root / "store", name="tiny", config=config)


def test_archive_contents(archive: Path) -> None:
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"handler.py", "model.pt", "lafam.json", "model-config.yaml", "MAR-INF/MANIFEST.json"} <= names
    assert f"{RUNTIME_PACKAGE}/handler.py" in names
    assert f"{RUNTIME_PACKAGE}/explain/lafam.py" in names
    assert any(name.startswith(f"{RUNTIME_PACKAGE}/_png.") and name.endswith(".so") for name in names)  # C writer
    assert not any("__pycache__" in name for name in names)
    with zipfile.ZipFile(archive) as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
    assert config == {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 5, "responseTimeout": 60,
        "lafam": {"top_k": 2},
    }  # fmt: skip
    assert manifest["model"]["modelName"] == "tiny"
    assert manifest["model"]["handler"] == "handler.py"


def test_archive_serves_without_the_repository(archive: Path, tmp_path: Path) -> None:
    """Extract like TorchServe does and serve with `handlers` made unimportable: only the archive's code runs."""
    model_dir = tmp_path / "model_dir"
    zipfile.ZipFile(archive).extractall(model_dir)
    image = tmp_path / "image.png"
    image.write_bytes(image_bytes())
    script = textwrap.dedent(
        f"""
        import json, sys, yaml
        sys.modules["handlers"] = None  # the repository's package must not be needed
        sys.modules["export"] = None
        sys.path.insert(0, {str(model_dir)!r})
        import handler

        class Context:
            system_properties = {{"model_dir": {str(model_dir)!r}, "gpu_id": None}}
            model_yaml_config = yaml.safe_load(open({str(model_dir / "model-config.yaml")!r}))
            def __init__(self): self.status = {{}}
            def get_all_request_header(self, idx):  # a REST request: its HTTP headers and the body's type
                return {{"content-length": "1", "content-type": "image/png", "body": {{"content-type": "image/png"}}}}
            def set_response_status(self, code, phrase, idx): self.status[idx] = code
            def set_response_content_type(self, idx, value): pass

        classes = [c for c in vars(handler).values() if isinstance(c, type) and c.__module__ == "handler"]
        assert len(classes) == 1, classes  # TorchServe instantiates the single class of the module
        service = classes[0]()
        context = Context()
        service.initialize(context)
        body = json.loads(service.handle([{{"body": open({str(image)!r}, "rb").read()}}], context)[0])
        writer = sys.modules["{RUNTIME_PACKAGE}.encode"]._native
        print(json.dumps({{"status": context.status[0], "body": body,
                          "module": type(service).__mro__[1].__module__,
                          "writer": getattr(writer, "__file__", None)}}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env={"LAFAM_METRICS_ADDRESS": "off", "LAFAM_METRICS_DIR": str(tmp_path / "metrics"), "PATH": "/usr/bin"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["status"] == 200
    assert answer["module"] == f"{RUNTIME_PACKAGE}.handler"
    assert answer["writer"].startswith(str(model_dir / RUNTIME_PACKAGE))  # the archive's own C writer
    assert len(answer["body"]["predictions"]) == 2  # the archive's model-config default
    assert answer["body"]["explanation"]["method"] == "lafam"


def test_archive_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="manifest not found"):
        build_archive(tmp_path, tmp_path / "store")


def test_archive_refuses_an_altered_graph(tmp_path: Path) -> None:
    write_export(tmp_path / "export")
    with open(tmp_path / "export" / "model.pt", "ab") as graph:
        graph.write(b"tampered")
    with pytest.raises(ArchiveError, match="checksum mismatch"):
        build_archive(tmp_path / "export", tmp_path / "store")
