"""Notification events and their durable delivery log (Postgres).

An event is enqueued in the transaction of whatever caused it (a threshold crossing, a reload's end, a
key marked failing), under a dedup key naming that one occurrence: enqueuing it again changes nothing,
so each occurrence is sent once however many calls observed it. Only workspaces with an endpoint
subscribed to the event's type get a row. The delivery worker (delivery.py) sends what is due.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import asyncpg
import orjson

EVENT_ID_PREFIX = "evt_"
ERROR_CHARS_MAX = 200
LIST_ROWS_MAX = 200


class EventType(StrEnum):
    BALANCE_LOW = "balance.below_threshold"
    RELOAD_SUCCEEDED = "auto_reload.succeeded"
    RELOAD_FAILED = "auto_reload.failed"
    CREDITS_EXPIRING = "credits.expiring"
    BYOK_KEY_FAILING = "byok_key.failing"
    PING = "ping"  # sent on request, to test an endpoint


class DeliveryState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class Enqueued(StrEnum):
    CREATED = "created"
    DUPLICATE = "duplicate"  # this occurrence was enqueued before
    NO_ENDPOINT = "no_endpoint"  # the workspace has no endpoint, or it is not subscribed
    QUEUE_FULL = "queue_full"  # past notifications.pending_deliveries_per_workspace_max


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    workspace_id: str
    event_type: str
    body: str
    attempts: int


def _body(event_id: str, event_type: EventType, workspace_id: str, data: dict, at: datetime) -> str:
    return orjson.dumps(
        {
            "id": event_id,
            "type": event_type.value,
            "created": at.isoformat(),
            "workspace_id": workspace_id,
            "data": data,
        }
    ).decode()


async def enqueue(
    conn: asyncpg.Connection,
    workspace_id: str,
    event_type: EventType,
    dedup_key: str,
    data: dict,
    pending_max: int,
) -> Enqueued:
    """Record the event for delivery, once per (workspace, dedup_key). Run it inside the transaction
    that records what the event reports, so both commit or neither does."""
    event_id = EVENT_ID_PREFIX + secrets.token_hex(12)
    body = _body(event_id, event_type, workspace_id, data, datetime.now(UTC))
    row = await conn.fetchrow(
        "WITH ep AS (SELECT 1 FROM notification_endpoints WHERE workspace_id = $1 AND $3 = ANY(events)), "
        "backlog AS (SELECT count(*) AS n FROM notification_deliveries WHERE workspace_id = $1 AND state = 'pending'), "
        "ins AS (INSERT INTO notification_deliveries (id, workspace_id, event_type, dedup_key, body, state) "
        "  SELECT $2, $1, $3, $4, $5, 'pending' WHERE EXISTS (SELECT 1 FROM ep) AND (SELECT n FROM backlog) < $6 "
        "  ON CONFLICT (workspace_id, dedup_key) DO NOTHING RETURNING id) "
        "SELECT EXISTS (SELECT 1 FROM ep) AS subscribed, (SELECT n FROM backlog) AS backlog, "
        "EXISTS (SELECT 1 FROM ins) AS created",
        workspace_id,
        event_id,
        event_type.value,
        dedup_key,
        body,
        pending_max,
    )
    if row["created"]:
        return Enqueued.CREATED
    if not row["subscribed"]:
        return Enqueued.NO_ENDPOINT
    if row["backlog"] >= pending_max:
        exists = await conn.fetchval(
            "SELECT true FROM notification_deliveries WHERE workspace_id = $1 AND dedup_key = $2",
            workspace_id,
            dedup_key,
        )
        return Enqueued.DUPLICATE if exists else Enqueued.QUEUE_FULL
    return Enqueued.DUPLICATE


async def claim_due(conn: asyncpg.Connection, batch_max: int, lease_s: float) -> list[Delivery]:
    """Take up to `batch_max` due deliveries, pushing their next attempt `lease_s` ahead: a process that
    dies mid-delivery leaves them due again once the lease ends (at-least-once; receivers dedupe on
    the event id). Another process skips rows being claimed (SKIP LOCKED)."""
    rows = await conn.fetch(
        "UPDATE notification_deliveries d SET attempts = d.attempts + 1, "
        "next_attempt_at = now() + make_interval(secs => $2) "
        "WHERE d.id IN (SELECT id FROM notification_deliveries WHERE state = 'pending' AND next_attempt_at <= now() "
        "  ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) "
        "RETURNING d.id, d.workspace_id, d.event_type, d.body, d.attempts",
        batch_max,
        lease_s,
    )
    return [Delivery(**r) for r in rows]


async def record_attempt(
    conn: asyncpg.Connection,
    delivery: Delivery,
    status_code: int | None,
    error: str | None,
    duration_ms: int,
    state: DeliveryState,
    retry_in_s: float,
) -> None:
    """The attempt's outcome, and what follows: delivered, failed for good, or due again in `retry_in_s`."""
    error = error[:ERROR_CHARS_MAX] if error else None
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO notification_attempts (delivery_id, attempt, status_code, error, duration_ms) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            delivery.id,
            delivery.attempts,
            status_code,
            error,
            duration_ms,
        )
        await conn.execute(
            "UPDATE notification_deliveries SET state = $2, last_status = $3, last_error = $4, "
            "next_attempt_at = now() + make_interval(secs => $5), "
            "finished_at = CASE WHEN $2 = 'pending' THEN NULL ELSE now() END "
            "WHERE id = $1 AND state = 'pending' AND attempts = $6",
            delivery.id,
            state.value,
            status_code,
            error,
            retry_in_s,
            delivery.attempts,
        )


