"""The ledger flusher: per-workspace Redis streams -> Postgres, in batches.

Each cycle reads up to `batch_rows_max` entries through one consumer group, workspaces taken in
turn, and writes them in ONE transaction: COPY into a staging table, INSERT ... ON CONFLICT DO
NOTHING, account balances updated from the rows actually inserted, and the daily roll-ups the read
side answers from (ledger_daily: the ledger's statement trigger adds exactly the rows this INSERT wrote,
migration 009). Only then are the entries
acknowledged and deleted from the streams. A crash anywhere before the acknowledgement replays the
batch, which the dedup key absorbs. Entries left pending by a dead consumer are claimed after
`claim_idle_ms`. While Postgres is down nothing is acknowledged, so nothing is lost; the admission
script refuses new calls once a stream's backlog reaches its bound.

An entry Postgres refuses as data (not as an outage) is moved to the workspace's dead-letter
stream, so one bad event cannot stop every workspace's ledger.
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
from sidecar.balances import Balances, sync_token
from sidecar.config import LedgerConfig
from sidecar.ledger.events import COLUMNS, generation, row_from_entry
from sidecar.state import keys

log = logging.getLogger("sidecar.flusher")

_EVENT_ID = COLUMNS.index("event_id")
_WORKSPACE = COLUMNS.index("workspace_id")
_IMPACT = COLUMNS.index("balance_impact_micro")
_WAIVED = COLUMNS.index("fee_waived_micro")
DEAD_LETTERS_MAX = 100_000  # per workspace; the stream is capped so a flood of bad events stays bounded

_STAGE_DDL = "CREATE TEMP TABLE IF NOT EXISTS ledger_stage (LIKE ledger INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
_INSERT = (
    f"INSERT INTO ledger ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM ledger_stage "
    # In event id order: two flushers writing overlapping batches (a replay, a claim) then wait on each
    # other's event ids in the same order, instead of deadlocking on ledger_event_ids.
    "ORDER BY event_id ON CONFLICT DO NOTHING RETURNING event_id, workspace_id, balance_impact_micro, fee_waived_micro"
)
# The fee waiver used is kept with the balance (same rows, same version): a load reads both at once.
_ACCOUNTS = (
    "INSERT INTO accounts AS a (workspace_id, balance_micro, version, fee_waived_micro) "
    "SELECT ws, delta, 1, waived FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS d(ws, delta, waived) "
    "ON CONFLICT (workspace_id) DO UPDATE SET balance_micro = a.balance_micro + EXCLUDED.balance_micro, "
    "fee_waived_micro = a.fee_waived_micro + EXCLUDED.fee_waived_micro, "
    "version = a.version + 1, updated_at = now() RETURNING workspace_id, version"
)
_SYNC_INSERT = (
    "INSERT INTO balance_sync (workspace_id, pg_version, gen, delta_micro, waived_micro) "
    "SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[])"
)


class Entry:
    __slots__ = ("entry_id", "fields", "row", "workspace_id")

    def __init__(self, workspace_id: str, entry_id: bytes, fields: dict[bytes, bytes] | None) -> None:
        self.workspace_id = workspace_id
        self.entry_id = entry_id
        self.fields = fields
        self.row: tuple | None = None


class Flusher:
    def __init__(
        self,
        redis: aioredis.Redis,
        pool: asyncpg.Pool,
        balances: Balances,
        config: LedgerConfig,
        served: frozenset[str] = frozenset(),
        on_batch: Callable[[int, float, int], None] | None = None,
        on_failure: Callable[[], None] | None = None,
        on_dead_letter: Callable[[], None] | None = None,
    ) -> None:
        self.redis = redis
        self.pool = pool
        self.balances = balances
        self.config = config
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self._workspaces: set[str] = set()
        # config server.workspaces: the streams this deployment reads at each refresh (empty: all). A
        # stream is written only by the data planes serving its workspace, so they flush it; a
        # workspace noted by a settlement (a spool replayed after the list changed) is flushed too.
        self.served = served
        self._groups_ready: set[str] = set()
        self._maybe_pending: set[str] = set()  # workspaces where this consumer may hold unacked entries
        self._turn = 0  # rotates the first workspace read, so a busy one cannot starve the rest
        self._refreshed_at = 0.0
        self._last_claim_at = 0.0
        self._more_waiting = False  # the last read filled some workspace's share: go again at once
        self._on_batch = on_batch or (lambda rows, seconds, lag: None)
        self._on_failure = on_failure or (lambda: None)
        self._on_dead_letter = on_dead_letter or (lambda: None)

    def note_workspace(self, ws: str) -> None:
        """Called on settle: flush this workspace's stream without waiting for the next refresh."""
        self._workspaces.add(ws)

    async def run(self, stop: asyncio.Event) -> None:
        backoff_ms = 50
        while not stop.is_set():
            try:
                flushed = await self.flush_once()
                backoff_ms = 50
            except Exception:
                self._on_failure()
                log.exception("ledger flush failed; entries stay pending and will be retried")
                await _sleep_or_stop(stop, backoff_ms / 1000)
                backoff_ms = min(backoff_ms * 2, self.config.retry_backoff_ms_max)
                continue
            # Batches form by age: a settled event waits at most batch_age_ms_max, and a backlog is
            # drained back to back. Settles do not wake the flusher: one flush per call would cost
            # more than the call itself.
            if not (flushed and self._more_waiting):
                await _sleep_or_stop(stop, self.config.batch_age_ms_max / 1000)

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: flush until the streams are empty or the time is up."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if await self.flush_once() == 0:
                    if await self.backlog() == 0:
                        return
                    await asyncio.sleep(0.1)  # entries pending elsewhere: wait, do not spin
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
        # A Redis back with data under a new run_id may hold stale balances: rebuild them first.
        await self.balances.revalidate(self._workspaces)
        await self._sync_balances()  # then whatever a crash or a failed grant left between commit and Redis
        entries = await self._read_batch()
        if not entries:
            return 0
        started = time.monotonic()
        good = await self._parse(entries)
        inserted = await self._write_or_isolate(good)
        await self._sync_balances()
        await self._acknowledge(entries)
        self._on_batch(inserted, time.monotonic() - started, len(entries))
        return len(entries)

    # --- reading ------------------------------------------------------------------------------------

    async def _refresh_workspaces(self) -> None:
        now = time.monotonic()
        if now - self._refreshed_at < self.config.workspace_refresh_ms / 1000:
            return
        async with self.pool.acquire() as conn:
            listed = await db.workspace_ids(conn)
        self._workspaces.update(ws for ws in listed if not self.served or ws in self.served)
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
        budget = self.config.batch_rows_max
        share = max(budget // 4, 1)  # no workspace takes more than a quarter of a batch
        claim = time.monotonic() - self._last_claim_at > self.config.claim_idle_ms / 2000
        if claim:
            self._last_claim_at = time.monotonic()
        order = sorted(self._workspaces)
        self._turn = (self._turn + 1) % max(len(order), 1)
        batch: list[Entry] = []
        self._more_waiting = False
        for ws in order[self._turn :] + order[: self._turn]:
            if budget <= 0:
                self._more_waiting = True
                break
            asked = min(share, budget)
            got = await self._read_stream(ws, asked, claim)
            self._more_waiting = self._more_waiting or len(got) == asked
            batch.extend(got)
            budget -= len(got)
        return batch

    async def _read_stream(self, ws: str, count: int, claim: bool) -> list[Entry]:
        stream = keys.stream(ws)
        await self._ensure_group(ws)
        try:
            if claim:  # take over what a dead consumer read but never acknowledged
                claimed = await self.redis.xautoclaim(  # with justid: the claimed ids
                    stream, keys.GROUP, self.consumer, self.config.claim_idle_ms, "0-0", count=count, justid=True
                )
                if claimed:
                    self._maybe_pending.add(ws)
            # Our own unacknowledged entries first (a failed write left them), then new ones.
            for start in ("0", ">") if ws in self._maybe_pending else (">",):
                reply = await self.redis.xreadgroup(keys.GROUP, self.consumer, {stream: start}, count=count)
                found = [Entry(ws, entry_id, fields or None) for _, items in reply for entry_id, fields in items]
                if found:
                    self._maybe_pending.add(ws)
                    return found
                self._maybe_pending.discard(ws)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted empty: recreate the group next time
                self._groups_ready.discard(ws)
                return []
            raise
        return []

    # --- writing ------------------------------------------------------------------------------------

    async def _parse(self, entries: list[Entry]) -> list[Entry]:
        good = []
        for entry in entries:
            if entry.fields is None:  # deleted under us (already flushed and trimmed): just acknowledge
                continue
            try:
                entry.row = row_from_entry(entry.fields)
            except (KeyError, ValueError, TypeError) as exc:  # InvalidEvent is a ValueError
                await self._dead_letter(entry, f"unreadable event: {type(exc).__name__}: {exc}")
                continue
            good.append(entry)
        return good

    async def _write_or_isolate(self, entries: list[Entry]) -> int:
        """Write the batch; if Postgres refuses its data, write entry by entry and dead-letter the bad."""
        if not entries:
            return 0
        try:
            return await self._write(entries)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
            log.warning("ledger batch refused as data; isolating the bad entries")
        inserted = 0
        for entry in entries:
            try:
                inserted += await self._write([entry])
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
                await self._dead_letter(entry, f"refused by postgres: {type(exc).__name__}: {exc}")
        return inserted

    async def _write(self, entries: list[Entry]) -> int:
        """One transaction: rows, accounts, and the record of what Redis must hold (see _record_sync)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_STAGE_DDL)
            await conn.copy_records_to_table("ledger_stage", records=[e.row for e in entries], columns=COLUMNS)
            inserted = await conn.fetch(_INSERT)
            if not inserted:
                return 0
            deltas: dict[str, int] = defaultdict(int)
            waived: dict[str, int] = defaultdict(int)
            for row in sorted(inserted, key=lambda r: r["workspace_id"]):  # accounts locked in one order too
                deltas[row["workspace_id"]] += row["balance_impact_micro"]
                waived[row["workspace_id"]] += row["fee_waived_micro"]
            versions = {
                r["workspace_id"]: r["version"]
                for r in await conn.fetch(_ACCOUNTS, list(deltas), list(deltas.values()), [waived[w] for w in deltas])
            }
            await self._record_sync(conn, entries, {row["event_id"] for row in inserted}, versions)
        return len(inserted)

    async def _record_sync(self, conn, entries: list[Entry], inserted: set, versions: dict[str, int]) -> None:
        """An event settled under an earlier Redis load than the live one (Redis restarted empty in
        between) is not in the balance Redis holds now. So, in this same transaction, the committed
        impacts are recorded per workspace and Redis load; after commit `_sync_balances` applies those
        whose load is not the live one, exactly once, and deletes the record. A crash in between
        leaves the record for the next flush: no change committed here can miss Redis."""
        owed: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for entry in entries:
            impact, waived = entry.row[_IMPACT], entry.row[_WAIVED]
            if (impact or waived) and entry.row[_EVENT_ID] in inserted:
                owed[(entry.workspace_id, generation(entry.fields))][0] += impact
                owed[(entry.workspace_id, generation(entry.fields))][1] += waived
        owed = {k: v for k, v in owed.items() if v[0] or v[1]}
        if owed:
            await conn.execute(
                _SYNC_INSERT,
                [ws for ws, _ in owed],
                [versions[ws] for ws, _ in owed],
                [g for _, g in owed],
                [v[0] for v in owed.values()],
                [v[1] for v in owed.values()],
            )

    async def _sync_balances(self) -> None:
        async with self.pool.acquire() as conn:
            owed = await conn.fetch(
                "SELECT workspace_id, pg_version, gen, delta_micro, waived_micro FROM balance_sync "
                "ORDER BY pg_version LIMIT 1000"
            )
        if not owed:
            return
        live = {ws: await self.balances.state.generation(ws) for ws in {r["workspace_id"] for r in owed}}
        for row in owed:
            ws, version, gen = row["workspace_id"], row["pg_version"], row["gen"]
            # A grant never went through Redis; a batch settled under an earlier load is not in the live
            # balance. Either is applied once (by version and token); a batch of the live load already is.
            if gen.startswith("grant:") or gen != live[ws]:
                await self.balances.apply_committed(
                    ws, version, row["delta_micro"], sync_token(version, gen), row["waived_micro"]
                )
        async with self.pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM balance_sync AS s USING unnest($1::text[], $2::bigint[], $3::text[]) AS d(ws, v, g) "
                "WHERE s.workspace_id = d.ws AND s.pg_version = d.v AND s.gen = d.g",
                [r["workspace_id"] for r in owed],
                [r["pg_version"] for r in owed],
                [r["gen"] for r in owed],
            )

    async def _dead_letter(self, entry: Entry, reason: str) -> None:
        log.error(
            "ledger event moved to the dead-letter stream",
            extra={"workspace_id": entry.workspace_id, "error": reason[:300]},
        )
        self._on_dead_letter()
        fields = dict(entry.fields or {})
        fields[b"dead_reason"] = reason[:1000].encode()
        fields[b"dead_entry_id"] = entry.entry_id
        await self.redis.xadd(keys.dead_letters(entry.workspace_id), fields, maxlen=DEAD_LETTERS_MAX, approximate=True)

    async def _acknowledge(self, entries: list[Entry]) -> None:
        by_stream: dict[str, list[bytes]] = defaultdict(list)
        for entry in entries:
            by_stream[keys.stream(entry.workspace_id)].append(entry.entry_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, keys.GROUP, *ids)
                pipe.xdel(stream, *ids)
            await pipe.execute()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
