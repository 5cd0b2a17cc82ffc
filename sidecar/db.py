"""Postgres: a thin typed layer over asyncpg for everything but the ledger flusher's batches."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sidecar.errors import DomainError
from sidecar.ledger.events import COLUMNS
from sidecar.money import AMOUNT_MICRO_MAX, format_micro
from sidecar.movements import CREDIT_KINDS, DEBIT_KINDS, DebitResult, Kind
from sidecar.wallet import epoch_ms, extended_expiry

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
    budget_micro: int | None = None  # the key's budget per budget_period (None: no budget)
    budget_period: str | None = None  # 'total' | 'monthly' | 'daily'
    budget_since: datetime | None = None  # when the budget was set: a 'total' budget counts from here


@dataclass(frozen=True, slots=True)
class GrantResult:
    grant_id: str
    event_id: uuid.UUID
    amount_micro: int
    kind: str
    created: bool  # False: this grant id was recorded before, nothing changed in Postgres
    pg_version: int  # the account version the grant committed at


class GrantConflict(DomainError):
    """The same grant (movement) id was used before with a different amount or kind."""


class ExpiryPending(DomainError):
    """A top-up of a workspace whose credits expired, while that balance is not forfeited yet (calls
    admitted before the expiry still hold part of it): crediting now would move the expiry past the
    forfeiture and revive the expired credits. Nothing is recorded; the credit is retried once the
    holds have settled and the expiry loop (or the next attempt) has forfeited the balance."""

    def __init__(self, workspace_id: str, expired_at: datetime) -> None:
        super().__init__(
            f"the credits of {workspace_id} expired at {expired_at.isoformat()} and are not forfeited yet "
            "(calls still hold part of them): the top-up is credited once they settle, retry shortly"
        )


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
    "id, workspace_id, office_id, name, key_hash, last4, rate_limit_rpm, created_at, revoked_at, tokens_per_minute, "
    "budget_micro, budget_period, budget_since"
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


async def set_key_budget(
    conn: asyncpg.Connection, workspace_id: str, key_id: str, budget_micro: int | None, period: str | None
) -> ApiKeyRecord | None:
    """Set (or, with None, remove) a key's budget; a 'total' budget counts from now."""
    row = await conn.fetchrow(
        f"UPDATE api_keys SET budget_micro = $3, budget_period = $4, budget_since = CASE WHEN $3::bigint IS NULL "
        f"THEN NULL ELSE now() END WHERE id = $1 AND workspace_id = $2 RETURNING {_KEY_COLUMNS}",
        key_id,
        workspace_id,
        budget_micro,
        period,
    )
    return ApiKeyRecord(**row) if row else None


async def key_spent_since(conn: asyncpg.Connection, workspace_id: str, key_id: str, since: datetime) -> int:
    """What a key's calls debited since `since`: its usage rows' impacts (cost and fee)."""
    return await conn.fetchval(
        "SELECT coalesce(-sum(balance_impact_micro), 0)::bigint FROM ledger "
        "WHERE workspace_id = $1 AND key_id = $2 AND kind = 'usage' AND created_at >= $3",
        workspace_id,
        key_id,
        since,
    )


@dataclass(frozen=True, slots=True)
class WalletRow:
    mode: str = "prepaid"
    credit_limit_micro: int = 0
    fee_waiver_micro: int | None = None  # None: the deployment's default
    expires_at: datetime | None = None
    version: int = 0


_WALLET_COLUMNS = "mode, credit_limit_micro, fee_waiver_micro, expires_at, version"


async def wallet(conn: asyncpg.Connection, workspace_id: str, lock: bool = False) -> WalletRow:
    row = await conn.fetchrow(
        f"SELECT {_WALLET_COLUMNS} FROM wallets WHERE workspace_id = $1" + (" FOR UPDATE" if lock else ""),
        workspace_id,
    )
    return WalletRow(**row) if row else WalletRow()


_UNSET = object()


async def update_wallet(
    conn: asyncpg.Connection,
    workspace_id: str,
    mode: object = _UNSET,
    credit_limit_micro: object = _UNSET,
    fee_waiver_micro: object = _UNSET,
    expires_at: object = _UNSET,
) -> WalletRow:
    """Change the given settings (the others stay), one version further."""
    async with conn.transaction():
        current = await wallet(conn, workspace_id, lock=True)
        merged = WalletRow(
            mode=current.mode if mode is _UNSET else mode,
            credit_limit_micro=current.credit_limit_micro if credit_limit_micro is _UNSET else credit_limit_micro,
            fee_waiver_micro=current.fee_waiver_micro if fee_waiver_micro is _UNSET else fee_waiver_micro,
            expires_at=current.expires_at if expires_at is _UNSET else expires_at,
        )
        row = await conn.fetchrow(
            "INSERT INTO wallets AS w (workspace_id, mode, credit_limit_micro, fee_waiver_micro, expires_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (workspace_id) DO UPDATE SET mode = $2, "
            "credit_limit_micro = $3, fee_waiver_micro = $4, expires_at = $5, version = w.version + 1, "
            f"updated_at = now() RETURNING {_WALLET_COLUMNS}",
            workspace_id,
            merged.mode,
            merged.credit_limit_micro,
            merged.fee_waiver_micro,
            merged.expires_at,
        )
    return WalletRow(**row)


