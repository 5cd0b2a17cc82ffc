"""DESIGN.md §6 under concurrency: many calls at once against a balance that covers only some of them."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest
from support.harness import Sidecar, chat_body

# The money path runs against a single Redis and against a Redis Cluster (conftest.py).
pytestmark = pytest.mark.both_redis

CALLS = 240


async def test_concurrent_calls_never_overdraw_and_each_has_one_row(sidecar: Sidecar) -> None:
    # Each call holds ~3,000 micro-credits (body bytes * 5 + 100 output * 25) and costs ~700: the
    # balance covers only part of the burst.
    ws = await sidecar.workspace(credits_micro=120_000, rpm=10_000)
    rng = random.Random(7)

    async def one(i: int) -> tuple[int, str, int, bool]:
        stream = i % 2 == 0
        headers = {"x-mock-chunks": str(rng.randint(1, 20))}
        if stream:
            headers["x-mock-delay-ms"] = str(rng.randint(0, 5))
        code, resp_headers, body = await sidecar.chat(ws, chat_body(f"call {i} " * 10, stream=stream), headers=headers)
        if code == 402:
            assert orjson.loads(body)["error"]["code"] == "PAYMENT_REQUIRED"
        cost = int(resp_headers.get("x-sidecar-cost-micro", -1))
        return code, resp_headers["x-request-id"], cost, stream

    results = await asyncio.gather(*[one(i) for i in range(CALLS)])
    codes = [code for code, *_ in results]
    assert set(codes) <= {200, 402}
    admitted = {rid for code, rid, _, _ in results if code == 200}
    refused = {rid for code, rid, _, _ in results if code == 402}
    assert admitted and refused, "the balance must cover some calls and not others"

    identity = await sidecar.assert_identity(ws.id)
    rows = await sidecar.ledger(ws.id)
    by_request = await sidecar.rows_per_request(ws.id)
    assert set(by_request) == admitted, "every admitted call has a row, no refused call has one"
    assert set(by_request.values()) == {1}, "no row is written twice"
    assert all(row["status"] == "completed" for row in rows)
    assert all(0 <= row["cost_micro"] <= row["hold_micro"] for row in rows)
    assert sum(row["cost_micro"] for row in rows) == identity["debits"]
    non_stream_costs = {rid: cost for code, rid, cost, stream in results if code == 200 and not stream}
    assert all(
        by_id["cost_micro"] == non_stream_costs[by_id["request_id"]]
        for by_id in rows
        if by_id["request_id"] in non_stream_costs
    )
    assert identity["account_balance"] == 120_000 - identity["debits"] >= 0
    # Balance after each debit, in settlement order, never went below zero.
    assert min(row["balance_after_micro"] for row in rows) >= 0


async def test_balance_rebuilt_once_after_redis_loses_everything(sidecar: Sidecar, redis_client) -> None:
    ws = await sidecar.workspace(credits_micro=500_000, rpm=10_000)
    for _ in range(5):
        assert (await sidecar.chat(ws, chat_body()))[0] == 200
    before = await sidecar.assert_identity(ws.id)
    await redis_client.flushdb()  # Redis restarted empty: no balance, no holds, no streams

    async def grant(i: int) -> None:
        await sidecar.grant(ws.id, 1_000 + i, grant_id=f"race-{i}")

    calls = [sidecar.chat(ws, chat_body(f"after restart {i}")) for i in range(60)]
    grants = [grant(i) for i in range(15)]
    results = await asyncio.gather(*calls, *grants)
    assert all(r[0] == 200 for r in results[:60])
    identity = await sidecar.assert_identity(ws.id)
    assert identity["grants"] == before["grants"] + sum(1_000 + i for i in range(15))
    assert identity["usage_rows"] == 65
    assert set((await sidecar.rows_per_request(ws.id)).values()) == {1}


async def test_a_replayed_grant_changes_nothing(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=0)
    bodies = await asyncio.gather(*[sidecar.grant(ws.id, 7_000, grant_id="once") for _ in range(10)])
    assert sum(b["created"] for b in bodies) == 1
    status, body = await sidecar.admin("POST", f"/workspaces/{ws.id}/grants", {"grant_id": "once", "amount_micro": 8})
    assert status == 409 and body["error"]["code"] == "grant_conflict"
    identity = await sidecar.assert_identity(ws.id)
    assert identity["grants"] == identity["account_balance"] == 7_000
