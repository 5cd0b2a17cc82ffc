"""Auto-reload's state in Postgres: the settings, one row per reload, and its forward-only states.

The guard is the database's: a unique partial index allows one reload in flight (pending or
processing) per workspace, so any number of processes racing to start one start exactly one. A
failure counts toward `auto_reload.failures_max` consecutive failures, after which auto-reload turns
itself off (`disabled_reason`); until then the next reload waits out a doubling back-off. A success
clears the count. Each end is also a notification (notify/events.py), in the same transaction.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg

from sidecar.config import AutoReloadConfig
from sidecar.money import format_micro
from sidecar.notify import events
from sidecar.notify.events import EventType
from sidecar.reload.gateway import ProviderIds, SavedMethod

RELOAD_ID_PREFIX = "rl_"
REASON_CHARS_MAX = 200
LIST_ROWS_MAX = 200
BACKOFF_DOUBLINGS_MAX = 30


class ReloadState(StrEnum):
    PENDING = "pending"  # recorded; its payment not started yet
    PROCESSING = "processing"  # the payment started; its webhook will say how it ended
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ReloadReason(StrEnum):
    THRESHOLD = "threshold"  # a settlement crossed the threshold
    RETRY = "retry"  # the back-off after a failure ended and the balance is still under it


class Ended(StrEnum):
    RECORDED = "recorded"
    ALREADY = "already"  # this reload had already ended (a replayed webhook)
    UNKNOWN = "unknown"  # no such reload


@dataclass(frozen=True, slots=True)
class Settings:
    workspace_id: str
    enabled: bool
    threshold_micro: int
    amount_micro: int
    customer_id: str | None
    payment_method_id: str | None
    failures: int
    retry_at: datetime | None
    disabled_reason: str | None
    disabled_at: datetime | None
    updated_at: datetime

    @property
    def method(self) -> SavedMethod | None:
        return SavedMethod(self.customer_id, self.payment_method_id) if self.payment_method_id else None

    def view(self) -> dict:
        return {
            "workspace_id": self.workspace_id,
            "enabled": self.enabled,
            "threshold_micro": self.threshold_micro,
            "threshold": format_micro(self.threshold_micro),
            "amount_micro": self.amount_micro,
            "amount": format_micro(self.amount_micro),
            "payment_method_saved": self.payment_method_id is not None,
            "consecutive_failures": self.failures,
            "retry_at": _iso(self.retry_at),
            "disabled_reason": self.disabled_reason,
            "disabled_at": _iso(self.disabled_at),
            "updated_at": _iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class Reload:
    id: str
    workspace_id: str
    amount_micro: int
    state: str
    attempt: int
    reason: str
    available_micro: int | None
    provider_payment_id: str | None
    order_id: str | None
    failure_reason: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def view(self) -> dict:
        return {
            "id": self.id,
            "workspace_id": self.workspace_id,
            "amount_micro": self.amount_micro,
            "amount": format_micro(self.amount_micro),
            "state": self.state,
            "attempt": self.attempt,
            "reason": self.reason,
            "available_micro": self.available_micro,
            "provider_payment_id": self.provider_payment_id,
            "order_id": self.order_id,
            "failure_reason": self.failure_reason,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }


@dataclass(frozen=True, slots=True)
class Failure:
    ended: Ended
    failures: int = 0
    disabled: bool = False
    retry_at: datetime | None = None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def new_reload_id() -> str:
    return RELOAD_ID_PREFIX + secrets.token_hex(12)


def backoff_s(config: AutoReloadConfig, failures: int) -> float:
    doubled = config.retry_backoff_ms_min * 2 ** min(max(failures - 1, 0), BACKOFF_DOUBLINGS_MAX)
    return min(doubled, config.retry_backoff_ms_max) / 1000


_SETTINGS = (
    "workspace_id, enabled, threshold_micro, amount_micro, customer_id, payment_method_id, failures, retry_at, "
    "disabled_reason, disabled_at, updated_at"
)
_RELOAD = (
    "id, workspace_id, amount_micro, state, attempt, reason, available_micro, provider_payment_id, order_id, "
    "failure_reason, created_at, started_at, finished_at"
)


async def get_settings(conn: asyncpg.Connection, ws: str) -> Settings | None:
    row = await conn.fetchrow(f"SELECT {_SETTINGS} FROM auto_reload_settings WHERE workspace_id = $1", ws)
    return Settings(**row) if row else None


async def put_settings(
    conn: asyncpg.Connection,
    ws: str,
    enabled: bool,
    threshold_micro: int,
    amount_micro: int,
    method: SavedMethod | None,
) -> Settings:
    """Set the settings (a method of None keeps the saved one). Enabling clears the failure count and
    a disabling: the operator turned it back on. The watch is re-armed."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO auto_reload_settings AS s (workspace_id, enabled, threshold_micro, amount_micro, customer_id, "
            "payment_method_id) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (workspace_id) DO UPDATE SET "
            "enabled = EXCLUDED.enabled, threshold_micro = EXCLUDED.threshold_micro, "
            "amount_micro = EXCLUDED.amount_micro, "
            "customer_id = CASE WHEN $6::text IS NULL THEN s.customer_id ELSE EXCLUDED.customer_id END, "
            "payment_method_id = coalesce(EXCLUDED.payment_method_id, s.payment_method_id), "
            "failures = CASE WHEN EXCLUDED.enabled AND NOT s.enabled THEN 0 ELSE s.failures END, "
            "retry_at = CASE WHEN EXCLUDED.enabled AND NOT s.enabled THEN NULL ELSE s.retry_at END, "
            "disabled_reason = CASE WHEN EXCLUDED.enabled THEN NULL ELSE s.disabled_reason END, "
            "disabled_at = CASE WHEN EXCLUDED.enabled THEN NULL ELSE s.disabled_at END, "
            f"updated_at = now() RETURNING {_SETTINGS}",
            ws,
            enabled,
            threshold_micro,
            amount_micro,
            method.customer_id if method else None,
            method.payment_method_id if method else None,
        )
        await set_watch(conn, ws, "reload", threshold_micro)
    return Settings(**row)


