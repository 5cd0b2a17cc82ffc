from __future__ import annotations

import asyncio
import base64
import struct
import time
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from sidecar.devtools import mock_provider
from sidecar.devtools.mock_provider import RECORDED, MockOptions, build_app, prompt_tokens_for
from sidecar.sse import SSEEvent, SSEFramer

AUTH = {"Authorization": "Bearer test-key"}
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there, mock!"}]
# (8 + 18) // 4 + 2 messages
MESSAGES_PROMPT_TOKENS = 8


def chat(**overrides: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": MESSAGES, **overrides}


def sse_events(body: bytes) -> list[SSEEvent]:
    """The events of a whole stream body, comment-only blocks left out."""
    framer = SSEFramer()
    events = framer.feed(body)
    assert framer.flush() is None, "stream must end on an event boundary"
    return [event for event in events if not event.is_comment_only]


def sse_data(body: bytes) -> list[bytes]:
    return [event.data for event in sse_events(body)]


def named_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of a named-event stream; each data's `type` must match its event name."""
    events = [(event.event, orjson.loads(event.data)) for event in sse_events(body)]
    for name, data in events:
        assert name == data["type"]
    return events


def json_chunks(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(data) for data in sse_data(body) if data != b"[DONE]"]


def content_of(chunks: list[dict[str, Any]]) -> list[str]:
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    return [delta["content"] for delta in deltas if delta.get("content")]


@pytest.fixture
async def client(aiohttp_client):
    return await aiohttp_client(build_app())


# ---- pure helpers ---------------------------------------------------------------------------------------


def test_prompt_tokens_formula():
    assert prompt_tokens_for(chat()) == MESSAGES_PROMPT_TOKENS
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 40}, {"type": "image_url"}]}]}
    assert prompt_tokens_for(parts) == 11
    assert prompt_tokens_for({"messages": [{"role": "assistant", "content": None}]}) == 1
    assert prompt_tokens_for({}) == 0
    assert prompt_tokens_for("not a dict") == 0


# ---- plain routes ---------------------------------------------------------------------------------------


async def test_healthz_needs_no_auth(client):
    response = await client.get("/healthz")
    assert response.status == 200 and (await response.json()) == {"status": "ok"}


async def test_models_list(client):
    response = await client.get("/v1/models", headers=AUTH)
    body = await response.json()
    assert response.status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(mock_provider.MODELS_DEFAULT)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer "}, {"Authorization": "Basic abc"}])
async def test_missing_or_bad_auth_is_401_invalid_api_key(client, headers):
    for path, method in [("/v1/models", "GET"), ("/v1/chat/completions", "POST")]:
        response = await client.request(method, path, json=chat(), headers=headers)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_api_key"


async def test_accepted_keys(aiohttp_client):
    client = await aiohttp_client(build_app(MockOptions(accepted_keys={"good"})))
    good = await client.get("/v1/models", headers={"Authorization": "Bearer good"})
    bad = await client.get("/v1/models", headers={"Authorization": "Bearer other"})
    assert good.status == 200
    assert bad.status == 401 and (await bad.json())["error"]["code"] == "invalid_api_key"


async def test_unknown_v1_route_is_openai_404(client):
    response = await client.post("/v1/audio/speech", json={}, headers=AUTH)
    assert response.status == 404
    assert set((await response.json())["error"]) == {"message", "type", "param", "code"}


# ---- non-streamed ---------------------------------------------------------------------------------------


async def test_non_stream_usage_and_echoed_model(client):
    response = await client.post("/v1/chat/completions", json=chat(model="some-model"), headers=AUTH)
    body = await response.json()
    assert response.status == 200 and body["object"] == "chat.completion"
    assert body["model"] == "some-model"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "".join(f"tok{i} " for i in range(8)), "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": MESSAGES_PROMPT_TOKENS,
        "completion_tokens": 8,
        "total_tokens": MESSAGES_PROMPT_TOKENS + 8,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def test_responses_are_deterministic_but_ids_differ(client):
    first = await (await client.post("/v1/chat/completions", json=chat(), headers=AUTH)).json()
    second = await (await client.post("/v1/chat/completions", json=chat(), headers=AUTH)).json()
    assert first["id"] != second["id"]
    first.pop("id"), second.pop("id")
    assert first == second


@pytest.mark.parametrize(
    ("caps", "expected_tokens", "finish_reason"),
    [
        ({"max_tokens": 3}, 3, "length"),
        ({"max_completion_tokens": 5}, 5, "length"),
        ({"max_tokens": 6, "max_completion_tokens": 2}, 2, "length"),
        ({"max_tokens": 2, "max_completion_tokens": 6}, 2, "length"),
        ({"max_tokens": 8}, 8, "stop"),
        ({"max_tokens": 100, "max_completion_tokens": None}, 8, "stop"),
    ],
)
async def test_output_caps_are_never_exceeded(client, caps, expected_tokens, finish_reason):
    body = await (await client.post("/v1/chat/completions", json=chat(**caps), headers=AUTH)).json()
    assert body["usage"]["completion_tokens"] == expected_tokens
    assert body["choices"][0]["finish_reason"] == finish_reason

    response = await client.post(
        "/v1/chat/completions",
        json=chat(**caps, stream=True, stream_options={"include_usage": True}),
        headers=AUTH,
    )
    chunks = json_chunks(await response.read())
    assert len(content_of(chunks)) == expected_tokens
    assert chunks[-1]["usage"]["completion_tokens"] == expected_tokens
    assert chunks[-2]["choices"][0]["finish_reason"] == finish_reason


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"max_tokens": "5"}, {"max_completion_tokens": True}])
async def test_invalid_caps_are_400(client, bad):
    response = await client.post("/v1/chat/completions", json=chat(**bad), headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(stream_options={"include_usage": True}), "stream_options"),
        (chat(usage={"include": True}), "usage"),
        ({"messages": MESSAGES}, "model"),
        ({"model": "m"}, "messages"),
    ],
)
async def test_requests_api_openai_would_reject_are_400(client, body, param):
    response = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status == 400 and (await response.json())["error"]["param"] == param


