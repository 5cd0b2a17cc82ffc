"""The ledger flusher: per-workspace Redis streams -> Postgres, in batches.

Each cycle reads up to `batch_max_rows` entries through one consumer group (first this consumer's own
unacknowledged entries, then new ones), writes them in ONE transaction (COPY into a staging table,
INSERT ... ON CONFLICT DO NOTHING, account balances updated from the rows actually inserted), and
only then acknowledges and deletes them from the streams. A crash anywhere before the acknowledgement
replays the batch, which the dedup key absorbs. Entries left pending by a dead consumer are claimed
after `claim_idle_ms`. While Postgres is down nothing is acknowledged, so nothing is lost; the
admission script refuses new calls once a stream's backlog reaches its bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from sidecar import db
from sidecar.balances import Balances
from sidecar.config import LedgerConfig
from sidecar.ledger.events import COLUMNS, generation, row_from_entry
from sidecar.state import keys

log = logging.getLogger("sidecar.flusher")

_EVENT_ID = COLUMNS.index("event_id")
_IMPACT = COLUMNS.index("balance_impact_micro")

_STAGE_DDL = "CREATE TEMP TABLE IF NOT EXISTS ledger_stage (LIKE ledger INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
_INSERT = (
    f"INSERT INTO ledger ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM ledger_stage "
    "ON CONFLICT DO NOTHING RETURNING event_id, workspace_id, balance_impact_micro"
)
_ACCOUNTS = (
    "INSERT INTO accounts AS a (workspace_id, balance_micro, version) "
    "SELECT ws, delta, 1 FROM unnest($1::text[], $2::bigint[]) AS d(ws, delta) "
    "ON CONFLICT (workspace_id) DO UPDATE SET balance_micro = a.balance_micro + EXCLUDED.balance_micro, "
    "version = a.version + 1, updated_at = now() RETURNING workspace_id, version"
)


class Entry:
    __slots__ = ("entry_id", "fields", "workspace_id")

    def __init__(self, workspace_id: str, entry_id: bytes, fields: dict[bytes, bytes] | None) -> None:
        self.workspace_id = workspace_id
        self.entry_id = entry_id
        self.fields = fields


class Flusher:
    def __init__(
        self,
        redis: aioredis.Redis,
        pool: asyncpg.Pool,
        balances: Balances,
        config: LedgerConfig,
        on_batch: Callable[[int, float, int], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.balances = balances
        self.config = config
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self._workspaces: set[str] = set()
        self._groups_ready: set[str] = set()
        self._refreshed_at = 0.0
        self._last_claim_at = 0.0
        self._wake = asyncio.Event()
        self._generations: dict[str, str | None] = {}  # per batch: each workspace's current Redis load
        self._on_batch = on_batch or (lambda rows, seconds, lag: None)
        self._on_failure = on_failure or (lambda: None)

    def note_workspace(self, ws: str) -> None:
        """Called on settle: flush this workspace's stream without waiting for the next refresh."""
        self._workspaces.add(ws)

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        backoff_ms = 50
        while not stop.is_set():
            try:
                flushed = await self.flush_once()
                backoff_ms = 50
            except Exception:
                self._on_failure()
                log.exception("ledger flush failed; entries stay pending and will be retried")
                flushed = 0
                await _sleep_or_stop(stop, backoff_ms / 1000)
                backoff_ms = min(backoff_ms * 2, self.config.retry_backoff_max_ms)
                continue
            if flushed < self.config.batch_max_rows:  # a full batch means more is waiting: go again
                self._wake.clear()
                await _wait_any(stop, self._wake, self.config.batch_max_age_ms / 1000)

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: flush until the streams are empty or the time is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if await self.flush_once() == 0 and await self.backlog() == 0:
                    return
            except Exception:
                log.exception("ledger flush failed during drain")
                await asyncio.sleep(0.2)

    async def backlog(self) -> int:
        """Entries not yet in Postgres, over all known streams (the ledger lag metric)."""
        if not self._workspaces:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for ws in self._workspaces:
                pipe.xlen(keys.stream(ws))
            return sum(await pipe.execute())

    async def flush_once(self) -> int:
        """One batch. Returns the number of stream entries handled."""
        await self._refresh_workspaces()
        entries = await self._read_batch()
        if not entries:
            return 0
        started = time.monotonic()
        rows = [(e, row_from_entry(e.fields)) for e in entries if e.fields is not None]
        inserted, versions = await self._write(rows)
        await self._apply_orphans(rows, inserted, versions)
        await self._acknowledge(entries)
        self._on_batch(len(inserted), time.monotonic() - started, len(entries))
        return len(entries)

    async def _refresh_workspaces(self) -> None:
        now = time.monotonic()
        if now - self._refreshed_at < self.config.workspace_refresh_ms / 1000:
            return
        async with self.pool.acquire() as conn:
            self._workspaces.update(await db.workspace_ids(conn))
        self._refreshed_at = now

    async def _ensure_group(self, ws: str) -> None:
        if ws in self._groups_ready:
            return
        try:
            await self.redis.xgroup_create(keys.stream(ws), keys.GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups_ready.add(ws)

    async def _read_batch(self) -> list[Entry]:
        budget = self.config.batch_max_rows
        claim = time.monotonic() - self._last_claim_at > self.config.claim_idle_ms / 2000
        if claim:
            self._last_claim_at = time.monotonic()
        batch: list[Entry] = []
        for ws in sorted(self._workspaces):
            if budget <= 0:
                break
            got = await self._read_stream(ws, budget, claim)
            batch.extend(got)
            budget -= len(got)
        return batch

    async def _read_stream(self, ws: str, count: int, claim: bool) -> list[Entry]:
        stream = keys.stream(ws)
        await self._ensure_group(ws)
        try:
            if claim:  # take over what a dead consumer read but never acknowledged
                await self.redis.xautoclaim(
                    stream, keys.GROUP, self.consumer, self.config.claim_idle_ms, "0-0", count=count, justid=True
                )
            for start in ("0", ">"):  # our own unacknowledged entries first, then new ones
                reply = await self.redis.xreadgroup(keys.GROUP, self.consumer, {stream: start}, count=count)
                found = [Entry(ws, entry_id, fields or None) for _, items in reply for entry_id, fields in items]
                if found:
                    return found
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted empty: recreate the group next time
                self._groups_ready.discard(ws)
                return []
            raise
        return []

    async def _write(self, rows: list[tuple[Entry, tuple]]) -> tuple[set, dict[str, int]]:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_STAGE_DDL)
            await conn.copy_records_to_table("ledger_stage", records=[r for _, r in rows], columns=COLUMNS)
            inserted = await conn.fetch(_INSERT)
            deltas: dict[str, int] = defaultdict(int)
            for row in inserted:
                deltas[row["workspace_id"]] += row["balance_impact_micro"]
            versions = {}
            if deltas:
                result = await conn.fetch(_ACCOUNTS, list(deltas), list(deltas.values()))
                versions = {r["workspace_id"]: r["version"] for r in result}
        return {row["event_id"] for row in inserted}, versions

    async def _acknowledge(self, entries: list[Entry]) -> None:
        by_stream: dict[str, list[bytes]] = defaultdict(list)
        for entry in entries:
            by_stream[keys.stream(entry.workspace_id)].append(entry.entry_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, keys.GROUP, *ids)
                pipe.xdel(stream, *ids)
            await pipe.execute()

    async def _apply_orphans(self, rows: list[tuple[Entry, tuple]], inserted: set, versions: dict[str, int]) -> None:
        """Events settled in a Redis that has since restarted empty are not in the balance Redis now
        holds (it was reloaded from Postgres before they arrived there). Apply them, exactly once."""
        orphans: dict[str, int] = defaultdict(int)
        for entry, row in rows:
            impact = row[_IMPACT]
            if impact and row[_EVENT_ID] in inserted:
                current = await self._generation(entry.workspace_id)
                if generation(entry.fields) != current:
                    orphans[entry.workspace_id] += impact
        for ws, delta in orphans.items():
            if delta:
                await self.balances.apply_committed(ws, versions[ws], delta, f"flush:{versions[ws]}")
        self._generations.clear()

    async def _generation(self, ws: str) -> str | None:
        if ws not in self._generations:
            self._generations[ws] = await self.balances.state.generation(ws)
        return self._generations[ws]


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
