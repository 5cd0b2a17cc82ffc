"""BYOK keys in Postgres: storage of sealed keys, resolution for a call, failure marking.

Resolution follows DESIGN.md section 9: the key of the caller's office for the call's provider if
there is one, else the workspace's, else none (the platform key). A key marked failing is skipped
until its cool-down ends. Resolutions are cached for a few seconds (ciphertext only, never the
plaintext), which bounds how long a change takes to reach every replica.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sidecar.byok.vault import Sealed
from sidecar.db import POSTGRES_ERRORS
from sidecar.notify import events as notify_events
from sidecar.notify.events import EventType

log = logging.getLogger("sidecar.byok")

CACHE_TTL_S = 5.0
USED_EVERY_S = 60.0  # `last_used_at` precision: one write per key per minute at most
CACHE_ENTRIES_MAX = 10_000

_COLUMNS = (
    "id, workspace_id, office_id, provider, kek_id, wrapped_dek, ciphertext, last4, status, failing_until, "
    "failure_reason, created_at, last_validated_at, last_used_at"
)


@dataclass(frozen=True, slots=True)
class StoredKey:
    id: str
    workspace_id: str
    office_id: str | None
    provider: str
    kek_id: str
    wrapped_dek: bytes
    ciphertext: bytes
    last4: str
    status: str
    failing_until: datetime | None
    failure_reason: str | None
    created_at: datetime
    last_validated_at: datetime | None
    last_used_at: datetime | None

    @property
    def sealed(self) -> Sealed:
        return Sealed(self.kek_id, self.wrapped_dek, self.ciphertext)

    @property
    def failing(self) -> bool:
        return self.failing_until is not None and self.failing_until.timestamp() > time.time()

    def view(self) -> dict:
        """What an admin may see: never the key, only its last 4 characters."""
        return {
            "id": self.id,
            "provider": self.provider,
            "scope": "office" if self.office_id else "workspace",
            "workspace_id": self.workspace_id,
            "office_id": self.office_id,
            "last4": self.last4,
            "status": "failing" if self.failing and self.status == "active" else self.status,
            "failure_reason": self.failure_reason if self.failing else None,
            "failing_until": _iso(self.failing_until) if self.failing else None,
            "created_at": _iso(self.created_at),
            "last_validated_at": _iso(self.last_validated_at),
            "last_used_at": _iso(self.last_used_at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


async def insert(
    conn: asyncpg.Connection, workspace_id: str, office_id: str | None, provider: str, sealed: Sealed, last4: str
) -> StoredKey:
    """Store a validated key as the active one of its scope; the previous active key is deactivated."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE byok_keys SET status = 'inactive', updated_at = now() WHERE workspace_id = $1 "
            "AND office_id IS NOT DISTINCT FROM $2 AND provider = $3 AND status = 'active'",
            workspace_id,
            office_id,
            provider,
        )
        row = await conn.fetchrow(
            f"INSERT INTO byok_keys (id, workspace_id, office_id, provider, kek_id, wrapped_dek, ciphertext, last4, "
            f"status, last_validated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'active', now()) RETURNING {_COLUMNS}",
            f"byok_{secrets.token_hex(8)}",
            workspace_id,
            office_id,
            provider,
            sealed.kek_id,
            sealed.wrapped_dek,
            sealed.ciphertext,
            last4,
        )
    return StoredKey(**row)


async def list_keys(conn: asyncpg.Connection, workspace_id: str, office_id: str | None) -> list[StoredKey]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM byok_keys WHERE workspace_id = $1 AND ($2::text IS NULL OR office_id = $2) "
        "ORDER BY created_at, id",
        workspace_id,
        office_id,
    )
    return [StoredKey(**r) for r in rows]


async def set_status(
    conn: asyncpg.Connection, workspace_id: str, office_id: str | None, key_id: str, status: str
) -> StoredKey | None:
    assert status in ("active", "inactive")
    async with conn.transaction():
        if status == "active":  # reactivating one key deactivates whichever else is active in its scope
            await conn.execute(
                "UPDATE byok_keys b SET status = 'inactive', updated_at = now() FROM byok_keys k "
                "WHERE k.id = $1 AND k.workspace_id = $2 AND k.office_id IS NOT DISTINCT FROM $3 "
                "AND b.id <> k.id AND b.workspace_id = k.workspace_id "
                "AND b.office_id IS NOT DISTINCT FROM k.office_id AND b.provider = k.provider AND b.status = 'active'",
                key_id,
                workspace_id,
                office_id,
            )
        row = await conn.fetchrow(
            f"UPDATE byok_keys SET status = $4, failing_until = NULL, failure_reason = NULL, updated_at = now() "
            f"WHERE id = $1 AND workspace_id = $2 AND office_id IS NOT DISTINCT FROM $3 RETURNING {_COLUMNS}",
            key_id,
            workspace_id,
            office_id,
            status,
        )
    return StoredKey(**row) if row else None


async def all_keys(conn: asyncpg.Connection) -> list[StoredKey]:
    return [StoredKey(**r) for r in await conn.fetch(f"SELECT {_COLUMNS} FROM byok_keys ORDER BY id")]