async def test_invalid_json_is_400(client):
    response = await client.post("/v1/chat/completions", data=b"{nope", headers=AUTH)
    assert response.status == 400


# ---- streamed -------------------------------------------------------------------------------------------


async def test_stream_without_include_usage(client):
    response = await client.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    raw = await response.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = json_chunks(raw)
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content_of(chunks) == [f"tok{i} " for i in range(8)]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert {c["model"] for c in chunks} == {"gpt-4o-mini"}
    assert len({c["id"] for c in chunks}) == 1


async def test_stream_with_include_usage(client):
    response = await client.post(
        "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True}), headers=AUTH
    )
    chunks = json_chunks(await response.read())
    *deltas, usage_chunk = chunks
    assert all(c["usage"] is None for c in deltas)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == MESSAGES_PROMPT_TOKENS
    assert usage_chunk["usage"]["completion_tokens"] == 8
    assert usage_chunk["usage"]["total_tokens"] == MESSAGES_PROMPT_TOKENS + 8
    assert deltas[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chunk_count_from_header_and_options(aiohttp_client):
    client = await aiohttp_client(build_app(MockOptions(chunks=3)))
    response = await client.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    assert len(content_of(json_chunks(await response.read()))) == 3
    response = await client.post(
        "/v1/chat/completions", json=chat(stream=True), headers={**AUTH, "x-mock-chunks": "20"}
    )
    assert len(content_of(json_chunks(await response.read()))) == 20
    response = await client.post("/v1/chat/completions", json=chat(), headers={**AUTH, "x-mock-chunks": "0"})
    assert (await response.json())["usage"]["completion_tokens"] == 0


async def test_bad_fault_header_is_400(client):
    for header, value in [("x-mock-chunks", "many"), ("x-mock-delay-ms", "-1"), ("x-mock-status", "200")]:
        response = await client.post("/v1/chat/completions", json=chat(), headers={**AUTH, header: value})
        assert response.status == 400, header
        assert (await response.json())["error"]["param"] == header


# ---- faults ---------------------------------------------------------------------------------------------


async def test_injected_status_uses_openai_envelope(client):
    response = await client.post("/v1/chat/completions", json=chat(), headers={**AUTH, "x-mock-status": "503"})
    assert response.status == 503
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"


async def test_injected_429_kinds(client):
    rate = await client.post("/v1/chat/completions", json=chat(), headers={**AUTH, "x-mock-status": "429"})
    assert (await rate.json())["error"]["code"] == "rate_limit_exceeded"
    quota = await client.post(
        "/v1/chat/completions",
        json=chat(),
        headers={**AUTH, "x-mock-status": "429", "x-mock-error-code": "insufficient_quota"},
    )
    assert (await quota.json())["error"] == {
        "message": "mock provider injected status 429",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }


async def test_status_from_options_applies_to_models_too(aiohttp_client):
    client = await aiohttp_client(build_app(MockOptions(status=500)))
    assert (await client.get("/v1/models", headers=AUTH)).status == 500


async def test_auth_is_checked_before_injected_status(client):
    response = await client.post("/v1/chat/completions", json=chat(), headers={"x-mock-status": "503"})
    assert response.status == 401


@pytest.mark.parametrize("cut_after", [0, 3, 8, 50])
async def test_stream_cut_after_breaks_the_body(client, cut_after):
    response = await client.post(
        "/v1/chat/completions",
        json=chat(stream=True, stream_options={"include_usage": True}),
        headers={**AUTH, "x-mock-cut-after": str(cut_after)},
    )
    assert response.status == 200
    framer = SSEFramer()
    events = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in response.content.iter_any():
            events.extend(framer.feed(chunk))
    chunks = [orjson.loads(e.data) for e in events]
    assert len(content_of(chunks)) == min(cut_after, 8)
    assert all(c["usage"] is None for c in chunks)
    assert b"[DONE]" not in [e.data for e in events]


async def test_non_stream_cut_after_closes_without_response(client):
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post("/v1/chat/completions", json=chat(), headers={**AUTH, "x-mock-cut-after": "0"})


async def test_reset_closes_without_response(client):
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        await client.post("/v1/chat/completions", json=chat(stream=True), headers={**AUTH, "x-mock-reset": "1"})


@pytest.mark.parametrize("error_after", [2, 8, 99])
async def test_stream_error_after_sends_error_event_and_ends(client, error_after):
    response = await client.post(
        "/v1/chat/completions",
        json=chat(stream=True, stream_options={"include_usage": True}),
        headers={**AUTH, "x-mock-error-after": str(error_after)},
    )
    data = sse_data(await response.read())  # the body itself completes cleanly
    *chunks, last = [orjson.loads(d) for d in data]
    assert len(content_of(chunks)) == min(error_after, 8)
    assert set(last) == {"error"} and set(last["error"]) == {"message", "type", "param", "code"}
    assert all(c["usage"] is None for c in chunks)


async def test_non_stream_error_after_is_500(client):
    response = await client.post("/v1/chat/completions", json=chat(), headers={**AUTH, "x-mock-error-after": "1"})
    assert response.status == 500 and (await response.json())["error"]["type"] == "server_error"


async def test_delays_are_applied(client):
    # Lower bounds only: a slow machine may take longer, never shorter.
    started = time.monotonic()
    response = await client.post(
        "/v1/chat/completions",
        json=chat(stream=True),
        headers={**AUTH, "x-mock-first-byte-delay-ms": "60", "x-mock-delay-ms": "10", "x-mock-chunks": "3"},
    )
    assert time.monotonic() - started >= 0.055
    await response.read()
    assert time.monotonic() - started >= 0.085


# ---- recording ------------------------------------------------------------------------------------------


async def test_records_what_was_received(aiohttp_client):
    app = build_app(MockOptions(max_recorded_requests=3))
    client = await aiohttp_client(app)
    body = chat(stream=True, stream_options={"include_usage": True}, max_tokens=4)
    await (await client.post("/v1/chat/completions", json=body, headers={**AUTH, "X-Custom": "v"})).read()
    recorded = app[RECORDED][-1]
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.headers["authorization"] == "Bearer test-key"
    assert recorded.headers["Authorization"] == "Bearer test-key"
    assert recorded.headers["x-custom"] == "v"
    assert recorded.json_body == body

    await client.post("/v1/chat/completions", json=chat())  # rejected (no auth) but still recorded
    assert app[RECORDED][-1].json_body == chat()
    for _ in range(5):
        await client.get("/v1/models?limit=2", headers=AUTH)
    assert len(app[RECORDED]) == 3
    assert app[RECORDED][-1].query == {"limit": "2"}
    await client.get("/healthz")
    assert app[RECORDED][-1].path == "/v1/models"  # health probes are not recorded


# ---- the real openai SDK --------------------------------------------------------------------------------


@pytest.fixture
async def sdk(aiohttp_server):
    server = await aiohttp_server(build_app())
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="k", max_retries=0)
    yield client
    await client.close()


