"""Keeping the Redis balance (hot path) consistent with the Postgres account (system of record).

Redis holds `balance` and `held` per workspace. When Redis has no balance (first use, or Redis
restarted empty) it is loaded from Postgres together with the account's version. Changes that
Postgres commits on its own (grants; ledger events whose Redis is gone) carry the version they
committed at, and are applied to Redis only when the loaded balance predates them. So every change
reaches the Redis balance exactly once, whatever the interleaving.

Each load also records the Redis server's run_id. A Redis that comes back with data but a new run_id
(restarted from an AOF or RDB that may be older than what was flushed since, or a replica promoted
while behind) cannot be trusted with its balances: every workspace it holds is reloaded from
Postgres (`revalidate`), with the holds Postgres already recorded dropped and `held` rebuilt from the
holds that are live. What was settled in Redis but not yet flushed reaches the new balance through
balance_sync, like the events of a Redis that restarted empty.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import asyncpg
import orjson
from redis.exceptions import RedisError

from sidecar import db, wallet
from sidecar.ledger.events import row_from_entry
from sidecar.movements import DebitResult, Kind
from sidecar.state.store import Applied, DebitOutcome, State, WalletSet, WalletSettings

log = logging.getLogger("sidecar.balances")

APPLY_ATTEMPTS = 3  # not loaded -> load (which includes the change) -> apply is then a no-op
INITIAL_ALLOWANCE_ID = "allowance:initial"  # the movement id of the one initial allowance per workspace
STREAM_SCAN_MAX = 1_000_000  # stream entries read to rebuild a key budget (the admission backlog bound)


def expiry_movement_id(expires_at: datetime) -> str:
    """One forfeiture per expiry instant: a later purchase that moves the expiry makes a new one."""
    return f"expiry:{wallet.epoch_ms(expires_at)}"


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def sync_token(pg_version: int, gen: str) -> str:
    """The token that makes an owed change apply once (apply.lua): a grant's is its grant id, a
    flushed batch's is the account version and the Redis load its events were settled under."""
    return gen if gen.startswith("grant:") else f"flush:{pg_version}:{gen}"


