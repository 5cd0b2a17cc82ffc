"""Keeping the Redis balance (hot path) consistent with the Postgres account (system of record).

Redis holds `balance` and `held` per workspace. When Redis has no balance (first use, or Redis
restarted empty) it is loaded from Postgres together with the account's version. Changes that
Postgres commits on its own (grants; ledger events whose Redis is gone) carry the version they
committed at, and are applied to Redis only when the loaded balance predates them. So every change
reaches the Redis balance exactly once, whatever the interleaving.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from sidecar import db
from sidecar.state.store import State

log = logging.getLogger("sidecar.balances")


class Balances:
    def __init__(self, state: State, pool: asyncpg.Pool) -> None:
        self.state = state
        self.pool = pool
        self._loading: dict[str, asyncio.Task[None]] = {}

    async def ensure_loaded(self, ws: str) -> None:
        """Load the workspace's balance into Redis unless it is there. Concurrent callers in this
        process share one load; across processes the first writer wins and the rest change nothing."""
        task = self._loading.get(ws)
        if task is None:
            task = asyncio.ensure_future(self._load(ws))
            self._loading[ws] = task
            task.add_done_callback(lambda _: self._loading.pop(ws, None))
        await asyncio.shield(task)

    async def _load(self, ws: str) -> None:
        async with self.pool.acquire() as conn:
            balance_micro, version = await db.account_snapshot(conn, ws)
        if await self.state.load(ws, balance_micro, version):
            log.info("balance loaded from postgres", extra={"workspace_id": ws, "pg_version": version})

    async def apply_committed(self, ws: str, pg_version: int, delta_micro: int, token: str) -> None:
        """Bring a change Postgres committed at `pg_version` into the Redis balance, exactly once."""
        for _ in range(3):  # not loaded -> load (which includes the change) -> apply is then a no-op
            if await self.state.apply(ws, pg_version, delta_micro, token) >= 0:
                return
            await self.ensure_loaded(ws)
        raise RuntimeError(f"could not apply committed change {token} to workspace {ws}")

    async def grant(self, ws: str, grant_id: str, kind: str, amount_micro: int) -> db.GrantResult:
        async with self.pool.acquire() as conn:
            result = await db.grant(conn, ws, grant_id, kind, amount_micro)
        # Also on a replayed grant: the first attempt may have died between Postgres and Redis.
        await self.apply_committed(ws, result.pg_version, amount_micro, f"grant:{grant_id}")
        return result