async def test_openai_sdk_non_stream(sdk):
    completion = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_completion_tokens=5)
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (MESSAGES_PROMPT_TOKENS, 5)
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert completion.usage.completion_tokens_details.reasoning_tokens == 0


async def test_openai_sdk_stream_with_usage(sdk):
    stream = await sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(text) == "".join(f"tok{i} " for i in range(8))
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (MESSAGES_PROMPT_TOKENS, 8)


async def test_openai_sdk_stream_without_usage(sdk):
    stream = await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_sdk_sees_errors(sdk):
    with pytest.raises(openai.AuthenticationError):
        await sdk.models.list(extra_headers={"x-mock-status": "401"})
    with pytest.raises(openai.InternalServerError):
        await sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"x-mock-status": "503"})
    stream = await sdk.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_headers={"x-mock-error-after": "1"}
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    models = await sdk.models.list()
    assert [m.id async for m in models] == list(mock_provider.MODELS_DEFAULT)


# ---- the CLI entry point --------------------------------------------------------------------------------


async def test_run_serves_and_prints_base_url(capsys):
    task = asyncio.create_task(mock_provider.run("127.0.0.1", 0, MockOptions(chunks=2)))
    try:
        output = ""
        for _ in range(500):
            output += capsys.readouterr().out
            if "\n" in output:
                break
            await asyncio.sleep(0.01)
        base_url = output.split()[-1]
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        sdk = openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0)
        completion = await sdk.chat.completions.create(model="m", messages=MESSAGES)
        await sdk.close()
        assert completion.usage is not None and completion.usage.completion_tokens == 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_cli_rejects_bad_flags():
    with pytest.raises(SystemExit):
        mock_provider.main(["--chunks", "-1"])
    with pytest.raises(SystemExit):
        mock_provider.main(["--status", "200"])


# ==== routes beyond chat ====================================================================================

ANTHROPIC_AUTH = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
# (8 + 18) // 4 + 1 message
ANTHROPIC_INPUT_TOKENS = 7
CACHED_SYSTEM = [{"type": "text", "text": "x" * 40, "cache_control": {"type": "ephemeral"}}]
FULL_TEXT = "".join(f"tok{i} " for i in range(8))


def anthropic_body(**overrides: Any) -> dict[str, Any]:
    return {
        "model": "claude-mock",
        "max_tokens": 100,
        "system": "be brief",
        "messages": [{"role": "user", "content": "hello there, mock!"}],
        **overrides,
    }


def responses_body(**overrides: Any) -> dict[str, Any]:
    # (8 + 18) // 4 + 1 item = 7 input tokens
    return {"model": "gpt-4o", "instructions": "be brief", "input": "hello there, mock!", **overrides}


@pytest.fixture
async def server(aiohttp_server):
    return await aiohttp_server(build_app())


@pytest.fixture
async def claude(server):
    client = anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key="k", max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def oai(server):
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="k", max_retries=0)
    yield client
    await client.close()


def test_token_rules_of_the_other_routes():
    assert mock_provider.anthropic_input_tokens_for(anthropic_body()) == ANTHROPIC_INPUT_TOKENS
    blocks = anthropic_body(
        system=CACHED_SYSTEM,
        messages=[{"role": "user", "content": [{"type": "text", "text": "y" * 20}, {"type": "image"}]}],
    )
    assert mock_provider.anthropic_input_tokens_for(blocks) == 60 // 4 + 1
    assert mock_provider.responses_input_tokens_for(responses_body()) == 7
    items = [
        {"role": "user", "content": "abcd" * 5},
        {"role": "user", "content": [{"type": "input_text", "text": "x" * 8}]},
        {"type": "function_call_output", "call_id": "c", "output": "ignored"},
    ]
    assert mock_provider.responses_input_tokens_for({"input": items}) == 28 // 4 + 3
    assert mock_provider.completion_prompt_tokens_for({"prompt": "hello there, mock!"}) == 5
    assert mock_provider.completion_prompt_tokens_for({"prompt": ["abcd", "efghijkl"]}) == 12 // 4 + 2
    assert mock_provider.completion_prompt_tokens_for({"prompt": [[1, 2, 3], [4, 5]]}) == 5
    assert mock_provider.completion_prompt_tokens_for({"prompt": [1, 2, 3]}) == 3
    assert mock_provider.completion_prompt_tokens_for({"prompt": 7}) == 0
    assert mock_provider.embedding_tokens_for({"input": ["abcd", [9, 9]]}) == 1 + 1 + 2
    assert mock_provider.openrouter_cost(1000, 500) == 0.002


