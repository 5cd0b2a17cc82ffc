"""End to end against a scripted provider that speaks like real ones and OpenAI-compatible servers do (spaced
JSON, counts as strings or floats, Anthropic's cumulative message_delta with zero input fields): each call's
ledger row, through the real sidecar, Redis and Postgres."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import orjson
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar

CREDITS = 1_000_000
ANSWER = web.AppKey("answer", dict)
TEXT = "y" * 400  # streamed output text: 400 UTF-8 bytes, estimated at 100 tokens


def scripted_provider() -> web.Application:
    """Answers every POST with what the test put in `app[ANSWER]`: a JSON body, or SSE events."""
    app = web.Application()
    app[ANSWER] = {}

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        script = request.app[ANSWER]
        if "body" in script:
            return web.Response(body=script["body"], content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in script["events"]:
            await response.write(event)
        await response.write_eof()
        return response

    app.router.add_post("/v1/{tail:.*}", answer)
    return app


@pytest_asyncio.fixture
async def scripted(redis_client, redis_url: str, migrated_database_url: str) -> AsyncIterator[tuple[Sidecar, dict]]:
    server = TestServer(scripted_provider())
    await server.start_server()
    sidecar = await start_sidecar(redis_url, migrated_database_url, provider_url=str(server.make_url("/v1")))
    try:
        yield sidecar, server.app[ANSWER]
    finally:
        await stop_sidecar(sidecar)
        await server.close()


def spaced(value: dict) -> bytes:
    """Python's json module: a space after every ':' and ',', non-ASCII escaped."""
    return json.dumps(value).encode()


def data_event(value: dict, name: str | None = None) -> bytes:
    return (f"event: {name}\n".encode() if name else b"") + b"data: " + spaced(value) + b"\n\n"


async def call(sidecar: Sidecar, path: str, payload: dict):
    ws = await sidecar.workspace(credits_micro=CREDITS)
    body = orjson.dumps(payload)
    async with sidecar.http.post(
        sidecar.data.make_url(path),
        data=body,
        headers={"Authorization": f"Bearer {ws.key}", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200, await resp.read()
        await resp.read()
    await sidecar.assert_identity(ws.id)
    [row] = await sidecar.ledger(ws.id)
    return row, len(body)


def ceil4(n: int) -> int:
    return -(-n // 4)


async def test_a_body_whose_usage_counts_are_strings_is_estimated_not_free(scripted) -> None:
    sidecar, answer = scripted
    answer["body"] = spaced(
        {
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": "101", "completion_tokens": "8", "total_tokens": "109"},
        }
    )
    row, body_bytes = await call(sidecar, "/v1/chat/completions", chat_body("x" * 400))
    assert row["status"] == "completed" and row["estimated"] is True
    assert row["input_tokens"] == ceil4(body_bytes) and row["output_tokens"] > 0
    assert row["cost_micro"] > 0


async def test_a_spaced_stream_with_unparsable_usage_bills_the_text_it_relayed(scripted) -> None:
    sidecar, answer = scripted
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    answer["events"] = [
        *(
            data_event({**chunk, "choices": [{"index": 0, "delta": {"content": TEXT[i : i + 40]}}], "usage": None})
            for i in range(0, len(TEXT), 40)
        ),
        data_event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}),
        data_event({**chunk, "choices": [], "usage": {"prompt_tokens": 101.0, "completion_tokens": 100.0}}),
        b"data: [DONE]\n\n",
    ]
    row, body_bytes = await call(sidecar, "/v1/chat/completions", chat_body("x" * 400, stream=True))
    assert row["status"] == "completed" and row["estimated"] is True
    assert (row["input_tokens"], row["output_tokens"]) == (ceil4(body_bytes), ceil4(len(TEXT)))
    assert row["cost_micro"] > 0


async def test_anthropic_zero_input_counts_in_message_delta_keep_message_start_counts(scripted) -> None:
    sidecar, answer = scripted
    start_usage = {"input_tokens": 2000, "cache_read_input_tokens": 500, "cache_creation_input_tokens": 0}
    delta_usage = {"input_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    answer["events"] = [
        data_event(
            {
                "type": "message_start",
                "message": {"model": "claude-test", "usage": {**start_usage, "output_tokens": 1}},
            },
            "message_start",
        ),
        data_event(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
            "content_block_delta",
        ),
        data_event(
            {"type": "message_delta", "delta": {}, "usage": {**delta_usage, "output_tokens": 10}}, "message_delta"
        ),
        data_event({"type": "message_stop"}, "message_stop"),
    ]
    payload = {"model": "claude-test", "max_tokens": 50, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    row, _ = await call(sidecar, "/v1/messages", payload)
    assert row["status"] == "completed" and row["estimated"] is False
    assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == (2000, 500, 10)


async def test_a_spaced_stream_without_usage_bills_the_text_it_relayed(scripted) -> None:
    # A server that ignores `stream_options.include_usage`: the output is estimated from the text relayed,
    # whatever the JSON's spacing, field order or escapes ("\u00e9" is two UTF-8 bytes).
    sidecar, answer = scripted
    text = TEXT[:398] + "\u00e9"
    answer["events"] = [
        *(
            data_event({"choices": [{"delta": {"content": text[i : i + 40]}, "index": 0}], "model": "gpt-4o-mini"})
            for i in range(0, len(text), 40)
        ),
        data_event({"choices": [{"delta": {}, "finish_reason": "stop", "index": 0}]}),
        b"data: [DONE]\n\n",
    ]
    row, body_bytes = await call(sidecar, "/v1/chat/completions", chat_body("x" * 400, stream=True))
    assert row["status"] == "completed" and row["estimated"] is True
    assert (row["input_tokens"], row["output_tokens"]) == (ceil4(body_bytes), ceil4(len(text.encode())))
    assert row["cost_micro"] > 0
