"""End to end for every wire protocol: the official SDKs (anthropic, openai) and raw clients against the
in-process sidecar, each call checked on its ledger row and the balance, to the micro-credit.

Covers the Anthropic Messages API, the OpenAI Responses, completions and embeddings APIs, fallback between
targets, client disconnects per protocol, the OpenRouter flavour, route/protocol mismatches, and recorded
real-shaped streams under every chunk split.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import anthropic
import httpx2
import openai
import orjson
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from support.harness import PLATFORM_KEY, PRICING, Sidecar, Workspace, chat_body, start_sidecar, stop_sidecar

from sidecar.config import parse_pricing
from sidecar.devtools import mock_provider
from sidecar.devtools.mock_provider import (
    anthropic_input_tokens_for,
    completion_prompt_tokens_for,
    embedding_for,
    embedding_tokens_for,
    responses_input_tokens_for,
)
from sidecar.pricing import Usage
from sidecar.protocols import anthropic_messages, openai_completions, openai_responses
from sidecar.protocols.base import RequestFacts
from sidecar.sse import SSEFramer

FIXTURES = Path(__file__).parent / "fixtures"
TEXT = "x" * 400  # the mock bills 400 // 4 + 1 = 101 input tokens for one message / prompt / input
ANTHROPIC_MESSAGES = [{"role": "user", "content": TEXT}]
CREDITS = 1_000_000
CLASSES = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
PRICE_SCALE = 10**9  # prices are held as micro-credits per token x 1e9, so every sum below is an exact integer


# --- hand-computed prices, from the harness's PRICING dict alone ---------------------------------------------


def scaled_prices(name: str) -> dict[str, int]:
    """Per token, in micro-credits x 1e9: a price P per 1M tokens is P micro-credits per token. An unpriced cache
    class costs what plain input costs."""
    entry = PRICING["models"][name]
    return {cls: int(Decimal(entry.get(cls, entry["input"])) * PRICE_SCALE) for cls in CLASSES}


def cost_micro(
    price: str,
    input: int = 0,
    output: int = 0,
    cache_read: int = 0,
    cache_write_5m: int = 0,
    cache_write_1h: int = 0,
) -> int:
    """The exact cost, rounded up once (charge_min is 0 in the harness)."""
    p = scaled_prices(price)
    nano = (
        input * p["input"]
        + output * p["output"]
        + cache_read * p["cache_read"]
        + cache_write_5m * p["cache_write_5m"]
        + cache_write_1h * p["cache_write_1h"]
    )
    return -(-nano // PRICE_SCALE)


def hold_micro(prices: list[str], body_bytes: int, output_cap: int) -> int:
    """The worst case over every target: each request byte an input token at the dearest input class, plus the cap
    of output tokens."""
    worst = 0
    for name in prices:
        p = scaled_prices(name)
        dearest_input = max(p["input"], p["cache_read"], p["cache_write_5m"], p["cache_write_1h"])
        worst = max(worst, -(-(body_bytes * dearest_input + output_cap * p["output"]) // PRICE_SCALE))
    return worst


def ceil4(chars: int) -> int:
    return -(-chars // 4)


# --- clients ---------------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def anthropic_client(sidecar: Sidecar, key: str) -> AsyncIterator[tuple[anthropic.AsyncAnthropic, list]]:
    """The official Anthropic SDK on the sidecar, and the request bodies it sent (to hand-compute holds)."""
    sent: list[bytes] = []

    async def keep(request: httpx2.Request) -> None:
        sent.append(request.content)

    http = httpx2.AsyncClient(event_hooks={"request": [keep]})
    async with anthropic.AsyncAnthropic(
        base_url=str(sidecar.data.make_url("")), api_key=key, max_retries=0, http_client=http
    ) as client:
        yield client, sent


@contextlib.asynccontextmanager
async def openai_client(sidecar: Sidecar, key: str) -> AsyncIterator[tuple[openai.AsyncOpenAI, list]]:
    sent: list[bytes] = []

    async def keep(request: httpx2.Request) -> None:
        sent.append(request.content)

    http = httpx2.AsyncClient(event_hooks={"request": [keep]})
    async with openai.AsyncOpenAI(base_url=sidecar.base_url, api_key=key, max_retries=0, http_client=http) as client:
        yield client, sent


async def post(sidecar: Sidecar, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with sidecar.http.post(
        sidecar.data.make_url(path), data=body, headers={"Content-Type": "application/json", **headers}
    ) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


def bearer(ws: Workspace) -> dict[str, str]:
    return {"Authorization": f"Bearer {ws.key}"}


def sse_events(stream: bytes) -> list[tuple[str | None, dict | str]]:
    """(event name, parsed data) for every event with data in a complete SSE body."""
    framer = SSEFramer()
    events = framer.feed(stream)
    tail = framer.flush()
    if tail is not None:
        events.append(tail)
    out = []
    for event in events:
        if event.is_comment_only or not event.data:
            continue
        out.append((event.event, event.data.decode() if event.data == b"[DONE]" else orjson.loads(event.data)))
    return out


async def one_row(sidecar: Sidecar, ws: Workspace):
    identity = await sidecar.assert_identity(ws.id)
    rows = await sidecar.ledger(ws.id)
    assert len(rows) == 1, rows
    return rows[0], identity


def assert_billed(row, identity: dict, cost: int, balance_before: int = CREDITS) -> None:
    assert row["cost_micro"] == cost
    assert row["balance_impact_micro"] == -cost
    assert row["balance_after_micro"] == balance_before - cost
    assert identity["debits"] == cost and identity["account_balance"] == balance_before - cost
    assert row["hold_micro"] >= cost


def tokens(row) -> tuple[int, int, int, int, int]:
    return (
        row["input_tokens"],
        row["output_tokens"],
        row["cache_read_tokens"],
        row["cache_write_5m_tokens"],
        row["cache_write_1h_tokens"],
    )


# ================================================================================================================
# 1. Anthropic Messages, with the official anthropic SDK
# ================================================================================================================


async def test_anthropic_non_streaming_is_billed_exactly(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with anthropic_client(sidecar, ws.key) as (client, sent):
        message = await client.messages.create(model="claude-test", max_tokens=50, messages=ANTHROPIC_MESSAGES)
    assert anthropic_input_tokens_for({"messages": ANTHROPIC_MESSAGES}) == 101
    assert (message.usage.input_tokens, message.usage.output_tokens) == (101, 8)
    assert message.content[0].text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    assert message.stop_reason == "end_turn"

    row, identity = await one_row(sidecar, ws)
    cost = cost_micro("claude-test", input=101, output=8)
    assert cost == 101 * 3 + 8 * 15 == 423
    assert_billed(row, identity, cost)
    assert row["status"] == "completed" and row["estimated"] is False and row["error"] is None
    assert tokens(row) == (101, 8, 0, 0, 0)
    assert row["protocol"] == "anthropic_messages"
    assert (row["provider"], row["model"], row["upstream_model"]) == ("mock-anthropic", "claude-test", "claude-test")
    assert (row["attempts"], row["fallback_reason"]) == (1, None)
    # The hold: every request byte at the dearest input class (1-hour cache write, 6.00) + max_tokens at 15.00.
    [body] = sent
    assert row["hold_micro"] == hold_micro(["claude-test"], len(body), 50) == len(body) * 6 + 50 * 15

    # The SDK sent the client key as x-api-key; the platform key went upstream the same way, and nothing else.
    forwarded = sidecar.recorded[-1]
    assert forwarded.path == "/v1/messages"
    assert forwarded.headers["x-api-key"] == PLATFORM_KEY
    assert "authorization" not in forwarded.headers
    assert forwarded.headers["anthropic-version"], "the SDK's anthropic-version is passed on"
    assert ws.key not in str(dict(forwarded.headers)) and ws.key not in orjson.dumps(forwarded.json_body).decode()
    assert forwarded.json_body["max_tokens"] == 50


async def test_anthropic_stream_true_is_billed_from_message_delta(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with anthropic_client(sidecar, ws.key) as (client, sent):
        stream = await client.messages.create(
            model="claude-test", max_tokens=5, messages=ANTHROPIC_MESSAGES, stream=True
        )
        events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == "tok0 tok1 tok2 tok3 tok4 "  # capped by max_tokens
    assert events[0].message.usage.input_tokens == 101
    assert events[-2].usage.output_tokens == 5 and events[-2].delta.stop_reason == "max_tokens"

    row, identity = await one_row(sidecar, ws)
    # message_start's output_tokens (1) is never added to message_delta's cumulative 5.
    assert tokens(row) == (101, 5, 0, 0, 0)
    assert_billed(row, identity, cost_micro("claude-test", input=101, output=5))
    assert row["status"] == "completed" and row["estimated"] is False
    assert row["hold_micro"] == hold_micro(["claude-test"], len(sent[0]), 5)
    assert row["first_byte_at"] is not None


async def test_anthropic_stream_helper_final_message(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with anthropic_client(sidecar, ws.key) as (client, _):
        async with client.messages.stream(
            model="claude-test", max_tokens=100, messages=ANTHROPIC_MESSAGES, system="be brief"
        ) as stream:
            final = await stream.get_final_message()
    input_tokens = anthropic_input_tokens_for({"system": "be brief", "messages": ANTHROPIC_MESSAGES})
    assert input_tokens == (8 + 400) // 4 + 1 == 103
    assert (final.usage.input_tokens, final.usage.output_tokens) == (103, 8)
    assert final.content[0].text.startswith("tok0 ")

    row, identity = await one_row(sidecar, ws)
    assert tokens(row) == (103, 8, 0, 0, 0)
    assert_billed(row, identity, cost_micro("claude-test", input=103, output=8))
    assert row["status"] == "completed"


CACHE_HEADERS = {"x-mock-cache-read": "40", "x-mock-cache-write-5m": "10", "x-mock-cache-write-1h": "20"}
CACHED_SYSTEM = [{"type": "text", "text": "s" * 400, "cache_control": {"type": "ephemeral"}}]
# (400 + 400) // 4 + 1: the system block and the one message, outside the cache counts (Anthropic's rule).
CACHED_INPUT = 201
# 201 x 3.00 + 8 x 15.00 + 40 x 0.30 + 10 x 3.75 + 20 x 6.00 = 603 + 120 + 12 + 37.5 + 120 = 892.5 -> 893
CACHED_COST = 893


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_anthropic_cache_classes_billed_at_their_own_prices(sidecar: Sidecar, stream: bool) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with anthropic_client(sidecar, ws.key) as (client, _):
        if stream:
            async with client.messages.stream(
                model="claude-test",
                max_tokens=100,
                system=CACHED_SYSTEM,
                messages=ANTHROPIC_MESSAGES,
                extra_headers=CACHE_HEADERS,
            ) as s:
                usage = (await s.get_final_message()).usage
        else:
            usage = (
                await client.messages.create(
                    model="claude-test",
                    max_tokens=100,
                    system=CACHED_SYSTEM,
                    messages=ANTHROPIC_MESSAGES,
                    extra_headers=CACHE_HEADERS,
                )
            ).usage
    assert usage.input_tokens == CACHED_INPUT
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (40, 30)

    row, identity = await one_row(sidecar, ws)
    assert tokens(row) == (CACHED_INPUT, 8, 40, 10, 20)
    cost = cost_micro("claude-test", input=201, output=8, cache_read=40, cache_write_5m=10, cache_write_1h=20)
    assert cost == CACHED_COST
    assert_billed(row, identity, CACHED_COST)


@pytest.mark.parametrize(
    "extra",
    [{"x-mock-full-delta-usage": "1"}, {"x-mock-full-delta-usage": "1", "x-mock-progress-deltas": "1"}],
    ids=["full-delta", "full-and-progress-deltas"],
)
async def test_anthropic_full_delta_usage_is_not_counted_twice(sidecar: Sidecar, extra: dict) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with anthropic_client(sidecar, ws.key) as (client, _):
        stream = await client.messages.create(
            model="claude-test",
            max_tokens=100,
            system=CACHED_SYSTEM,
            messages=ANTHROPIC_MESSAGES,
            stream=True,
            extra_headers={**CACHE_HEADERS, **extra},
        )
        events = [event async for event in stream]
    deltas = [e for e in events if e.type == "message_delta"]
    assert deltas[-1].usage.input_tokens == CACHED_INPUT, "the mock repeats the input counts in message_delta"
    assert len(deltas) == (9 if "x-mock-progress-deltas" in extra else 1)

    row, identity = await one_row(sidecar, ws)
    assert tokens(row) == (CACHED_INPUT, 8, 40, 10, 20)
    assert_billed(row, identity, CACHED_COST)


async def test_anthropic_bearer_authorization_also_works(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    body = orjson.dumps({"model": "claude-test", "max_tokens": 20, "messages": ANTHROPIC_MESSAGES})
    status, headers, raw = await post(sidecar, "/v1/messages", body, bearer(ws))
    assert status == 200, raw
    message = orjson.loads(raw)
    assert message["type"] == "message" and message["usage"]["output_tokens"] == 8
    cost = cost_micro("claude-test", input=101, output=8)
    assert headers["x-sidecar-cost-micro"] == str(cost)

    forwarded = sidecar.recorded[-1]
    assert forwarded.headers["x-api-key"] == PLATFORM_KEY
    assert "authorization" not in forwarded.headers, "the client's bearer token never goes upstream"
    assert forwarded.headers["anthropic-version"] == "2023-06-01", "a default version when the client sent none"

    row, identity = await one_row(sidecar, ws)
    assert_billed(row, identity, cost)
    assert row["hold_micro"] == hold_micro(["claude-test"], len(body), 20)
    assert row["request_id"] == headers["x-request-id"]


async def test_anthropic_missing_max_tokens_is_400_in_anthropic_envelope(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    before = len(sidecar.recorded)
    body = orjson.dumps({"model": "claude-test", "messages": ANTHROPIC_MESSAGES})
    status, _, raw = await post(sidecar, "/v1/messages", body, {"x-api-key": ws.key})
    assert status == 400
    error = orjson.loads(raw)
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in error["error"]["message"]
    assert len(sidecar.recorded) == before, "nothing forwarded"
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 0 and identity["account_balance"] == CREDITS


@pytest.mark.parametrize(
    ("case", "status", "error_type"),
    [
        ("bad-key", 401, "authentication_error"),
        ("unknown-model", 404, "not_found_error"),
        ("too-large", 413, "request_too_large"),
    ],
)
async def test_anthropic_sidecar_errors_use_anthropic_envelope(
    sidecar: Sidecar, case: str, status: int, error_type: str
) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    payload = {"model": "claude-test", "max_tokens": 10, "messages": ANTHROPIC_MESSAGES}
    key = ws.key
    if case == "bad-key":
        key = "sk-sc-not-a-key"
    elif case == "unknown-model":
        payload["model"] = "claude-nope"
    else:
        payload["messages"] = [{"role": "user", "content": "z" * 70_000}]  # over server.body_bytes_max (64 KiB)
    before = len(sidecar.recorded)
    code, _, raw = await post(sidecar, "/v1/messages", orjson.dumps(payload), {"x-api-key": key})
    assert code == status
    body = orjson.loads(raw)
    assert body["type"] == "error" and body["error"]["type"] == error_type and body["error"]["message"]
    assert len(sidecar.recorded) == before, "nothing forwarded"
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 0 and identity["account_balance"] == CREDITS


async def test_anthropic_402_is_a_billing_error_with_the_payment_code(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=10)
    before = len(sidecar.recorded)
    async with anthropic_client(sidecar, ws.key) as (client, _):
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(model="claude-test", max_tokens=50, messages=ANTHROPIC_MESSAGES)
    assert caught.value.status_code == 402
    assert caught.value.response.json() == {
        "type": "error",
        "error": {"type": "billing_error", "message": "insufficient credits", "code": "PAYMENT_REQUIRED"},
    }
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(sidecar.recorded) == before, "nothing forwarded"
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 0 and identity["account_balance"] == 10


async def test_anthropic_429_is_a_rate_limit_error(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS, rpm=1)
    async with anthropic_client(sidecar, ws.key) as (client, _):
        await client.messages.create(model="claude-test", max_tokens=8, messages=ANTHROPIC_MESSAGES)
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(model="claude-test", max_tokens=8, messages=ANTHROPIC_MESSAGES)
    assert caught.value.status_code == 429
    body = caught.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    row, identity = await one_row(sidecar, ws)  # only the first call
    assert_billed(row, identity, cost_micro("claude-test", input=101, output=8))


async def test_anthropic_provider_errors_pass_through_and_platform_auth_failure_is_ours(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with anthropic_client(sidecar, ws.key) as (client, _):
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(
                model="claude-test",
                max_tokens=8,
                messages=ANTHROPIC_MESSAGES,
                extra_headers={"x-mock-status": "529"},
            )
        assert caught.value.status_code == 529
        assert caught.value.response.json()["error"]["type"] == "overloaded_error"  # the provider's own answer

        # The provider refused the platform's key: a 502 in the sidecar's words, in Anthropic's envelope.
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(
                model="claude-test",
                max_tokens=8,
                messages=ANTHROPIC_MESSAGES,
                extra_headers={"x-mock-status": "401"},
            )
    assert caught.value.status_code == 502
    body = caught.value.response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "api_error" and body["error"]["code"] == "upstream_auth_failed"
    identity = await sidecar.assert_identity(ws.id)
    rows = await sidecar.ledger(ws.id)
    assert [(r["status"], r["cost_micro"]) for r in rows] == [("failed", 0), ("failed", 0)]
    assert identity["debits"] == 0


async def test_anthropic_mid_stream_error_event_fails_the_call_at_no_cost(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with anthropic_client(sidecar, ws.key) as (client, _):
        stream = await client.messages.create(
            model="claude-test",
            max_tokens=50,
            messages=ANTHROPIC_MESSAGES,
            stream=True,
            extra_headers={"x-mock-error-after": "3"},
        )
        seen = []
        with pytest.raises(anthropic.APIStatusError) as caught:
            async for event in stream:
                seen.append(event.type)
    assert seen.count("content_block_delta") == 3
    assert "Overloaded" in str(caught.value)
    row, identity = await one_row(sidecar, ws)
    assert row["status"] == "failed"
    assert row["cost_micro"] == 0 and row["balance_impact_micro"] == 0
    assert "Overloaded" in row["error"]
    assert identity["debits"] == 0 and identity["account_balance"] == CREDITS


# ================================================================================================================
# 2. OpenAI Responses, completions and embeddings, with the official openai SDK
# ================================================================================================================


async def test_responses_non_streaming(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with openai_client(sidecar, ws.key) as (client, sent):
        response = await client.responses.create(model="gpt-4o-mini", input=TEXT)
    assert responses_input_tokens_for({"input": TEXT}) == 101
    assert (response.usage.input_tokens, response.usage.output_tokens) == (101, 8)
    assert response.output_text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    forwarded = sidecar.recorded[-1]
    assert forwarded.path == "/v1/responses"
    assert forwarded.json_body["max_output_tokens"] == 100, "the model's default cap is injected"

    row, identity = await one_row(sidecar, ws)
    assert tokens(row) == (101, 8, 0, 0, 0)
    cost = cost_micro("gpt-4o-mini", input=101, output=8)
    assert cost == 101 * 5 + 8 * 25 == 705
    assert_billed(row, identity, cost)
    assert row["protocol"] == "openai_responses" and row["status"] == "completed"
    assert row["hold_micro"] == hold_micro(["gpt-4o-mini"], len(sent[0]), 100)


@pytest.mark.parametrize("cap", [None, 5], ids=["completed", "incomplete"])
async def test_responses_streaming_billed_from_the_terminal_event(sidecar: Sidecar, cap: int | None) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    extra = {} if cap is None else {"max_output_tokens": cap}
    async with openai_client(sidecar, ws.key) as (client, sent):
        stream = await client.responses.create(
            model="gpt-4o-mini", input=TEXT, stream=True, extra_headers={"x-mock-cache-read": "40"}, **extra
        )
        events = [event async for event in stream]
    output = 8 if cap is None else 5
    terminal = events[-1]
    assert terminal.type == ("response.completed" if cap is None else "response.incomplete")
    # OpenAI counts cached tokens INSIDE input_tokens.
    assert (terminal.response.usage.input_tokens, terminal.response.usage.output_tokens) == (141, output)
    assert terminal.response.usage.input_tokens_details.cached_tokens == 40
    assert sum(1 for e in events if e.type == "response.output_text.delta") == output
    assert sidecar.recorded[-1].json_body["max_output_tokens"] == (cap or 100)
    assert "stream_options" not in sidecar.recorded[-1].json_body, "Responses has no include_usage option"

    row, identity = await one_row(sidecar, ws)
    assert tokens(row) == (101, output, 40, 0, 0)
    cost = cost_micro("gpt-4o-mini", input=101, output=output, cache_read=40)
    assert cost == 101 * 5 + 40 * 0.5 + output * 25
    assert_billed(row, identity, cost)
    assert row["status"] == "completed" and row["estimated"] is False
    assert row["hold_micro"] == hold_micro(["gpt-4o-mini"], len(sent[0]), cap or 100)


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_completions(sidecar: Sidecar, stream: bool) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with openai_client(sidecar, ws.key) as (client, sent):
        if stream:
            chunks = [c async for c in await client.completions.create(model="gpt-4o-mini", prompt=TEXT, stream=True)]
            assert all(c.choices for c in chunks), "the usage chunk the client did not ask for must not reach it"
            text = "".join(c.choices[0].text for c in chunks)
        else:
            completion = await client.completions.create(model="gpt-4o-mini", prompt=TEXT)
            assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (101, 8)
            text = completion.choices[0].text
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    assert completion_prompt_tokens_for({"prompt": TEXT}) == 101
    forwarded = sidecar.recorded[-1].json_body
    assert forwarded["max_tokens"] == 100, "the model's default cap is injected as max_tokens"
    assert "max_completion_tokens" not in forwarded
    if stream:
        assert forwarded["stream_options"] == {"include_usage": True}
    else:
        assert "stream_options" not in forwarded

    row, identity = await one_row(sidecar, ws)
    assert tokens(row) == (101, 8, 0, 0, 0)
    assert_billed(row, identity, cost_micro("gpt-4o-mini", input=101, output=8))
    assert row["protocol"] == "openai_completions" and row["status"] == "completed"
    assert row["hold_micro"] == hold_micro(["gpt-4o-mini"], len(sent[0]), 100)


async def test_embeddings_are_priced_on_input_only(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with openai_client(sidecar, ws.key) as (client, sent):
        result = await client.embeddings.create(model="embed-small", input=TEXT)
    assert embedding_tokens_for({"input": TEXT}) == 101
    assert result.usage.prompt_tokens == result.usage.total_tokens == 101
    assert result.data[0].embedding == embedding_for(TEXT)
    forwarded = sidecar.recorded[-1].json_body
    assert not {"max_tokens", "max_completion_tokens", "max_output_tokens", "stream_options"} & set(forwarded)

    row, identity = await one_row(sidecar, ws)
    assert tokens(row) == (101, 0, 0, 0, 0)
    cost = cost_micro("embed-small", input=101)
    assert cost == 3  # 101 x 0.02 = 2.02, rounded up
    assert_billed(row, identity, cost)
    assert row["protocol"] == "openai_embeddings"
    assert row["hold_micro"] == hold_micro(["embed-small"], len(sent[0]), 0)


async def test_completions_with_a_list_of_prompts_holds_and_bills_every_choice(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    prompts = ["a" * 40, "b" * 80]
    assert completion_prompt_tokens_for({"prompt": prompts}) == 10 + 20 + 2
    async with openai_client(sidecar, ws.key) as (client, sent):
        completion = await client.completions.create(model="gpt-4o-mini", prompt=prompts, max_tokens=6)
    assert sorted(choice.index for choice in completion.choices) == [0, 1]
    assert completion.usage.completion_tokens == 2 * 6
    row, identity = await one_row(sidecar, ws)
    assert tokens(row) == (32, 12, 0, 0, 0)
    assert_billed(row, identity, cost_micro("gpt-4o-mini", input=32, output=12))
    # The output cap applies to each of the two choices.
    assert row["hold_micro"] == hold_micro(["gpt-4o-mini"], len(sent[0]), 2 * 6)


# ================================================================================================================
# 3. Fallback between targets
# ================================================================================================================


@pytest.mark.parametrize("model", ["fallback-503", "fallback-dead"])
@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_fallback_serves_from_the_second_target_and_bills_there(
    sidecar: Sidecar, model: str, stream: bool
) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    body = orjson.dumps(chat_body(TEXT, model=model, stream=stream))
    status, _, raw = await post(sidecar, "/v1/chat/completions", body, bearer(ws))
    assert status == 200, raw
    if stream:
        events = sse_events(raw)
        assert events[-1] == (None, "[DONE]")
        chunks = [data for _, data in events[:-1]]
        assert all(chunk["choices"] for chunk in chunks), "no usage chunk: the client did not ask"
        text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
        assert {chunk["model"] for chunk in chunks} == {"second-model"}
    else:
        answer = orjson.loads(raw)
        text = answer["choices"][0]["message"]["content"]
        assert answer["model"] == "second-model"
        assert answer["usage"]["prompt_tokens"] == 101
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "

    row, identity = await one_row(sidecar, ws)
    cost = cost_micro("fallback-second", input=101, output=8)
    assert cost == 101 * 1 + 8 * 2 == 117
    assert cost != cost_micro("fallback-first", input=101, output=8)
    assert_billed(row, identity, cost)
    assert (row["status"], row["attempts"]) == ("completed", 2)
    assert (row["provider"], row["upstream_model"], row["model"]) == ("mock", "second-model", model)
    first = "mock-503" if model == "fallback-503" else "mock-dead"
    assert row["fallback_reason"].startswith(f"{first}: ")
    if model == "fallback-503":
        assert row["fallback_reason"] == "mock-503: answered 503"
    assert tokens(row) == (101, 8, 0, 0, 0)
    # The hold is the worst case over both targets (the dear first one), though the cheap one served.
    assert row["hold_micro"] == hold_micro(["fallback-first", "fallback-second"], len(body), 100)
    assert row["hold_micro"] == len(body) * 50 + 100 * 100
    assert sidecar.recorded[-1].json_body["model"] == "second-model"

    registry = sidecar.svc.metrics.registry
    outcome = "503" if model == "fallback-503" else "unreachable"
    assert registry.get_sample_value("sidecar_upstream_attempts_total", {"provider": first, "outcome": outcome}) == 1
    assert registry.get_sample_value("sidecar_upstream_attempts_total", {"provider": "mock", "outcome": "200"}) == 1
    exposition = generate_latest(registry).decode()
    assert f'sidecar_upstream_attempts_total{{outcome="{outcome}",provider="{first}"}} 1.0' in exposition
    assert 'sidecar_upstream_attempts_total{outcome="200",provider="mock"} 1.0' in exposition


# ================================================================================================================
# 4. The client disconnects mid-stream, per protocol
# ================================================================================================================


def _chat_text(name: str | None, data: dict) -> int:
    return sum(len(c.get("delta", {}).get("content") or "") for c in data.get("choices") or [])


def _completions_text(name: str | None, data: dict) -> int:
    return sum(len(c.get("text") or "") for c in data.get("choices") or [])


def _responses_text(name: str | None, data: dict) -> int:
    return len(data["delta"]) if data.get("type") == "response.output_text.delta" else 0


def _anthropic_text(name: str | None, data: dict) -> int:
    return len(data["delta"]["text"]) if data.get("type") == "content_block_delta" else 0


DISCONNECT_CASES = {
    "chat": ("/v1/chat/completions", "gpt-4o-mini", chat_body(TEXT, stream=True), _chat_text),
    "completions": (
        "/v1/completions",
        "gpt-4o-mini",
        {"model": "gpt-4o-mini", "prompt": TEXT, "stream": True},
        _completions_text,
    ),
    "responses": (
        "/v1/responses",
        "gpt-4o-mini",
        {"model": "gpt-4o-mini", "input": TEXT, "stream": True},
        _responses_text,
    ),
    "anthropic": (
        "/v1/messages",
        "claude-test",
        {"model": "claude-test", "max_tokens": 100, "messages": ANTHROPIC_MESSAGES, "stream": True},
        _anthropic_text,
    ),
    "anthropic-progress": (
        "/v1/messages",
        "claude-test",
        {"model": "claude-test", "max_tokens": 100, "messages": ANTHROPIC_MESSAGES, "stream": True},
        _anthropic_text,
    ),
}


@pytest_asyncio.fixture
async def sidecar_no_usage_wait(redis_client, redis_url: str, migrated_database_url: str) -> AsyncIterator[Sidecar]:
    """A sidecar that stops reading the provider as soon as the client hangs up: what it bills then is
    its estimate of what was observed."""
    instance = await start_sidecar(redis_url, migrated_database_url, upstream={"usage_wait_after_hangup_ms": 0})
    try:
        yield instance
    finally:
        await stop_sidecar(instance)


@pytest.mark.parametrize("case", list(DISCONNECT_CASES))
async def test_client_disconnect_mid_stream_bills_what_was_observed(sidecar_no_usage_wait: Sidecar, case: str) -> None:
    sidecar = sidecar_no_usage_wait
    path, model, payload, text_of = DISCONNECT_CASES[case]
    ws = await sidecar.workspace(credits_micro=CREDITS)
    body = orjson.dumps(payload)
    headers = {
        **bearer(ws),
        "Content-Type": "application/json",
        "x-mock-chunks": "60",
        "x-mock-delay-ms": "20",
        # A cut stream is not kept under its key: the client's retry runs again (and is billed as a new call).
        "Idempotency-Key": f"disconnect-{case}",
    }
    if case == "anthropic-progress":
        headers["x-mock-progress-deltas"] = "1"

    received = b""
    async with sidecar.http.post(sidecar.data.make_url(path), data=body, headers=headers) as resp:
        assert resp.status == 200
        while received.count(b'"tok') < 5:
            chunk = await asyncio.wait_for(resp.content.readany(), 5)
            assert chunk, "the stream ended before the client left"
            received += chunk
        resp.close()  # the client goes away after a few tokens

    rows = await sidecar.ledger_eventually(ws.id)
    assert len(rows) == 1, "exactly one row for the abandoned call"
    [row] = rows
    assert row["status"] == "cancelled"
    assert await sidecar.svc.state.active_holds(ws.id) == 0
    assert (await sidecar.redis_account(ws.id))[1] == 0, "nothing left held"

    seen_tokens = received.count(b'"tok')
    seen_chars = sum(text_of(name, data) for name, data in sse_events(received) if isinstance(data, dict))
    # The sidecar observed at least what the client got, and less than the whole answer.
    most_chars = len("".join(f"tok{i} " for i in range(60)))

    if model == "claude-test":
        input_tokens = anthropic_input_tokens_for(payload)  # exact, from message_start
        assert input_tokens == 101 and row["input_tokens"] == input_tokens
        if case == "anthropic-progress":
            # A message_delta counted the output: the provider's own cumulative count, not an estimate.
            assert seen_tokens - 1 <= row["output_tokens"] < 60
            estimated = False
        else:
            assert ceil4(seen_chars) <= row["output_tokens"] <= ceil4(most_chars)
            estimated = True
    else:
        # No usage chunk / terminal event arrived: input estimated from the request bytes, output from the text.
        assert row["input_tokens"] == ceil4(len(body))
        assert ceil4(seen_chars) <= row["output_tokens"] <= ceil4(most_chars)
        estimated = True
    input_tokens, output = row["input_tokens"], row["output_tokens"]
    assert row["estimated"] is estimated
    cost = cost_micro(model, input=input_tokens, output=output)
    assert 0 < cost <= row["hold_micro"]
    assert row["hold_micro"] == hold_micro([model], len(body), 100)
    identity = await sidecar.assert_identity(ws.id)
    assert_billed(row, identity, cost)
    assert identity["usage_rows"] == 1

    # The cut stream is not replayed under its key, nor does the key block the client's retry: it runs.
    retry_headers = {k: v for k, v in headers.items() if k not in ("x-mock-chunks", "x-mock-delay-ms")}
    status, _, _ = await post(sidecar, path, body, retry_headers)
    assert status == 200
    await sidecar.flush()
    statuses = sorted(r["status"] for r in await sidecar.ledger(ws.id))
    assert statuses == ["cancelled", "completed"]


@pytest.mark.parametrize("case", ["chat", "anthropic"])
async def test_client_disconnect_reads_on_for_the_providers_usage(sidecar: Sidecar, case: str) -> None:
    """After a hang-up the sidecar keeps reading (not relaying) the provider's stream until its usage
    arrives, and bills that exact count, not an estimate from bytes (issue 15.12)."""
    path, model, payload, _ = DISCONNECT_CASES[case]
    ws = await sidecar.workspace(credits_micro=CREDITS)
    body = orjson.dumps(payload)
    headers = {**bearer(ws), "Content-Type": "application/json", "x-mock-chunks": "40", "x-mock-delay-ms": "10"}
    received = b""
    async with sidecar.http.post(sidecar.data.make_url(path), data=body, headers=headers) as resp:
        assert resp.status == 200
        while received.count(b'"tok') < 3:
            chunk = await asyncio.wait_for(resp.content.readany(), 5)
            assert chunk, "the stream ended before the client left"
            received += chunk
        resp.close()
    rows = await sidecar.ledger_eventually(ws.id)
    [row] = rows
    assert row["status"] == "cancelled"
    assert row["estimated"] is False, "the provider's own count, not an estimate"
    assert row["output_tokens"] == 40, "every token the provider generated (and charged the platform for)"
    cost = cost_micro(model, input=row["input_tokens"], output=40)
    assert_billed(row, await sidecar.assert_identity(ws.id), cost)


MID_STREAM_ERRORS = {
    # The provider's own mid-stream error, as each protocol sends it.
    "chat": lambda events: events[-1][1]["error"]["code"] == "mock_stream_error",
    "completions": lambda events: events[-1][1]["error"]["code"] == "mock_stream_error",
    "responses": lambda events: events[-1][0] == "error" and events[-1][1]["code"] == "server_error",
    "anthropic": lambda events: events[-1][0] == "error" and events[-1][1]["error"]["type"] == "overloaded_error",
}
BROKEN_STREAM_ERRORS = {
    # The sidecar's own notice that the provider's stream broke off, in the client's protocol.
    "chat": lambda events: events[-1] == (None, _openai_stream_error()),
    "completions": lambda events: events[-1] == (None, _openai_stream_error()),
    "responses": lambda events: (
        events[-1][0] == "error"
        and events[-1][1]
        == {
            "type": "error",
            "code": "upstream_error",
            "message": "the provider's stream broke off",
            "param": None,
        }
    ),
    "anthropic": lambda events: (
        events[-1]
        == ("error", {"type": "error", "error": {"type": "api_error", "message": "the provider's stream broke off"}})
    ),
}


def _openai_stream_error() -> dict:
    return {
        "error": {
            "message": "the provider's stream broke off",
            "type": "api_error",
            "param": None,
            "code": "upstream_error",
        }
    }


@pytest.mark.parametrize("fault", ["x-mock-error-after", "x-mock-cut-after"], ids=["provider-error", "broken"])
@pytest.mark.parametrize("case", list(MID_STREAM_ERRORS))
async def test_upstream_failure_mid_stream_costs_nothing(sidecar: Sidecar, case: str, fault: str) -> None:
    path, _, payload, text_of = DISCONNECT_CASES[case]
    ws = await sidecar.workspace(credits_micro=CREDITS)
    status, _, raw = await post(sidecar, path, orjson.dumps(payload), {**bearer(ws), fault: "3"})
    assert status == 200
    events = sse_events(raw)
    assert sum(text_of(name, data) for name, data in events if isinstance(data, dict)) == len("tok0 tok1 tok2 ")
    assert (None, "[DONE]") not in events
    expected = MID_STREAM_ERRORS if fault == "x-mock-error-after" else BROKEN_STREAM_ERRORS
    assert expected[case](events), events[-1]
    row, identity = await one_row(sidecar, ws)
    assert row["status"] == "failed"
    assert (row["cost_micro"], row["balance_impact_micro"]) == (0, 0)
    assert row["error"]
    assert identity["debits"] == 0 and identity["account_balance"] == CREDITS


# ================================================================================================================
# 5. OpenRouter
# ================================================================================================================


def openrouter_requests(sidecar: Sidecar):
    """The OpenRouter-flavoured mock's recorded requests (the harness's third mock server)."""
    return sidecar.extra[1].app[mock_provider.RECORDED]


@pytest.mark.parametrize("client_wants_usage", [False, True])
async def test_openrouter_stream_always_has_usage(sidecar: Sidecar, client_wants_usage: bool) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    extra = {"stream_options": {"include_usage": True}} if client_wants_usage else {}
    async with openai_client(sidecar, ws.key) as (client, _):
        stream = await client.chat.completions.create(
            model="router-model", messages=[{"role": "user", "content": TEXT}], stream=True, **extra
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    if client_wants_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 101
    else:
        assert all(c.choices for c in chunks), "the usage chunk the client did not ask for must not reach it"
    forwarded = openrouter_requests(sidecar)[-1]
    assert forwarded.path == "/api/v1/chat/completions"
    assert forwarded.headers["authorization"] == f"Bearer {PLATFORM_KEY}"

    row, identity = await one_row(sidecar, ws)
    assert (row["status"], row["estimated"]) == ("completed", False)
    assert tokens(row) == (101, 8, 0, 0, 0)
    assert (row["provider"], row["upstream_model"]) == ("mock-openrouter", "router/requested")
    assert_billed(row, identity, cost_micro("router-requested", input=101, output=8))


async def test_openrouter_processing_comment_is_relayed_harmlessly(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    body = orjson.dumps(chat_body(TEXT, model="router-model", stream=True))
    status, _, raw = await post(sidecar, "/v1/chat/completions", body, bearer(ws))
    assert status == 200
    assert raw.startswith(b": OPENROUTER PROCESSING\n\n")
    events = sse_events(raw)
    assert events[-1] == (None, "[DONE]")
    assert all(data["choices"] for _, data in events[:-1])
    assert b'"choices":[]' not in raw
    row, identity = await one_row(sidecar, ws)
    assert tokens(row) == (101, 8, 0, 0, 0)
    assert_billed(row, identity, cost_micro("router-requested", input=101, output=8))


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_openrouter_served_model_sets_upstream_model_and_price(sidecar: Sidecar, stream: bool) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    body = orjson.dumps(chat_body(TEXT, model="router-model", stream=stream))
    status, _, raw = await post(
        sidecar, "/v1/chat/completions", body, {**bearer(ws), "x-mock-served-model": "router/served"}
    )
    assert status == 200, raw
    row, identity = await one_row(sidecar, ws)
    assert row["upstream_model"] == "router/served"
    cost = cost_micro("router/served", input=101, output=8)
    assert cost == 101 * 1 + 8 * 4 == 133
    assert_billed(row, identity, cost)
    assert row["hold_micro"] == hold_micro(["router-requested"], len(body), 100)


async def test_openrouter_only_fields_reach_openrouter_and_nothing_else(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=2 * CREDITS)
    routed = {"usage": {"include": True}, "provider": {"order": ["x"]}, "transforms": ["middle-out"]}
    status, _, raw = await post(
        sidecar, "/v1/chat/completions", orjson.dumps(chat_body(TEXT, model="router-model", **routed)), bearer(ws)
    )
    assert status == 200, raw
    to_router = openrouter_requests(sidecar)[-1].json_body
    assert {k: to_router[k] for k in routed} == routed

    # The plain mock (like api.openai.com) answers 400 to a top-level `usage`: the sidecar must strip it.
    # (`provider` is a routing field gpt-4o-mini does not allow: refused, see the routing tests.)
    routed.pop("provider")
    status, _, raw = await post(sidecar, "/v1/chat/completions", orjson.dumps(chat_body(TEXT, **routed)), bearer(ws))
    assert status == 200, raw
    to_openai = sidecar.recorded[-1].json_body
    assert not set(routed) & set(to_openai)
    assert to_openai["model"] == "gpt-4o-mini"

    identity = await sidecar.assert_identity(ws.id)
    expected = cost_micro("router-requested", input=101, output=8) + cost_micro("gpt-4o-mini", input=101, output=8)
    assert identity["usage_rows"] == 2 and identity["debits"] == expected


# ================================================================================================================
# 5b. What a hold covers: input the body does not bound, routing the client chooses, features with their own price
# ================================================================================================================

WINDOW = 128000  # the harness's context_window_tokens for these models
UNBOUNDED_INPUT = {
    # Media found by parsing, whatever the key's escapes or spacing: the body's bytes do not bound its tokens.
    "chat-escaped-image-key": (
        "/v1/chat/completions",
        "gpt-4o-mini",
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},'
        b' {"type" : "\\u0069mage_url", "\\u0069mage_url" : {"url": "https://example.com/a.png"}}]}]}',
    ),
    "chat-file-id": (
        "/v1/chat/completions",
        "gpt-4o-mini",
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":[{"type":"file","file":{"file_id":"file-1"}}]}]}',
    ),
    "anthropic-spaced-image": (
        "/v1/messages",
        "claude-test",
        b'{"model": "claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": [{"type" : "image",'
        b' "source": {"type": "url", "url": "https://example.com/a.png"}}, {"type": "text", "text": "hi"}]}]}',
    ),
    "anthropic-document": (
        "/v1/messages",
        "claude-test",
        b'{"model":"claude-test","max_tokens":100,"messages":[{"role":"user","content":[{"type":"document",'
        b'"source":{"type":"file","file_id":"file_1"}}]}]}',
    ),
    # Server-side context and server tools: input stored or fetched at the provider.
    "responses-previous-response": (
        "/v1/responses",
        "gpt-4o-mini",
        b'{"model":"gpt-4o-mini","input":"and then?","previous_response_id":"resp_123"}',
    ),
    "responses-conversation": (
        "/v1/responses",
        "gpt-4o-mini",
        b'{"model":"gpt-4o-mini","input":"and then?","conversation":"conv_123"}',
    ),
    "responses-stored-prompt": (
        "/v1/responses",
        "gpt-4o-mini",
        b'{"model":"gpt-4o-mini","prompt":{"id":"pmpt_1","version":"2"}}',
    ),
    "responses-mcp-tool": (
        "/v1/responses",
        "gpt-4o-mini",
        b'{"model":"gpt-4o-mini","input":"hi","tools":[{"type":"mcp","server_label":"x","server_url":"https://x"}]}',
    ),
    "anthropic-web-fetch": (
        "/v1/messages",
        "claude-test",
        b'{"model":"claude-test","max_tokens":100,"messages":[{"role":"user","content":"hi"}],'
        b'"tools":[{"type":"web_fetch_20250910","name":"web_fetch"}]}',
    ),
}


@pytest.mark.parametrize("case", list(UNBOUNDED_INPUT))
async def test_input_the_body_does_not_bound_is_held_at_the_context_window(sidecar: Sidecar, case: str) -> None:
    path, model, body = UNBOUNDED_INPUT[case]
    ws = await sidecar.workspace(credits_micro=10 * CREDITS)
    status, _, raw = await post(sidecar, path, body, bearer(ws))
    assert status == 200, raw
    row, _ = await one_row(sidecar, ws)
    assert row["hold_micro"] == hold_micro([model], WINDOW, 100) > hold_micro([model], len(body), 100)


async def test_text_only_input_is_still_held_at_the_body_size(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    # Keys and words that only look like media inside text or a tool's schema are not media.
    tool = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"image_url": {}}}}}
    body = orjson.dumps(chat_body('"image_url": {"type": "image"}', tools=[tool]))
    status, _, raw = await post(sidecar, "/v1/chat/completions", body, bearer(ws))
    assert status == 200, raw
    row, _ = await one_row(sidecar, ws)
    assert row["hold_micro"] == hold_micro(["gpt-4o-mini"], len(body), 100)


ROUTING_REFUSED = [
    # gpt-4o-mini allows no routing field; router-model allows provider, route and models, not plugins.
    ("/v1/chat/completions", chat_body(TEXT, provider={"order": ["x"]}), "provider"),
    ("/v1/chat/completions", chat_body(TEXT, models=["router/dear"]), "models"),
    ("/v1/chat/completions", chat_body(TEXT, route="fallback"), "route"),
    ("/v1/chat/completions", chat_body(TEXT, model="router-model", plugins=[{"id": "response-healing"}]), "plugins"),
    ("/v1/responses", {"model": "router-model", "input": TEXT, "plugins": [{"id": "file-parser"}]}, "plugins"),
    (
        "/v1/messages",
        {"model": "claude-test", "max_tokens": 5, "messages": ANTHROPIC_MESSAGES, "models": ["a"]},
        "models",
    ),
]


@pytest.mark.parametrize(("path", "payload", "field"), ROUTING_REFUSED)
async def test_routing_fields_a_model_does_not_allow_are_a_clear_400(
    sidecar: Sidecar, path: str, payload: dict, field: str
) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    before = len(sidecar.recorded) + len(openrouter_requests(sidecar))
    status, _, raw = await post(sidecar, path, orjson.dumps(payload), bearer(ws))
    assert status == 400, raw
    error = orjson.loads(raw)["error"]
    assert error["type"] == "invalid_request_error" and f"'{field}'" in error["message"]
    if path != "/v1/messages":
        assert error["param"] == field
    else:
        assert orjson.loads(raw)["type"] == "error"
    assert len(sidecar.recorded) + len(openrouter_requests(sidecar)) == before, "nothing went upstream"
    assert await sidecar.ledger(ws.id) == []
    assert (await sidecar.redis_account(ws.id)) == (CREDITS, 0)


async def test_openrouter_models_are_held_at_the_dearest_listed(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    body = orjson.dumps(
        chat_body(TEXT, model="router-model", models=["router/served", "router/dear"], route="fallback")
    )
    status, _, raw = await post(
        sidecar, "/v1/chat/completions", body, {**bearer(ws), "x-mock-served-model": "router/dear"}
    )
    assert status == 200, raw
    assert openrouter_requests(sidecar)[-1].json_body["models"] == ["router/served", "router/dear"]
    row, identity = await one_row(sidecar, ws)
    assert (
        row["hold_micro"]
        == hold_micro(["router/dear"], len(body), 100)
        > hold_micro(["router-requested"], len(body), 100)
    )
    assert row["upstream_model"] == "router/dear"
    assert_billed(row, identity, cost_micro("router/dear", input=101, output=8))

    # A listed model the cost profile cannot price is refused before anything is held.
    body = orjson.dumps(chat_body(TEXT, model="router-model", models=["openai/o1-pro"]))
    status, _, raw = await post(sidecar, "/v1/chat/completions", body, bearer(ws))
    assert status == 400 and "'openai/o1-pro'" in orjson.loads(raw)["error"]["message"], raw


UNPRICED_FEATURES = [
    ("/v1/chat/completions", chat_body(TEXT, web_search_options={}), {}, "web_search_options"),
    ("/v1/chat/completions", chat_body(TEXT, modalities=["text", "audio"], audio={"voice": "alloy"}), {}, "modalities"),
    (
        "/v1/chat/completions",
        chat_body([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]),
        {},
        "input_audio",
    ),
    ("/v1/chat/completions", chat_body(TEXT, service_tier="priority"), {}, "service_tier"),
    ("/v1/chat/completions", chat_body(TEXT, model="router-model", models=["openai/gpt-4o:online"]), {}, "models"),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": TEXT, "tools": [{"type": "web_search"}]}, {}, "tools"),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": TEXT, "tools": [{"type": "code_interpreter"}]}, {}, "tools"),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": TEXT, "background": True}, {}, "background"),
    (
        "/v1/messages",
        {
            "model": "claude-test",
            "max_tokens": 5,
            "messages": ANTHROPIC_MESSAGES,
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        },
        {},
        "tools",
    ),
    (
        "/v1/messages",
        {"model": "claude-test", "max_tokens": 5, "messages": ANTHROPIC_MESSAGES},
        {"anthropic-beta": "prompt-caching-2024-07-31, context-1m-2025-08-07"},
        "anthropic-beta",
    ),
]


@pytest.mark.parametrize(("path", "payload", "headers", "param"), UNPRICED_FEATURES)
async def test_features_the_cost_profile_cannot_price_are_a_clear_400(
    sidecar: Sidecar, path: str, payload: dict, headers: dict, param: str
) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    before = len(sidecar.recorded) + len(openrouter_requests(sidecar))
    status, _, raw = await post(sidecar, path, orjson.dumps(payload), {**bearer(ws), **headers})
    assert status == 400, raw
    body = orjson.loads(raw)
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "unsupported_feature" and "cannot be metered" in body["error"]["message"]
    if path == "/v1/messages":
        assert body["type"] == "error"
    else:
        assert body["error"]["param"] == param
    assert len(sidecar.recorded) + len(openrouter_requests(sidecar)) == before, "nothing went upstream"
    assert await sidecar.ledger(ws.id) == []


ABSURD_NUMBERS = [
    ("/v1/chat/completions", chat_body(TEXT, max_tokens=2**63), "max_tokens"),
    ("/v1/chat/completions", chat_body(TEXT, max_completion_tokens=2**64 - 1), "max_completion_tokens"),
    ("/v1/chat/completions", chat_body(TEXT, max_tokens=10**12), "max_tokens"),
    ("/v1/chat/completions", chat_body(TEXT, n=2**63), "n"),
    ("/v1/chat/completions", chat_body(TEXT, n=129), "n"),
    ("/v1/chat/completions", chat_body(TEXT, max_tokens=-1), "max_tokens"),
    ("/v1/chat/completions", chat_body(TEXT, max_tokens=1.5), "max_tokens"),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": TEXT, "best_of": 2**63}, "best_of"),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": TEXT, "max_tokens": 2**63}, "max_tokens"),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": [TEXT] * 40, "n": 128}, "prompt"),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": TEXT, "max_output_tokens": 2**63}, "max_output_tokens"),
    ("/v1/messages", {"model": "claude-test", "max_tokens": 2**63, "messages": ANTHROPIC_MESSAGES}, "max_tokens"),
]


@pytest.mark.parametrize(("path", "payload", "param"), ABSURD_NUMBERS)
async def test_absurd_caps_and_counts_are_a_clear_400(sidecar: Sidecar, path: str, payload: dict, param: str) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    status, _, raw = await post(sidecar, path, orjson.dumps(payload), bearer(ws))
    assert status == 400, raw
    body = orjson.loads(raw)
    assert body["error"]["type"] == "invalid_request_error" and param in body["error"]["message"]
    assert await sidecar.ledger(ws.id) == []
    assert (await sidecar.redis_account(ws.id)) == (CREDITS, 0)


# ================================================================================================================
# 6. Routes
# ================================================================================================================


async def test_anthropic_model_on_the_chat_route_is_a_clear_400(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    before = len(sidecar.recorded)
    status, _, raw = await sidecar.chat(ws, chat_body(TEXT, model="claude-test"))
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["code"] == "model_not_supported_on_route" and error["param"] == "model"
    assert "claude-test" in error["message"] and "/v1/chat/completions" in error["message"]
    # And the other way round, in Anthropic's envelope.
    body = orjson.dumps({"model": "gpt-4o-mini", "max_tokens": 10, "messages": ANTHROPIC_MESSAGES})
    status, _, raw = await post(sidecar, "/v1/messages", body, {"x-api-key": ws.key})
    assert status == 400
    error = orjson.loads(raw)
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == "model_not_supported_on_route"
    assert len(sidecar.recorded) == before
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 0 and identity["account_balance"] == CREDITS


async def test_models_list_works_for_the_anthropic_sdk(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with anthropic_client(sidecar, ws.key) as (client, _):
        page = await client.models.list()
    ids = [model.id for model in page.data]
    assert "claude-test" in ids and "gpt-4o-mini" in ids
    assert all(model.type == "model" for model in page.data)
    # A bad key gets Anthropic's authentication error.
    async with anthropic_client(sidecar, "sk-sc-wrong") as (client, _):
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await client.models.list()
    assert caught.value.response.json()["error"]["type"] == "authentication_error"
    await sidecar.assert_identity(ws.id)


# ================================================================================================================
# 7. Recorded real-shaped streams under every chunk split
# ================================================================================================================

ANTHROPIC_STREAM = (FIXTURES / "anthropic_messages_stream.sse").read_bytes()
RESPONSES_STREAM = (FIXTURES / "openai_responses_stream.sse").read_bytes()
COMPLETIONS_STREAM = (FIXTURES / "openai_completions_stream.sse").read_bytes()

# input_tokens excludes the cache (Anthropic); 1000 cache writes split 400 (5 min) / 600 (1 h); output is the last
# message_delta's cumulative 15, never plus message_start's 1; the final delta's repeated input counts are not
# added again.
ANTHROPIC_USAGE = Usage(
    input_tokens=2095, output_tokens=15, cache_read_tokens=512, cache_write_5m_tokens=400, cache_write_1h_tokens=600
)
# 1200 input includes 1024 cached (OpenAI); 300 output includes 256 reasoning.
RESPONSES_USAGE = Usage(input_tokens=176, output_tokens=300, cache_read_tokens=1024, reasoning_tokens=256)
COMPLETIONS_USAGE = Usage(input_tokens=37, output_tokens=7)
COST_PROFILE = parse_pricing(PRICING, "tests")


def split(stream: bytes, cuts: list[int], crlf: bool) -> tuple[bytes, list[bytes]]:
    if crlf:
        stream = stream.replace(b"\n", b"\r\n")
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(stream)), len(stream)]
    return stream, [stream[a:b] for a, b in itertools.pairwise(bounds)]


def feed(reader, chunks: list[bytes]) -> bytes:
    framer, out = SSEFramer(), []
    for chunk in chunks:
        out += [event.raw for event in framer.feed(chunk) if reader.observe(event)]
    tail = framer.flush()
    if tail is not None and reader.observe(tail):
        out.append(tail.raw)
    return b"".join(out)


CUTS = st.lists(st.integers(1, 5000), max_size=40)


@given(CUTS, st.booleans())
def test_anthropic_recorded_stream_any_split(cuts: list[int], crlf: bool) -> None:
    stream, chunks = split(ANTHROPIC_STREAM, cuts, crlf)
    reader = anthropic_messages.PROTOCOL.stream_reader(RequestFacts("claude-test", True, 100))
    assert feed(reader, chunks) == stream, "every event is relayed, byte for byte"
    assert reader.usage == ANTHROPIC_USAGE
    assert reader.done and reader.error is None
    assert reader.model == "claude-sonnet-4-5-20250929"
    assert reader.observed(len(stream)) == (ANTHROPIC_USAGE, False)
    # 2095 x 3 + 15 x 15 + 512 x 0.30 + 400 x 3.75 + 600 x 6 = 6285 + 225 + 153.6 + 1500 + 3600 = 11763.6
    assert COST_PROFILE.cost_micro(COST_PROFILE.price_of("claude-test"), reader.usage) == 11764


@given(CUTS, st.booleans())
def test_responses_recorded_stream_any_split(cuts: list[int], crlf: bool) -> None:
    stream, chunks = split(RESPONSES_STREAM, cuts, crlf)
    reader = openai_responses.PROTOCOL.stream_reader(RequestFacts("gpt-4o-mini", True, None))
    assert feed(reader, chunks) == stream
    assert reader.usage == RESPONSES_USAGE
    assert reader.done and reader.error is None
    assert reader.model == "o4-mini-2025-04-16"
    assert reader.observed(len(stream)) == (RESPONSES_USAGE, False)
    # 176 x 5 + 1024 x 0.50 + 300 x 25 = 880 + 512 + 7500
    assert COST_PROFILE.cost_micro(COST_PROFILE.price_of("gpt-4o-mini"), reader.usage) == 8892


@given(CUTS, st.booleans(), st.booleans())
def test_completions_recorded_stream_any_split(cuts: list[int], crlf: bool, client_wants_usage: bool) -> None:
    stream, chunks = split(COMPLETIONS_STREAM, cuts, crlf)
    facts = RequestFacts("gpt-4o-mini", True, None, client_wants_usage=client_wants_usage)
    reader = openai_completions.PROTOCOL.stream_reader(facts)
    out = feed(reader, chunks)
    assert reader.usage == COMPLETIONS_USAGE
    assert reader.done and reader.error is None
    assert reader.model == "gpt-3.5-turbo-instruct:20230824-v2"
    sep = b"\r\n" if crlf else b"\n"
    usage_chunk = next(block + sep + sep for block in stream.split(sep + sep) if b'"choices":[]' in block)
    assert out == (stream if client_wants_usage else stream.replace(usage_chunk, b"")), "only the usage chunk hides"
    assert COST_PROFILE.cost_micro(COST_PROFILE.price_of("gpt-4o-mini"), reader.usage) == 37 * 5 + 7 * 25


def test_recorded_streams_count_streamed_text_for_estimates() -> None:
    """Cut before the usage arrives: the readers have the streamed text to estimate from."""
    cut = ANTHROPIC_STREAM.index(b"event: message_delta")
    reader = anthropic_messages.PROTOCOL.stream_reader(RequestFacts("claude-test", True, 100))
    feed(reader, [ANTHROPIC_STREAM[:cut]])
    usage, estimated = reader.observed(1000)
    assert estimated and usage.input_tokens == 2095 and usage.cache_read_tokens == 512
    # The text as decoded (UTF-8 bytes), not as the provider escaped it.
    assert usage.output_tokens == ceil4(len(b"Hello") + len(' "world" \u00e9'.encode()))

    cut = RESPONSES_STREAM.index(b"event: response.completed")
    reader = openai_responses.PROTOCOL.stream_reader(RequestFacts("gpt-4o-mini", True, None))
    feed(reader, [RESPONSES_STREAM[:cut]])
    usage, estimated = reader.observed(1000)
    assert estimated and usage.input_tokens == 250
    assert usage.output_tokens == ceil4(len(b"Hi") + len(' "there" \u00e9'.encode()))
