from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from sidecar import mock_provider
from sidecar.mock_provider import RECORDED, MockOptions, build_app, prompt_tokens_for
from sidecar.sse import SSEFramer

AUTH = {"Authorization": "Bearer test-key"}
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there, mock!"}]
# (8 + 18) // 4 + 2 messages
MESSAGES_PROMPT_TOKENS = 8


def chat(**overrides: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": MESSAGES, **overrides}


def sse_data(body: bytes) -> list[bytes]:
    framer = SSEFramer()
    events = framer.feed(body)
    assert framer.flush() is None, "stream must end on an event boundary"
    return [event.data for event in events]


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
    assert [m["id"] for m in body["data"]] == list(mock_provider.DEFAULT_MODELS)


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
    response = await client.post("/v1/embeddings", json={}, headers=AUTH)
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
    assert [m.id async for m in models] == list(mock_provider.DEFAULT_MODELS)


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
