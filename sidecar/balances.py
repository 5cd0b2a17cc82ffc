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
from collections.abc import Iterable

import asyncpg
from redis.exceptions import RedisError

from sidecar import db
from sidecar.state.store import Applied, State

log = logging.getLogger("sidecar.balances")

APPLY_ATTEMPTS = 3  # not loaded -> load (which includes the change) -> apply is then a no-op


def sync_token(pg_version: int, gen: str) -> str:
    """The token that makes an owed change apply once (apply.lua): a grant's is its grant id, a
    flushed batch's is the account version and the Redis load its events were settled under."""
    return gen if gen.startswith("grant:") else f"flush:{pg_version}:{gen}"


class Balances:
    def __init__(self, state: State, pool: asyncpg.Pool) -> None:
        self.state = state
        self.pool = pool
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
        run_id = await self.state.run_id(ws)
        hold_ids = await self.state.hold_ids(ws)
        async with self.pool.acquire() as conn, conn.transaction():
            balance_micro, version = await db.account_snapshot(conn, ws, lock=bool(replacing_gen))
            resolved = await db.recorded_events(conn, _event_ids(hold_ids))
            loaded = await self.state.load(
                ws, balance_micro, version, run_id, replacing_gen, [h for h in hold_ids if _event_id(h) in resolved]
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

    async def apply_committed(self, ws: str, pg_version: int, delta_micro: int, token: str) -> None:
        """Bring a change Postgres committed at `pg_version` into the Redis balance, exactly once."""
        for _ in range(APPLY_ATTEMPTS):
            if await self.state.apply(ws, pg_version, delta_micro, token) is not Applied.NOT_LOADED:
                return
            await self.ensure_loaded(ws)
        raise RuntimeError(f"could not apply committed change {token} to workspace {ws}")

    async def grant(self, ws: str, grant_id: str, kind: str, amount_micro: int) -> db.GrantResult:
        """Record the grant in Postgres, then apply it to Redis. The grant's transaction also records
        it as owed to Redis (balance_sync): if Redis fails here, the data plane's flusher applies it
        later, so the grant is answered as done once Postgres has it."""
        async with self.pool.acquire() as conn:
            result = await db.grant(conn, ws, grant_id, kind, amount_micro)
        gen = db.grant_sync_gen(grant_id)
        try:
            # Also on a replayed grant: the first attempt may have died between Postgres and Redis.
            await self.apply_committed(ws, result.pg_version, amount_micro, sync_token(result.pg_version, gen))
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
