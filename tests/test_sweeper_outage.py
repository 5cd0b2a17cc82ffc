"""The hold sweeper is the only thing that records the call of a sidecar that died mid-call (DESIGN.md
section 5). Found by `make chaos`: after Postgres was SIGKILLed, a connection error that is not a
PostgresError (asyncpg.InterfaceError, which db.POSTGRES_OUTAGE counts as an outage, or asyncpg's
InternalClientError on a connection left mid-operation) ended the sweeper's loop for good, so the
holds of dead sidecars stayed held and their calls unrecorded until the process restarted."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import orjson
import pytest
from support.harness import Sidecar
from support.scripts import admit

from sidecar import sweeper

# The money path runs against a single Redis and against a Redis Cluster (conftest.py).
pytestmark = pytest.mark.both_redis


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    ],
)
async def test_sweeper_loop_outlives_a_connection_lost_under_it(sidecar: Sidecar, monkeypatch, error) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    event = uuid.uuid4()  # the ledger dedups on the event id alone, across workspaces: one per test
    hold_id = event.hex
    real_workspace_ids = sweeper.db.workspace_ids
    failures = [error, error]

    async def connection_lost_twice(conn):
        if failures:
            raise failures.pop()
        return await real_workspace_ids(conn)

    monkeypatch.setattr(sweeper.db, "workspace_ids", connection_lost_twice)
    stop = asyncio.Event()
    svc = sidecar.svc
    loop = asyncio.create_task(sweeper.run(svc.state, svc.pool, svc.config.holds, svc.metrics, stop))
    try:
        # A hold taken by a process that then died: admitted, never settled, deadline at once.
        meta = {
            "event_id": str(event),
            "status": "expired",
            "workspace_id": ws.id,
            "key_id": ws.key_id,
            "request_id": hold_id,
            "model": "gpt-4o-mini",
            "hold_micro": 5_000,
            "started_at": 1,
        }
        admitted = await admit(
            svc.state, ws.id, ceiling=5_000, hold_id=hold_id, key_id=ws.key_id, hold_ttl_ms=1, meta=orjson.dumps(meta)
        )
        assert admitted.outcome == 0
        deadline = time.monotonic() + 5
        while await svc.state.active_holds(ws.id):
            assert not loop.done(), f"the sweeper stopped: {loop.exception()!r}"
            assert time.monotonic() < deadline, "the dead sidecar's hold was never voided"
            await asyncio.sleep(0.05)
        assert not failures, "the injected connection errors were not met"
        await sidecar.flush()
        [row] = await sidecar.ledger(ws.id)
        assert (row["request_id"], row["status"], row["cost_micro"]) == (hold_id, "expired", 0)
        await sidecar.assert_identity(ws.id)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 5)
