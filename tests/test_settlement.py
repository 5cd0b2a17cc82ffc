"""Every row of DESIGN.md §5's table: what is charged and what the ledger says, for each way a call ends."""

from __future__ import annotations

import asyncio
import socket
import uuid

import aiohttp
import orjson
import pytest
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar
from support.scripts import admit, settle

from sidecar.money import AMOUNT_MICRO_MAX
from sidecar.sweeper import sweep_all

# The money path runs against a single Redis and against a Redis Cluster (conftest.py).
pytestmark = pytest.mark.both_redis

PROMPT_TOKENS = 101
BODY = chat_body("y" * 400)


@pytest.mark.parametrize("status", [500, 503, 429, 400])
async def test_upstream_error_before_first_byte_costs_nothing(sidecar: Sidecar, status: int) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    code, headers, body = await sidecar.chat(ws, BODY, headers={"x-mock-status": str(status)})
    assert code == status
    assert "error" in orjson.loads(body)
    identity = await sidecar.assert_identity(ws.id)
    assert identity["debits"] == 0
    [row] = await sidecar.ledger(ws.id)
    assert (row["status"], row["cost_micro"], row["balance_impact_micro"]) == ("failed", 0, 0)
    assert row["request_id"] == headers["x-request-id"]


async def test_upstream_auth_failure_does_not_leak_provider_message(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    code, _, body = await sidecar.chat(ws, BODY, headers={"x-mock-status": "401"})
    assert code == 502
    assert orjson.loads(body)["error"]["code"] == "upstream_auth_failed"
    await sidecar.assert_identity(ws.id)


async def test_connection_reset_before_first_byte_costs_nothing(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    code, _, body = await sidecar.chat(ws, BODY, headers={"x-mock-reset": "1"})
    assert code == 502
    assert orjson.loads(body)["error"]["code"] == "upstream_unavailable"
    identity = await sidecar.assert_identity(ws.id)
    assert identity["debits"] == 0
    [row] = await sidecar.ledger(ws.id)
    assert row["status"] == "failed"


async def test_connect_failure_costs_nothing(redis_client, redis_url, migrated_database_url) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    sidecar = await start_sidecar(redis_url, migrated_database_url, provider_url=f"http://127.0.0.1:{dead_port}/v1")
    try:
        ws = await sidecar.workspace(credits_micro=1_000_000)
        code, _, _ = await sidecar.chat(ws, BODY)
        assert code == 502
        await sidecar.flush()
        [row] = await sidecar.ledger(ws.id)
        assert (row["status"], row["cost_micro"]) == ("failed", 0)
        await sidecar.assert_identity(ws.id)
    finally:
        await stop_sidecar(sidecar)


async def test_first_byte_timeout_costs_nothing(redis_client, redis_url, migrated_database_url) -> None:
    sidecar = await start_sidecar(redis_url, migrated_database_url, upstream={"first_byte_timeout_ms": 200})
    try:
        ws = await sidecar.workspace(credits_micro=1_000_000)
        code, _, _ = await sidecar.chat(ws, BODY, headers={"x-mock-first-byte-delay-ms": "2000"})
        assert code == 504
        await sidecar.flush()
        [row] = await sidecar.ledger(ws.id)
        assert (row["status"], row["cost_micro"]) == ("failed", 0)
        await sidecar.assert_identity(ws.id)
    finally:
        await stop_sidecar(sidecar)


@pytest.mark.parametrize("fault", ["x-mock-cut-after", "x-mock-error-after"])
async def test_upstream_failure_mid_stream_costs_nothing_by_default(sidecar: Sidecar, fault: str) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    code, _, body = await sidecar.chat(ws, {**BODY, "stream": True}, headers={fault: "3"})
    assert code == 200
    assert b"tok2" in body and b'"error"' in body and b"[DONE]" not in body
    identity = await sidecar.assert_identity(ws.id)
    assert identity["debits"] == 0
    [row] = await sidecar.ledger(ws.id)
    assert (row["status"], row["cost_micro"]) == ("failed", 0)


async def test_upstream_failure_mid_stream_bills_observed_when_configured(
    redis_client, redis_url, migrated_database_url
) -> None:
    sidecar = await start_sidecar(redis_url, migrated_database_url, billing={"bill_observed_on_upstream_failure": True})
    try:
        ws = await sidecar.workspace(credits_micro=1_000_000)
        await sidecar.chat(ws, {**BODY, "stream": True}, headers={"x-mock-cut-after": "3"})
        identity = await sidecar.assert_identity(ws.id)
        [row] = await sidecar.ledger(ws.id)
        assert row["status"] == "failed" and row["estimated"] is True
        assert row["cost_micro"] == identity["debits"] > 0
        assert row["cost_micro"] <= row["hold_micro"]
    finally:
        await stop_sidecar(sidecar)


async def test_client_disconnect_mid_stream_bills_what_was_observed(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    url = sidecar.data.make_url("/v1/chat/completions")
    headers = {"Authorization": f"Bearer {ws.key}", "x-mock-chunks": "50", "x-mock-delay-ms": "20"}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url, json={**BODY, "stream": True}, headers=headers)
        seen = b""
        while seen.count(b"tok") < 4:
            seen += await resp.content.readany()
        resp.close()  # the client goes away after a few chunks
    for _ in range(100):
        await asyncio.sleep(0.05)
        await sidecar.flush()
        if await sidecar.ledger(ws.id):
            break
    identity = await sidecar.assert_identity(ws.id)
    [row] = await sidecar.ledger(ws.id)
    # The sidecar read on after the hang-up until the provider's usage came: its exact count is billed.
    assert row["status"] == "cancelled" and row["estimated"] is False
    assert 0 < row["cost_micro"] == identity["debits"] <= row["hold_micro"]
    assert row["output_tokens"] == 50


async def test_sidecar_death_hold_expires_and_is_recorded(redis_client, redis_url, migrated_database_url) -> None:
    sidecar = await start_sidecar(redis_url, migrated_database_url)
    try:
        ws = await sidecar.workspace(credits_micro=1_000_000)
        # Fresh ids: the ledger keeps each event id once per database, and this test runs once per Redis.
        hold = uuid.uuid4()
        # A hold taken by a process that then died: admitted, never settled, deadline in the past.
        result = await admit(
            sidecar.svc.state,
            ws.id,
            ceiling=5_000,
            limit=10,
            hold_id=hold.hex,
            key_id=ws.key_id,
            hold_ttl_ms=1,
            meta=orjson.dumps(
                {
                    "event_id": str(hold),
                    "status": "expired",
                    "workspace_id": ws.id,
                    "key_id": ws.key_id,
                    "request_id": hold.hex,
                    "model": "gpt-4o-mini",
                    "hold_micro": 5_000,
                    "started_at": 1,
                }
            ),
        )
        assert result.outcome == 0
        assert await sidecar.redis_account(ws.id) == (1_000_000, 5_000)
        await asyncio.sleep(0.01)
        assert await sweep_all(sidecar.svc.state, sidecar.svc.pool, sidecar.svc.config.holds) >= 1
        identity = await sidecar.assert_identity(ws.id)
        assert identity["debits"] == 0
        [row] = await sidecar.ledger(ws.id)
        assert (row["status"], row["cost_micro"], row["hold_micro"]) == ("expired", 0, 5_000)
        # A late settle of the same hold changes nothing.
        late = await settle(sidecar.svc.state, ws.id, hold.hex, 4_000, key_id=ws.key_id)
        assert late.resolved_now is False
        await sidecar.assert_identity(ws.id)
        assert len(await sidecar.ledger(ws.id)) == 1
    finally:
        await stop_sidecar(sidecar)


async def test_same_idempotency_key_is_never_billed_twice(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    headers = {"Idempotency-Key": "order-42"}
    first = await sidecar.chat(ws, BODY, headers=headers)
    second = await sidecar.chat(ws, BODY, headers=headers)
    assert first[0] == second[0] == 200
    assert first[2] == second[2]
    assert second[1]["Idempotent-Replayed"] == "true"
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 1
    # Same key, different body: refused, nothing charged.
    code, _, body = await sidecar.chat(ws, chat_body("something else"), headers=headers)
    assert code == 409 and orjson.loads(body)["error"]["code"] == "idempotency_key_reused"
    assert (await sidecar.assert_identity(ws.id))["usage_rows"] == 1


async def test_idempotent_stream_is_replayed(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    headers = {"Idempotency-Key": "stream-1"}
    first = await sidecar.chat(ws, {**BODY, "stream": True}, headers=headers)
    second = await sidecar.chat(ws, {**BODY, "stream": True}, headers=headers)
    assert first[2] == second[2] and b"[DONE]" in second[2]
    assert second[1]["Content-Type"].startswith("text/event-stream")
    assert (await sidecar.assert_identity(ws.id))["usage_rows"] == 1


async def test_idempotency_key_in_flight_is_a_conflict(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    headers = {"Idempotency-Key": "slow-1", "x-mock-first-byte-delay-ms": "300"}
    slow = asyncio.create_task(sidecar.chat(ws, BODY, headers=headers))
    await asyncio.sleep(0.1)
    code, _, body = await sidecar.chat(ws, BODY, headers=headers)
    assert code == 409 and orjson.loads(body)["error"]["code"] == "idempotency_key_in_use"
    assert (await slow)[0] == 200
    assert (await sidecar.assert_identity(ws.id))["usage_rows"] == 1


async def test_failed_call_frees_its_idempotency_key_for_a_retry(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    headers = {"Idempotency-Key": "retry-me"}
    assert (await sidecar.chat(ws, BODY, headers={**headers, "x-mock-status": "503"}))[0] == 503
    assert (await sidecar.chat(ws, BODY, headers=headers))[0] == 200
    await sidecar.flush()
    statuses = sorted(r["status"] for r in await sidecar.ledger(ws.id))
    assert statuses == ["completed", "failed"]
    await sidecar.assert_identity(ws.id)


async def test_a_second_settle_changes_nothing(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    code, headers, _ = await sidecar.chat(ws, BODY)
    assert code == 200
    again = await settle(sidecar.svc.state, ws.id, headers["x-request-id"], 999, key_id=ws.key_id)
    assert again.resolved_now is False
    assert (await sidecar.assert_identity(ws.id))["usage_rows"] == 1


async def test_cancelled_stream_frees_its_idempotency_key_for_a_retry(sidecar: Sidecar) -> None:
    """Issue 15.18: the client hung up, so it has no answer; its retry must run, not get 409."""
    ws = await sidecar.workspace(credits_micro=1_000_000)
    url = sidecar.data.make_url("/v1/chat/completions")
    body = {**BODY, "stream": True}
    headers = {"Authorization": f"Bearer {ws.key}", "Idempotency-Key": "hang-up-1"}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url, json=body, headers={**headers, "x-mock-chunks": "50", "x-mock-delay-ms": "20"})
        seen = b""
        while seen.count(b"tok") < 4:
            seen += await resp.content.readany()
        resp.close()
    for _ in range(100):
        await asyncio.sleep(0.05)
        await sidecar.flush()
        if await sidecar.ledger(ws.id):
            break
    code, _, again = await sidecar.chat(ws, body, headers={"Idempotency-Key": "hang-up-1"})
    assert code == 200 and b"[DONE]" in again
    await sidecar.flush()
    assert sorted(r["status"] for r in await sidecar.ledger(ws.id)) == ["cancelled", "completed"]
    await sidecar.assert_identity(ws.id)


async def test_idempotency_key_is_scoped_by_route(sidecar: Sidecar) -> None:
    """Issue 8.16: the same key and body on another route is another request, not a replay."""
    ws = await sidecar.workspace(credits_micro=1_000_000)
    body = orjson.dumps({"model": "embed-small", "messages": [{"role": "user", "content": "hi"}], "input": "hi"})
    headers = {"Authorization": f"Bearer {ws.key}", "Content-Type": "application/json", "Idempotency-Key": "both"}
    answers = {}
    for route in ("/v1/chat/completions", "/v1/embeddings"):
        async with sidecar.http.post(sidecar.data.make_url(route), data=body, headers=headers) as resp:
            answers[route] = (resp.status, resp.headers.get("Idempotent-Replayed"), await resp.json())
    assert answers["/v1/chat/completions"][0] == answers["/v1/embeddings"][0] == 200
    assert answers["/v1/embeddings"][1] is None
    assert answers["/v1/embeddings"][2]["object"] == "list"  # an embeddings answer, not the chat one
    assert (await sidecar.assert_identity(ws.id))["usage_rows"] == 2


async def test_concurrent_calls_past_the_key_limit_get_429(redis_client, redis_url, migrated_database_url) -> None:
    """Issue 8.5: one key cannot hold more calls open than its limit; a finished call frees its slot."""
    sidecar = await start_sidecar(redis_url, migrated_database_url, limits={"concurrent_calls_per_key": 1})
    try:
        ws = await sidecar.workspace(credits_micro=1_000_000)
        slow = asyncio.create_task(sidecar.chat(ws, BODY, headers={"x-mock-first-byte-delay-ms": "400"}))
        await asyncio.sleep(0.15)
        code, headers, body = await sidecar.chat(ws, BODY)
        assert code == 429 and orjson.loads(body)["error"]["code"] == "concurrency_limit_exceeded"
        assert headers["Retry-After"] == "1"
        assert (await slow)[0] == 200
        assert (await sidecar.chat(ws, BODY))[0] == 200
        assert (await sidecar.assert_identity(ws.id))["usage_rows"] == 2
    finally:
        await stop_sidecar(sidecar)


async def test_a_grant_past_the_amount_bound_is_refused(sidecar: Sidecar) -> None:
    """Issue 15.10: balances stay below AMOUNT_MICRO_MAX, so every Lua number stays an exact integer."""
    ws = await sidecar.workspace(credits_micro=AMOUNT_MICRO_MAX - 10)
    status, body = await sidecar.admin("POST", f"/workspaces/{ws.id}/grants", {"grant_id": "over", "amount_micro": 11})
    assert status == 409 and body["error"]["code"] == "balance_limit", body
    assert await sidecar.redis_account(ws.id) == (AMOUNT_MICRO_MAX - 10, 0)
    await sidecar.grant(ws.id, 10)  # up to the bound itself is fine
    assert (await sidecar.assert_identity(ws.id))["grants"] == AMOUNT_MICRO_MAX


async def test_past_the_replay_bytes_bound_a_retry_is_refused_not_billed(
    redis_client, redis_url, migrated_database_url
) -> None:
    """Issue 8.6: past the stored-bytes bound the call is served and remembered, its body not kept."""
    sidecar = await start_sidecar(
        redis_url, migrated_database_url, limits={"idempotency_replay_bytes_per_workspace": 10}
    )
    try:
        ws = await sidecar.workspace(credits_micro=1_000_000)
        headers = {"Idempotency-Key": "big-1"}
        assert (await sidecar.chat(ws, BODY, headers=headers))[0] == 200
        code, _, body = await sidecar.chat(ws, BODY, headers=headers)
        assert code == 409 and orjson.loads(body)["error"]["code"] == "idempotency_key_used"
        assert (await sidecar.assert_identity(ws.id))["usage_rows"] == 1
    finally:
        await stop_sidecar(sidecar)
