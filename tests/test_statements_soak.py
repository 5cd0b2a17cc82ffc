"""A soak of every kind of row (issue 10, done-when 2): concurrent calls on the credits path and on a
customer's key, free calls, fallbacks, failures, cancelled and expired rows, grants and top-ups, two
flushers racing and a replayed batch. Then the roll-ups, the usage summary and the margin report must
agree to the micro-credit with the same figures recomputed from raw ledger rows."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from support.harness import TENANT_ADMIN_TOKEN, Sidecar, Workspace, chat_body, start_sidecar, stop_sidecar
from support.statements import (
    add_entries,
    check_margin,
    check_summary,
    ensure_past_partitions,
    expected_margin,
    expected_summary,
    get,
    raw_rows,
    synthetic_entry,
)

from sidecar.ledger.flusher import Flusher
from sidecar.movements import Kind
from sidecar.state import keys

CALLS = 120
ROLLUP_CHECK = """
SELECT d.*, r.* FROM (
    SELECT (created_at AT TIME ZONE 'UTC')::date AS day, kind, status, coalesce(provider, '') AS provider,
           coalesce(model, '') AS model, byok, count(*) AS rows, sum(input_tokens) AS input_tokens,
           sum(output_tokens) AS output_tokens, sum(cache_read_tokens) AS cache_read_tokens,
           sum(reasoning_tokens) AS reasoning_tokens, sum(cost_micro) AS cost_micro,
           sum(upstream_cost_micro) AS upstream_cost_micro, sum(balance_impact_micro) AS balance_impact_micro
    FROM ledger WHERE workspace_id = $1 GROUP BY 1, 2, 3, 4, 5, 6
) r FULL JOIN (SELECT * FROM ledger_daily WHERE workspace_id = $1) d
  USING (day, kind, status, provider, model, byok)
WHERE r.rows IS DISTINCT FROM d.rows OR r.input_tokens IS DISTINCT FROM d.input_tokens
   OR r.output_tokens IS DISTINCT FROM d.output_tokens OR r.cache_read_tokens IS DISTINCT FROM d.cache_read_tokens
   OR r.reasoning_tokens IS DISTINCT FROM d.reasoning_tokens OR r.cost_micro IS DISTINCT FROM d.cost_micro
   OR r.upstream_cost_micro IS DISTINCT FROM d.upstream_cost_micro
   OR r.balance_impact_micro IS DISTINCT FROM d.balance_impact_micro
