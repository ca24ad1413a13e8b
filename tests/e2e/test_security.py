"""Security defaults, checked on the shipped configuration and on a real TorchServe started from it.

One server for the module (the demo model as ONNX, free loopback ports, always stopped). Its config is
the shipped ``config.properties`` with only the ports changed (``serving.torchserve.TorchServe``), so what
holds here holds for ``torchserve --ts-config config.properties``.
"""

from __future__ import annotations

import http.client
import io
import re
import shutil
import socket
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

import handlers
from demo.run import build_demo_archive
from serving.torchserve import REPO_CONFIG, TorchServe, port_open, read_properties, running

from .test_torchserve import call, predict

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe's frontend needs Java 11+"),
]

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
MODEL = "shapes"
MiB = 1024 * 1024
REFUSED_TOKEN = (400, 401, 403)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    root = tmp_path_factory.mktemp("security")
    store = root / "model_store"
    build_demo_archive(root, store, backend="onnx", name=MODEL, log=lambda _: None)
    with running(store, [MODEL], workdir=root / "ts") as instance:  # stop() checks every port closed
        yield instance


@pytest.fixture(scope="module")
def scene() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (40, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _host(address: str) -> str:
    """The host of ``http://host:port`` or of a bare host (the gRPC addresses)."""
    return urlsplit(address).hostname if "://" in address else address


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def refused(call_result: tuple[int, dict]) -> bool:
    status, body = call_result
    return status in REFUSED_TOKEN and ("InvalidKeyException" in str(body) or "Token" in str(body))


# authorization


def test_inference_without_a_token_is_refused(server: TorchServe, scene: bytes) -> None:
    result = call(server, f"/predictions/{MODEL}", scene, {"Content-Type": "image/png"}, token=None)
    assert refused(result), result


def test_inference_with_a_wrong_token_is_refused(server: TorchServe, scene: bytes) -> None:
    headers = {"Content-Type": "image/png", "Authorization": "Bearer not-the-key"}
    result = call(server, f"/predictions/{MODEL}", scene, headers, token=None)
    assert refused(result), result


def test_the_management_key_does_not_open_inference(server: TorchServe, scene: bytes) -> None:
    assert server.token("management") != server.token("inference")
    result = call(server, f"/predictions/{MODEL}", scene, {"Content-Type": "image/png"}, token="management")
    assert refused(result), result
    result = call(server, f"/explanations/{MODEL}", scene, {"Content-Type": "image/png"}, token="management")
    assert refused(result), result


def test_the_inference_key_does_not_open_management(server: TorchServe) -> None:
    request = urllib.request.Request(
        server.url("management") + "/models", headers={"Authorization": f"Bearer {server.token('inference')}"}
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code in REFUSED_TOKEN


def test_the_right_token_is_served(server: TorchServe, scene: bytes) -> None:
    status, body = predict(server, MODEL, scene)
    assert status == 200, body


# listeners


def test_shipped_config_listens_on_loopback_only() -> None:
    properties = read_properties(REPO_CONFIG)
    addresses = {key: value for key, value in properties.items() if key.endswith("_address")}
    assert {"inference_address", "management_address", "metrics_address"} <= set(addresses)
    assert {"grpc_inference_address", "grpc_management_address"} <= set(addresses)
    for key, value in addresses.items():
        assert _host(value) in LOOPBACK, f"{key}={value}"


def test_running_server_binds_management_on_loopback(server: TorchServe) -> None:
    properties = read_properties(server.workdir / "config.properties")  # what this TorchServe was started with
    for key in ("inference_address", "management_address", "metrics_address"):
        assert _host(properties[key]) == "127.0.0.1", f"{key}={properties[key]}"
    assert urlsplit(properties["management_address"]).port == server.ports["management"]
    other = non_loopback_address()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address to probe from")
    for api in ("management", "metrics", "lafam_metrics", "inference"):
        assert port_open(server.ports[api])  # listening on loopback ...
        assert not port_open(server.ports[api], host=other), f"{api} reachable on {other}"  # ... and only there


def test_lafam_metrics_exporter_defaults_to_loopback() -> None:
    from handlers import metrics

    assert metrics.parse_address(metrics.DEFAULT_ADDRESS) == ("127.0.0.1", 8083)
    assert metrics.parse_address(":9100") == ("127.0.0.1", 9100)  # no host: still loopback
    assert metrics.parse_address("off") is None


# model API and URLs


def management_error(server: TorchServe, path: str, method: str) -> int:
    """The HTTP error status of a management call made with the management key (fails if it succeeds)."""
    request = urllib.request.Request(
        server.url("management") + path,
        method=method,
        headers={"Authorization": f"Bearer {server.token('management')}"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    return error.value.code


def test_registering_a_model_over_http_is_refused(server: TorchServe) -> None:
    for url in (f"{MODEL}.mar", "https://example.com/evil.mar", "file:///etc/passwd"):
        assert management_error(server, f"/models?url={url}", "POST") in (400, 403, 405), url


def test_unregistering_a_model_over_http_is_refused(server: TorchServe, scene: bytes) -> None:
    assert management_error(server, f"/models/{MODEL}", "DELETE") in (400, 403, 405)
    assert predict(server, MODEL, scene)[0] == 200


def test_shipped_config_turns_the_model_api_off_and_allows_no_url() -> None:
    properties = read_properties(REPO_CONFIG)
    assert properties["enable_model_api"] == "false"
    assert properties.get("disable_token_authorization", "false") == "false"
    pattern = re.compile(properties["allowed_urls"])
    for url in (
        "https://example.com/model.mar",
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
        "s3://bucket/model.mar",
        "model.mar",
        " ",
    ):
        assert pattern.fullmatch(url) is None, url  # TorchServe full-matches each allowed_urls pattern
        assert pattern.search(url) is None, url


# size caps


def test_shipped_config_caps_request_and_response_size() -> None:
    properties = read_properties(REPO_CONFIG)
    assert int(properties["max_request_size"]) <= 10 * MiB
    assert int(properties["max_response_size"]) <= 10 * MiB


def test_an_11_mib_body_is_not_processed(server: TorchServe, scene: bytes) -> None:
    body = scene + b"\x00" * (11 * MiB - len(scene))
    try:
        status, answer = predict(server, MODEL, body)
    except (ConnectionError, http.client.HTTPException, urllib.error.URLError):
        status, answer = 0, {}  # the frontend closes the connection (README: connection reset)
    assert status in (0, 413), (status, answer)
    assert predict(server, MODEL, scene)[0] == 200  # and keeps serving


# the decompression-bomb guard


def test_pillow_bomb_guard_stays_on_after_importing_the_handler() -> None:
    import handlers.handler
    import handlers.images
    import handlers.service  # noqa: F401 - imported for their side effects, if any

    assert Image.MAX_IMAGE_PIXELS is not None
    assert Image.MAX_IMAGE_PIXELS >= 1


ASSIGNS_LIMIT = re.compile(r"MAX_IMAGE_PIXELS\s*=(?!=)")


def test_no_served_code_assigns_the_bomb_limit(server: TorchServe) -> None:
    package = Path(handlers.__file__).parent
    sources = {str(path): path.read_text() for path in package.rglob("*.py")}
    assert len(sources) > 5
    with zipfile.ZipFile(server.model_store / f"{MODEL}.mar") as archive:  # the code the worker really runs
        shipped = {name: archive.read(name).decode() for name in archive.namelist() if name.endswith(".py")}
    assert any("handler" in name for name in shipped)
    for name, text in {**sources, **shipped}.items():
        assert not ASSIGNS_LIMIT.search(text), name


def test_the_worker_rejects_a_bomb_with_pillows_guard(server: TorchServe, scene: bytes) -> None:
    """A 30000x30000 header: only Pillow's guard (not the handler's own check) says 'decompression-bomb'."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 30_000, 30_000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )
    status, body = predict(server, MODEL, bomb)
    assert (status, body["error"]["code"]) == (413, "image_too_large"), body
    assert "decompression-bomb" in body["error"]["message"]
    assert predict(server, MODEL, scene)[0] == 200