async def set_watch(conn: asyncpg.Connection, ws: str, kind: str, threshold_micro: int | None) -> None:
    """The threshold a balance watch compares against; None removes the watch. Setting it re-arms the
    watch: a balance already under the new settings crosses at the next settlement."""
    if threshold_micro is None:
        await conn.execute("DELETE FROM balance_watches WHERE workspace_id = $1 AND kind = $2", ws, kind)
        return
    await conn.execute(
        "INSERT INTO balance_watches AS w (workspace_id, kind, threshold_micro) VALUES ($1, $2, $3) "
        "ON CONFLICT (workspace_id, kind) DO UPDATE SET threshold_micro = EXCLUDED.threshold_micro, below_ms = NULL",
        ws,
        kind,
        threshold_micro,
    )


async def save_payment_method(conn: asyncpg.Connection, ws: str, method: SavedMethod) -> bool:
    """Remember the method a checkout saved (the payment webhook calls this). True: settings exist and
    now use it; auto-reload is not turned on by this."""
    status = await conn.execute(
        "UPDATE auto_reload_settings SET customer_id = $2, payment_method_id = $3, updated_at = now() "
        "WHERE workspace_id = $1",
        ws,
        method.customer_id,
        method.payment_method_id,
    )
    return status.endswith(" 1")