async def expired_wallets(conn: asyncpg.Connection, rows_max: int) -> list[tuple[str, datetime]]:
    """Workspaces past their expiry whose forfeiture is not recorded yet (movement 'expiry:<ms>')."""
    rows = await conn.fetch(
        "SELECT w.workspace_id, w.expires_at FROM wallets w WHERE w.expires_at <= now() AND NOT EXISTS ("
        "  SELECT 1 FROM grants g WHERE g.workspace_id = w.workspace_id AND g.kind = 'expiry' "
        "  AND g.taken_micro IS NOT NULL "
        "  AND g.grant_id = 'expiry:' || floor(extract(epoch FROM w.expires_at) * 1000)::bigint) "
        "ORDER BY w.expires_at LIMIT $1",
        rows_max,
    )
    return [(r["workspace_id"], r["expires_at"]) for r in rows]


async def fee_waived(conn: asyncpg.Connection, workspace_id: str) -> int:
    return await conn.fetchval(
        "SELECT coalesce((SELECT fee_waived_micro FROM accounts WHERE workspace_id = $1), 0)", workspace_id
    )


async def account_state(conn: asyncpg.Connection, workspace_id: str, lock: bool = False) -> tuple[int, int, int]:
    """(balance_micro, version, fee_waived_micro) at one version (see account_snapshot)."""
    query = "SELECT balance_micro, version, fee_waived_micro FROM accounts WHERE workspace_id = $1"
    row = await conn.fetchrow(query + (" FOR UPDATE" if lock else ""), workspace_id)
    return (row["balance_micro"], row["version"], row["fee_waived_micro"]) if row else (0, 0, 0)


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


async def credit(
    conn: asyncpg.Connection,
    workspace_id: str,
    grant_id: str,
    kind: str,
    amount_micro: int,
    expiry_months: tuple[int, int] | None = None,
) -> GrantResult:
    """Record a credit (grant, topup, allowance) in the ledger and the account, once per movement id,
    in one transaction (sidecar/movements.py). expiry_months (extend, ahead at most): the credit also
    moves the workspace's expiry (wallet.extended_expiry), in the same transaction, so exactly once."""
    if kind not in CREDIT_KINDS:
        raise ValueError(f"credit kind must be one of {', '.join(sorted(CREDIT_KINDS))}, not {kind!r}")
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
        if expiry_months is not None:
            now = await conn.fetchval("SELECT now()")
            current = await wallet(conn, workspace_id, lock=True)
            await _refuse_reviving(conn, workspace_id, now, current.expires_at)
            await update_wallet(conn, workspace_id, expires_at=extended_expiry(now, current.expires_at, *expiry_months))
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


grant = credit  # the name every caller used before movements


async def _refuse_reviving(
    conn: asyncpg.Connection, workspace_id: str, now: datetime, expires_at: datetime | None
) -> None:
    """A credit that moves the expiry must not move it past an expiry whose forfeiture is not recorded:
    the balance that expired would survive into the new period (ExpiryPending, the transaction rolls
    back). Decided under the wallet's row lock, so a purchase racing the expiry instant is caught too."""
    if expires_at is None or expires_at > now:
        return
    forfeited = await conn.fetchval(
        "SELECT taken_micro IS NOT NULL FROM grants WHERE workspace_id = $1 AND grant_id = $2",
        workspace_id,
        f"expiry:{epoch_ms(expires_at)}",
    )
    if not forfeited:
        raise ExpiryPending(workspace_id, expires_at)


