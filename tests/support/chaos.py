"""The pieces of `make chaos` (tests/test_chaos.py): a Redis primary with a replica behind a TCP proxy
that can fail over, the faults themselves, a load generator that records what every client saw, and the
final audit that holds the money to account against that client-side truth.

Every wait is bounded, every loop has an exit, and every process started here is stopped by its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import orjson
import redis
import redis.asyncio

from sidecar import db
from sidecar.devtools.embedded import EmbeddedError, PostgresServer, RedisServer
from sidecar.state import keys

HOST = "127.0.0.1"
PROXY_CONNECT_TIMEOUT_S = 1.0
PROXY_READ_BYTES = 64 * 1024
CONTROL_TIMEOUT_S = 5.0
REPLICA_SYNC_TIMEOUT_S = 10.0
AOF_REWRITE_TIMEOUT_S = 10.0
# A write pause (CLIENT PAUSE WRITE) must stay well inside the sidecars' 5 s socket timeout.
WRITE_PAUSE_MS = 3000
WRITE_PAUSE_USABLE_S = 2.0


# --- a TCP proxy in front of Redis, so a failover is one switch -----------------------------------------


class TcpProxy:
    """Forwards every connection to the current backend port, on its own thread and event loop (the test's
    loop is busy with the load). `switch()` points new connections elsewhere and cuts the live ones, as a
    failover behind a virtual IP or a managed endpoint does."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="redis-proxy", daemon=True)
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self._thread.start()
        self.port = self._call(self._listen())

    def switch(self, backend_port: int) -> None:
        self._call(self._switch(backend_port))

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT_S)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        return self._server.sockets[0].getsockname()[1]

    async def _switch(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self._cut_all()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._cut_all()

    def _cut_all(self) -> None:
        for client, upstream in list(self._pairs):
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(HOST, self.backend_port), PROXY_CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            writer.transport.abort()  # the backend is down: the client sees a refused connection, and retries
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        pipes = [asyncio.ensure_future(_pipe(reader, up_writer)), asyncio.ensure_future(_pipe(up_reader, writer))]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            writer.transport.abort()
            up_writer.transport.abort()
            self._pairs.discard(pair)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(PROXY_READ_BYTES):
            writer.write(data)
            await writer.drain()


# --- Redis: a primary, its replica, and the proxy the sidecars use --------------------------------------


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host=HOST, port=server.port, socket_timeout=CONTROL_TIMEOUT_S, socket_connect_timeout=2)


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class RedisPair:
    """Two private redis-servers, one the replica of the other, and the proxy pointing at the primary.
    The methods block (they start and stop processes): call them through asyncio.to_thread."""

    def __init__(self, primary: RedisServer, replica: RedisServer, proxy: TcpProxy) -> None:
        self.primary = primary
        self.replica = replica
        self.proxy = proxy

    def attach_replica(self) -> None:
        with contextlib.closing(_client(self.replica)) as r:
            r.replicaof(HOST, self.primary.port)
        self.wait_replica_synced()

    def replica_synced(self) -> bool:
        with contextlib.closing(_client(self.replica)) as r, contextlib.closing(_client(self.primary)) as p:
            info, primary = r.info("replication"), p.info("replication")
        return (
            info.get("master_link_status") == "up"
            and info.get("master_port") == self.primary.port
            and info.get("master_replid") == primary["master_replid"]
        )

    def wait_replica_synced(self) -> None:
        _wait(self.replica_synced, REPLICA_SYNC_TIMEOUT_S, "the replica to sync")

    def kill_and_restart(self) -> None:
        """SIGKILL the primary and restart it on its AOF: nothing it acknowledged may be lost."""
        self.primary.kill()
        self.primary.restart()

    def pause_writes(self) -> float:
        with contextlib.closing(_client(self.primary)) as r:
            r.execute_command("CLIENT", "PAUSE", WRITE_PAUSE_MS, "WRITE")
        return time.monotonic()

    def unpause_writes(self) -> None:
        with contextlib.suppress(redis.RedisError), contextlib.closing(_client(self.primary)) as r:
            r.execute_command("CLIENT", "UNPAUSE")

    def snapshot(self) -> None:
        """An RDB snapshot of the primary now (what a restore from backup, or a stale replica, brings back)."""
        with contextlib.closing(_client(self.primary)) as r:
            r.save()

    def kill_and_restart_without_aof(self, keep_snapshot: bool) -> None:
        """SIGKILL the primary and bring it back WITHOUT its AOF: from the last RDB snapshot (stale data)
        or empty. Then turn the AOF back on (and wait for its rewrite) so later kills lose nothing."""
        server = self.primary
        server.kill()
        shutil.rmtree(server.data_dir / "appendonlydir", ignore_errors=True)
        if not keep_snapshot:
            (server.data_dir / "dump.rdb").unlink(missing_ok=True)
        server.persistent = False
        server.restart()
        with contextlib.closing(_client(server)) as r:
            r.config_set("appendonly", "yes")

            def rewritten() -> bool:
                info = r.info("persistence")
                return (
                    info["aof_enabled"] == 1
                    and info["aof_rewrite_in_progress"] == 0
                    and info["aof_rewrite_scheduled"] == 0
                    and info["aof_last_bgrewrite_status"] == "ok"
                )

            _wait(rewritten, AOF_REWRITE_TIMEOUT_S, "the AOF rewrite")
        server.persistent = True
        (server.data_dir / "dump.rdb").unlink(missing_ok=True)

    def failover(self) -> None:
        """A planned failover, as a managed Redis does it: writes paused on the primary, the replica caught
        up, promoted (REPLICAOF NO ONE), the proxy switched to it; the old primary becomes its replica."""
        old, new = self.primary, self.replica
        self.wait_replica_synced()  # after a restart of the primary the replica resyncs in full first
        with contextlib.closing(_client(old)) as o, contextlib.closing(_client(new)) as n:
            o.execute_command("CLIENT", "PAUSE", WRITE_PAUSE_MS, "WRITE")
            try:

                def caught_up() -> bool:
                    # Same replication id first: after the primary restarted, the replica's offset still
                    # counts the previous history until its full resync is done.
                    mine, theirs = n.info("replication"), o.info("replication")
                    return (
                        mine.get("master_link_status") == "up"
                        and mine["master_replid"] == theirs["master_replid"]
                        and int(mine["slave_repl_offset"]) >= int(theirs["master_repl_offset"])
                    )

                _wait(caught_up, WRITE_PAUSE_USABLE_S, "the replica to catch up", interval_s=0.005)
                n.replicaof("NO", "ONE")
                self.proxy.switch(new.port)
                o.replicaof(HOST, new.port)
            finally:
                with contextlib.suppress(redis.RedisError):
                    o.execute_command("CLIENT", "UNPAUSE")
        self.primary, self.replica = new, old
        self.wait_replica_synced()

    def stop(self) -> None:
        for server in (self.primary, self.replica):
            with contextlib.suppress(Exception):
                server.stop()


