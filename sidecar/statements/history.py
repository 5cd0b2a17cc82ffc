"""The ledger history of a workspace, a page at a time, with a cursor that never skips or repeats a row.

The order is the order rows were committed to the ledger: (insert_xid, event_id), where insert_xid is
the id of the transaction that wrote the row (migration 009). Not created_at: that is the time a call
settled in Redis, and its row reaches Postgres later (a batch, an outage, a replayed spool), so rows
keep appearing behind a time cursor. A page shows only rows written by transactions below the reader's
snapshot xmin: every transaction below it has ended, so no row can ever appear below the watermark
after a page was read, and the next page resumes exactly after the cursor. Rows of a transaction still
running wait for the next page (a long transaction anywhere in the cluster holds the watermark back).

A page is one range scan of the `ledger_history` index per partition, the cursor as its start key:
deep pages cost what the first costs. `from`/`to` bound created_at and prune partitions.
"""

from __future__ import annotations

import base64
import uuid

import asyncpg
import orjson

from sidecar.statements.columns import json_row, select_list
from sidecar.statements.filters import Filters, QueryRefused

_WATERMARK = "insert_xid < pg_snapshot_xmin(pg_current_snapshot())"
_CURSOR_VERSION = 1


def encode_cursor(xid: str, event_id: uuid.UUID, filters: Filters) -> str:
    raw = orjson.dumps({"v": _CURSOR_VERSION, "x": xid, "e": str(event_id), "f": filters.fingerprint()})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str, filters: Filters) -> tuple[int, uuid.UUID]:
    """(transaction id, event id) after which the page starts; refused if made for other filters."""
    try:
        data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        xid, event_id = int(data["x"]), uuid.UUID(data["e"])
        fingerprint, version = data["f"], data["v"]
    except (ValueError, TypeError, KeyError, orjson.JSONDecodeError):
        raise QueryRefused("cursor is not one this API returned", "invalid_cursor") from None
    if version != _CURSOR_VERSION or not 0 <= xid < 2**63:
        raise QueryRefused("cursor is not one this API returned", "invalid_cursor")
    if fingerprint != filters.fingerprint():
        message = "cursor was made for other filters or another order; use it with the same ones"
        raise QueryRefused(message, "cursor_mismatch")
    return xid, event_id


def page_query(filters: Filters, after: tuple[int, uuid.UUID] | None, limit: int) -> tuple[str, list]:
    conditions, args = filters.where()
    direction, compare = ("DESC", "<") if filters.descending else ("ASC", ">")
    if after is not None:
        args += [str(after[0]), after[1]]
        n = len(args) + 1
        conditions.append(f"(insert_xid, event_id) {compare} (${n - 1}::text::xid8, ${n}::uuid)")
    where = " AND ".join(["workspace_id = $1", _WATERMARK, *conditions])
    query = (
        f"SELECT {select_list()} FROM ledger WHERE {where} "
        f"ORDER BY insert_xid {direction}, event_id {direction} LIMIT {limit + 1}"
    )
    return query, args


async def page(conn: asyncpg.Connection, workspace_id: str, filters: Filters, cursor: str | None, limit: int) -> dict:
    after = decode_cursor(cursor, filters) if cursor else None
    query, args = page_query(filters, after, limit)
    rows = await conn.fetch(query, workspace_id, *args)
    more = len(rows) > limit
    rows = rows[:limit]
    # The cursor after the last row shown; at the end it still lets a caller follow new rows (asc).
    last = rows[-1] if rows else None
    next_cursor = encode_cursor(last["xid"], last["event_id"], filters) if last else cursor
    return {
        "object": "list",
        "data": [json_row(r) for r in rows],
        "has_more": more,
        "next_cursor": next_cursor,
    }
