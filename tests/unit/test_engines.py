"""The engines' shared parts without a server: the HTTP contract, the token, the bind rule, archives, batching."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import zipfile
from pathlib import Path

import pytest

from cli.main import main
from engines import archives, auth, protocol
from engines.asgi import Batcher, Guard, ProtocolApp, is_open
from export.archive import build_archive
from handlers.service import LafamService

from .conftest import image_bytes

TOKEN = "unit-token-0123456789abcdef"
PNG = image_bytes()
B64 = base64.b64encode(PNG).decode()
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def served(tiny_export: Path) -> dict[str, protocol.Served]:
    service = LafamService.from_folder(tiny_export)
    return {"tiny": protocol.Served("tiny", "1", service)}


@pytest.fixture(scope="module")
def check() -> auth.TokenCheck:
    return auth.TokenCheck(auth.digest(TOKEN))


def bearer(**headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}", **headers}


def run(models: dict[str, protocol.Served], check: auth.TokenCheck, method: str, path: str, body: bytes = b"",
        headers: dict[str, str] | None = None) -> tuple[int, dict]:  # fmt: skip
    routed = protocol.route(protocol.HttpRequest(method, path, headers or {}, body), models, check)
    reply = routed if isinstance(routed, protocol.HttpReply) else protocol.run_calls(models, [routed])[0]
    return reply.status, json.loads(reply.body)


# routes


def test_predictions_raw_body(served: dict, check: auth.TokenCheck) -> None:
    status, body = run(served, check, "POST", "/predictions/tiny", PNG, bearer(**{"content-type": "image/png"}))
    assert status == 200, body
    assert body["explanation"]["method"] == "lafam"


def test_health_is_open_and_inference_needs_the_token(served: dict, check: auth.TokenCheck) -> None:
    assert run(served, check, "GET", "/ping") == (200, {"status": "Healthy"})
    assert run(served, check, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert run(served, check, "GET", "/v1/models/tiny") == (200, {"name": "tiny", "ready": True})
    status, body = run(served, check, "POST", "/predictions/tiny", PNG)
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, _ = run(served, check, "POST", "/predictions/tiny", PNG, {"authorization": "Bearer wrong-wrong-wrong"})
    assert status == 401
    status, _ = run(served, check, "GET", "/v1/models")
    assert status == 401
    assert run(served, check, "GET", "/v1/models", headers=bearer()) == (200, {"models": ["tiny"]})


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("POST", "/predictions/nope", 404, "not_found"), ("GET", "/predictions/tiny", 405, "method_not_allowed"),
     ("POST", "/nowhere", 404, "not_found"), ("POST", "/ping", 405, "method_not_allowed")],
)  # fmt: skip
def test_unknown_routes_and_methods(served: dict, check: auth.TokenCheck, method: str, path: str, status: int,
                                    code: str) -> None:  # fmt: skip
    got, body = run(served, check, method, path, PNG, bearer())
    assert (got, body["error"]["code"]) == (status, code)


def test_multipart_and_urlencoded_forms(served: dict, check: auth.TokenCheck) -> None:
    boundary = "b0undary"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + PNG
        + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="options"\r\n\r\n'
            f'{{"top_k": 2}}\r\n--{boundary}--\r\n'
        ).encode()
    )
    headers = bearer(**{"content-type": f"multipart/form-data; boundary={boundary}"})
    status, body = run(served, check, "POST", "/predictions/tiny", form, headers)
    assert status == 200, body
    assert len(body["predictions"]) == 2
    parameters, types = protocol.decode_body({"content-type": "application/x-www-form-urlencoded"}, b"a=1&b=x+y")
    assert parameters == {"a": "1", "b": "x y"}
    assert types == {"a": "text/plain", "b": "text/plain"}


def test_v1_instances_each_answered_in_place(served: dict, check: auth.TokenCheck) -> None:
    request = {"instances": [{"image": B64, "options": {"top_k": 1}}, {"data": {"b64": B64}}, 42, {"data": "***"}]}
    status, body = run(served, check, "POST", "/v1/models/tiny:predict", json.dumps(request).encode(), bearer(**JSON))
    assert status == 400  # the first failure's
    first, second, third, fourth = body["predictions"]
    assert len(first["predictions"]) == 1
    assert second["predictions"]
    assert third["error"]["code"] == fourth["error"]["code"] == "invalid_json"
    status, body = run(served, check, "POST", "/v1/models/tiny:predict", b'{"instances": []}', bearer(**JSON))
    assert status == 400
    assert "instances" in body["predictions"][0]["error"]["message"]
    status, body = run(served, check, "POST", "/v1/models/tiny:predict", b"{nope", bearer(**JSON))
    assert (status, body["error"]["code"]) == (400, "invalid_json")


def test_v1_explain_allows_backward_methods_only_there(served: dict, check: auth.TokenCheck) -> None:
    request = json.dumps({"instances": [{"image": B64, "options": {"method": "distribution"}}]}).encode()
    status, body = run(served, check, "POST", "/v1/models/tiny:predict", request, bearer(**JSON))
    assert status == 400
    assert "/explanations" in body["predictions"][0]["error"]["message"]


def test_v2_bytes_tensors(served: dict, check: auth.TokenCheck) -> None:
    tensor = {"name": "a", "datatype": "BYTES", "shape": [1], "data": [B64], "parameters": {"options": '{"top_k": 3}'}}
    request = {"id": "r1", "inputs": [tensor, {**tensor, "name": "b", "datatype": "UINT8"}]}
    status, body = run(served, check, "POST", "/v2/models/tiny/infer", json.dumps(request).encode(), bearer(**JSON))
    assert status == 400
    assert (body["id"], body["model_name"], body["model_version"]) == ("r1", "tiny", "1")
    first, second = body["outputs"]
    assert (first["name"], first["datatype"], first["shape"]) == ("a", "BYTES", [1])
    assert len(json.loads(first["data"][0])["predictions"]) == 3
    assert json.loads(second["data"][0])["error"]["code"] == "invalid_json"


def test_run_calls_batches_by_model_and_keeps_order(served: dict, check: auth.TokenCheck) -> None:
    calls = []
    for data in (PNG, b"junk", PNG):
        routed = protocol.route(protocol.HttpRequest("POST", "/predictions/tiny", bearer(), data), served, check)
        assert isinstance(routed, protocol.Call)
        calls.append(routed)
    assert [reply.status for reply in protocol.run_calls(served, calls)] == [200, 400, 200]


# ASGI


def asgi(app: object, method: str, path: str, body: bytes, headers: dict[str, str], chunk: int = 1 << 20
         ) -> tuple[int, dict]:  # fmt: skip
    messages = [{"type": "http.request", "body": body[i : i + chunk], "more_body": i + chunk < len(body)}
                for i in range(0, max(len(body), 1), chunk)]  # fmt: skip
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip
    asyncio.run(app(scope, receive, send))  # type: ignore[operator]
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_protocol_app_refuses_a_body_over_10_mib_even_unannounced(served: dict, check: auth.TokenCheck) -> None:
    async def dispatch(call: protocol.Call) -> protocol.HttpReply:
        return protocol.run_calls(served, [call])[0]

    app = ProtocolApp(served, check, dispatch)
    status, body = asgi(app, "POST", "/predictions/tiny", PNG, bearer())
    assert status == 200, body
    status, body = asgi(app, "POST", "/predictions/tiny", b"\0" * (protocol.MAX_REQUEST_BYTES + 1), bearer())
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    status, body = asgi(app, "POST", "/predictions/tiny", PNG, bearer(**{"content-length": str(11 << 20)}))
    assert status == 413


def test_guard_checks_the_token_and_replays_the_body(check: auth.TokenCheck) -> None:
    seen: list[bytes] = []

    async def inner(scope: dict, receive: object, send: object) -> None:
        message = await receive()  # type: ignore[operator]
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]

    guard = Guard(inner, check)
    assert asgi(guard, "POST", "/v1/models/tiny:predict", b"abc", {})[0] == 401
    assert asgi(guard, "POST", "/v1/models/tiny:predict", b"abc" * 3, bearer(), chunk=2)[0] == 200
    assert seen == [b"abcabcabc"]
    assert asgi(guard, "GET", "/v2/health/ready", b"", {})[0] == 200  # probes need no token
    assert is_open("GET", "/v2/models/tiny/ready")
    assert not is_open("POST", "/v2/health/ready")


def test_batcher_runs_concurrent_calls_in_one_forward_pass(served: dict, check: auth.TokenCheck,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    sizes: list[int] = []
    service = served["tiny"].service
    original = service.predict
    monkeypatch.setattr(service, "predict", lambda requests: sizes.append(len(requests)) or original(requests))

    async def scenario() -> list[int]:
        batcher = Batcher(served, {"tiny": (4, 0.5)})
        calls = [protocol.route(protocol.HttpRequest("POST", "/predictions/tiny", bearer(), PNG), served, check)
                 for _ in range(6)]  # fmt: skip
        replies = await asyncio.gather(*(batcher(call) for call in calls))  # type: ignore[arg-type]
        batcher.close()
        return [reply.status for reply in replies]

    assert asyncio.run(scenario()) == [200] * 6
    assert sizes == [4, 2]  # a batch closes at batchSize; the rest waits at most maxBatchDelay


# the token and the bind rule


def test_token_sources_in_order(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    check, origin = auth.resolve_token(token_file, no_auth=False, generated_file=tmp_path / "gen", environ={})
    assert check.allows({"authorization": f"Bearer {TOKEN}"})
    assert str(token_file) in origin
    env = {auth.TOKEN_ENV: "from-the-environment-0123"}
    check, _ = auth.resolve_token(None, no_auth=False, generated_file=tmp_path / "gen", environ=env)
    assert check.allows({"authorization": "bearer from-the-environment-0123"})
    assert not check.allows({"authorization": f"Bearer {TOKEN}"})
    check, origin = auth.resolve_token(None, no_auth=False, generated_file=tmp_path / "gen", environ={})
    generated = (tmp_path / "gen").read_text().strip()
    assert check.allows({"authorization": f"Bearer {generated}"})
    assert stat.S_IMODE((tmp_path / "gen").stat().st_mode) == 0o600
    check, _ = auth.resolve_token(None, no_auth=True, generated_file=tmp_path / "x", environ={})
    assert not check.enabled
    assert check.allows({})


@pytest.mark.parametrize("token", ["short", "has a space in it 0123456789"])
def test_unusable_tokens_are_refused(tmp_path: Path, token: str) -> None:
    with pytest.raises(auth.AuthError):
        auth.resolve_token(None, no_auth=False, generated_file=tmp_path / "g", environ={auth.TOKEN_ENV: token})


def test_no_auth_with_a_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(auth.AuthError, match="both"):
        auth.resolve_token(None, no_auth=True, generated_file=tmp_path / "g", environ={auth.TOKEN_ENV: TOKEN})


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                                 ("127.5.5.5", True), ("0.0.0.0", False), ("::", False),
                                                 ("10.1.2.3", False)])  # fmt: skip
def test_only_loopback_binds_without_allow_remote(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback
    if loopback:
        auth.check_bind(host, allow_remote=False)
    else:
        with pytest.raises(auth.BindError, match="--allow-remote"):
            auth.check_bind(host, allow_remote=False)
        auth.check_bind(host, allow_remote=True)


@pytest.mark.parametrize(
    ("arguments", "env", "message"),
    [
        (["--engine", "kserve", "--host", "0.0.0.0"], {}, "--allow-remote"),
        (["--engine", "ray", "--host", "10.0.0.1"], {}, "--allow-remote"),
        (["--engine", "kserve"], {"LAFAM_METRICS_ADDRESS": "0.0.0.0:9000"}, "LAFAM_METRICS_ADDRESS"),
        (["--engine", "kserve", "--no-auth"], {"LAFAM_TOKEN": TOKEN}, "both"),
        (["--token-file", "/dev/null"], {}, "TorchServe makes its own key"),
        (["--engine", "ray", "--replicas", "0"], {}, "--replicas"),
    ],
)
def test_serve_refuses_bad_arguments_with_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], arguments: list[str],
    env: dict[str, str], message: str,
) -> None:  # fmt: skip
    monkeypatch.delenv("LAFAM_TOKEN", raising=False)
    monkeypatch.delenv("LAFAM_METRICS_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", str(tmp_path / "x.mar"), "--workdir", str(tmp_path), *arguments]) == 2
    assert message in capsys.readouterr().err


# archives


def test_an_archive_loads_with_its_name_and_batching(tiny_export: Path, tmp_path: Path) -> None:
    from export.archive import model_config

    config = model_config(batch_size=3, max_batch_delay_ms=25)
    mar = build_archive(tiny_export, tmp_path / "store", name="tiny-mar", config=config, log=lambda _: None)
    model = archives.load(mar)
    assert (model.name, model.batch_size, model.max_batch_delay_s) == ("tiny-mar", 3, 0.025)
    folder = archives.load(tiny_export)
    assert (folder.name, folder.batch_size) == ("tiny-classification", archives.DEFAULT_BATCH_SIZE)
    with pytest.raises(archives.ArchiveError, match="two archives"):
        archives.load_all([mar, mar])


def test_archive_members_cannot_escape(tmp_path: Path) -> None:
    evil = tmp_path / "evil.mar"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../outside.txt", "x")
    with pytest.raises(archives.ArchiveError, match="outside"):
        archives.unpack(evil, tmp_path / "work")
    assert not (tmp_path / "outside.txt").exists()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(archives.ArchiveError, match="neither"):
        archives.unpack(tmp_path / "notes.txt")