async def begin(conn: asyncpg.Connection, ws: str, reason: ReloadReason, available_micro: int) -> str | None:
    """Record a new pending reload, if auto-reload is on, out of its back-off, and none is in flight (the
    unique index: a racing insert changes nothing). The reload id, or None."""
    # A retry follows a failure; a crossing during a back-off starts nothing (the retry comes after it).
    after_failure = "AND s.failures > 0" if reason is ReloadReason.RETRY else ""
    return await conn.fetchval(
        "INSERT INTO auto_reloads (id, workspace_id, amount_micro, state, attempt, reason, available_micro) "
        "SELECT $2, s.workspace_id, s.amount_micro, 'pending', s.failures + 1, $3, $4 FROM auto_reload_settings s "
        "WHERE s.workspace_id = $1 AND s.enabled "
        f"AND (s.retry_at IS NULL OR s.retry_at <= now()) {after_failure} ON CONFLICT DO NOTHING RETURNING id",
        ws,
        new_reload_id(),
        reason.value,
        available_micro,
    )


async def due_retries(conn: asyncpg.Connection, limit: int) -> list[tuple[str, int]]:
    """(workspace, threshold) whose back-off ended with the watch still below and nothing in flight."""
    rows = await conn.fetch(
        "SELECT s.workspace_id, s.threshold_micro FROM auto_reload_settings s JOIN balance_watches w "
        "ON w.workspace_id = s.workspace_id AND w.kind = 'reload' "
        "WHERE s.enabled AND s.failures > 0 AND s.retry_at <= now() AND w.below_ms IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM auto_reloads r WHERE r.workspace_id = s.workspace_id "
        "  AND r.state IN ('pending', 'processing')) ORDER BY s.retry_at LIMIT $1",
        limit,
    )
    return [(r["workspace_id"], r["threshold_micro"]) for r in rows]


async def pending(conn: asyncpg.Connection, limit: int) -> list[tuple[Reload, SavedMethod | None]]:
    rows = await conn.fetch(
        f"SELECT {', '.join('r.' + c.strip() for c in _RELOAD.split(','))}, s.customer_id, s.payment_method_id "
        "FROM auto_reloads r JOIN auto_reload_settings s USING (workspace_id) "
        "WHERE r.state = 'pending' ORDER BY r.created_at LIMIT $1",
        limit,
    )
    found = []
    for r in rows:
        values = dict(r)
        customer, method = values.pop("customer_id"), values.pop("payment_method_id")
        found.append((Reload(**values), SavedMethod(customer, method) if method else None))
    return found


async def processing(conn: asyncpg.Connection, limit: int) -> list[tuple[str, str]]:
    """(reload id, order id) of the reloads whose payment started and has not ended yet."""
    rows = await conn.fetch(
        "SELECT id, order_id FROM auto_reloads WHERE state = 'processing' AND order_id IS NOT NULL "
        "ORDER BY started_at LIMIT $1",
        limit,
    )
    return [(r["id"], r["order_id"]) for r in rows]


async def mark_started(conn: asyncpg.Connection, reload_id: str, payment_id: str, order_id: str | None) -> bool:
    status = await conn.execute(
        "UPDATE auto_reloads SET state = 'processing', provider_payment_id = $2, order_id = $3, started_at = now() "
        "WHERE id = $1 AND state = 'pending'",
        reload_id,
        payment_id,
        order_id,
    )
    return status.endswith(" 1")


