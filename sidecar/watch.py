"""The balance watch: notices a settlement leaving a workspace's available balance under a threshold
(the low-balance notification's, auto-reload's), once per crossing, off the call's path.

A settlement hands over the available balance its script returned and the Redis time it ran at
(`observe`: a dict lookup, no I/O, no await), so the call's answer never waits for any of this. A
background task checks the observations in bounded batches. The crossing itself is decided by
Postgres (`balance_watches`): one conditional UPDATE finds the watch armed and records the crossing at
that Redis time, so 200 concurrent settlements under the threshold, in any number of processes,
cross it once. What the crossing causes (the notification, the pending reload) is written in the same
transaction. An observation at or above the threshold re-arms the watch only if it is later (Redis
time) than the crossing, so observations arriving out of order neither fire twice nor re-arm early.

Bounded: one pending observation per workspace (the latest), at most `pending_workspaces_max`
workspaces waiting (past that an observation is counted and skipped: the next settlement observes
again), `batch_workspaces_max` per round, settings cached `settings_cache_ms`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

import asyncpg

from sidecar.config import Config
from sidecar.db import POSTGRES_OUTAGE
from sidecar.money import format_micro
from sidecar.notify import events
from sidecar.notify.events import EventType
from sidecar.observability.metrics import Metrics
from sidecar.reload import store as reload_store

log = logging.getLogger("sidecar.watch")

CACHE_ENTRIES_MAX = 10_000
IDLE_WAIT_S = 1.0


class WatchKind(StrEnum):
    NOTIFY = "notify"  # balance.below_threshold to the workspace's endpoint
    RELOAD = "reload"  # an auto-reload


@dataclass(frozen=True, slots=True)
class Watch:
    kind: WatchKind
    threshold_micro: int
    below: bool  # as last read: crossed and not re-armed since


@dataclass(frozen=True, slots=True)
class Observation:
    available_micro: int
    at_ms: int  # Redis time of the settlement


class BalanceWatch:
    def __init__(self, pool: asyncpg.Pool, config: Config, metrics: Metrics) -> None:
        self.pool, self.config, self.metrics = pool, config, metrics
        self._pending: dict[str, Observation] = {}
        self._cache: OrderedDict[str, tuple[float, tuple[Watch, ...]]] = OrderedDict()
        self._wake = asyncio.Event()

    def observe(self, ws: str, available_micro: int, at_ms: int) -> None:
        """A settlement's result. Cheap and synchronous: it runs before the call's answer is sent."""
        cached = self._cache.get(ws)
        if cached is not None and cached[0] > time.monotonic() and _settled(cached[1], available_micro):
            return  # nothing to cross or re-arm: the usual case, and no work at all
        prior = self._pending.get(ws)
        if prior is None and len(self._pending) >= self.config.balance_watch.pending_workspaces_max:
            self.metrics.balance_watch_skipped.inc()
            return
        if prior is None or at_ms >= prior.at_ms:
            self._pending[ws] = Observation(available_micro, at_ms)
        self._wake.set()

    def forget(self, ws: str) -> None:
        """Settings changed in this process: read them again on the next observation."""
        self._cache.pop(ws, None)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except POSTGRES_OUTAGE as exc:
                log.warning("balance watch paused: postgres unavailable", extra={"error": type(exc).__name__})
                await _sleep_or_stop(stop, IDLE_WAIT_S)
            except Exception:  # the loop must outlive any one bad round
                log.exception("balance watch round failed; will retry")
                await _sleep_or_stop(stop, IDLE_WAIT_S)
            if not self._pending:
                self._wake.clear()
                waiter = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, timeout=IDLE_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()

    async def run_once(self) -> int:
        """Check up to `batch_workspaces_max` observations. Returns how many were checked. An observation
        whose check fails (Postgres down) goes back, unless a newer one arrived meanwhile."""
        batch = []
        while self._pending and len(batch) < self.config.balance_watch.batch_workspaces_max:
            ws = next(iter(self._pending))
            batch.append((ws, self._pending.pop(ws)))
        for i, (ws, seen) in enumerate(batch):
            try:
                await self.check(ws, seen)
            except BaseException:
                for later_ws, later in batch[i:]:
                    self._pending.setdefault(later_ws, later)
                raise
        return len(batch)

    async def check(self, ws: str, seen: Observation) -> None:
        watches = await self._watches(ws)
        changed = False
        for watch in watches:
            below_now = seen.available_micro < watch.threshold_micro
            if below_now and not watch.below:
                changed |= await self._cross(ws, watch, seen)
            elif not below_now and watch.below:
                changed |= await self._rearm(ws, watch, seen)
        if changed:
            self.forget(ws)

    async def _cross(self, ws: str, watch: Watch, seen: Observation) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            crossed = await conn.fetchval(
                "UPDATE balance_watches SET below_ms = $3 WHERE workspace_id = $1 AND kind = $2 AND below_ms IS NULL "
                "AND rearmed_ms < $3 AND threshold_micro > $4 RETURNING threshold_micro",
                ws,
                watch.kind.value,
                seen.at_ms,
                seen.available_micro,
            )
            if crossed is None:
                return True  # another settlement (or process) got there first, or it was re-armed later
            if watch.kind is WatchKind.NOTIFY:
                await self._notify_low(conn, ws, crossed, seen)
            else:
                reload_id = await reload_store.begin(
                    conn, ws, reload_store.ReloadReason.THRESHOLD, seen.available_micro
                )
                if reload_id is not None:
                    self.metrics.child(self.metrics.auto_reloads, "created").inc()
        self.metrics.child(self.metrics.balance_crossings, watch.kind.value).inc()
        return True

    async def _notify_low(self, conn: asyncpg.Connection, ws: str, threshold_micro: int, seen: Observation) -> None:
        data = {
            "available_micro": seen.available_micro,
            "available": format_micro(seen.available_micro),
            "threshold_micro": threshold_micro,
            "threshold": format_micro(threshold_micro),
        }
        pending_max = self.config.notifications.pending_deliveries_per_workspace_max
        await events.enqueue(conn, ws, EventType.BALANCE_LOW, f"balance.below:{seen.at_ms}", data, pending_max)

    async def _rearm(self, ws: str, watch: Watch, seen: Observation) -> bool:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE balance_watches SET below_ms = NULL, rearmed_ms = $3 WHERE workspace_id = $1 AND kind = $2 "
                "AND below_ms IS NOT NULL AND below_ms < $3 AND threshold_micro <= $4",
                ws,
                watch.kind.value,
                seen.at_ms,
                seen.available_micro,
            )
        return True

    async def _watches(self, ws: str) -> tuple[Watch, ...]:
        cached = self._cache.get(ws)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT w.kind, w.threshold_micro, w.below_ms IS NOT NULL AS below FROM balance_watches w "
                "WHERE w.workspace_id = $1 AND ((w.kind = 'notify' AND EXISTS (SELECT 1 FROM notification_endpoints e "
                "  WHERE e.workspace_id = w.workspace_id AND $2 = ANY(e.events))) "
                "OR (w.kind = 'reload' AND EXISTS (SELECT 1 FROM auto_reload_settings s "
                "  WHERE s.workspace_id = w.workspace_id AND s.enabled)))",
                ws,
                EventType.BALANCE_LOW.value,
            )
        watches = tuple(Watch(WatchKind(r["kind"]), r["threshold_micro"], r["below"]) for r in rows)
        self._cache[ws] = (now + self.config.balance_watch.settings_cache_ms / 1000, watches)
        self._cache.move_to_end(ws)
        while len(self._cache) > CACHE_ENTRIES_MAX:
            self._cache.popitem(last=False)
        return watches


def _settled(watches: tuple[Watch, ...], available_micro: int) -> bool:
    """Each watch already agrees with this balance: nothing to cross, nothing to re-arm."""
    return all((available_micro < w.threshold_micro) == w.below for w in watches)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