def test_embedding_is_deterministic_float32():
    vector = mock_provider.embedding_for("hello")
    assert vector == mock_provider.embedding_for("hello") != mock_provider.embedding_for("hello!")
    assert len(vector) == 8 and all(-1 <= x < 1 for x in vector)
    assert list(struct.unpack("<8f", struct.pack("<8f", *vector))) == vector
    assert len(mock_provider.embedding_for([1, 2], 3)) == 3


# ---- Anthropic Messages -----------------------------------------------------------------------------------


async def test_messages_non_stream(client):
    response = await client.post("/v1/messages", json=anthropic_body(), headers=ANTHROPIC_AUTH)
    body = await response.json()
    assert response.status == 200
    assert body.pop("id").startswith("msg_")
    assert body == {
        "type": "message",
        "role": "assistant",
        "model": "claude-mock",
        "content": [{"type": "text", "text": FULL_TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": ANTHROPIC_INPUT_TOKENS,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 8,
            "service_tier": "standard",
        },
    }
    capped = await (await client.post("/v1/messages", json=anthropic_body(max_tokens=3), headers=ANTHROPIC_AUTH)).json()
    assert (capped["stop_reason"], capped["usage"]["output_tokens"]) == ("max_tokens", 3)
    assert capped["content"][0]["text"] == "tok0 tok1 tok2 "


CACHE_HEADERS = {"x-mock-cache-write-5m": "100", "x-mock-cache-write-1h": "1000", "x-mock-cache-read": "50"}


@pytest.mark.parametrize(
    ("overrides", "cached"),
    [
        ({}, False),
        ({"system": CACHED_SYSTEM}, True),
        ({"cache_control": {"type": "ephemeral"}}, True),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}]},
            True,
        ),
        ({"tools": [{"name": "t", "input_schema": {}, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}, True),
    ],
)
async def test_messages_cache_counts_need_a_cache_control_marker(client, overrides, cached):
    body = anthropic_body(**overrides)
    response = await client.post("/v1/messages", json=body, headers={**ANTHROPIC_AUTH, **CACHE_HEADERS})
    usage = (await response.json())["usage"]
    assert usage["input_tokens"] == mock_provider.anthropic_input_tokens_for(body)  # cached tokens excluded
    if cached:
        assert usage["cache_creation_input_tokens"] == 1100 and usage["cache_read_input_tokens"] == 50
        assert usage["cache_creation"] == {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 1000}
    else:
        assert usage["cache_creation_input_tokens"] == usage["cache_read_input_tokens"] == 0


async def test_messages_stream_event_sequence(client):
    body = anthropic_body(system=CACHED_SYSTEM, stream=True, max_tokens=3)
    response = await client.post("/v1/messages", json=body, headers={**ANTHROPIC_AUTH, **CACHE_HEADERS})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    raw = await response.read()
    assert b"[DONE]" not in raw
    events = named_events(raw)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    message = events[0][1]["message"]
    assert message["content"] == [] and message["stop_reason"] is None and message["model"] == "claude-mock"
    assert message["usage"]["input_tokens"] == mock_provider.anthropic_input_tokens_for(body) == (40 + 18) // 4 + 1
    assert message["usage"]["cache_creation_input_tokens"] == 1100
    assert message["usage"]["cache_read_input_tokens"] == 50
    assert message["usage"]["output_tokens"] == 1
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert [data["delta"] for _, data in events[3:6]] == [{"type": "text_delta", "text": f"tok{i} "} for i in range(3)]
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"output_tokens": 3},
    }


async def test_messages_stream_progress_deltas_and_full_delta_usage(client):
    headers = {**ANTHROPIC_AUTH, "x-mock-progress-deltas": "1", "x-mock-chunks": "3"}
    events = named_events(
        await (await client.post("/v1/messages", json=anthropic_body(stream=True), headers=headers)).read()
    )
    deltas = [data for name, data in events if name == "message_delta"]
    assert [d["usage"] for d in deltas] == [{"output_tokens": n} for n in (1, 2, 3, 3)]
    assert [d["delta"]["stop_reason"] for d in deltas] == [None, None, None, "end_turn"]
    assert [name for name, _ in events][3:5] == ["content_block_delta", "message_delta"]

    headers = {**ANTHROPIC_AUTH, "x-mock-full-delta-usage": "1", "x-mock-chunks": "2"}
    events = named_events(
        await (await client.post("/v1/messages", json=anthropic_body(stream=True), headers=headers)).read()
    )
    (delta,) = [data for name, data in events if name == "message_delta"]
    assert delta["usage"] == {
        "input_tokens": ANTHROPIC_INPUT_TOKENS,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 2,
    }