POSTGRES_RESTART_ATTEMPTS = 10


def kill_and_restart_postgres(server: PostgresServer) -> None:
    """SIGKILL the postmaster and its backends, restart. A backend still exiting holds the shared memory
    block for a moment ("pre-existing shared memory block is still in use"): wait and try again."""
    server.kill()
    for attempt in range(POSTGRES_RESTART_ATTEMPTS):
        try:
            server.restart()
            return
        except EmbeddedError as exc:
            if "shared memory block" not in str(exc) or attempt + 1 == POSTGRES_RESTART_ATTEMPTS:
                raise
            time.sleep(0.5)


# Faults after which Redis no longer holds what it held: restarts without the AOF.
REDIS_DATA_LOSS = ("redis_restart_empty", "redis_restart_stale")
HOLD_TTL_S = 15.0  # holds.ttl_ms of the chaos replicas (tests/test_chaos.py SIDECAR_OVERRIDES)
SWEEP_GRACE_S = 1.5  # holds.sweep_grace_ms of the chaos replicas: no voiding until Redis answered this long
SWEEP_MARGIN_S = 2.0 + SWEEP_GRACE_S
WATCH_INTERVAL_S = 0.25  # how often watch_holds looks
# The longest a hold may live: a call to its client timeout, then (its sidecar dead) the TTL, plus the
# sweepers' pauses through outages and their grace after each Redis fault. Longer: every sweeper failed it.
HOLD_LIFE_MAX_S = 20.0 + HOLD_TTL_S + 30.0


