"""Postgres: a thin typed layer over asyncpg for everything but the ledger flusher's batches."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sidecar.errors import DomainError
from sidecar.money import AMOUNT_MICRO_MAX, format_micro

# A Postgres that is down, starting, stopping, failing over, overloaded or cut off mid-query: an
# outage, answered "unavailable, retry shortly". Every other PostgresError (a syntax error, an
# undefined column, a data exception, a constraint the code did not foresee) is a bug in the sidecar
# or its schema: retrying cannot help, so it is logged at error and answered 500 internal.
POSTGRES_OUTAGE = (
    OSError,
    TimeoutError,  # pool acquire or command_timeout
    asyncpg.InterfaceError,  # the connection closed under a query
    asyncpg.InternalClientError,  # the protocol state broke with the connection (seen as Postgres restarts)
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up, query cancelled
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full, out of memory
    asyncpg.TransactionRollbackError,  # class 40: serialization failure, deadlock; a retry succeeds
    asyncpg.ReadOnlySQLTransactionError,  # a standby answered: failover in progress
)
# Kept for the call sites written before the split; it means the outage errors only.
POSTGRES_ERRORS = POSTGRES_OUTAGE


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, POSTGRES_OUTAGE)


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    workspace_id: str
    office_id: str | None
    name: str
    key_hash: bytes
    last4: str
    rate_limit_rpm: int
    created_at: datetime
    revoked_at: datetime | None
    tokens_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class GrantResult:
    grant_id: str
    event_id: uuid.UUID
    amount_micro: int
    kind: str
    created: bool  # False: this grant id was recorded before, nothing changed in Postgres
    pg_version: int  # the account version the grant committed at


class GrantConflict(DomainError):
    """The same grant id was used before with a different amount or kind."""


class BalanceLimitExceeded(DomainError):
    """The grant would push the balance past AMOUNT_MICRO_MAX (nothing is recorded)."""

    def __init__(self, workspace_id: str, balance_micro: int, amount_micro: int) -> None:
        super().__init__(
            f"a grant of {format_micro(amount_micro)} credits would bring the balance of {workspace_id} "
            f"({format_micro(balance_micro)}) past the limit of {format_micro(AMOUNT_MICRO_MAX)} credits"
        )


async def create_pool(database_url: str, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(database_url, min_size=1, max_size=max_size, command_timeout=30)


async def create_workspace(conn: asyncpg.Connection, workspace_id: str, name: str) -> bool:
    status = await conn.execute(
        "INSERT INTO workspaces (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING", workspace_id, name
    )
    await conn.execute("INSERT INTO accounts (workspace_id) VALUES ($1) ON CONFLICT DO NOTHING", workspace_id)
    return status.endswith(" 1")


async def workspace_exists(conn: asyncpg.Connection, workspace_id: str) -> bool:
    return await conn.fetchval("SELECT true FROM workspaces WHERE id = $1", workspace_id) is not None


@dataclass(frozen=True, slots=True)
class WorkspaceRecord:
    id: str
    name: str
    created_at: datetime


WORKSPACES_LISTED_MAX = 10_000  # a list past this is cut (the admin API says so): no unbounded answer


async def list_workspaces(conn: asyncpg.Connection, limit: int = WORKSPACES_LISTED_MAX) -> list[WorkspaceRecord]:
    rows = await conn.fetch("SELECT id, name, created_at FROM workspaces ORDER BY id LIMIT $1", limit)
    return [WorkspaceRecord(**r) for r in rows]


async def get_workspace(conn: asyncpg.Connection, workspace_id: str) -> WorkspaceRecord | None:
    row = await conn.fetchrow("SELECT id, name, created_at FROM workspaces WHERE id = $1", workspace_id)
    return WorkspaceRecord(**row) if row else None


async def workspace_ids(conn: asyncpg.Connection) -> list[str]:
    return [r["id"] for r in await conn.fetch("SELECT id FROM workspaces ORDER BY id")]


async def create_office(conn: asyncpg.Connection, office_id: str, workspace_id: str, name: str) -> bool:
    status = await conn.execute(
        "INSERT INTO offices (id, workspace_id, name) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        office_id,
        workspace_id,
        name,
    )
    return status.endswith(" 1")


async def office_workspace(conn: asyncpg.Connection, office_id: str) -> str | None:
    return await conn.fetchval("SELECT workspace_id FROM offices WHERE id = $1", office_id)


_KEY_COLUMNS = (
    "id, workspace_id, office_id, name, key_hash, last4, rate_limit_rpm, created_at, revoked_at, tokens_per_minute"
)


async def insert_api_key(conn: asyncpg.Connection, record: ApiKeyRecord) -> None:
    await conn.execute(
        "INSERT INTO api_keys (id, workspace_id, office_id, name, key_hash, last4, rate_limit_rpm, tokens_per_minute) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        record.id,
        record.workspace_id,
        record.office_id,
        record.name,
        record.key_hash,
        record.last4,
        record.rate_limit_rpm,
        record.tokens_per_minute,
    )


async def api_key_by_hash(conn: asyncpg.Connection, key_hash: bytes) -> ApiKeyRecord | None:
    row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1", key_hash)
    return ApiKeyRecord(**row) if row else None


async def list_api_keys(conn: asyncpg.Connection, workspace_id: str) -> list[ApiKeyRecord]:
    rows = await conn.fetch(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE workspace_id = $1 ORDER BY created_at, id", workspace_id
    )
    return [ApiKeyRecord(**r) for r in rows]


async def revoke_api_key(conn: asyncpg.Connection, workspace_id: str, key_id: str) -> ApiKeyRecord | None:
    row = await conn.fetchrow(
        f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 AND workspace_id = $2 "
        f"RETURNING {_KEY_COLUMNS}",
        key_id,
        workspace_id,
    )
    return ApiKeyRecord(**row) if row else None


async def account_snapshot(conn: asyncpg.Connection, workspace_id: str, lock: bool = False) -> tuple[int, int]:
    """(balance_micro, version) as Postgres knows it: the ledger's sum, at a version. lock=True keeps
    the row locked until the caller's transaction ends (no flush or grant commits meanwhile)."""
    query = "SELECT balance_micro, version FROM accounts WHERE workspace_id = $1" + (" FOR UPDATE" if lock else "")
    row = await conn.fetchrow(query, workspace_id)
    return (row["balance_micro"], row["version"]) if row else (0, 0)