@pytest.mark.parametrize("error_after", [1, 99])
async def test_messages_stream_error_after(client, error_after):
    response = await client.post(
        "/v1/messages",
        json=anthropic_body(stream=True),
        headers={**ANTHROPIC_AUTH, "x-mock-error-after": str(error_after)},
    )
    events = named_events(await response.read())
    assert response.status == 200
    assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert [name for name, _ in events].count("content_block_delta") == min(error_after, 8)
    assert "message_delta" not in [name for name, _ in events]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (anthropic_body(max_tokens=None), "max_tokens: Field required"),
        ({"model": "m", "max_tokens": 5}, "messages: Field required"),
        (anthropic_body(max_tokens=0), "Invalid 'max_tokens': expected an integer of at least 1."),
    ],
)
async def test_messages_bad_request_is_anthropic_400(client, body, message):
    response = await client.post("/v1/messages", json=body, headers=ANTHROPIC_AUTH)
    assert response.status == 400
    assert await response.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"x-api-key": "k"}, 200),
        ({"Authorization": "Bearer k"}, 200),
        ({"anthropic-version": "2023-06-01"}, 401),
        ({"x-api-key": " "}, 401),
    ],
)
async def test_messages_auth(client, headers, status):
    response = await client.post("/v1/messages", json=anthropic_body(), headers=headers)
    assert response.status == status
    if status == 401:
        assert (await response.json())["error"]["type"] == "authentication_error"


async def test_messages_accepted_keys_check_either_header(aiohttp_client):
    client = await aiohttp_client(build_app(MockOptions(accepted_keys={"good"})))
    for headers, status in [
        ({"x-api-key": "good"}, 200),
        ({"Authorization": "Bearer good"}, 200),
        ({"x-api-key": "bad"}, 401),
        ({"x-api-key": "bad", "Authorization": "Bearer good"}, 200),
    ]:
        response = await client.post("/v1/messages", json=anthropic_body(), headers=headers)
        assert response.status == status, headers


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (418, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (529, "overloaded_error"),
    ],
)
async def test_messages_injected_status_uses_anthropic_envelope(client, status, error_type):
    response = await client.post(
        "/v1/messages", json=anthropic_body(), headers={**ANTHROPIC_AUTH, "x-mock-status": str(status)}
    )
    assert response.status == status
    body = await response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type
    assert set(body["error"]) == {"type", "message"}


async def test_messages_error_code_overrides_type_and_non_stream_error_after(client):
    headers = {**ANTHROPIC_AUTH, "x-mock-status": "402", "x-mock-error-code": "billing_error"}
    response = await client.post("/v1/messages", json=anthropic_body(), headers=headers)
    assert (await response.json())["error"]["type"] == "billing_error"
    response = await client.post(
        "/v1/messages", json=anthropic_body(), headers={**ANTHROPIC_AUTH, "x-mock-error-after": "1"}
    )
    assert response.status == 500 and (await response.json())["error"]["type"] == "api_error"


