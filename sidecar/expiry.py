"""Expiry (config wallet.expiry_enabled): forfeit the balance of every workspace past its expiry,
exactly once each, by one `expiry` ledger row (Balances.forfeit_if_expired, movement `expiry:<ms>`).

Admission itself refuses every call that needs credits from the expiry instant (admit.lua reads the
expiry from the account), so this loop only has to record the forfeiture, and may run late: it waits
until no call holds credits, then takes everything that remains. Run by each data plane; the
movement id makes concurrent runs forfeit once.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from redis.exceptions import RedisError

from sidecar import db
from sidecar.balances import Balances
from sidecar.config import WalletConfig
from sidecar.observability.metrics import Metrics

log = logging.getLogger("sidecar.expiry")


async def forfeit_due(balances: Balances, rows_max: int, served: frozenset[str] = frozenset()) -> int:
    """One pass: the forfeitures recorded now."""
    async with balances.pool.acquire() as conn:
        due = await db.expired_wallets(conn, rows_max)
    done = 0
    for ws, _ in due:
        if served and ws not in served:
            continue
        result = await balances.forfeit_if_expired(ws)
        if result is not None and result.created:
            done += 1
            log.info("expired balance forfeited", extra={"workspace_id": ws, "amount_micro": result.taken_micro})
    return done


async def run(
    balances: Balances,
    config: WalletConfig,
    metrics: Metrics,
    stop: asyncio.Event,
    served: frozenset[str] = frozenset(),
) -> None:
    while not stop.is_set():
        try:
            forfeited = await forfeit_due(balances, config.expiry_batch_max, served)
            if forfeited:
                metrics.expiry_forfeits.inc(forfeited)
        except (RedisError, OSError, *db.POSTGRES_OUTAGE) as exc:
            log.warning("expiry pass failed; will retry", extra={"error": type(exc).__name__})
        except (asyncpg.PostgresError, Exception):  # the loop must outlive whatever one pass hits
            log.exception("expiry pass failed on an unexpected error; will retry")
        try:
            await asyncio.wait_for(stop.wait(), config.expiry_check_interval_ms / 1000)
        except TimeoutError:
            pass
