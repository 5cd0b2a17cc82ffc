"""The ledger flusher's harder cases: bad events, fairness, and balance changes owed to a Redis
that restarted empty (recorded durably in the flush transaction)."""

from __future__ import annotations

import uuid

import orjson
import pytest
from support.harness import Sidecar, chat_body

from sidecar.state import keys

# The money path runs against a single Redis and against a Redis Cluster (conftest.py).
pytestmark = pytest.mark.both_redis


async def test_a_bad_event_is_dead_lettered_and_the_rest_flushes(sidecar: Sidecar, redis_client) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    stream = keys.stream(ws.id)
    await redis_client.xadd(stream, {b"e": b"not json at all", b"cost": b"0", b"impact": b"0", b"at": b"1"})
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    await sidecar.flush()
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 2
    [(_, dead)] = await redis_client.xrange(keys.dead_letters(ws.id))
    assert dead[b"e"] == b"not json at all" and b"unreadable event" in dead[b"dead_reason"]
    assert await redis_client.xlen(stream) == 0


async def test_nul_bytes_from_a_provider_do_not_stop_the_ledger(sidecar: Sidecar, redis_client) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    [(entry_id, fields)] = await redis_client.xrange(keys.stream(ws.id))
    event = orjson.loads(fields[b"e"])
    event["error"] = "bad\x00byte"
    await redis_client.xdel(keys.stream(ws.id), entry_id)
    await redis_client.xadd(keys.stream(ws.id), {**fields, b"e": orjson.dumps(event)})
    await sidecar.flush()
    [row] = await sidecar.ledger(ws.id)
    assert row["error"] == "badbyte"
    await sidecar.assert_identity(ws.id)


async def test_a_busy_workspace_does_not_starve_the_others(sidecar: Sidecar, redis_client) -> None:
    busy, quiet = await sidecar.workspace(credits_micro=10**9), await sidecar.workspace(credits_micro=10**9)
    for _ in range(3):
        assert (await sidecar.chat(quiet, chat_body()))[0] == 200
    template = (await redis_client.xrange(keys.stream(quiet.id)))[0][1]
    event = orjson.loads(template[b"e"])
    for i in range(1200):  # a backlog far larger than one batch
        event.update(workspace_id=busy.id, event_id=str(uuid.uuid4()), request_id=str(i))
        await redis_client.xadd(keys.stream(busy.id), {**template, b"e": orjson.dumps(event), b"impact": b"0"})
    for ws in (busy.id, quiet.id):
        sidecar.svc.flusher.note_workspace(ws)
    for _ in range(3):
        await sidecar.svc.flusher.flush_once()
    assert len(await sidecar.ledger(quiet.id)) == 3, "the quiet workspace flushed within a few batches"


async def test_events_settled_before_redis_lost_everything_reach_the_new_balance_once(
    sidecar: Sidecar, redis_client
) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    events = await redis_client.xrange(keys.stream(ws.id))
    [(_, fields)] = events
    cost = -int(fields[b"impact"])
    # Redis restarts empty before the flush: the event only lives in the flusher's hands now.
    await redis_client.flushdb()
    await sidecar.svc.balances.ensure_loaded(ws.id)  # a new call reloads from Postgres: without the event
    assert await sidecar.redis_account(ws.id) == (1_000_000, 0)
    await redis_client.xadd(keys.stream(ws.id), fields)  # the in-flight batch, committed after the reload

    flusher = sidecar.svc.flusher
    real_sync = flusher._sync_balances
    calls = 0

    async def crash_after_commit() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the sync right after this batch's commit: the process "dies" here
            raise ConnectionError("crash between commit and Redis")
        await real_sync()

    flusher._sync_balances = crash_after_commit
    flusher.note_workspace(ws.id)
    try:
        await flusher.flush_once()
    except ConnectionError:
        pass
    flusher._sync_balances = real_sync
    async with sidecar.svc.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM balance_sync WHERE workspace_id = $1", ws.id) == 1
    await sidecar.flush()  # the next flush finishes the job, once
    await sidecar.flush()
    assert await sidecar.redis_account(ws.id) == (1_000_000 - cost, 0)
    identity = await sidecar.assert_identity(ws.id)
    assert identity["debits"] == cost and identity["usage_rows"] == 1