async def begin_debit(
    conn: asyncpg.Connection, workspace_id: str, movement_id: str, kind: str, amount_micro: int | None
) -> tuple[uuid.UUID, DebitResult | None]:
    """Step 1 of a debit (sidecar/movements.py): the movement's row, written once per movement id.
    Returns its ledger event id, and its result when it is known already (in its row, or in the
    ledger: the debit was flushed there after the caller lost its answer)."""
    if kind not in DEBIT_KINDS:
        raise ValueError(f"debit kind must be one of {', '.join(sorted(DEBIT_KINDS))}, not {kind!r}")
    if amount_micro is not None and not 0 < amount_micro <= AMOUNT_MICRO_MAX:
        raise ValueError(f"a debit must be positive and at most {AMOUNT_MICRO_MAX} micro-credits")
    await conn.execute(
        "INSERT INTO grants (workspace_id, grant_id, kind, amount_micro, event_id) VALUES ($1, $2, $3, $4, $5) "
        "ON CONFLICT DO NOTHING",
        workspace_id,
        movement_id,
        kind,
        amount_micro,
        uuid.uuid4(),
    )
    row = await conn.fetchrow(
        "SELECT kind, amount_micro, event_id, taken_micro, short_micro FROM grants "
        "WHERE workspace_id = $1 AND grant_id = $2",
        workspace_id,
        movement_id,
    )
    if row["kind"] != kind or row["amount_micro"] != amount_micro:
        raise GrantConflict(movement_id)
    event_id = row["event_id"]
    taken, short = row["taken_micro"], row["short_micro"]
    if taken is None:
        flushed = await conn.fetchrow(
            "SELECT -balance_impact_micro AS taken, short_micro AS short FROM ledger "
            "WHERE workspace_id = $1 AND event_id = $2 AND kind = $3",
            workspace_id,
            event_id,
            kind,
        )
        if flushed is None:
            return event_id, None
        taken, short = flushed["taken"], flushed["short"]
        await _debit_result(conn, workspace_id, movement_id, taken, short)
    return event_id, DebitResult(movement_id, str(event_id), Kind(kind), amount_micro, taken, short, created=False)


async def _debit_result(conn: asyncpg.Connection, workspace_id: str, movement_id: str, taken: int, short: int) -> None:
    await conn.execute(
        "UPDATE grants SET taken_micro = $3, short_micro = $4 WHERE workspace_id = $1 AND grant_id = $2",
        workspace_id,
        movement_id,
        taken,
        short,
    )


async def record_debit(conn: asyncpg.Connection, movement_id: str, row: tuple, gen: str) -> None:
    """Step 3 of a debit: its ledger row (once per event id, whoever writes it first: this or the
    flusher), the account, what the Redis load `gen` is owed if it is no longer the live one (as a
    flushed batch records it), and the movement's result, in one transaction."""
    values = dict(zip(COLUMNS, row, strict=True))
    workspace_id, impact = values["workspace_id"], values["balance_impact_micro"]
    async with conn.transaction():
        placeholders = ", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))
        inserted = await conn.fetchval(
            f"INSERT INTO ledger ({', '.join(COLUMNS)}) VALUES ({placeholders}) RETURNING event_id", *row
        )
        if inserted is not None and impact:
            version = await conn.fetchval(
                "UPDATE accounts SET balance_micro = balance_micro + $2, version = version + 1, updated_at = now() "
                "WHERE workspace_id = $1 RETURNING version",
                workspace_id,
                impact,
            )
            await conn.execute(
                "INSERT INTO balance_sync (workspace_id, pg_version, gen, delta_micro) VALUES ($1, $2, $3, $4)",
                workspace_id,
                version,
                gen,
                impact,
            )
        await _debit_result(conn, workspace_id, movement_id, -impact, values["short_micro"])


async def ledger_identity(conn: asyncpg.Connection, workspace_id: str) -> dict[str, int]:
    """The money identity from the ledger alone (sidecar/movements.py), each term from its own rows:
    grants + topups + allowances - refunds - expiries - usage - fees == balance. `usage` is the cost
    charged to billed calls (BYOK calls are recorded, never charged), `fees` their usage fees;
    `expected` is the left-hand side, `account_balance` what the accounts table says."""
    row = await conn.fetchrow(
        "SELECT coalesce(sum(balance_impact_micro) FILTER (WHERE kind = 'grant'), 0)::bigint AS grants, "
        "coalesce(sum(balance_impact_micro) FILTER (WHERE kind = 'topup'), 0)::bigint AS topups, "
        "coalesce(sum(balance_impact_micro) FILTER (WHERE kind = 'allowance'), 0)::bigint AS allowances, "
        "coalesce(-sum(balance_impact_micro) FILTER (WHERE kind = 'refund'), 0)::bigint AS refunds, "
        "coalesce(-sum(balance_impact_micro) FILTER (WHERE kind = 'expiry'), 0)::bigint AS expiries, "
        "coalesce(sum(cost_micro) FILTER (WHERE kind = 'usage' AND NOT byok), 0)::bigint AS usage, "
        "coalesce(sum(fee_micro) FILTER (WHERE kind = 'usage'), 0)::bigint AS fees, "
        "coalesce(-sum(balance_impact_micro) FILTER (WHERE kind = 'usage'), 0)::bigint AS debits, "
        "coalesce(sum(short_micro), 0)::bigint AS short, "
        "count(*) FILTER (WHERE kind = 'usage') AS usage_rows "
        "FROM ledger WHERE workspace_id = $1",
        workspace_id,
    )
    balance, _ = await account_snapshot(conn, workspace_id)
    identity = dict(row)
    identity["expected"] = (
        identity["grants"]
        + identity["topups"]
        + identity["allowances"]
        - identity["refunds"]
        - identity["expiries"]
        - identity["usage"]
        - identity["fees"]
    )
    return {**identity, "account_balance": balance}
