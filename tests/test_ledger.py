"""The Postgres ledger: append-only, partitioned, migrations repeatable."""

from __future__ import annotations

import logging
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest
import pytest_asyncio
from support import services
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar

from sidecar import db
from sidecar.ledger.migrate import migrate_url, migration_files
from sidecar.money import AMOUNT_MICRO_MAX


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


# --- one row per event, whatever its timestamp (issue 15.7) -------------------------------------------


async def test_an_event_is_recorded_once_whatever_its_timestamp(sidecar: Sidecar, redis_client) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    stream = f"{{ws:{ws.id}}}:ledger"
    [(_, fields)] = await redis_client.xrange(stream)
    await sidecar.flush()
    async with sidecar.svc.pool.acquire() as conn:
        account_before = await conn.fetchrow(
            "SELECT balance_micro, version FROM accounts WHERE workspace_id = $1", ws.id
        )
    # The same event again, later and with another debit: a stale Redis replaying a call it lost track of.
    later = int(fields[b"at"]) + 3_600_000
    await redis_client.xadd(stream, {**fields, b"at": str(later).encode(), b"impact": b"-777", b"cost": b"777"})
    await redis_client.xadd(stream, {**fields, b"at": str(later).encode(), b"status": b"expired", b"impact": b"0"})
    await sidecar.flush()
    rows = await sidecar.ledger(ws.id)
    assert len(rows) == 1 and rows[0]["status"] == "completed"
    async with sidecar.svc.pool.acquire() as conn:
        account_after = await conn.fetchrow(
            "SELECT balance_micro, version FROM accounts WHERE workspace_id = $1", ws.id
        )
        # The rule holds in Postgres itself, for any writer.
        await conn.execute(
            "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, cost_micro, balance_impact_micro) "
            "VALUES ($1, now() + interval '1 day', 'usage', 'expired', $2, 0, 0)",
            rows[0]["event_id"],
            ws.id,
        )
    assert account_after == account_before
    assert len(await sidecar.ledger(ws.id)) == 1
    await sidecar.assert_identity(ws.id)


# --- errors that mean what they say (issue 13.8) ------------------------------------------------------


@pytest_asyncio.fixture
async def fresh_database_url(database_url: str) -> AsyncIterator[str]:
    """A database of this test's own, migrated: the test may break its schema."""
    name = f"sidecar_test_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(services.with_database(database_url, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = services.with_database(database_url, name)
    await migrate_url(url)
    try:
        yield url
    finally:
        admin = await asyncpg.connect(services.with_database(database_url, "postgres"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_a_sql_bug_is_an_internal_error_not_an_outage(redis_client, redis_url, fresh_database_url) -> None:
    sc = await start_sidecar(redis_url, fresh_database_url)
    try:
        ws = await sc.workspace(credits_micro=1_000_000)
        async with sc.svc.pool.acquire() as conn:  # a release whose code and schema disagree
            await conn.execute("ALTER TABLE api_keys RENAME COLUMN tokens_per_minute TO tokens_per_minute_old")
        code, _, body = await sc.chat(ws, chat_body())
        assert code == 500, body
        error = orjson.loads(body)["error"]
        assert error["type"] == "api_error" and "retry" not in error["message"]
    finally:
        await stop_sidecar(sc)


def test_event_validation_survives_python_O() -> None:
    program = (
        "import orjson\n"
        "from sidecar.ledger.events import InvalidEvent, row_from_entry\n"
        "event = {'event_id': '00000000-0000-4000-8000-000000000001', 'workspace_id': 'w', 'status': 'bogus'}\n"
        "fields = {b'e': orjson.dumps(event), b'at': b'1', b'cost': b'0', b'impact': b'0'}\n"
        "try:\n"
        "    row_from_entry(fields)\n"
        "except InvalidEvent as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    print('accepted')\n"
    )
    done = subprocess.run([sys.executable, "-O", "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused: unknown status 'bogus'"), done.stdout


# --- the default partition (issue 15.20) --------------------------------------------------------------


async def test_rows_in_the_default_partition_move_into_their_new_partition(fresh_database_url: str, caplog) -> None:
    conn = await asyncpg.connect(fresh_database_url)
    try:
        event_id = uuid.uuid4()
        await conn.execute(  # a month no partition covers yet: the row goes to ledger_default
            "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, cost_micro, balance_impact_micro) "
            "VALUES ($1, date_trunc('month', now()) + interval '5 months 3 days', 'grant', 'completed', 'w', 0, 7)",
            event_id,
        )
        assert await conn.fetchval("SELECT tableoid::regclass::text FROM ledger WHERE event_id = $1", event_id) == (
            "ledger_default"
        )
        caplog.set_level(logging.ERROR, logger="sidecar.migrate")
        await migrate_url(fresh_database_url)
        assert any("default partition" in r.getMessage() for r in caplog.records), "no alert logged"

        await conn.execute("SELECT ledger_ensure_partitions(6)")  # the month's partition is due now
        partition = await conn.fetchval("SELECT tableoid::regclass::text FROM ledger WHERE event_id = $1", event_id)
        assert partition.startswith("ledger_2") and partition != "ledger_default"
        assert await conn.fetchval("SELECT count(*) FROM ledger_default") == 0
        assert await conn.fetchval("SELECT count(*) FROM ledger WHERE event_id = $1", event_id) == 1
        # Every protection is back on, on both tables.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"DELETE FROM {partition}")
        disabled = await conn.fetch(
            "SELECT tgrelid::regclass::text AS t, tgname FROM pg_trigger WHERE tgenabled = 'D' "
            "AND tgrelid IN ('ledger_default'::regclass, $1::regclass)",
            partition,
        )
        assert disabled == []
        await conn.execute(
            "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, cost_micro, balance_impact_micro) "
            "VALUES ($1, date_trunc('month', now()) + interval '5 months 4 days', 'grant', 'completed', 'w', 0, 7)",
            event_id,
        )
        assert await conn.fetchval("SELECT count(*) FROM ledger WHERE event_id = $1", event_id) == 1
    finally:
        await conn.close()


# --- bounded balances (issue 15.10, grant side) -------------------------------------------------------


async def test_a_grant_past_the_balance_limit_is_refused(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=AMOUNT_MICRO_MAX - 10)
    status, body = await sidecar.admin("POST", f"/workspaces/{ws.id}/grants", {"grant_id": "over", "amount_micro": 11})
    assert status == 409 and body["error"]["code"] == "balance_limit", body
    assert "limit" in body["error"]["message"]
    status, _ = await sidecar.admin("POST", f"/workspaces/{ws.id}/grants", {"grant_id": "at", "amount_micro": 10})
    assert status == 201
    identity = await sidecar.assert_identity(ws.id)
    assert identity["account_balance"] == AMOUNT_MICRO_MAX
    async with sidecar.svc.pool.acquire() as conn:
        with pytest.raises(ValueError, match="at most"):
            await db.grant(conn, ws.id, "huge", "grant", AMOUNT_MICRO_MAX + 1)
