"""Redis that comes back with the wrong state (issue 15, points 7, 8 and 9): restored from an older
snapshot, refusing a grant's write, or having evicted an account while its holds survive. Each test
runs against real servers and checks exact money and one ledger row per call."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from support.harness import Sidecar, Workspace, start_sidecar, stop_sidecar
from test_faults import CREDITS, JSON, calls, expected_hold, pg_account, read_until

from sidecar.state import keys
from sidecar.sweeper import sweep_all

# The money path runs against a single Redis and against a Redis Cluster (conftest.py).
pytestmark = pytest.mark.both_redis


async def _open_stream(sc: Sidecar, ws: Workspace, http: aiohttp.ClientSession, chunks: int = 20):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"slow {ws.id}"}], "stream": True}
    headers = {**JSON, "Authorization": f"Bearer {ws.key}", "x-mock-chunks": str(chunks), "x-mock-delay-ms": "40"}
    resp = await http.post(sc.data.make_url("/v1/chat/completions"), data=orjson.dumps(body), headers=headers)
    assert resp.status == 200
    return resp, body


async def _finish(resp: aiohttp.ClientResponse) -> bytes:
    seen = b""
    async with asyncio.timeout(15):
        while not seen.rstrip().endswith(b"[DONE]"):
            chunk = await resp.content.readany()
            assert chunk, seen[-300:]
            seen += chunk
    resp.release()
    return seen


async def _settled(sc: Sidecar) -> None:
    if sc.svc.settling:
        await asyncio.wait(list(sc.svc.settling), timeout=10)


async def test_redis_restored_from_a_stale_snapshot_converges_to_postgres(private_redis, migrated_database_url):
    sc = await start_sidecar(private_redis.url, migrated_database_url)
    snapshot = private_redis.data_dir.parent / "snapshot.rdb"
    try:
        swept, reloaded = await sc.workspace(credits_micro=CREDITS), await sc.workspace(credits_micro=CREDITS)
        costs = {ws.id: await calls(sc, ws, range(3)) for ws in (swept, reloaded)}
        await sc.flush()
        for ws in (swept, reloaded):  # settled, not yet flushed when the snapshot is taken
            costs[ws.id] |= await calls(sc, ws, range(3, 4))

        async with aiohttp.ClientSession() as http:
            streams = {ws.id: await _open_stream(sc, ws, http) for ws in (swept, reloaded)}
            for resp, _ in streams.values():
                await read_until(resp, b"tok", 2)
            # The snapshot: both streams hold credits in it, and neither is settled.
            probe = aioredis.Redis.from_url(private_redis.url)
            try:
                await probe.execute_command("SAVE")
            finally:
                await probe.aclose()
            shutil.copy(private_redis.data_dir / "dump.rdb", snapshot)
            for ws_id, (resp, _) in streams.items():
                await _finish(resp)
                costs[ws_id][resp.headers["x-request-id"]] = None  # its cost is in the ledger row
        await _settled(sc)
        for ws in (swept, reloaded):
            costs[ws.id] |= await calls(sc, ws, range(4, 6))
        await sc.flush()
        pg_before = {ws.id: await pg_account(sc.svc.pool, ws.id) for ws in (swept, reloaded)}
        for ws in (swept, reloaded):
            assert len(await sc.ledger(ws.id)) == 7

        # Redis restarts from the older snapshot: the streams' holds are back, later debits are gone.
        private_redis.stop()
        shutil.rmtree(private_redis.data_dir / "appendonlydir", ignore_errors=True)
        shutil.copy(snapshot, private_redis.data_dir / "dump.rdb")
        private_redis.persistent = False  # so it loads the RDB (with AOF on, Redis 7 starts from the AOF only)
        private_redis.restart()
        assert await sc.svc.state.active_holds(swept.id) == 1

        # The sweeper gets there first for one workspace: that call's deadline has passed.
        stale_hold = streams[swept.id][0].headers["x-request-id"]
        await sc.svc.state.redis.zadd(keys.hold_deadlines(swept.id), {stale_hold: 0})
        assert await sweep_all(sc.svc.state, sc.svc.pool, sc.svc.config.holds) == 1
        await sc.flush()  # the flusher notices the new run_id and rebuilds both balances

        for ws in (swept, reloaded):
            rows = await sc.ledger(ws.id)
            per_request = Counter(r["request_id"] for r in rows)
            assert all(n == 1 for n in per_request.values()), f"a request recorded twice: {per_request}"
            assert set(per_request) == set(costs[ws.id])
            assert all(r["status"] == "completed" for r in rows), [dict(r) for r in rows]
            assert await pg_account(sc.svc.pool, ws.id) == pg_before[ws.id], "a replayed event changed a balance"
            assert await sc.redis_account(ws.id) == (pg_before[ws.id][0], 0)
            assert await sc.svc.state.active_holds(ws.id) == 0

        # Calls go on, exactly counted.
        for ws in (swept, reloaded):
            await calls(sc, ws, range(6, 9))
            identity = await sc.assert_identity(ws.id)
            assert identity["usage_rows"] == 10
    finally:
        await stop_sidecar(sc)


async def test_a_grant_whose_redis_side_fails_reaches_redis_without_an_operator(private_redis, migrated_database_url):
    sc = await start_sidecar(private_redis.url, migrated_database_url)
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        cost = sum((await calls(sc, ws, range(1))).values())
        redis = sc.svc.state.redis
        await redis.config_set("min-replicas-to-write", 1)  # Redis refuses every write: NOREPLICAS
        try:
            status, body = await sc.admin("POST", f"/workspaces/{ws.id}/grants", {"grant_id": "g-1", "amount_micro": 5})
        finally:
            await redis.config_set("min-replicas-to-write", 0)
        assert status == 201 and body["created"] is True, body  # committed in Postgres: the grant is done
        assert int(await redis.hget(keys.acct(ws.id), "balance")) == CREDITS - cost  # not in Redis yet

        await sc.svc.flusher.flush_once()  # the data plane's next cycle applies what Redis is owed
        await sc.svc.flusher.flush_once()
        assert await sc.redis_account(ws.id) == (CREDITS - cost + 5, 0)
        async with sc.svc.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM balance_sync WHERE workspace_id = $1", ws.id) == 0
        # A replay of the grant changes nothing anywhere.
        status, body = await sc.admin("POST", f"/workspaces/{ws.id}/grants", {"grant_id": "g-1", "amount_micro": 5})
        assert status == 200 and body["created"] is False
        identity = await sc.assert_identity(ws.id)
        assert identity["grants"] == CREDITS + 5
    finally:
        await stop_sidecar(sc)


async def test_an_evicted_account_is_reloaded_with_what_its_live_holds_hold(sidecar: Sidecar, redis_client):
    ws = await sidecar.workspace(credits_micro=CREDITS)
    async with aiohttp.ClientSession() as http:
        resp, body = await _open_stream(sidecar, ws, http)
        await read_until(resp, b"tok", 2)
        hold = expected_hold(body)
        assert (await sidecar.svc.state.account(ws.id)).held_micro == hold
        await redis_client.delete(keys.acct(ws.id))  # evicted (allkeys-*), while the hold lives on
        costs = await calls(sidecar, ws, range(1))  # reloads the account from Postgres
        account = await sidecar.svc.state.account(ws.id)
        assert account.held_micro == hold, "the reload forgot the live hold: admission would over-commit"
        await _finish(resp)
    await _settled(sidecar)
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 2 and identity["debits"] > sum(costs.values())


async def test_a_reload_that_drops_a_recorded_hold_frees_its_slot_and_settles_its_idempotency_record(
    redis_client,
) -> None:
    """Dropping a hold Postgres already recorded gives back its key's concurrency slot, and its pending
    idempotency record becomes "done" (the call was billed: a retry must not run and be billed again)."""
    import secrets

    from support.scripts import admit

    from sidecar.state.store import Admission, State, StateLimits

    state = State(redis_client, StateLimits(concurrent_calls_per_key=1))
    ws = f"ws_{secrets.token_hex(5)}"
    await state.load(ws, 10_000, 1, run_id="runA")
    hold = secrets.token_hex(16)
    admitted = await admit(state, ws, ceiling=10, hold_id=hold, key_id="k1", idem="idem-1")
    assert admitted.outcome is Admission.ADMITTED
    gen, _ = await state.load_marks(ws)
    assert await state.load(ws, 10_000, 2, run_id="runB", replacing_gen=gen, resolved_holds=[hold])
    assert await state.active_holds(ws) == 0
    assert (await admit(state, ws, ceiling=10, key_id="k1")).outcome is Admission.ADMITTED, "the slot is free"
    retry = await admit(state, ws, ceiling=10, key_id="k1", idem="idem-1")
    assert retry.outcome is Admission.DUPLICATE and not retry.replayable