async def recorded_events(conn: asyncpg.Connection, event_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these events the ledger already has."""
    if not event_ids:
        return set()
    rows = await conn.fetch("SELECT event_id FROM ledger_event_ids WHERE event_id = ANY($1::uuid[])", event_ids)
    return {r["event_id"] for r in rows}


def grant_sync_gen(grant_id: str) -> str:
    """The balance_sync `gen` of a grant's Redis side (a flush's is the Redis load id)."""
    return f"grant:{grant_id}"


async def forget_sync(conn: asyncpg.Connection, workspace_id: str, pg_version: int, gen: str) -> None:
    await conn.execute(
        "DELETE FROM balance_sync WHERE workspace_id = $1 AND pg_version = $2 AND gen = $3",
        workspace_id,
        pg_version,
        gen,
    )


async def grant(
    conn: asyncpg.Connection, workspace_id: str, grant_id: str, kind: str, amount_micro: int
) -> GrantResult:
    """Record a grant in the ledger and the account, once per grant id, in one transaction."""
    if kind not in ("grant", "topup"):
        raise ValueError(f"grant kind must be 'grant' or 'topup', not {kind!r}")
    if not 0 < amount_micro <= AMOUNT_MICRO_MAX:
        raise ValueError(f"grant amount must be positive and at most {AMOUNT_MICRO_MAX} micro-credits")
    async with conn.transaction():
        event_id = uuid.uuid4()
        inserted = await conn.fetchval(
            "INSERT INTO grants (workspace_id, grant_id, kind, amount_micro, event_id) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT DO NOTHING RETURNING created_at",
            workspace_id,
            grant_id,
            kind,
            amount_micro,
            event_id,
        )
        if inserted is None:
            prior = await conn.fetchrow(
                "SELECT kind, amount_micro, event_id, pg_version FROM grants WHERE workspace_id = $1 AND grant_id = $2",
                workspace_id,
                grant_id,
            )
            if prior["amount_micro"] != amount_micro or prior["kind"] != kind:
                raise GrantConflict(grant_id)
            return GrantResult(grant_id, prior["event_id"], amount_micro, kind, False, prior["pg_version"])
        account = await conn.fetchrow(
            "INSERT INTO accounts AS a (workspace_id, balance_micro, version) VALUES ($1, $2, 1) "
            "ON CONFLICT (workspace_id) DO UPDATE SET balance_micro = a.balance_micro + EXCLUDED.balance_micro, "
            "version = a.version + 1, updated_at = now() RETURNING balance_micro, version",
            workspace_id,
            amount_micro,
        )
        await conn.execute(
            "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, cost_micro, "
            "balance_impact_micro, balance_after_micro) VALUES ($1, $2, $3, 'completed', $4, 0, $5, $6)",
            event_id,
            inserted,
            kind,
            workspace_id,
            amount_micro,
            account["balance_micro"],
        )
        if account["balance_micro"] > AMOUNT_MICRO_MAX:  # raising rolls the whole grant back
            raise BalanceLimitExceeded(workspace_id, account["balance_micro"] - amount_micro, amount_micro)
        await conn.execute(
            "UPDATE grants SET pg_version = $3 WHERE workspace_id = $1 AND grant_id = $2",
            workspace_id,
            grant_id,
            account["version"],
        )
        # Owed to Redis until applied there: if this process cannot reach Redis after the commit, the
        # data plane's flusher applies it (sidecar/balances.py, Flusher._sync_balances).
        await conn.execute(
            "INSERT INTO balance_sync (workspace_id, pg_version, gen, delta_micro) VALUES ($1, $2, $3, $4)",
            workspace_id,
            account["version"],
            grant_sync_gen(grant_id),
            amount_micro,
        )
        return GrantResult(grant_id, event_id, amount_micro, kind, created=True, pg_version=account["version"])


async def ledger_identity(conn: asyncpg.Connection, workspace_id: str) -> dict[str, int]:
    """The money identity from the ledger alone: grants + top-ups - debits, and the account's balance."""
    row = await conn.fetchrow(
        "SELECT coalesce(sum(balance_impact_micro) FILTER (WHERE kind = 'grant'), 0)::bigint AS grants, "
        "coalesce(sum(balance_impact_micro) FILTER (WHERE kind = 'topup'), 0)::bigint AS topups, "
        "coalesce(-sum(balance_impact_micro) FILTER (WHERE kind = 'usage'), 0)::bigint AS debits, "
        "count(*) FILTER (WHERE kind = 'usage') AS usage_rows "
        "FROM ledger WHERE workspace_id = $1",
        workspace_id,
    )
    balance, _ = await account_snapshot(conn, workspace_id)
    return {**dict(row), "account_balance": balance}