async def test_models_list_anthropic_shape(client):
    for headers in (ANTHROPIC_AUTH, {"x-api-key": "k"}, {"anthropic-version": "2023-06-01", **AUTH}):
        body = await (await client.get("/v1/models", headers=headers)).json()
        assert body["has_more"] is False
        assert (
            body["first_id"] == mock_provider.MODELS_DEFAULT[0] and body["last_id"] == mock_provider.MODELS_DEFAULT[-1]
        )
        assert body["data"][0] == {
            "type": "model",
            "id": "gpt-4o-mini",
            "display_name": "gpt-4o-mini",
            "created_at": "2023-11-14T22:13:20Z",
        }
    response = await client.get("/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert response.status == 401 and (await response.json())["error"]["type"] == "authentication_error"
    response = await client.get("/v1/nope", headers=ANTHROPIC_AUTH)
    assert response.status == 404 and (await response.json())["error"]["type"] == "not_found_error"


async def test_anthropic_sdk_non_stream(claude):
    message = await claude.messages.create(
        model="claude-mock",
        max_tokens=5,
        system="be brief",
        messages=[{"role": "user", "content": "hello there, mock!"}],
    )
    assert message.content[0].text == "tok0 tok1 tok2 tok3 tok4 "
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (ANTHROPIC_INPUT_TOKENS, 5)
    assert message.usage.cache_read_input_tokens == 0


async def test_anthropic_sdk_stream(claude):
    stream = await claude.messages.create(
        model="claude-mock",
        max_tokens=100,
        system="be brief",
        messages=[{"role": "user", "content": "hello there, mock!"}],
        stream=True,
    )
    events = [event async for event in stream]
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == FULL_TEXT
    (delta,) = [e for e in events if e.type == "message_delta"]
    assert delta.usage.output_tokens == 8 and delta.delta.stop_reason == "end_turn"


async def test_anthropic_sdk_stream_helper_final_message(claude):
    async with claude.messages.stream(
        model="claude-mock",
        max_tokens=100,
        system=CACHED_SYSTEM,
        messages=[{"role": "user", "content": "y" * 20}],
        extra_headers={**CACHE_HEADERS, "x-mock-progress-deltas": "1", "x-mock-chunks": "4"},
    ) as stream:
        text = [chunk async for chunk in stream.text_stream]
        message = await stream.get_final_message()
    assert "".join(text) == "tok0 tok1 tok2 tok3 "
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (60 // 4 + 1, 4)
    assert (usage.cache_creation_input_tokens, usage.cache_read_input_tokens) == (1100, 50)
    assert usage.cache_creation is not None and usage.cache_creation.ephemeral_1h_input_tokens == 1000
    assert message.stop_reason == "end_turn"


async def test_anthropic_sdk_sees_errors(claude):
    with pytest.raises(anthropic.RateLimitError):
        await claude.messages.create(
            model="m",
            max_tokens=5,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-status": "429"},
        )
    with pytest.raises(anthropic.OverloadedError):
        await claude.messages.create(
            model="m",
            max_tokens=5,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-mock-status": "529"},
        )
    stream = await claude.messages.create(
        model="m",
        max_tokens=5,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-mock-error-after": "1"},
    )
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        async for _ in stream:
            pass
    models = await claude.models.list()
    assert [m.id async for m in models] == list(mock_provider.MODELS_DEFAULT)


# ---- OpenAI Responses ---------------------------------------------------------------------------------------


async def test_responses_non_stream(client):
    response = await client.post("/v1/responses", json=responses_body(), headers=AUTH)
    body = await response.json()
    assert response.status == 200 and body["object"] == "response" and body["status"] == "completed"
    assert body["incomplete_details"] is None and body["model"] == "gpt-4o"
    (item,) = body["output"]
    assert item["type"] == "message" and item["status"] == "completed" and item["role"] == "assistant"
    assert item["content"] == [{"type": "output_text", "text": FULL_TEXT, "annotations": [], "logprobs": []}]
    assert body["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 8,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 15,
    }
    capped = await (
        await client.post(
            "/v1/responses", json=responses_body(max_output_tokens=2), headers={**AUTH, "x-mock-cache-read": "40"}
        )
    ).json()
    assert capped["status"] == "incomplete" and capped["incomplete_details"] == {"reason": "max_output_tokens"}
    assert capped["output"][0]["status"] == "incomplete"
    assert capped["usage"]["output_tokens"] == 2
    # cached tokens are part of input_tokens
    assert capped["usage"]["input_tokens"] == 47 and capped["usage"]["input_tokens_details"]["cached_tokens"] == 40


@pytest.mark.parametrize(("cap", "terminal"), [(None, "response.completed"), (3, "response.incomplete")])
async def test_responses_stream_event_sequence(client, cap, terminal):
    body = responses_body(stream=True, max_output_tokens=cap)
    response = await client.post("/v1/responses", json=body, headers={**AUTH, "x-mock-chunks": "4"})
    raw = await response.read()
    assert b"[DONE]" not in raw
    events = named_events(raw)
    tokens = 4 if cap is None else cap
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * tokens,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        terminal,
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["usage"] is None
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    assert deltas == [f"tok{i} " for i in range(tokens)]
    final = events[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == "".join(deltas)
    assert final["usage"]["input_tokens"] == 7 and final["usage"]["output_tokens"] == tokens
    item_ids = {data.get("item_id") for _, data in events} - {None}
    assert item_ids == {final["output"][0]["id"]}


async def test_responses_stream_error_after(client):
    response = await client.post(
        "/v1/responses", json=responses_body(stream=True), headers={**AUTH, "x-mock-error-after": "2"}
    )
    events = named_events(await response.read())
    assert events[-1][1] == {
        "type": "error",
        "code": "server_error",
        "message": "mock provider injected a mid-stream error",
        "param": None,
        "sequence_number": 6,
    }
    assert [n for n, _ in events].count("response.output_text.delta") == 2
    assert not any(n in ("response.completed", "response.incomplete") for n, _ in events)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (responses_body(usage={"include": True}), "usage"),
        (responses_body(input=5), "input"),
        (responses_body(max_output_tokens=0), "max_output_tokens"),
        ({"input": "hi"}, "model"),
    ],
)
async def test_responses_bad_requests(client, body, param):
    response = await client.post("/v1/responses", json=body, headers=AUTH)
    assert response.status == 400 and (await response.json())["error"]["param"] == param


async def test_openai_sdk_responses_non_stream(oai):
    result = await oai.responses.create(model="gpt-4o", instructions="be brief", input="hello there, mock!")
    assert result.output_text == FULL_TEXT and result.status == "completed"
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (7, 8, 15)
    assert result.usage.input_tokens_details.cached_tokens == 0
    assert result.usage.output_tokens_details.reasoning_tokens == 0


async def test_openai_sdk_responses_stream(oai):
    stream = await oai.responses.create(
        model="gpt-4o",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "x" * 40}]}],
        max_output_tokens=5,
        stream=True,
    )
    events = [event async for event in stream]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "tok0 tok1 tok2 tok3 tok4 "
    assert events[-1].type == "response.incomplete"
    usage = events[-1].response.usage
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (11, 5)

    async with oai.responses.stream(model="gpt-4o", input="hello") as helper:
        async for _ in helper:
            pass
        final = await helper.get_final_response()
    assert final.output_text == FULL_TEXT and final.usage is not None and final.usage.output_tokens == 8

    stream = await oai.responses.create(
        model="gpt-4o", input="hi", stream=True, extra_headers={"x-mock-error-after": "1"}
    )
    events = [event async for event in stream]
    assert events[-1].type == "error" and events[-1].code == "server_error"


# ---- OpenAI completions -------------------------------------------------------------------------------------


async def test_completions_raw_non_stream_and_multiple_prompts(client):
    body = await (
        await client.post(
            "/v1/completions", json={"model": "m", "prompt": ["abcd", "efghijkl"], "max_tokens": 3}, headers=AUTH
        )
    ).json()
    assert body["object"] == "text_completion"
    assert body["choices"] == [
        {"text": "tok0 tok1 tok2 ", "index": i, "logprobs": None, "finish_reason": "length"} for i in range(2)
    ]
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (5, 6)


