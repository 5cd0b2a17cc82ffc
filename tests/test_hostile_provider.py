"""A provider whose answers are broken or hostile: the client gets a clean end in its own protocol, the
call settles exactly once, and the money adds up (issue 8.15)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.harness import start_sidecar, stop_sidecar

CREDITS = 1_000_000


def _sse(events: list[tuple[str | None, object]]) -> bytes:
    out = b""
    for name, data in events:
        if name:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"
    return out


_CHUNK = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
_FIRST = {
    **_CHUNK,
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "tok0 "}, "finish_reason": None}],
}

# (sidecar route, model, request body, the provider's stream with fields of the wrong types)
CASES = {
    "chat-usage-string": (
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        [(None, _FIRST), (None, {**_CHUNK, "choices": [], "usage": "lots"}), (None, b"[DONE]")],
    ),
    "chat-choices-int": (
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        [(None, _FIRST), (None, {"choices": 5, "usage": {"prompt_tokens": "9"}}), (None, b"[DONE]")],
    ),
    "anthropic-message-string": (
        "/v1/messages",
        {"model": "claude-test", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        [
            ("message_start", {"type": "message_start", "message": "x"}),
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "tok0 "}},
            ),
            ("message_delta", {"type": "message_delta", "delta": "stop", "usage": "lots"}),
            ("message_stop", {"type": "message_stop"}),
        ],
    ),
    "responses-response-string": (
        "/v1/responses",
        {"model": "gpt-4o-mini", "input": "hi", "stream": True},
        [
            ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "tok0 "}),
            ("response.completed", {"type": "response.completed", "response": "x"}),
        ],
    ),
}


async def _hostile_provider(stream: bytes) -> TestServer:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(stream)
        await response.write_eof()
        return response

    app = web.Application()
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/responses"):
        app.router.add_post(path, answer)
    server = TestServer(app)
    await server.start_server()
    return server


@pytest.mark.parametrize("case", list(CASES))
async def test_wrong_typed_provider_event_ends_the_stream_cleanly(
    redis_client, redis_url, migrated_database_url, case: str
) -> None:
    route, request_body, events = CASES[case]
    provider = await _hostile_provider(_sse(events))
    sc = await start_sidecar(redis_url, migrated_database_url, provider_url=str(provider.make_url("/v1")))
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        async with sc.http.post(
            sc.data.make_url(route),
            data=orjson.dumps(request_body),
            headers={"Authorization": f"Bearer {ws.key}", "x-api-key": ws.key, "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 200
            body = await asyncio.wait_for(resp.read(), 10)  # the stream ends; it does not hang
        assert b"HTTP/1.1" not in body, "no second response inside the open body"
        rows = await sc.ledger_eventually(ws.id)
        assert len(rows) == 1, "exactly one settlement"
        assert rows[0]["cost_micro"] <= rows[0]["hold_micro"]
        await sc.assert_identity(ws.id)
    finally:
        await stop_sidecar(sc)
        await provider.close()


async def test_a_client_that_stops_reading_is_cut_off_and_billed_what_was_relayed(
    redis_client, redis_url, migrated_database_url
) -> None:
    """A stream whose client stops reading would hold its provider connection for the whole total
    timeout (8.5): past `upstream.write_timeout_ms` on one write the call ends as cancelled, billed."""
    content = "x" * 60_000
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    big = {**chunk, "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    stream = b"".join(b"data: " + orjson.dumps(big) + b"\n\n" for _ in range(300)) + b"data: [DONE]\n\n"
    provider = await _hostile_provider(stream)
    sc = await start_sidecar(
        redis_url, migrated_database_url, provider_url=str(provider.make_url("/v1")), upstream={"write_timeout_ms": 300}
    )
    try:
        ws = await sc.workspace(credits_micro=10_000_000)
        async with sc.http.post(
            sc.data.make_url("/v1/chat/completions"),
            data=orjson.dumps(
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            ),
            headers={"Authorization": f"Bearer {ws.key}", "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 200
            rows = []
            for _ in range(100):  # the client reads nothing more; bounded: 10 s
                await asyncio.sleep(0.1)
                await sc.flush()
                rows = await sc.ledger(ws.id)
                if rows:
                    break
        [row] = rows
        assert row["status"] == "cancelled" and row["error"] == "client too slow to read the stream"
        assert 0 < row["cost_micro"] <= row["hold_micro"], "what was relayed is billed"
        await sc.assert_identity(ws.id)
    finally:
        await stop_sidecar(sc)
        await provider.close()


async def test_an_error_answer_with_a_lying_content_encoding_is_a_502_not_a_500(
    redis_client, redis_url, migrated_database_url
) -> None:
    """Found by make fuzz: the provider's error body says gzip and is not; reading it failed as a 500."""

    async def lying(request: web.Request) -> web.Response:
        return web.Response(status=503, body=b"not gzip at all", headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", lying)
    provider = TestServer(app)
    await provider.start_server()
    sc = await start_sidecar(redis_url, migrated_database_url, provider_url=str(provider.make_url("/v1")))
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        async with sc.http.post(
            sc.data.make_url("/v1/chat/completions"),
            data=orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
            headers={"Authorization": f"Bearer {ws.key}", "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "upstream_error"
        identity = await sc.assert_identity(ws.id)
        assert identity["debits"] == 0
    finally:
        await stop_sidecar(sc)
        await provider.close()