async def watch_holds(redis_url: str, workspaces: list[str], truth: Truth, stop: asyncio.Event) -> None:
    """Note when each hold is seen live, so a call without a row can say where its hold went."""
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1)
    try:
        while not stop.is_set():
            now = time.monotonic()
            with contextlib.suppress(redis.RedisError, OSError):
                for ws in workspaces:
                    for hold in await client.hkeys(keys.holds(ws)):
                        truth.holds_seen.setdefault(hold.decode(), [now, now])[1] = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_INTERVAL_S)
    finally:
        await client.aclose()


# --- what the clients saw -------------------------------------------------------------------------------


@dataclass
class CallRecord:
    """One call as its client saw it."""

    workspace: str
    replica: str  # which sidecar process (name#incarnation) served it
    fault: str  # the provider fault the request asked for ("" for an honest provider)
    status: int  # HTTP status; 0 when the connection failed before a status
    request_id: str = ""
    complete: bool = False  # the whole body arrived (a stream reached its end)
    cost_micro: int | None = None  # the charge the client can know: header, or honest usage x price
    started_s: float = 0.0
    ended_s: float = 0.0
    idempotency_key: str = ""
    replayed: bool = False  # answered from the idempotency record (Idempotent-Replayed: true): no row of its own


@dataclass
class Truth:
    calls: list[CallRecord] = field(default_factory=list)
    granted_micro: Counter = field(default_factory=Counter)  # per workspace, grants the admin API confirmed
    # replica incarnation -> monotonic time it was SIGKILLed
    killed_at: dict[str, float] = field(default_factory=dict)
    faults: list[tuple[float, float, str]] = field(default_factory=list)  # (began, ended, kind), monotonic
    # hold id (= request id) -> [first, last] monotonic time a watcher saw it live in Redis
    holds_seen: dict[str, list[float]] = field(default_factory=dict)

    def lost_with_redis(self, call: CallRecord) -> bool:
        """The double fault no record survives: the call's sidecar was SIGKILLed while the call was in flight
        (its hold, in Redis only, waited for its deadline), and before that deadline Redis came back without
        its AOF (empty, or from a snapshot older than the hold), so no sweeper ever saw the hold."""
        killed = self.killed_at.get(call.replica)
        seen = self.holds_seen.get(call.request_id)
        if killed is None or killed < call.started_s or seen is None:
            return False
        last_seen = seen[1]
        if last_seen > killed + HOLD_TTL_S + SWEEP_MARGIN_S:
            return False  # the hold outlived its deadline: the sweepers failed it, whatever came next
        return any(
            kind in REDIS_DATA_LOSS and began <= last_seen <= ended + WATCH_INTERVAL_S
            for began, ended, kind in self.faults
        )

    def hold_story(self, call: CallRecord) -> str:
        """When the call's hold was seen live, relative to the call's start, and the faults then."""
        seen = self.holds_seen.get(call.request_id)
        if seen is None:
            return "hold never seen"
        first, last = seen
        around = [
            f"{kind}@{began - call.started_s:+.1f}s"
            for began, ended, kind in self.faults
            if began - 1.0 <= last + WATCH_INTERVAL_S and ended + 1.0 >= last
        ]
        killed = self.killed_at.get(call.replica)
        kill = f"replica killed @{killed - call.started_s:+.1f}s" if killed is not None else "replica not killed"
        return (
            f"hold seen {first - call.started_s:+.1f}s..{last - call.started_s:+.1f}s, {kill}, "
            f"faults as it vanished: {', '.join(around) or 'none'}"
        )

    def faults_near(self, call: CallRecord, margin_s: float = 5.0) -> str:
        """The faults around a call, to tell which one a finding follows."""
        near = [
            f"{kind}@{began - call.started_s:+.1f}s"
            for began, ended, kind in self.faults
            if began - margin_s <= call.ended_s and ended + margin_s >= call.started_s
        ]
        return ", ".join(near) or "no fault near"


