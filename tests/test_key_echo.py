"""A provider that quotes the key it was sent, in every place an answer can carry it: neither the
platform's key nor a customer's own key reaches the client, the ledger or a log line (issue 8.1)."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.harness import PLATFORM_KEY, TENANT_ADMIN_TOKEN, chat_body, start_sidecar, stop_sidecar

CUSTOMER_KEY = "sk-customer-echoed-key-0123456789"
CREDITS = 1_000_000


def _sent_key(request: web.Request) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ") or request.headers.get("x-api-key", "")


def _escaped(key: str) -> str:
    """The key as a JSON encoder that escapes every character might write it."""
    return "".join(f"\\u{ord(c):04x}" for c in key)


async def _echo_provider() -> TestServer:
    """Answers by the `x-echo` header the sidecar forwards: each way quotes the key it received."""

    async def models(request: web.Request) -> web.Response:  # BYOK validation: the key is accepted
        return web.json_response({"object": "list", "data": []})

    async def chat(request: web.Request) -> web.StreamResponse:
        key, mode = _sent_key(request), request.headers.get("x-mock-chunks", "")
        if mode == "4":  # retry advice that quotes the key, beside one well-formed value
            headers = {"x-should-retry": key, "retry-after-ms": key, "retry-after": "7"}
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers=headers)
        if mode == "1":  # an error answer with a status the sidecar relays
            return web.json_response({"error": {"message": f"bad request for key {key}"}}, status=400)
        if mode == "2":  # a 200 whose model and error quote the key, escaped
            body = {
                "id": "x",
                "object": "chat.completion",
                "model": key,
                "choices": [],
                "error": {"message": f"quota of {_escaped(key)}"},
            }
            return web.Response(
                body=orjson.dumps(body).replace(_escaped(key).encode().replace(b"\\", b"\\\\"), _escaped(key).encode()),
                content_type="application/json",
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": "tok0 "}, "finish_reason": None}],
        }
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: " + orjson.dumps({"error": {"message": f"key {key} revoked"}}) + b"\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    server = TestServer(app)
    await server.start_server()
    return server


@pytest.mark.parametrize("byok", [False, True], ids=["platform-key", "customer-key"])
@pytest.mark.parametrize(
    "mode", ["1", "2", "3", "4"], ids=["error-body", "200-model-and-error", "mid-stream-error", "retry-headers"]
)
async def test_an_echoed_key_reaches_no_client_row_or_log(
    redis_client, redis_url, migrated_database_url, caplog, byok: bool, mode: str
) -> None:
    provider = await _echo_provider()
    sc = await start_sidecar(redis_url, migrated_database_url, provider_url=str(provider.make_url("/v1")))
    caplog.set_level(logging.DEBUG)
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        key = PLATFORM_KEY
        if byok:
            status, added = await sc.admin(
                "POST",
                f"/workspaces/{ws.id}/byok-keys",
                {"provider": "mock", "key": CUSTOMER_KEY},
                token=TENANT_ADMIN_TOKEN,
            )
            assert status == 201, added
            key = CUSTOMER_KEY
        stream = mode == "3"
        async with sc.http.post(
            sc.data.make_url("/v1/chat/completions"),
            data=orjson.dumps(chat_body("echo", stream=stream)),
            headers={"Authorization": f"Bearer {ws.key}", "Content-Type": "application/json", "x-mock-chunks": mode},
        ) as resp:
            raw = await asyncio.wait_for(resp.read(), 10)
            headers = str(dict(resp.headers))
        assert b"tok0" in raw or mode != "3"
        for text in (raw.decode(errors="replace"), headers):
            assert key not in text and _escaped(key) not in text, text
        [row] = await sc.ledger_eventually(ws.id)
        assert key not in str(dict(row)), dict(row)
        if mode == "4":
            assert "'Retry-After': '7'" in headers, "well-formed retry advice still passes"
        else:
            assert "REDACTED" in raw.decode(errors="replace") + str(dict(row)), "the echo was there, and was redacted"
        assert key not in caplog.text
    finally:
        await stop_sidecar(sc)
        await provider.close()
