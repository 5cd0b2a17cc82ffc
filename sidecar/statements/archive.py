"""Retention: `sidecar ledger archive --before YYYY-MM --dir DIR [--drop] [--dry-run]`.

Each monthly ledger partition before the given month is, in ONE transaction, detached from the ledger
and its per-workspace, per-kind totals recorded in `ledger_archive_totals` (so balance = the ledger +
its archived months, exactly; `sidecar audit` adds both). Its rows are then written to
DIR/ledger-YYYY-MM.csv (every column, a header, Postgres's own CSV) with a SHA-256 recorded in
`ledger_archives`. The detached table is kept (renamed archived_ledger_YYYY_MM, still append-only)
unless --drop is given; it is dropped only after the file is read back and matches its row count and
digest. Event ids stay in ledger_event_ids, so a replayed old event is still refused, and the daily
roll-ups stay, so summaries and margin reports of archived months still answer.

What "points to" a month, which refuses it (ArchiveRefused, nothing changed):
- an open statement period: a month's statements are issued during the month after it, so a month is
  archivable only from the first day of the second month after it (November from January 1st);
- an invoice: a month holding the ledger row of an invoiced payment order (its crediting, grant id
  `order:<id>`, or its refund, `refund:<id>`) stays, with the invoice's figures.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import asyncpg

from sidecar.errors import DomainError

_PARTITION_RE = re.compile(r"ledger_(\d{4})_(\d{2})\Z")
MONTHS_ARCHIVED_MAX = 120  # one run: a bound on the loop, far above a decade of backlog


class ArchiveRefused(DomainError):
    """A month that must stay in the ledger (an open statement period, an invoice points into it)."""


@dataclass(frozen=True, slots=True)
class Archived:
    month: date
    rows: int
    file: Path | None
    sha256: str | None
    dropped: bool


def parse_month(text: str) -> date:
    match = re.fullmatch(r"(\d{4})-(\d{2})", text or "")
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise ArchiveRefused(f"--before must be a month like 2026-01, not {text!r}")
    return date(int(match.group(1)), int(match.group(2)), 1)


def add_months(month: date, months: int) -> date:
    index = month.year * 12 + month.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def archivable_before(today: date) -> date:
    """The first month whose statement period may still be open (today's and the one before)."""
    return add_months(today.replace(day=1), -1)


async def partitions(conn: asyncpg.Connection) -> dict[date, str]:
    """The ledger's monthly partitions, by their first day."""
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'ledger'::regclass"
    )
    found = {}
    for row in rows:
        match = _PARTITION_RE.match(row["relname"])
        if match:
            found[date(int(match.group(1)), int(match.group(2)), 1)] = row["relname"]
    return found


# An invoice is of a payment order; the order's ledger rows are its crediting (grant id `order:<id>`) and
# its refund (`refund:<id>`), found through `grants`, the index of every movement (sidecar/billing).
_INVOICED_ROWS = (
    "SELECT count(*) FROM invoices i JOIN grants g ON g.workspace_id = i.workspace_id "
    "AND g.grant_id IN ('order:' || i.order_id, 'refund:' || i.order_id) "
    "JOIN ledger_event_ids e ON e.event_id = g.event_id WHERE e.created_at >= $1 AND e.created_at < $2"
)


async def _invoice_references(conn: asyncpg.Connection, month: date) -> int:
    """Ledger rows of this month that an invoice points to (none while there is no invoices table)."""
    if await conn.fetchval("SELECT to_regclass('invoices')") is None:
        return 0
    return await conn.fetchval(_INVOICED_ROWS, month, add_months(month, 1))


async def check(conn: asyncpg.Connection, month: date, today: date) -> None:
    open_from = archivable_before(today)
    if month >= open_from:
        raise ArchiveRefused(
            f"{month:%Y-%m}: its statement period is still open (months from {open_from:%Y-%m} stay in the ledger)"
        )
    referenced = await _invoice_references(conn, month)
    if referenced:
        raise ArchiveRefused(f"{month:%Y-%m}: {referenced} ledger row(s) of invoiced payment orders")


async def detach(conn: asyncpg.Connection, month: date, partition: str, today: date) -> tuple[str, int]:
    """One transaction: checks, detach, totals. Returns the detached table and its row count."""
    archived = f"archived_{partition}"
    async with conn.transaction():
        await check(conn, month, today)
        await conn.execute(f'ALTER TABLE ledger DETACH PARTITION "{partition}"')
        await conn.execute(f'ALTER TABLE "{partition}" RENAME TO "{archived}"')
        # The ledger's row triggers were clones, and leave with the partition: the archive stays append-only.
        await conn.execute(
            f'CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON "{archived}" '
            "FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()"
        )
        rows = await conn.fetchval(f'SELECT count(*) FROM "{archived}"')
        await conn.execute(
            "INSERT INTO ledger_archives (month, partition, rows) VALUES ($1, $2, $3)", month, archived, rows
        )
        await conn.execute(
            "INSERT INTO ledger_archive_totals (month, workspace_id, kind, rows, balance_impact_micro) "
            f'SELECT $1, workspace_id, kind, count(*), sum(balance_impact_micro)::bigint FROM "{archived}" '
            "GROUP BY workspace_id, kind",
            month,
        )
    return archived, rows


def _digest(path: Path) -> tuple[str, int]:
    """SHA-256 and data lines (the header not counted) of a written archive file."""
    sha, lines = hashlib.sha256(), 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    with path.open("r", newline="", encoding="utf-8") as f:
        lines = sum(1 for _ in csv.reader(f)) - 1
    return sha.hexdigest(), lines


async def export(conn: asyncpg.Connection, month: date, table: str, rows: int, directory: Path) -> tuple[Path, str]:
    path = directory / f"ledger-{month:%Y-%m}.csv"
    await conn.copy_from_query(
        f'SELECT * FROM "{table}" ORDER BY created_at, event_id', output=str(path), format="csv", header=True
    )
    sha, lines = _digest(path)
    if lines != rows:
        raise ArchiveRefused(f"{path}: {lines} rows written, {rows} expected; the table is kept")
    await conn.execute("UPDATE ledger_archives SET file = $2, sha256 = $3 WHERE month = $1", month, str(path), sha)
    return path, sha


async def drop(conn: asyncpg.Connection, month: date, table: str, rows: int, path: Path, sha: str) -> None:
    again, lines = _digest(path)
    if again != sha or lines != rows:
        raise ArchiveRefused(f"{path} no longer matches what was written; {table} is kept")
    async with conn.transaction():
        await conn.execute(f'DROP TABLE "{table}"')
        await conn.execute("UPDATE ledger_archives SET dropped_at = now() WHERE month = $1", month)


async def run(
    conn: asyncpg.Connection, before: date, directory: Path, today: date, drop_tables: bool, dry_run: bool
) -> list[Archived]:
    """Archive every monthly partition before `before`, oldest first; stops at the first refusal.
    `directory` must exist."""
    done = []
    found = await partitions(conn)
    for month in sorted(m for m in found if m < before)[:MONTHS_ARCHIVED_MAX]:
        if dry_run:
            await check(conn, month, today)
            rows = await conn.fetchval(f'SELECT count(*) FROM "{found[month]}"')
            done.append(Archived(month, rows, None, None, False))
            continue
        table, rows = await detach(conn, month, found[month], today)
        path, sha = await export(conn, month, table, rows, directory)
        if drop_tables:
            await drop(conn, month, table, rows, path, sha)
        done.append(Archived(month, rows, path, sha, drop_tables))
    return done