async def test_completions_raw_stream(client):
    response = await client.post(
        "/v1/completions",
        json={"model": "m", "prompt": "hello there, mock!", "stream": True, "stream_options": {"include_usage": True}},
        headers={**AUTH, "x-mock-chunks": "3"},
    )
    raw = await response.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    *chunks, usage_chunk = json_chunks(raw)
    assert [c["choices"][0]["text"] for c in chunks] == ["tok0 ", "tok1 ", "tok2 ", ""]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert all(c["usage"] is None and c["object"] == "text_completion" for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] == 5 + 3

    response = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True}, headers=AUTH)
    assert all("usage" not in c for c in json_chunks(await response.read()))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "m", "prompt": "x", "usage": {"include": True}}, "usage"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": [True]}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ],
)
async def test_completions_bad_requests(client, body, param):
    response = await client.post("/v1/completions", json=body, headers=AUTH)
    assert response.status == 400 and (await response.json())["error"]["param"] == param


async def test_openai_sdk_completions(oai):
    completion = await oai.completions.create(model="m", prompt="hello there, mock!", max_tokens=2)
    assert completion.choices[0].text == "tok0 tok1 " and completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        5,
        2,
    )
    stream = await oai.completions.create(
        model="m", prompt=[1, 2, 3], stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == FULL_TEXT
    assert chunks[-1].usage is not None and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        3,
        8,
    )


# ---- OpenAI embeddings --------------------------------------------------------------------------------------


async def test_embeddings_raw(client):
    body = await (
        await client.post("/v1/embeddings", json={"model": "emb", "input": ["abcd", [5, 6, 7]]}, headers=AUTH)
    ).json()
    assert body["object"] == "list" and body["model"] == "emb"
    assert body["data"] == [
        {"object": "embedding", "index": 0, "embedding": mock_provider.embedding_for("abcd")},
        {"object": "embedding", "index": 1, "embedding": mock_provider.embedding_for([5, 6, 7])},
    ]
    assert body["usage"] == {"prompt_tokens": 2 + 3, "total_tokens": 5}
    encoded = await (
        await client.post(
            "/v1/embeddings",
            json={"model": "e", "input": "abcd", "encoding_format": "base64", "dimensions": 3},
            headers=AUTH,
        )
    ).json()
    vector = list(struct.unpack("<3f", base64.b64decode(encoded["data"][0]["embedding"])))
    assert vector == mock_provider.embedding_for("abcd", 3)


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"encoding_format": "hex"}, "encoding_format"), ({"dimensions": 0}, "dimensions"), ({"input": []}, "input")],
)
async def test_embeddings_bad_requests(client, extra, param):
    response = await client.post("/v1/embeddings", json={"model": "e", "input": "x", **extra}, headers=AUTH)
    assert response.status == 400 and (await response.json())["error"]["param"] == param