async def drop_pending(conn: asyncpg.Connection, workspace_id: str, reason: str) -> int:
    """Fail what is still pending for a workspace (its endpoint was removed)."""
    status = await conn.execute(
        "UPDATE notification_deliveries SET state = 'failed', last_error = $2, finished_at = now() "
        "WHERE workspace_id = $1 AND state = 'pending'",
        workspace_id,
        reason,
    )
    return int(status.split()[-1])


async def pending_count(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM notification_deliveries WHERE state = 'pending'")


async def list_deliveries(conn: asyncpg.Connection, workspace_id: str, limit: int, state: str | None) -> list[dict]:
    """The delivery log, newest first, each with its attempts."""
    rows = await conn.fetch(
        "SELECT id, event_type, body, state, attempts, next_attempt_at, last_status, last_error, created_at, "
        "finished_at FROM notification_deliveries WHERE workspace_id = $1 AND ($3::text IS NULL OR state = $3) "
        "ORDER BY created_at DESC, id LIMIT $2",
        workspace_id,
        min(limit, LIST_ROWS_MAX),
        state,
    )
    attempts = await conn.fetch(
        "SELECT delivery_id, attempt, at, status_code, error, duration_ms FROM notification_attempts "
        "WHERE delivery_id = ANY($1::text[]) ORDER BY delivery_id, attempt",
        [r["id"] for r in rows],
    )
    by_delivery: dict[str, list[dict]] = {}
    for a in attempts:
        by_delivery.setdefault(a["delivery_id"], []).append(
            {
                "attempt": a["attempt"],
                "at": a["at"].isoformat(),
                "status_code": a["status_code"],
                "error": a["error"],
                "duration_ms": a["duration_ms"],
            }
        )
    return [
        {
            "id": r["id"],
            "type": r["event_type"],
            "state": r["state"],
            "attempts": r["attempts"],
            "next_attempt_at": r["next_attempt_at"].isoformat() if r["state"] == "pending" else None,
            "last_status": r["last_status"],
            "last_error": r["last_error"],
            "created_at": r["created_at"].isoformat(),
            "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None,
            "event": orjson.loads(r["body"]),
            "attempt_log": by_delivery.get(r["id"], []),
        }
        for r in rows
    ]
