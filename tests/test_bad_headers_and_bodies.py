"""Bad bytes in credentials and bodies that do not decode get a clear 4xx in the route's envelope,
never a 500 (issue 8.11, 8.13), and nothing is forwarded or charged."""

from __future__ import annotations

import gzip
import zlib

import orjson
import pytest
from support import rawhttp
from support.harness import ADMIN_TOKEN, Sidecar, chat_body

ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"]


def _envelope_error(path: str, answer: rawhttp.RawAnswer) -> dict:
    body = answer.json()
    if path == "/v1/messages":
        assert body["type"] == "error"
        return body["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("value", [b"Bearer caf\xe9", b"Bearer sk-sc-\xff\xfe", b"Bearer \xc3\x28"])
async def test_a_non_utf8_authorization_is_401_on_every_route(sidecar: Sidecar, path: str, value: bytes):
    head = rawhttp.request_bytes("POST", path, [(b"Authorization", value), (b"Content-Type", b"application/json")])
    answer = await rawhttp.exchange(sidecar.data.port, head[:-4] + b"\r\nContent-Length: 2\r\n\r\n{}")
    assert answer.status == 401, answer
    assert _envelope_error(path, answer)["type"] == "authentication_error"
    assert len(sidecar.recorded) == 0


async def test_a_non_utf8_x_api_key_and_models_route_are_401(sidecar: Sidecar):
    head = rawhttp.request_bytes("POST", "/v1/messages", [(b"x-api-key", b"caf\xe9")], b"{}")
    answer = await rawhttp.exchange(sidecar.data.port, head)
    assert answer.status == 401 and _envelope_error("/v1/messages", answer)["type"] == "authentication_error"
    answer = await rawhttp.exchange(
        sidecar.data.port, rawhttp.request_bytes("GET", "/v1/models", [(b"Authorization", b"Bearer caf\xe9")])
    )
    assert answer.status == 401


async def test_a_non_utf8_admin_token_is_401(sidecar: Sidecar):
    head = rawhttp.request_bytes(
        "GET", "/admin/v1/workspaces/x/balance", [(b"Authorization", b"Bearer " + ADMIN_TOKEN.encode() + b"\xe9")]
    )
    answer = await rawhttp.exchange(sidecar.control.port, head)
    assert answer.status == 401
    assert answer.json()["error"]["code"] == "invalid_admin_token"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_body_that_is_not_what_its_content_encoding_says_is_400(sidecar: Sidecar, encoding: str, path: str):
    ws = await sidecar.workspace(credits_micro=1_000_000)
    headers = [
        (b"Authorization", f"Bearer {ws.key}".encode()),
        (b"Content-Type", b"application/json"),
        (b"Content-Encoding", encoding.encode()),
    ]
    answer = await rawhttp.exchange(
        sidecar.data.port, rawhttp.request_bytes("POST", path, headers, orjson.dumps(chat_body()))
    )
    assert answer.status == 400, answer
    error = _envelope_error(path, answer)
    assert error["type"] == "invalid_request_error"
    assert "Content-Encoding" in error["message"]
    assert len(sidecar.recorded) == 0
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 0 and identity["account_balance"] == 1_000_000


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
async def test_a_body_compressed_as_declared_is_served(sidecar: Sidecar, encoding: str, compress):
    ws = await sidecar.workspace(credits_micro=1_000_000)
    status, _, body = await sidecar.chat(
        ws, raw=compress(orjson.dumps(chat_body())), headers={"Content-Encoding": encoding}
    )
    assert status == 200, body