async def test_openai_sdk_embeddings(oai):
    result = await oai.embeddings.create(model="emb", input=["hello there, mock!", "abcd"])  # base64 on the wire
    assert [d.embedding for d in result.data] == [
        mock_provider.embedding_for("hello there, mock!"),
        mock_provider.embedding_for("abcd"),
    ]
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (22 // 4 + 2, 22 // 4 + 2)
    floats = await oai.embeddings.create(model="emb", input="abcd", encoding_format="float")
    assert floats.data[0].embedding == mock_provider.embedding_for("abcd")


# ---- faults on the new routes -------------------------------------------------------------------------------

STREAM_ROUTES = [
    ("/v1/messages", anthropic_body(stream=True), ANTHROPIC_AUTH),
    ("/v1/responses", responses_body(stream=True), AUTH),
    ("/v1/completions", {"model": "m", "prompt": "hi", "stream": True}, AUTH),
]
ALL_ROUTES = [
    *STREAM_ROUTES,
    ("/v1/responses", responses_body(), AUTH),
    ("/v1/completions", {"model": "m", "prompt": "hi"}, AUTH),
    ("/v1/embeddings", {"model": "e", "input": "hi"}, AUTH),
    ("/v1/messages", anthropic_body(), ANTHROPIC_AUTH),
]


@pytest.mark.parametrize(("path", "body", "headers"), ALL_ROUTES)
async def test_new_routes_fault_knobs(client, path, body, headers):
    response = await client.post(path, json=body, headers={**headers, "x-mock-status": "503"})
    assert response.status == 503
    response = await client.post(path, json=body, headers={**headers, "x-mock-chunks": "lots"})
    assert response.status == 400
    response = await client.post(path, json=body)
    assert response.status == 401
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        await client.post(path, json=body, headers={**headers, "x-mock-reset": "1"})
    started = time.monotonic()
    response = await client.post(path, json=body, headers={**headers, "x-mock-first-byte-delay-ms": "30"})
    await response.read()
    assert response.status == 200 and time.monotonic() - started >= 0.025
    response = await client.post(
        path, json=body, headers={**headers, "x-mock-served-model": "fallback-model", "x-mock-chunks": "1"}
    )
    raw = await response.read()
    assert b'"fallback-model"' in raw and b'"model":"' + str(body["model"]).encode() + b'"' not in raw


@pytest.mark.parametrize(("path", "body", "headers"), STREAM_ROUTES)
async def test_new_routes_stream_cut_after(client, path, body, headers):
    response = await client.post(path, json=body, headers={**headers, "x-mock-cut-after": "2"})
    assert response.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in response.content.iter_any():
            received += chunk
    assert b"tok1 " in received and b"tok2 " not in received


async def test_new_routes_are_recorded(aiohttp_client):
    app = build_app()
    client = await aiohttp_client(app)
    await client.post("/v1/messages", json=anthropic_body(), headers={"x-api-key": "sk-ant-used"})
    recorded = app[RECORDED][-1]
    assert recorded.path == "/v1/messages" and recorded.headers["x-api-key"] == "sk-ant-used"
    assert recorded.json_body == anthropic_body()


# ---- the OpenRouter flavour ---------------------------------------------------------------------------------


@pytest.fixture
async def openrouter(aiohttp_client):
    return await aiohttp_client(build_app(MockOptions(flavor="openrouter", accepted_keys={"sk-or-v1-good-key"})))


OR_AUTH = {"Authorization": "Bearer sk-or-v1-good-key"}


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_openrouter_chat_stream_always_has_usage_with_cost(openrouter, prefix):
    response = await openrouter.post(
        f"{prefix}/chat/completions", json=chat(stream=True, usage={"include": True}), headers=OR_AUTH
    )
    raw = await response.read()
    assert raw.startswith(b": OPENROUTER PROCESSING\n\n") and raw.endswith(b"data: [DONE]\n\n")
    *deltas, usage_chunk = json_chunks(raw)
    assert all(c["usage"] is None for c in deltas) and usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (MESSAGES_PROMPT_TOKENS, 8)
    assert usage["cost"] == mock_provider.openrouter_cost(MESSAGES_PROMPT_TOKENS, 8)
    assert usage["is_byok"] is False and usage["cost_details"] == {"upstream_inference_cost": None}


async def test_openrouter_other_routes_carry_cost(openrouter):
    completion = await (
        await openrouter.post(
            "/api/v1/completions", json={"model": "m", "prompt": "hi", "stream": True}, headers=OR_AUTH
        )
    ).read()
    assert completion.startswith(b": OPENROUTER PROCESSING")
    assert json_chunks(completion)[-1]["usage"]["cost"] == mock_provider.openrouter_cost(1, 8)
    result = await (await openrouter.post("/api/v1/responses", json=responses_body(), headers=OR_AUTH)).json()
    assert result["usage"]["cost"] == mock_provider.openrouter_cost(7, 8) and result["usage"]["is_byok"] is False
    embedded = await (
        await openrouter.post("/api/v1/embeddings", json={"model": "e", "input": "abcd"}, headers=OR_AUTH)
    ).json()
    assert embedded["usage"]["cost"] == mock_provider.openrouter_cost(2, 0)
    message = await (
        await openrouter.post("/api/v1/messages", json=anthropic_body(), headers={"x-api-key": "sk-or-v1-good-key"})
    ).json()
    assert message["usage"]["input_tokens"] == ANTHROPIC_INPUT_TOKENS


async def test_openrouter_served_model_errors_and_key(openrouter):
    body = await (
        await openrouter.post(
            "/api/v1/chat/completions", json=chat(), headers={**OR_AUTH, "x-mock-served-model": "openai/gpt-4o"}
        )
    ).json()
    assert body["model"] == "openai/gpt-4o"
    response = await openrouter.post(
        "/api/v1/chat/completions", json=chat(), headers={**OR_AUTH, "x-mock-status": "402", "x-mock-error-code": "x"}
    )
    assert response.status == 402
    assert await response.json() == {
        "error": {
            "code": 402,
            "message": "mock provider injected status 402",
            "metadata": {"provider_name": "mock-provider", "raw": "x"},
        }
    }
    response = await openrouter.post(
        "/api/v1/chat/completions", json=chat(stream=True), headers={**OR_AUTH, "x-mock-error-after": "1"}
    )
    last = json_chunks(await response.read())[-1]
    assert last["error"]["code"] == "server_error" and last["choices"][0]["finish_reason"] == "error"

    key = await openrouter.get("/api/v1/key", headers=OR_AUTH)
    assert key.status == 200
    data = (await key.json())["data"]
    assert data["label"] == "sk-or-v1-...key" and data["usage"] == 0 and data["limit"] is None
    bad = await openrouter.get("/api/v1/key", headers={"Authorization": "Bearer sk-or-v1-bad"})
    assert bad.status == 401 and (await bad.json())["error"]["code"] == 401
    missing = await openrouter.get("/api/v1/nope", headers=OR_AUTH)
    assert missing.status == 404 and (await missing.json())["error"]["code"] == 404


async def test_openai_flavor_has_no_openrouter_routes(client):
    for path in ("/api/v1/chat/completions", "/api/v1/key"):
        response = await client.post(path, json=chat(), headers=AUTH)
        assert response.status == 404


async def test_openai_sdk_against_openrouter_flavor(aiohttp_server):
    server = await aiohttp_server(build_app(MockOptions(flavor="openrouter")))
    sdk = openai.AsyncOpenAI(base_url=str(server.make_url("/api/v1")), api_key="k", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        assert chunks[-1].usage.model_extra == {
            "cost": mock_provider.openrouter_cost(MESSAGES_PROMPT_TOKENS, 8),
            "is_byok": False,
            "cost_details": {"upstream_inference_cost": None},
        }
        stream = await sdk.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, extra_headers={"x-mock-error-after": "0"}
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    finally:
        await sdk.close()


def test_flavor_is_validated():
    with pytest.raises(ValueError):
        build_app(MockOptions(flavor="azure"))
    with pytest.raises(SystemExit):
        mock_provider.main(["--flavor", "azure"])


async def test_chat_and_completions_cache_read_is_inside_prompt_tokens(client):
    headers = {**AUTH, "x-mock-cache-read": "100"}
    usage = (await (await client.post("/v1/chat/completions", json=chat(), headers=headers)).json())["usage"]
    assert (
        usage["prompt_tokens"] == MESSAGES_PROMPT_TOKENS + 100
        and usage["prompt_tokens_details"]["cached_tokens"] == 100
    )
    body = {"model": "m", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}}
    usage = json_chunks(await (await client.post("/v1/completions", json=body, headers=headers)).read())[-1]["usage"]
    assert usage["prompt_tokens"] == 101 and usage["prompt_tokens_details"]["cached_tokens"] == 100