class Balances:
    def __init__(self, state: State, pool: asyncpg.Pool, policy: wallet.Policy | None = None) -> None:
        self.state = state
        self.pool = pool
        self.policy = policy or wallet.Policy()
        # Told of every movement that changed something (kind, amount taken or credited, short): metrics.
        self.on_movement: Callable[[str, int, int], None] = lambda kind, amount, short: None
        self._loading: dict[str, asyncio.Task[None]] = {}
        # The Redis run_ids (per primary: a cluster's shards) every known workspace was checked against.
        self._run_ids_seen: dict[str, str] | None = None

    async def ensure_loaded(self, ws: str) -> None:
        """Load the workspace's balance into Redis unless it is there. Concurrent callers in this
        process share one load; across processes the first writer wins and the rest change nothing."""
        task = self._loading.get(ws)
        if task is None:
            task = asyncio.ensure_future(self._load(ws))
            self._loading[ws] = task
            task.add_done_callback(lambda _: self._loading.pop(ws, None))
        await asyncio.shield(task)

    async def _load(self, ws: str, replacing_gen: str = "") -> bool:
        """Read the account and the live holds' state in Postgres, and load Redis from them. A reload
        keeps the account row locked until Redis has the new balance: a flush committing meanwhile
        would otherwise skip applying its events (their load still looked live) and then be missing
        from a balance read before it."""
        if not replacing_gen:
            await self._allowance_on_first_use(ws)
        run_id = await self.state.run_id(ws)
        hold_ids = await self.state.hold_ids(ws)
        async with self.pool.acquire() as conn, conn.transaction():
            balance_micro, version, waived = await db.account_state(conn, ws, lock=bool(replacing_gen))
            resolved = await db.recorded_events(conn, _event_ids(hold_ids))
            settings = self.settings_of(await db.wallet(conn, ws))
            loaded = await self.state.load(
                ws,
                balance_micro,
                version,
                run_id,
                replacing_gen,
                [h for h in hold_ids if _event_id(h) in resolved],
                waived_micro=waived,
                wallet=settings,
            )
        if loaded:
            log.info(
                "balance reloaded from postgres" if replacing_gen else "balance loaded from postgres",
                extra={"workspace_id": ws, "pg_version": version, "holds_resolved": len(resolved)},
            )
        return loaded

    async def revalidate(self, workspaces: Iterable[str]) -> int:
        """Reload from Postgres every workspace whose Redis balance was loaded under another Redis
        run_id (see the module docstring); in a Redis Cluster, the run_id of the primary that owns the
        workspace's slot now, so a failover of one shard reloads that shard's workspaces. Cheap when
        nothing changed: one INFO per primary per call. Returns the number of workspaces reloaded."""
        run_ids = await self.state.run_ids()
        if not run_ids or run_ids == self._run_ids_seen:
            return 0
        reloaded = 0
        checked_all = True
        for ws in workspaces:
            gen, loaded_under = await self.state.load_marks(ws)
            run_id = run_ids.get(self.state.server_of(ws), "")
            if not run_id:  # its shard moved since the run_ids were read: check again next time
                checked_all = False
                continue
            if gen is None or loaded_under == run_id:
                continue  # not loaded (the next use loads it), or loaded by this Redis
            log.warning(
                "redis was restarted or failed over with its data: reloading the balance from postgres",
                extra={"workspace_id": ws},
            )
            if await self._load(ws, replacing_gen=gen):
                reloaded += 1
        if checked_all:
            self._run_ids_seen = run_ids
        return reloaded

    async def apply_committed(
        self, ws: str, pg_version: int, delta_micro: int, token: str, waived_micro: int = 0
    ) -> None:
        """Bring a change Postgres committed at `pg_version` into the Redis balance, exactly once."""
        for _ in range(APPLY_ATTEMPTS):
            if await self.state.apply(ws, pg_version, delta_micro, token, waived_micro) is not Applied.NOT_LOADED:
                return
            await self.ensure_loaded(ws)
        raise RuntimeError(f"could not apply committed change {token} to workspace {ws}")

    async def credit(self, ws: str, movement_id: str, kind: str, amount_micro: int) -> db.GrantResult:
        """A credit movement (grant, topup, allowance): see sidecar/movements.py. With expiry on, a
        top-up first forfeits a balance already expired (it must not be revived by the purchase),
        and moves the expiry in its own transaction."""
        extends = await self.before_credit(ws, kind)
        async with self.pool.acquire() as conn:
            result = await db.credit(conn, ws, movement_id, kind, amount_micro, self.expiry_months(extends))
        return await self.after_credit(ws, result, extends)

    async def before_credit(self, ws: str, kind: str) -> bool:
        """What must precede a credit's transaction; True when the credit moves the expiry (a top-up
        with expiry on: an expired balance is forfeited first, so a purchase never revives it)."""
        extends = kind == Kind.TOPUP and self.policy.expiry_enabled
        if extends:
            await self.forfeit_if_expired(ws)
        return extends

    def expiry_months(self, extends: bool) -> tuple[int, int] | None:
        """db.credit's expiry_months for a credit that moves the expiry (before_credit said so)."""
        return (self.policy.expiry_extend_months, self.policy.expiry_ahead_months_max) if extends else None

    async def after_credit(self, ws: str, result: db.GrantResult, extended: bool) -> db.GrantResult:
        """The Redis side of a credit Postgres committed (db.credit, possibly inside a caller's larger
        transaction, as an order's crediting is): the balance, the moved expiry, the metric."""
        await self.apply_grant(ws, result)
        if extended:
            await self.push_wallet(ws)
        if result.created:
            self.on_movement(result.kind, result.amount_micro, 0)
        return result

    # --- wallet settings ----------------------------------------------------------------------------

    def settings_of(self, row: db.WalletRow) -> WalletSettings:
        waiver = self.policy.fee_waiver_micro if row.fee_waiver_micro is None else row.fee_waiver_micro
        expires_ms = wallet.epoch_ms(row.expires_at) if row.expires_at is not None else None
        return WalletSettings(
            version=row.version,
            postpaid=row.mode == wallet.Mode.POSTPAID,
            credit_limit_micro=row.credit_limit_micro,
            expires_at_ms=expires_ms,
            fee_waiver_micro=waiver,
        )

    async def push_wallet(self, ws: str) -> None:
        """Bring the wallet settings Postgres has into Redis (newest version wins, see wallet.lua). Not
        loaded: load (which reads them), then set again, in case a load that read older ones landed."""
        for _ in range(APPLY_ATTEMPTS):
            async with self.pool.acquire() as conn:
                settings = self.settings_of(await db.wallet(conn, ws))
            if await self.state.set_wallet(ws, settings) is not WalletSet.NOT_LOADED:
                return
            await self.ensure_loaded(ws)

    async def _allowance_on_first_use(self, ws: str) -> None:
        """The initial allowance, once per workspace, in Postgres only: the load that follows reads it."""
        if not (self.policy.allowance_on_first_use and self.policy.allowance_micro > 0):
            return
        async with self.pool.acquire() as conn:
            if await db.workspace_exists(conn, ws):
                await db.credit(conn, ws, INITIAL_ALLOWANCE_ID, Kind.ALLOWANCE, self.policy.allowance_micro)

    async def grant_initial_allowance(self, ws: str) -> db.GrantResult | None:
        """The initial allowance when a workspace is created (config wallet.allowance_on: created)."""
        if self.policy.allowance_on_first_use or self.policy.allowance_micro <= 0:
            return None
        return await self.credit(ws, INITIAL_ALLOWANCE_ID, Kind.ALLOWANCE, self.policy.allowance_micro)

    # --- expiry -------------------------------------------------------------------------------------

    async def forfeit_if_expired(self, ws: str) -> DebitResult | None:
        """Forfeit the balance of an expired workspace, once (movement `expiry:<ms>`). Only once no call
        holds credits: admission refuses calls from the expiry instant, so the holds drain within the
        hold TTL, and everything that remains then is forfeited. None: not expired, or holds still live."""
        async with self.pool.acquire() as conn:
            row = await db.wallet(conn, ws)
        if row.expires_at is None or wallet.epoch_ms(row.expires_at) > await self.state.time_ms():
            return None
        await self.ensure_loaded(ws)
        account = await self.state.account(ws)
        if account is not None and account.held_micro > 0:
            return None
        return await self.debit(ws, expiry_movement_id(row.expires_at), Kind.EXPIRY, None)

    # --- key budgets --------------------------------------------------------------------------------

    async def load_key_budget(self, ws: str, key_id: str, period: str, since_ms: int) -> None:
        """Rebuild a key's budget record from Postgres (see key_budget_load.lua): its usage rows in the
        current period, plus what the stream holds that Postgres does not, with the account row locked
        so no ledger row of the workspace commits meanwhile."""
        kind = wallet.BudgetPeriod(period)
        async with self.pool.acquire() as conn, conn.transaction():
            await db.account_state(conn, ws, lock=True)
            now_ms = await self.state.time_ms()
            start_ms = wallet.period_start_ms(kind, now_ms, since_ms)
            spent = await db.key_spent_since(conn, ws, key_id, _from_ms(start_ms))
            entries = await self.state.stream_entries(ws, STREAM_SCAN_MAX)
            mine = [e for e in entries if e.key_id == key_id and e.kind == Kind.USAGE and e.at_ms >= start_ms]
            recorded = await db.recorded_events(conn, [e.event_id for e in mine if e.event_id is not None])
            spent += sum(-e.impact_micro for e in mine if e.event_id not in recorded)
            last = entries[-1].entry_id if entries else ""
            await self.state.load_key_budget(
                ws, key_id, kind.value, wallet.period_id(kind, now_ms), spent, last, start_ms
            )

    async def debit(self, ws: str, movement_id: str, kind: str, amount_micro: int | None) -> DebitResult:
        """A debit movement (refund; expiry with amount None: everything that remains), at most what
        remains, once per movement id: see sidecar/movements.py for the three steps and why."""
        async with self.pool.acquire() as conn:
            event_id, known = await db.begin_debit(conn, ws, movement_id, kind, amount_micro)
        if known is not None:
            return known
        event = orjson.dumps({"event_id": str(event_id), "workspace_id": ws, "status": "completed"})
        for _ in range(APPLY_ATTEMPTS):
            done = await self.state.debit(ws, str(event_id), amount_micro, event, kind)
            if done.outcome is not DebitOutcome.NEED_LOAD:
                break
            await self.ensure_loaded(ws)
        else:
            raise RuntimeError(f"could not load workspace {ws} to debit movement {movement_id}")
        fields = {
            b"e": event,
            b"cost": b"0",
            b"impact": str(-done.taken_micro).encode(),
            b"after": str(done.balance_after_micro).encode(),
            b"at": str(done.at_ms).encode(),
            b"gen": done.gen.encode(),
            b"status": b"completed",
            b"kind": kind.encode(),
            b"short": str(done.short_micro).encode(),
        }
        try:
            async with self.pool.acquire() as conn:
                await db.record_debit(conn, movement_id, row_from_entry(fields), done.gen)
        except db.POSTGRES_OUTAGE as exc:  # the stream entry reaches the ledger through the flusher
            log.warning(
                "debit taken in redis; postgres is unavailable, so the flusher will record it",
                extra={"workspace_id": ws, "error": type(exc).__name__},
            )
        created = done.outcome is DebitOutcome.DEBITED
        if created:
            self.on_movement(kind, done.taken_micro, done.short_micro)
        log.info(
            "debit movement",
            extra={
                "workspace_id": ws,
                "movement_kind": kind,
                "amount_micro": done.taken_micro,
                "short_micro": done.short_micro,
            },
        )
        return DebitResult(
            movement_id, str(event_id), Kind(kind), amount_micro, done.taken_micro, done.short_micro, created
        )

    async def grant(self, ws: str, grant_id: str, kind: str, amount_micro: int) -> db.GrantResult:
        """Record the grant in Postgres, then apply it to Redis (no expiry move, no metric: see credit)."""
        async with self.pool.acquire() as conn:
            result = await db.credit(conn, ws, grant_id, kind, amount_micro)
        return await self.apply_grant(ws, result)

    async def apply_grant(self, ws: str, result: db.GrantResult) -> db.GrantResult:
        """The Redis side of a grant Postgres committed. The grant's transaction also recorded it as
        owed to Redis (balance_sync): if Redis fails here, the data plane's flusher applies it later,
        so the grant is answered as done once Postgres has it."""
        gen = db.grant_sync_gen(result.grant_id)
        try:
            # Also on a replayed grant: the first attempt may have died between Postgres and Redis.
            await self.apply_committed(ws, result.pg_version, result.amount_micro, sync_token(result.pg_version, gen))
        except RedisError as exc:
            log.warning(
                "grant committed; redis is unavailable, so the data plane will apply it to the live balance",
                extra={"workspace_id": ws, "error": type(exc).__name__},
            )
            return result
        try:
            async with self.pool.acquire() as conn:
                await db.forget_sync(conn, ws, result.pg_version, gen)
        except db.POSTGRES_OUTAGE:  # the flusher deletes it after applying it again (a no-op)
            pass
        return result


def _event_id(hold_id: str) -> uuid.UUID | None:
    """A call's hold id is its request id, and its ledger event id is the same 128 bits."""
    try:
        return uuid.UUID(hold_id)
    except ValueError:
        return None


def _event_ids(hold_ids: list[str]) -> list[uuid.UUID]:
    return [e for e in map(_event_id, hold_ids) if e is not None]
