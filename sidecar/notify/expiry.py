"""`credits.expiring`: a periodic check for workspaces whose credits expire within
`notifications.expiry_warning_ms`, notified once per expiry instant (a purchase that moves the expiry
makes a new instant, warned again in its turn).

It reads `wallets.expires_at` (the expiry of issue 9, point 6, migration 007) and the account's balance
in Postgres.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from sidecar.config import NotificationsConfig
from sidecar.db import POSTGRES_OUTAGE
from sidecar.money import format_micro
from sidecar.notify import events
from sidecar.notify.events import EventType

log = logging.getLogger("sidecar.notify")

BATCH_WORKSPACES_MAX = 500


def dedup_key(expires_at_ms: int) -> str:
    return f"credits.expiring:{expires_at_ms}"


async def warn_expiring(conn: asyncpg.Connection, config: NotificationsConfig) -> int:
    """Enqueue a warning for each workspace (with an endpoint and credits left) whose expiry falls within
    the warning window and was not warned of yet. Returns how many were enqueued."""
    rows = await conn.fetch(
        "SELECT w.workspace_id, w.expires_at, a.balance_micro, "
        "(extract(epoch FROM w.expires_at) * 1000)::bigint AS expires_ms FROM wallets w "
        "JOIN accounts a USING (workspace_id) JOIN notification_endpoints e USING (workspace_id) "
        "WHERE w.expires_at > now() AND w.expires_at <= now() + make_interval(secs => $1) AND a.balance_micro > 0 "
        "AND $3 = ANY(e.events) AND NOT EXISTS (SELECT 1 FROM notification_deliveries d "
        "  WHERE d.workspace_id = w.workspace_id "
        "  AND d.dedup_key = 'credits.expiring:' || (extract(epoch FROM w.expires_at) * 1000)::bigint) "
        "ORDER BY w.expires_at LIMIT $2",
        config.expiry_warning_ms / 1000,
        BATCH_WORKSPACES_MAX,
        EventType.CREDITS_EXPIRING.value,
    )
    enqueued = 0
    for row in rows:
        data = {
            "expires_at": row["expires_at"].isoformat(),
            "balance_micro": row["balance_micro"],
            "balance": format_micro(row["balance_micro"]),
        }
        outcome = await events.enqueue(
            conn,
            row["workspace_id"],
            EventType.CREDITS_EXPIRING,
            dedup_key(row["expires_ms"]),
            data,
            config.pending_deliveries_per_workspace_max,
        )
        enqueued += outcome is events.Enqueued.CREATED
    return enqueued


async def run(pool: asyncpg.Pool, config: NotificationsConfig, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with pool.acquire() as conn:
                await warn_expiring(conn, config)
        except POSTGRES_OUTAGE as exc:
            log.warning("expiry warnings paused: postgres unavailable", extra={"error": type(exc).__name__})
        except Exception:  # the loop must outlive any one bad round
            log.exception("expiry warning round failed; will retry")
        try:
            await asyncio.wait_for(stop.wait(), config.expiry_check_interval_ms / 1000)
        except TimeoutError:
            pass