"""


@pytest.fixture
async def fee_sidecar(redis_client, redis_url: str, migrated_database_url: str) -> AsyncIterator[Sidecar]:
    """Usage fees, a fee waiver and an initial allowance on: every column and kind of row in play."""
    wallet = {"usage_fee_percent": "7.5", "fee_waiver_credits": "0.000200", "allowance_credits": "0.25"}
    instance = await start_sidecar(redis_url, migrated_database_url, wallet=wallet)
    try:
        async with instance.svc.pool.acquire() as conn:
            await ensure_past_partitions(conn)
        yield instance
    finally:
        await stop_sidecar(instance)


def _call_kinds(rng: random.Random) -> tuple[dict, dict]:
    """(body, headers) of one call: completed (streamed or not), free, fallback, or failing."""
    choice = rng.choice(["plain", "stream", "free", "fallback", "error_status", "error_mid_stream", "cache"])
    content = "x" * rng.randint(5, 400)
    if choice == "stream":
        return chat_body(content, stream=True), {}
    if choice == "free":
        return chat_body(content, model="mock-free"), {}
    if choice == "fallback":
        return chat_body(content, model="fallback-503"), {}
    if choice == "error_status":
        return chat_body(content), {"x-mock-status": "500"}
    if choice == "error_mid_stream":
        return chat_body(content, stream=True), {"x-mock-error-after": str(rng.randint(0, 3))}
    if choice == "cache":
        return chat_body(content), {"x-mock-cache-read": str(rng.randint(1, 50))}
    return chat_body(content), {}


async def test_summary_and_margin_agree_with_raw_rows_after_a_soak(fee_sidecar: Sidecar, redis_client) -> None:
    sidecar = fee_sidecar
    rng = random.Random(10)
    office = f"of_{rng.getrandbits(32):08x}_{id(sidecar) & 0xFFFF:x}"  # office ids are global
    ws = await sidecar.workspace(credits_micro=50_000_000, office=office, rpm=100_000)
    status, created = await sidecar.admin(
        "POST", f"/workspaces/{ws.id}/keys", {"name": "own", "rate_limit_rpm": 100_000}
    )
    assert status == 201
    credits_key = Workspace(ws.id, created["key"], created["id"])  # workspace-wide: the platform's key
    status, _ = await sidecar.admin(  # the office's calls go on the customer's own key
        "POST",
        f"/workspaces/{ws.id}/offices/{office}/byok-keys",
        {"provider": "mock", "key": "sk-own-key-soak"},
        token=TENANT_ADMIN_TOKEN,
    )
    assert status == 201
    second = Flusher(sidecar.svc.state.redis, sidecar.svc.pool, sidecar.svc.balances, sidecar.svc.config.ledger)
    second.note_workspace(ws.id)
    stop = asyncio.Event()

    async def flush_forever(flusher: Flusher) -> None:
        while not stop.is_set():
            await flusher.flush_once()
            await asyncio.sleep(0.01)

    flushers = [asyncio.create_task(flush_forever(f)) for f in (sidecar.svc.flusher, second)]
    sidecar.svc.flusher.note_workspace(ws.id)
    gate = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        body, headers = _call_kinds(rng)
        async with gate:
            status, _, answer = await sidecar.chat(ws if i % 3 else credits_key, body, headers)
        assert status in (200, 500), answer  # 500: the provider's own error, relayed (the call has its row)

    try:
        refunds = [sidecar.svc.balances.debit(ws.id, f"refund-{i}", Kind.REFUND, 300 + i) for i in range(4)]
        await asyncio.gather(*(one(i) for i in range(CALLS)), *refunds)
        for i in range(6):
            await sidecar.grant(ws.id, 1_000 + i)
        status, _ = await sidecar.admin(
            "POST", f"/workspaces/{ws.id}/grants", {"grant_id": "soak-topup", "kind": "topup", "amount_micro": 7_000}
        )
        assert status == 201
    finally:
        stop.set()
        await asyncio.gather(*flushers)
    await sidecar.flush()

    # Rows settled on earlier days (cancelled, expired, a backlog), and one batch replayed.
    assert (await sidecar.chat(credits_key, chat_body()))[0] == 200
    template = None
    for _ in range(100):  # the call settles just after its answer
        if entries := await redis_client.xrange(keys.stream(ws.id)):
            template = entries[-1][1]
            break
        await asyncio.sleep(0.02)
    assert template is not None
    now = datetime.now(UTC)
    extra = [
        synthetic_entry(template, ws.id, now - timedelta(days=rng.randint(0, 40)), status=status)
        for status in ("completed", "failed", "cancelled", "expired") * 5
    ]
    await add_entries(redis_client, sidecar, ws.id, extra)
    await sidecar.flush()
    await add_entries(redis_client, sidecar, ws.id, extra[:7])  # a replay: nothing more
    await sidecar.svc.balances.debit(ws.id, "expiry-1", Kind.EXPIRY, None)  # what remains, forfeited
    await sidecar.flush()

    rows = await raw_rows(sidecar, ws.id)
    assert {r["status"] for r in rows} >= {"completed", "failed", "cancelled", "expired"}
    assert {r["kind"] for r in rows} == {"usage", "grant", "topup", "allowance", "refund", "expiry"}
    assert any(r["fee_micro"] for r in rows) and any(r["fee_waived_micro"] for r in rows)
    assert any(r["byok"] for r in rows) and any(r["cache_read_tokens"] for r in rows)
    assert len([r for r in rows if r["kind"] == "usage"]) == CALLS + 1 + 20
    async with sidecar.svc.pool.acquire() as conn:
        drift = await conn.fetch(ROLLUP_CHECK, ws.id)
    assert not drift, [dict(r) for r in drift]

    today = now.date()
    async with sidecar.http.post(
        sidecar.data.make_url("/v1/credits/projections/usage-summary"),
        headers={"Authorization": f"Bearer {credits_key.key}"},
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    check_summary(body, expected_summary(rows, today - timedelta(days=29), today, today - timedelta(days=6)))
    first = today - timedelta(days=45)
    status, body = await get(
        sidecar, f"/workspaces/{ws.id}/usage-summary", **{"from": first.isoformat(), "to": today.isoformat()}
    )
    assert status == 200
    check_summary(body, expected_summary(rows, first, today, first))
    status, report = await get(
        sidecar, "/reports/margin", **{"from": first.isoformat(), "to": today.isoformat(), "workspace_id": ws.id}
    )
    assert status == 200
    check_margin(report, expected_margin(rows, first, today))
    assert report["totals"]["byok_calls"] > 0 and report["totals"]["upstream_cost_micro"] > 0
    assert report["totals"]["fees_micro"] == sum(r["fee_micro"] for r in rows if r["kind"] == "usage") > 0
