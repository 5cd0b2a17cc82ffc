"""A CSV statement: the history's rows (same filters, same order) streamed as one download.

Postgres writes the CSV itself (`COPY (SELECT ...) TO STDOUT`): amounts are formatted in SQL exactly as
money.format_micro writes them and times in UTC, and no row becomes a Python object. The rows flow
through in the chunks Postgres sends, each awaited into the HTTP response before the next is read, so
a slow client slows the query instead of filling memory: a million rows stream in constant memory
(bench/statements.py measures rows/s and peak RSS). The export runs in one REPEATABLE READ read-only
transaction: one snapshot, the same watermark as the history (rows of transactions still running at
its start are not in it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg

from sidecar.statements.columns import csv_select_list, fee_expression
from sidecar.statements.filters import Filters

_WATERMARK = "insert_xid < pg_snapshot_xmin(pg_current_snapshot())"


def export_query(filters: Filters, fee: str) -> tuple[str, list]:
    conditions, args = filters.where()
    direction = "DESC" if filters.descending else "ASC"
    where = " AND ".join(["workspace_id = $1", _WATERMARK, *conditions])
    query = (
        f"SELECT {csv_select_list(fee)} FROM ledger WHERE {where} ORDER BY insert_xid {direction}, event_id {direction}"
    )
    return query, args


async def export(
    conn: asyncpg.Connection,
    workspace_id: str,
    filters: Filters,
    write: Callable[[bytes], Awaitable[None]],
    timeout_s: float,
) -> int:
    """Stream the CSV (header first) through `write`; returns the number of rows."""
    query, args = export_query(filters, await fee_expression(conn))
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        status = await conn.copy_from_query(
            query, workspace_id, *args, output=write, format="csv", header=True, timeout=timeout_s
        )
    return int(status.split()[-1])
