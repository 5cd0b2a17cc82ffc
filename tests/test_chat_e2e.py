"""End to end with the official openai SDK: the call, its ledger row and the balance, to the micro-credit."""

from __future__ import annotations

import openai
import pytest
from support.harness import Sidecar

from sidecar.devtools.mock_provider import prompt_tokens_for

MESSAGES = [{"role": "user", "content": "x" * 400}]  # the mock bills 400 // 4 + 1 = 101 prompt tokens


def price_micro(input_tokens: int, output_tokens: int) -> int:
    # 5.00 and 25.00 credits per 1M tokens = 5 and 25 micro-credits per token.
    return input_tokens * 5 + output_tokens * 25


def client(sidecar: Sidecar, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sidecar.base_url, api_key=key, max_retries=0)


async def test_non_streaming_call_is_billed_exactly(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    raw = await client(sidecar, ws.key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    completion = raw.parse()
    prompt = prompt_tokens_for({"messages": MESSAGES})
    assert completion.usage.prompt_tokens == prompt == 101
    assert completion.usage.completion_tokens == 8
    cost = price_micro(101, 8)
    assert raw.headers["x-sidecar-cost-micro"] == str(cost)
    assert raw.headers["x-sidecar-balance-micro"] == str(1_000_000 - cost)
    assert raw.headers["x-ratelimit-limit"] == "1000"
    assert raw.headers["x-request-id"]

    identity = await sidecar.assert_identity(ws.id)
    assert identity["debits"] == cost
    [row] = await sidecar.ledger(ws.id)
    assert row["status"] == "completed"
    assert (row["input_tokens"], row["output_tokens"], row["cost_micro"]) == (101, 8, cost)
    assert row["balance_impact_micro"] == -cost
    assert row["balance_after_micro"] == 1_000_000 - cost
    assert row["upstream_cost_micro"] == 101 * 4 + 8 * 20
    assert row["request_id"] == raw.headers["x-request-id"]
    assert row["key_id"] == ws.key_id and row["provider"] == "mock" and row["byok"] is False
    # The platform key went upstream, never the client's.
    forwarded = sidecar.recorded[-1]
    assert forwarded.headers["authorization"] == "Bearer sk-platform-test-0000"
    assert forwarded.json_body["max_completion_tokens"] == 100  # the model's default cap, injected


async def test_streaming_call_is_billed_exactly_and_usage_chunk_hidden(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    stream = await client(sidecar, ws.key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=5
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert all(c.choices for c in chunks), "the usage chunk the client did not ask for must not reach it"
    assert sidecar.recorded[-1].json_body["stream_options"] == {"include_usage": True}

    identity = await sidecar.assert_identity(ws.id)
    assert identity["debits"] == price_micro(101, 5)
    [row] = await sidecar.ledger(ws.id)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("completed", 101, 5)
    assert row["first_byte_at"] is not None and row["ended_at"] >= row["first_byte_at"]


async def test_streaming_usage_kept_when_client_asks(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    stream = await client(sidecar, ws.key).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    await sidecar.assert_identity(ws.id)


async def test_insufficient_credits_is_402_and_nothing_forwarded(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=10)
    before = len(sidecar.recorded)
    with pytest.raises(openai.APIStatusError) as caught:
        await client(sidecar, ws.key).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.status_code == 402
    assert caught.value.response.headers["x-ratelimit-remaining"] == "1000"  # a refused call uses no slot
    assert caught.value.body["code"] == "PAYMENT_REQUIRED"
    assert caught.value.body["message"] == "insufficient credits"
    assert len(sidecar.recorded) == before
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 0 and identity["account_balance"] == 10


async def test_free_model_is_never_gated_by_balance(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=0)
    completion = await client(sidecar, ws.key).chat.completions.create(model="mock-free", messages=MESSAGES)
    assert completion.usage.completion_tokens == 8
    await sidecar.flush()
    [row] = await sidecar.ledger(ws.id)
    assert (row["status"], row["cost_micro"], row["balance_impact_micro"]) == ("completed", 0, 0)