async def replace_sealed(conn: asyncpg.Connection, key_id: str, old: Sealed, new: Sealed) -> bool:
    """Compare-and-set, so a rotation racing another writes nothing stale."""
    status = await conn.execute(
        "UPDATE byok_keys SET kek_id = $2, wrapped_dek = $3, updated_at = now() "
        "WHERE id = $1 AND kek_id = $4 AND wrapped_dek = $5",
        key_id,
        new.kek_id,
        new.wrapped_dek,
        old.kek_id,
        old.wrapped_dek,
    )
    return status.endswith(" 1")


async def kek_ids(conn: asyncpg.Connection) -> list[str]:
    """The KEKs the stored keys are sealed under: each must be configured for them to open."""
    return [r["kek_id"] for r in await conn.fetch("SELECT DISTINCT kek_id FROM byok_keys")]


class Resolver:
    """The BYOK key for (workspace, office, provider), or None: the platform key is used."""

    def __init__(self, pool: asyncpg.Pool, pending_notifications_max: int = 1_000) -> None:
        self.pool = pool
        self.pending_notifications_max = pending_notifications_max
        self._cache: OrderedDict[tuple, tuple[float, StoredKey | None]] = OrderedDict()
        self._used_at: dict[str, float] = {}  # key id -> when `last_used_at` was last written

    async def resolve(self, workspace_id: str, office_id: str | None, provider: str) -> StoredKey | None:
        scope = (workspace_id, office_id, provider)
        now = time.monotonic()
        cached = self._cache.get(scope)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM byok_keys WHERE workspace_id = $1 AND provider = $3 AND status = 'active' "
                "AND (office_id IS NULL OR office_id = $2) "
                # The office's key first, unless it is cooling down and the workspace has one that is not.
                "ORDER BY (failing_until IS NOT NULL AND failing_until > now()), office_id IS NULL LIMIT 1",
                workspace_id,
                office_id,
                provider,
            )
        key = StoredKey(**row) if row else None
        self._cache[scope] = (now + CACHE_TTL_S, key)
        self._cache.move_to_end(scope)
        while len(self._cache) > CACHE_ENTRIES_MAX:
            self._cache.popitem(last=False)
        return key

    def forget(self, workspace_id: str | None = None) -> None:
        for scope in [s for s in self._cache if workspace_id is None or s[0] == workspace_id]:
            del self._cache[scope]

    async def mark_failing(self, key: StoredKey, reason: str, cooldown_s: float) -> None:
        """Best effort: the call falls back to the platform key whether or not this is recorded."""
        self.forget(key.workspace_id)
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                # The row lock orders concurrent failures: only the one that finds the key healthy
                # starts a failure episode, and only that one notifies the customer.
                row = await conn.fetchrow(
                    "WITH prior AS (SELECT id, failing_until FROM byok_keys WHERE id = $1 FOR UPDATE) "
                    "UPDATE byok_keys k SET failing_until = now() + make_interval(secs => $2), failure_reason = $3, "
                    "updated_at = now() FROM prior WHERE k.id = prior.id "
                    "RETURNING prior.failing_until IS NULL OR prior.failing_until <= now() AS newly, k.failing_until",
                    key.id,
                    cooldown_s,
                    reason[:200],
                )
                if row is not None and row["newly"]:
                    await self._notify_failing(conn, key, reason, row["failing_until"])
        except POSTGRES_ERRORS:
            pass
        except asyncpg.PostgresError:  # a bug, not an outage: said loudly, but bookkeeping never fails a call
            log.exception("could not record a failing BYOK key")
        self.forget(key.workspace_id)

    async def _notify_failing(self, conn: asyncpg.Connection, key: StoredKey, reason: str, until: datetime) -> None:
        data = {
            "key_id": key.id,
            "provider": key.provider,
            "office_id": key.office_id,
            "last4": key.last4,
            "reason": reason[:200],
            "failing_until": _iso(until),
        }
        dedup = f"byok_key.failing:{key.id}:{int(until.timestamp() * 1000)}"
        await notify_events.enqueue(
            conn, key.workspace_id, EventType.BYOK_KEY_FAILING, dedup, data, self.pending_notifications_max
        )

    async def mark_used(self, key: StoredKey) -> None:
        """Best effort, at most once a minute per key: bookkeeping must never fail or slow a call."""
        now = time.monotonic()
        if now - self._used_at.get(key.id, -USED_EVERY_S) < USED_EVERY_S:
            return
        if len(self._used_at) >= CACHE_ENTRIES_MAX:
            self._used_at.clear()
        self._used_at[key.id] = now
        try:
            async with self.pool.acquire() as conn:
                await conn.execute("UPDATE byok_keys SET last_used_at = now() WHERE id = $1", key.id)
        except POSTGRES_ERRORS:
            self._used_at.pop(key.id, None)
        except asyncpg.PostgresError:  # a bug, not an outage: said loudly, but bookkeeping never fails a call
            self._used_at.pop(key.id, None)
            log.exception("could not record a BYOK key's use")
