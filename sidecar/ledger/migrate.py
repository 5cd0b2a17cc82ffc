"""Schema migrations: numbered SQL files applied once each, in order, under an advisory lock."""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

log = logging.getLogger("sidecar.migrate")

_LOCK_KEY = 0x51DECA7  # any constant: serialises concurrent `sidecar migrate` runs
PARTITION_MONTHS_AHEAD = 3


def migration_files() -> list[tuple[int, str, str]]:
    folder = resources.files("sidecar.ledger") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            found.append((int(entry.name.split("_", 1)[0]), entry.name, entry.read_text()))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; returns the names applied. Safe to run concurrently and repeatedly."""
    applied_now = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            log.info("applied migration", extra={"migration": name})
            applied_now.append(name)
        await _report_default_partition(conn)
        await conn.execute("SELECT ledger_ensure_partitions($1)", PARTITION_MONTHS_AHEAD)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def default_partition_rows(conn: asyncpg.Connection) -> dict[str, int]:
    """Rows in ledger_default per month ('YYYY-MM'): each one means a month had no partition when it
    was written (`sidecar migrate` not run for months, or a clock far ahead)."""
    rows = await conn.fetch(
        "SELECT to_char(date_trunc('month', created_at), 'YYYY-MM') AS month, count(*) AS n "
        "FROM ledger_default GROUP BY 1 ORDER BY 1"
    )
    return {r["month"]: r["n"] for r in rows}


async def _report_default_partition(conn: asyncpg.Connection) -> None:
    for month, count in (await default_partition_rows(conn)).items():
        log.error(
            "ledger rows found in the default partition; they are moved into their month's partition "
            "when it is created (run `sidecar migrate` at least monthly)",
            extra={"month": month, "rows": count},
        )


async def migrate_url(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
