"""``lafam-serve explain`` on the demo export: the JSON ``LafamService`` answers, overlays, errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from cli.offline import option_help
from export.archive import build_archive, model_config
from handlers.options import OPTION_NAMES
from handlers.service import LafamService, Request
from scenes.synthetic import generate_scene
from tests.demo_export import export_demo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_demo(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def service(exported: Path) -> LafamService:
    return LafamService.from_folder(exported)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed, size in enumerate([(128, 128), (96, 80), (140, 120)]):
        path = folder / f"scene{seed}.png"
        Image.fromarray(generate_scene(np.random.default_rng(seed), 128, 2).image).resize(size).save(path)
        paths.append(path)
    return paths


def explain(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    status = main(["explain", *argv])
    captured = capsys.readouterr()
    return status, json.loads(captured.out), captured.err


def served(service: LafamService, image: Path, **options: str) -> dict[str, Any]:
    """What the server answers for the same bytes and options on POST /explanations."""
    headers = {f"X-LaFAM-{name.replace('_', '-')}": value for name, value in options.items()}
    (reply,) = service.predict([Request({"body": image.read_bytes()}, headers, {}, explain=True)])
    return reply.body


def flags(**options: str) -> list[str]:
    return [item for name, value in options.items() for item in (f"--{name.replace('_', '-')}", value)]


@pytest.mark.parametrize(
    "options",
    [
        {},  # the server's /explanations default (lrp on the demo model)
        {"method": "lafam"},
        {"method": "lrp", "format": "array"},
        {"method": "gradcam", "classes": "4,1", "size": "original"},
        {"method": "distribution", "base": "lrp", "format": "array", "top_classes": "1"},
        {"method": "distribution_fast", "least_likely": "false", "temperature": "5", "tau": "0.1"},
        {"method": "lrp", "resize": "none", "format": "array"},
    ],
)
def test_one_image_is_the_servers_json(
    exported: Path, service: LafamService, images: list[Path], options: dict[str, str], capsys
) -> None:
    status, body, err = explain([str(exported), str(images[1]), *flags(**options)], capsys)
    assert status == 0, body
    assert body == served(service, images[1], **options)
    assert body["explanation"]["method"] == options.get("method", "lrp")
    assert "explain" not in err  # no progress bar for one file


def test_several_images_are_a_list_with_a_progress_bar(
    exported: Path, service: LafamService, images: list[Path], capsys
) -> None:
    status, bodies, err = explain([str(exported), *map(str, images), "--method", "gradcam", "--top-k", "2"], capsys)
    assert status == 0
    assert isinstance(bodies, list)
    assert bodies == [served(service, image, method="gradcam", top_k="2") for image in images]
    assert "explain" in err
    assert "3/3" in err


def test_out_writes_the_compact_json_the_server_sends(
    exported: Path, service: LafamService, images: list[Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "deep" / "answer.json"
    assert main(["explain", str(exported), str(images[0]), "--format", "array", "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    text = out.read_text()
    expected = served(service, images[0], format="array")
    assert text == json.dumps(expected, separators=(",", ":")) + "\n"


def test_overlays_one_per_image_and_class(exported: Path, images: list[Path], tmp_path: Path, capsys) -> None:
    folder = tmp_path / "overlays"
    argv = [str(exported), str(images[0]), str(images[1]), "--method", "gradcam", "--top-classes", "2"]
    status, bodies, _ = explain([*argv, "--overlay", str(folder)], capsys)
    assert status == 0
    names = sorted(p.name for p in folder.iterdir())
    expected = sorted(
        f"{image.stem}_gradcam_class{c['index']}-{c['label']}.png"
        for image, body in zip(images[:2], bodies, strict=True)
        for c in body["explanation"]["classes"]
    )
    assert names == expected
    assert len(names) == 4
    with Image.open(folder / names[0]) as panel:
        source = next(i for i in images if names[0].startswith(i.stem))
        width, height = Image.open(source).size
        assert panel.size == (2 * width, height)  # the picture beside its overlay (scenes.overlay)
    status, _, _ = explain([str(exported), str(images[2]), "--method", "lafam", "--overlay", str(folder)], capsys)
    assert status == 0
    assert (folder / f"{images[2].stem}_lafam.png").is_file()  # label-free: one overlay


def test_an_option_error_is_the_servers_error_json_and_exit_2(
    exported: Path, service: LafamService, images: list[Path], capsys
) -> None:
    status, body, _ = explain([str(exported), str(images[0]), "--top-k", "100"], capsys)
    assert status == 2
    assert body["error"]["code"] == "invalid_option"
    assert body["error"]["option"] == "top_k"
    assert body == served(service, images[0], top_k="100")
    status, body, _ = explain([str(exported), str(images[0]), "--method", "shap"], capsys)
    assert status == 2
    assert body["error"]["valid"] == [
        "lrp", "lrp_class", "gradcam", "input_x_gradient", "distribution", "distribution_fast", "lafam"
    ]  # fmt: skip


def test_resize_is_a_flag_like_every_option(exported: Path, images: list[Path], capsys) -> None:
    status, bodies, _ = explain([str(exported), *map(str, images), "--method", "gradcam", "--resize", "none"], capsys)
    assert status == 0
    assert [body["input_size"] for body in bodies] == [[128, 128], [80, 96], [120, 140]]  # each image's own size
    status, body, _ = explain([str(exported), str(images[2]), "--resize", "70", "--size", "input"], capsys)
    assert status == 0
    assert body["input_size"] == body["explanation"]["size"] == [60, 70]  # longer side 70, aspect ratio kept
    status, body, _ = explain([str(exported), str(images[0]), "--resize", "8"], capsys)
    assert status == 2
    assert body["error"]["option"] == "resize"
    assert "from 16 to 4096" in body["error"]["message"]


def test_a_bad_or_missing_image_fails_alone(exported: Path, images: list[Path], tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "missing.jpg"
    status, bodies, _ = explain([str(exported), str(images[0]), str(bad), str(missing)], capsys)
    assert status == 2
    assert "predictions" in bodies[0]
    assert bodies[1]["error"]["code"] == "invalid_image"
    assert bodies[2]["error"]["code"] == "file_not_found"
    assert str(missing) in bodies[2]["error"]["message"]


def test_a_model_that_cannot_load_is_exit_1(tmp_path: Path, images: list[Path], capsys) -> None:
    status, body, _ = explain([str(tmp_path), str(images[0])], capsys)  # a folder without lafam.json
    assert status == 1
    assert body["error"]["code"] == "model_unavailable"
    status, body, _ = explain([str(tmp_path / "nothing.mar"), str(images[0])], capsys)
    assert status == 2
    assert body["error"]["code"] == "file_not_found"


def test_an_archive_is_served_with_its_own_model_config(
    exported: Path, images: list[Path], tmp_path: Path, capsys
) -> None:
    mar = build_archive(exported, tmp_path, config=model_config(lafam={"max_classes": 2}))
    ok = [str(mar), str(images[0]), "--method", "lrp_class", "--classes"]
    status, body, _ = explain([*ok, "0,1"], capsys)
    assert status == 0, body
    status, body, _ = explain([*ok, "0,1,2"], capsys)
    assert status == 2
    assert "at most 2" in body["error"]["message"]  # the archive's lafam: {max_classes: 2}, as TorchServe reads it
    status, body, _ = explain([str(exported.parent), str(images[0]), "--method", "lafam"], capsys)
    assert status == 0  # the export root with one backend folder


def test_every_request_option_is_a_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    text = capsys.readouterr().out
    for name in OPTION_NAMES:
        assert f"--{name.replace('_', '-')}" in text
    assert set(option_help()) == set(OPTION_NAMES)
    assert "exit status" in text