async def payment_succeeded(conn: asyncpg.Connection, reload_id: str, pending_max: int) -> Ended:
    """The payment webhook confirmed it: the reload succeeded, the failure count is cleared. Call it in
    the transaction that credits the order. A replay changes nothing."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE auto_reloads SET state = 'succeeded', finished_at = now() "
            "WHERE id = $1 AND state IN ('pending', 'processing') RETURNING workspace_id, amount_micro",
            reload_id,
        )
        if row is None:
            return await _ended_before(conn, reload_id)
        await conn.execute(
            "UPDATE auto_reload_settings SET failures = 0, retry_at = NULL WHERE workspace_id = $1", row["workspace_id"]
        )
        data = {
            "reload_id": reload_id,
            "amount_micro": row["amount_micro"],
            "amount": format_micro(row["amount_micro"]),
        }
        await events.enqueue(
            conn, row["workspace_id"], EventType.RELOAD_SUCCEEDED, f"reload:{reload_id}", data, pending_max
        )
    return Ended.RECORDED


async def payment_failed(
    conn: asyncpg.Connection,
    reload_id: str,
    reason: str,
    config: AutoReloadConfig,
    pending_max: int,
    provider: ProviderIds | None = None,
) -> Failure:
    """The reload failed (declined, refused by the webhook, stuck): count it, then back off or, at
    `failures_max` in a row, turn auto-reload off. A replay changes nothing."""
    reason = reason[:REASON_CHARS_MAX]
    async with conn.transaction():
        row = await conn.fetchrow(
            "UPDATE auto_reloads SET state = 'failed', failure_reason = $2, finished_at = now(), "
            "provider_payment_id = coalesce(provider_payment_id, $3), order_id = coalesce(order_id, $4) "
            "WHERE id = $1 AND state IN ('pending', 'processing') RETURNING workspace_id, amount_micro",
            reload_id,
            reason,
            provider.payment_id if provider else None,
            provider.order_id if provider else None,
        )
        if row is None:
            return Failure(await _ended_before(conn, reload_id))
        ws = row["workspace_id"]
        failures = await conn.fetchval(
            "UPDATE auto_reload_settings SET failures = failures + 1 WHERE workspace_id = $1 RETURNING failures", ws
        )
        disabled = failures >= config.failures_max
        settings = await conn.fetchrow(
            "UPDATE auto_reload_settings SET "
            "enabled = CASE WHEN $2 THEN false ELSE enabled END, "
            "disabled_reason = CASE WHEN $2 THEN $3 ELSE disabled_reason END, "
            "disabled_at = CASE WHEN $2 THEN now() ELSE disabled_at END, "
            "retry_at = now() + make_interval(secs => $4), updated_at = now() "
            "WHERE workspace_id = $1 RETURNING retry_at",
            ws,
            disabled,
            f"{failures} consecutive reloads failed; the last: {reason}",
            backoff_s(config, failures),
        )
        data = {
            "reload_id": reload_id,
            "amount_micro": row["amount_micro"],
            "amount": format_micro(row["amount_micro"]),
            "reason": reason,
            "consecutive_failures": failures,
            "auto_reload_disabled": disabled,
            "retry_at": None if disabled else settings["retry_at"].isoformat(),
        }
        await events.enqueue(conn, ws, EventType.RELOAD_FAILED, f"reload:{reload_id}", data, pending_max)
    return Failure(Ended.RECORDED, failures, disabled, None if disabled else settings["retry_at"])


async def _ended_before(conn: asyncpg.Connection, reload_id: str) -> Ended:
    exists = await conn.fetchval("SELECT true FROM auto_reloads WHERE id = $1", reload_id)
    return Ended.ALREADY if exists else Ended.UNKNOWN


async def stuck(conn: asyncpg.Connection, timeout_s: float, limit: int) -> list[str]:
    rows = await conn.fetch(
        "SELECT id FROM auto_reloads WHERE state IN ('pending', 'processing') "
        "AND created_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2",
        timeout_s,
        limit,
    )
    return [r["id"] for r in rows]


async def get_reload(conn: asyncpg.Connection, reload_id: str) -> Reload | None:
    row = await conn.fetchrow(f"SELECT {_RELOAD} FROM auto_reloads WHERE id = $1", reload_id)
    return Reload(**row) if row else None


async def list_reloads(conn: asyncpg.Connection, ws: str, limit: int) -> list[Reload]:
    rows = await conn.fetch(
        f"SELECT {_RELOAD} FROM auto_reloads WHERE workspace_id = $1 ORDER BY created_at DESC, id LIMIT $2",
        ws,
        min(limit, LIST_ROWS_MAX),
    )
    return [Reload(**r) for r in rows]


async def disabled_count(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM auto_reload_settings WHERE disabled_reason IS NOT NULL")