# --- the audit ------------------------------------------------------------------------------------------


@dataclass
class Findings:
    workspaces: int = 0
    rows: int = 0
    paid_calls: int = 0  # calls the client saw a 200 for
    drift: list[str] = field(default_factory=list)
    calls_without_row: list[str] = field(default_factory=list)
    doubled_rows: list[str] = field(default_factory=list)
    cost_mismatches: list[str] = field(default_factory=list)
    over_hold: list[str] = field(default_factory=list)
    backlog: list[str] = field(default_factory=list)
    grant_mismatches: list[str] = field(default_factory=list)
    late_holds: list[str] = field(default_factory=list)  # live far past any deadline: no sweeper voided them
    # Allowed, counted: a 200 whose sidecar was SIGKILLed before it settled (its hold voided at the deadline).
    expired_by_kill: int = 0
    # The double fault of Truth.lost_with_redis: once a known limit, now recorded from the dead process's
    # journal (sidecar/proxy/inflight.py). Named apart for the report, and a failure like any call without a row.
    lost_with_redis: list[str] = field(default_factory=list)
    replays: int = 0  # 200s answered from an idempotency record
    statuses: Counter = field(default_factory=Counter)

    @property
    def problems(self) -> dict[str, list[str]]:
        named = {
            "drift": self.drift,
            "calls_without_row": self.calls_without_row,
            "lost_with_redis": self.lost_with_redis,
            "doubled_rows": self.doubled_rows,
            "cost_mismatches": self.cost_mismatches,
            "over_hold": self.over_hold,
            "backlog": self.backlog,
            "grant_mismatches": self.grant_mismatches,
            "late_holds": self.late_holds,
        }
        return {name: found for name, found in named.items() if found}


KILL_SETTLE_WINDOW_S = 2.0  # a call that ended this close before its sidecar's SIGKILL may not have settled


