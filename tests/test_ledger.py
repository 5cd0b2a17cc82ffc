"""The Postgres ledger: append-only, partitioned, migrations repeatable."""

from __future__ import annotations

import asyncpg
import pytest
from support.harness import Sidecar, chat_body

from sidecar.ledger.migrate import migrate_url, migration_files


async def test_ledger_refuses_update_delete_truncate(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    await sidecar.flush()
    [row] = await sidecar.ledger(ws.id)
    async with sidecar.svc.pool.acquire() as conn:
        partition = await conn.fetchval(
            "SELECT tableoid::regclass::text FROM ledger WHERE event_id = $1", row["event_id"]
        )
        assert partition.startswith("ledger_2")  # a monthly partition, not the default one
        for statement in (
            "UPDATE ledger SET cost_micro = 0 WHERE workspace_id = $1",
            "DELETE FROM ledger WHERE workspace_id = $1",
            f"UPDATE {partition} SET cost_micro = 0 WHERE workspace_id = $1",
            f"DELETE FROM {partition} WHERE workspace_id = $1",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement, ws.id)
        for table in ("ledger", partition, "ledger_default"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(f"TRUNCATE {table}")
    assert len(await sidecar.ledger(ws.id)) == 1


async def test_migrations_are_repeatable(migrated_database_url: str) -> None:
    assert await migrate_url(migrated_database_url) == []
    conn = await asyncpg.connect(migrated_database_url)
    try:
        versions = await conn.fetch("SELECT version FROM schema_migrations")
        assert [r["version"] for r in versions] == [v for v, _, _ in migration_files()]
        partitions = await conn.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'ledger'::regclass")
        assert partitions >= 4  # default + this month + the months ahead
    finally:
        await conn.close()


async def test_flushing_the_same_events_twice_writes_them_once(sidecar: Sidecar, redis_client) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    for _ in range(3):
        assert (await sidecar.chat(ws, chat_body()))[0] == 200
    stream = f"{{ws:{ws.id}}}:ledger"
    entries = await redis_client.xrange(stream)
    await sidecar.flush()
    # The same events again, as if a flusher died after commit and before the acknowledgement.
    for _, fields in entries:
        await redis_client.xadd(stream, fields)
    await sidecar.flush()
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 3
