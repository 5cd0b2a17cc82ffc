"""The hold sweeper: voids holds whose deadline passed and records those calls as `expired`.

A live call pushes its hold's deadline forward (State.extend_hold) per attempt, so a hold past its
deadline belongs to a sidecar that died mid-call, or to a call whose settlement waits in a spool for
Redis to come back: `holds.sweep_grace_ms` past the deadline leaves that settlement the time to land.
The deadline is checked again by Redis time inside expire.lua, so a hold extended after it was listed
here is left alone.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from redis.exceptions import RedisError

from sidecar import db
from sidecar.config import HoldConfig
from sidecar.observability.metrics import Metrics
from sidecar.state.store import ExpireOutcome, ExpireStatus, State

log = logging.getLogger("sidecar.sweeper")


async def sweep_workspace(state: State, ws: str, holds_max: int, grace_ms: int = 0) -> int:
    voided = 0
    for hold_id in await state.due_holds(ws, holds_max, grace_ms):
        if await state.expire(ws, hold_id, ExpireStatus.EXPIRED, grace_ms) is ExpireOutcome.VOIDED:
            voided += 1
    return voided


async def sweep_all(state: State, pool: asyncpg.Pool, config: HoldConfig) -> int:
    async with pool.acquire() as conn:
        workspaces = await db.workspace_ids(conn)
    voided = 0
    for ws in workspaces:
        voided += await sweep_workspace(state, ws, config.sweep_batch_holds_max, config.sweep_grace_ms)
    return voided


async def run(state: State, pool: asyncpg.Pool, config: HoldConfig, metrics: Metrics, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    grace_s = config.sweep_grace_ms / 1000
    # Since when Redis has answered every round. After an outage (and at start) nothing is voided until
    # Redis has been back for the grace: the spools of every replica (one pass a second) replay first,
    # so a call whose settlement waited out the outage is billed, not expired at 0.
    available_since: float | None = None
    while not stop.is_set():
        try:
            await state.ping()
            if available_since is None:
                available_since = loop.time()
            if loop.time() - available_since >= grace_s:
                voided = await sweep_all(state, pool, config)
                if voided:
                    metrics.holds_expired.inc(voided)
                    log.warning("voided expired holds", extra={"holds": voided})
        except (RedisError, OSError) as exc:
            available_since = None
            log.warning("hold sweep failed; will retry", extra={"error": type(exc).__name__})
        except (asyncpg.PostgresError, ValueError) as exc:
            log.warning("hold sweep failed; will retry", extra={"error": type(exc).__name__})
        try:
            await asyncio.wait_for(stop.wait(), config.sweep_interval_ms / 1000)
        except TimeoutError:
            pass