async def audit(redis_url: str, database_url: str, truth: Truth, workspaces: list[str]) -> Findings:
    """Every workspace's money from the ledger vs the accounts table vs Redis, and every call the clients
    saw vs the rows. Run once nothing moves any more (no call in flight, streams drained, holds resolved)."""
    found = Findings(workspaces=len(workspaces))
    client = redis.asyncio.Redis.from_url(redis_url)
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT request_id, workspace_id, key_id, idempotency_key, status, cost_micro, hold_micro, "
            "balance_impact_micro "
            "FROM ledger WHERE kind = 'usage' AND workspace_id = ANY($1)",
            workspaces,
        )
        found.rows = len(rows)
        found.statuses = Counter(row["status"] for row in rows)
        by_request: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            by_request.setdefault(row["request_id"], []).append(row)
            if not 0 <= row["cost_micro"] <= row["hold_micro"] or row["balance_impact_micro"] > 0:
                found.over_hold.append(f"{row['request_id']}: {dict(row)}")
        found.doubled_rows = [f"{rid}: {len(rs)} rows" for rid, rs in by_request.items() if len(rs) > 1]
        # A retried call runs to completion at most once: one completed row per idempotency key. A try that
        # failed, was cut or cancelled frees the key, and the retry is a new call (billed what it used).
        completed_per_key = Counter(
            (row["workspace_id"], row["key_id"], row["idempotency_key"])
            for row in rows
            if row["idempotency_key"] and row["status"] == "completed"
        )
        found.doubled_rows += [
            f"idempotency key {key}: completed {n} times" for key, n in completed_per_key.items() if n > 1
        ]
        keyed_rows = Counter((row["workspace_id"], row["idempotency_key"]) for row in rows if row["idempotency_key"])
        for call in truth.calls:
            if call.status != 200:
                continue
            found.paid_calls += 1
            if call.replayed:  # the answer of an earlier call: that call's row is the one
                found.replays += 1
                if not keyed_rows[(call.workspace, call.idempotency_key)]:
                    found.calls_without_row.append(f"replay of {call.idempotency_key}: no row for the key")
                continue
            mine = by_request.get(call.request_id, [])
            if len(mine) != 1:
                if not mine and truth.lost_with_redis(call):
                    found.lost_with_redis.append(call.request_id)
                elif not mine:
                    found.calls_without_row.append(
                        f"{call.request_id} ({call.fault or 'honest'}, {call.replica}, "
                        f"{call.ended_s - call.started_s:.2f}s long, {'complete' if call.complete else 'cut'}; "
                        f"{truth.faults_near(call)}; {truth.hold_story(call)})"
                    )
                continue
            [row] = mine
            if call.cost_micro is None or row["cost_micro"] == call.cost_micro:
                continue
            killed = truth.killed_at.get(call.replica)
            if row["status"] == "expired" and killed is not None and killed >= call.ended_s - KILL_SETTLE_WINDOW_S:
                found.expired_by_kill += 1
                continue
            found.cost_mismatches.append(
                f"{call.request_id}: client saw {call.cost_micro}, row {row['status']} {row['cost_micro']} "
                f"({truth.faults_near(call)})"
            )
        found.late_holds = [
            f"{hold}: live for {last - first:.0f} s"
            for hold, (first, last) in truth.holds_seen.items()
            if last - first > HOLD_LIFE_MAX_S
        ]
        for ws in workspaces:
            identity = await db.ledger_identity(conn, ws)
            implied = identity["grants"] + identity["topups"] - identity["debits"]
            if identity["account_balance"] != implied:
                found.drift.append(f"{ws}: accounts {identity['account_balance']} != ledger {implied}")
            credited = identity["grants"] + identity["topups"]
            if credited != truth.granted_micro[ws]:
                found.grant_mismatches.append(f"{ws}: ledger grants {credited} != confirmed {truth.granted_micro[ws]}")
            balance, held = await client.hmget(keys.acct(ws), "balance", "held")
            holds = {k: int(v) for k, v in (await client.hgetall(keys.holds(ws))).items()}
            if balance is not None and int(balance) != identity["account_balance"]:
                found.drift.append(f"{ws}: Redis balance {int(balance)} != accounts {identity['account_balance']}")
            if int(held or 0) != sum(holds.values()):
                found.drift.append(f"{ws}: Redis held {int(held or 0)} != live holds {sum(holds.values())}")
            if holds:
                found.backlog.append(f"{ws}: {len(holds)} holds still live")
            for stream in (keys.stream(ws), keys.dead_letters(ws)):
                if length := await client.xlen(stream):
                    found.backlog.append(f"{stream}: {length} entries")
    finally:
        await conn.close()
        await client.aclose()
    return found


async def settled_everywhere(redis_url: str, workspaces: list[str]) -> bool:
    """No live hold and no unflushed ledger entry in any workspace."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        for ws in workspaces:
            if await client.hlen(keys.holds(ws)) or await client.xlen(keys.stream(ws)):
                return False
        return True
    finally:
        await client.aclose()


async def unflushed_event_ids(redis_url: str, database_url: str, workspaces: list[str]) -> int:
    """How many entries in the ledger streams are not in Postgres yet (read-only: works under a write pause)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        event_ids: list[str] = []
        for ws in workspaces:
            for _id, fields in await client.xrange(keys.stream(ws)):
                event_ids.append(orjson.loads(fields[b"e"])["event_id"])
    finally:
        await client.aclose()
    if not event_ids:
        return 0
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        present = await conn.fetchval(
            "SELECT count(DISTINCT event_id) FROM ledger WHERE event_id = ANY($1::uuid[])", event_ids
        )
    finally:
        await conn.close()
    return len(set(event_ids)) - present


def summary_lines(found: Findings) -> list[str]:
    lines = [
        f"workspaces {found.workspaces}, usage rows {found.rows} {dict(found.statuses)}, paid calls {found.paid_calls}",
        f"expired after a sidecar SIGKILL (allowed) {found.expired_by_kill}, idempotent replays {found.replays}",
        f"lost with Redis (dead sidecar, then Redis without AOF): {len(found.lost_with_redis)} {found.lost_with_redis}",
    ]
    for name, items in found.problems.items():
        lines.append(f"{name}: {len(items)}: {items[:10]}")
    return lines
