"""Fault tests (DESIGN.md §5 and §6): Postgres down, a flusher that dies, Redis restarted empty, a
sidecar killed mid-stream, and a graceful shutdown. Each one checks exact money and exactly one ledger
row per call, not merely that nothing crashed.

Prices (tests/support/harness.py): gpt-4o-mini costs 5 micro-credits per input token and 25 per output
token, and the mock provider's usage is a pure function of the request, so every call's cost is known
in advance (`expected_cost`).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import msgspec
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from support.harness import Sidecar, Workspace, chat_body, start_sidecar, stop_sidecar
from support.processes import SidecarProcess

from sidecar.devtools.mock_provider import prompt_tokens_for
from sidecar.ledger.flusher import Flusher
from sidecar.ledger.migrate import migrate_url
from sidecar.state import keys
from sidecar.sweeper import sweep_all

CREDITS = 1_000_000
INPUT_MICRO, OUTPUT_MICRO = 5, 25  # gpt-4o-mini in the harness's pricing, per token
MAX_OUTPUT_TOKENS_DEFAULT = 100  # gpt-4o-mini's max_output_tokens_default in the harness's config
MOCK_CHUNKS = 8  # the mock provider's default completion length
JSON = {"Content-Type": "application/json"}


# --- helpers ----------------------------------------------------------------------------------------


def call_body(i: int, stream: bool) -> dict:
    body = chat_body(f"call number {i}: " + "z" * (i % 7 * 4))
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def expected_cost(body: dict, chunks: int = MOCK_CHUNKS) -> int:
    return INPUT_MICRO * prompt_tokens_for(body) + OUTPUT_MICRO * min(chunks, MAX_OUTPUT_TOKENS_DEFAULT)


def stream_usage(raw: bytes) -> dict:
    """The usage chunk of an OpenAI SSE body (the client asked for include_usage)."""
    assert raw.rstrip().endswith(b"data: [DONE]"), raw[-300:]
    found = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            chunk = orjson.loads(line[6:])
            if chunk.get("usage"):
                found.append(chunk["usage"])
    assert len(found) == 1, raw[-300:]
    return found[0]


async def metered_call(sc: Sidecar, ws: Workspace, i: int) -> tuple[str, int]:
    """One successful call (even i: non-streamed, odd i: streamed); returns (request id, cost charged)."""
    code, headers, raw = await sc.chat(ws, call_body(i, i % 2 == 1))
    assert code == 200, raw
    return charged(i, headers, raw)


def charged(i: int, headers, raw: bytes) -> tuple[str, int]:
    """The cost of call i as its client learns it (header, or the stream's usage chunk), checked
    against the price list."""
    stream = i % 2 == 1
    body = call_body(i, stream)
    if stream:
        usage = stream_usage(raw)
        assert usage["completion_tokens"] == MOCK_CHUNKS
        cost = INPUT_MICRO * usage["prompt_tokens"] + OUTPUT_MICRO * usage["completion_tokens"]
    else:
        cost = int(headers["x-sidecar-cost-micro"])
    assert cost == expected_cost(body), (i, cost)
    return headers["x-request-id"], cost


async def attempt_call(sc: Sidecar, ws: Workspace, i: int) -> tuple[int, str, int | bytes]:
    """Like metered_call, but a refusal is returned, not raised: (status, request id, cost or body)."""
    code, headers, raw = await sc.chat(ws, call_body(i, i % 2 == 1))
    if code != 200:
        return code, headers.get("x-request-id", ""), raw
    return (code, *charged(i, headers, raw))


async def calls(sc: Sidecar, ws: Workspace, numbers: range) -> dict[str, int]:
    results = await asyncio.gather(*(metered_call(sc, ws, i) for i in numbers))
    return dict(results)


async def assert_one_row_per_call(sc: Sidecar, ws: str, costs: dict[str, int]) -> None:
    """Exactly one usage row per call, none doubled, none foreign, each with the cost the client saw."""
    rows = await sc.ledger(ws)
    per_request = Counter(row["request_id"] for row in rows)
    doubled = {rid: n for rid, n in per_request.items() if n != 1}
    assert not doubled, f"rows written more than once: {doubled}"
    assert set(per_request) == set(costs), set(per_request) ^ set(costs)
    assert len({row["event_id"] for row in rows}) == len(rows)
    for row in rows:
        assert row["status"] == "completed", dict(row)
        assert row["cost_micro"] == costs[row["request_id"]] == -row["balance_impact_micro"], dict(row)
    assert sum(row["cost_micro"] for row in rows) == sum(costs.values())


async def pg_account(pool_or_url: asyncpg.Pool | str, ws: str) -> tuple[int, int]:
    query = "SELECT balance_micro, version FROM accounts WHERE workspace_id = $1"
    if isinstance(pool_or_url, str):
        conn = await asyncpg.connect(pool_or_url)
        try:
            row = await conn.fetchrow(query, ws)
        finally:
            await conn.close()
    else:
        async with pool_or_url.acquire() as conn:
            row = await conn.fetchrow(query, ws)
    return row["balance_micro"], row["version"]


async def stream_pending(redis, ws: str) -> dict:
    """The ledger stream's length and its consumer group's pending entries, per consumer."""
    stream = keys.stream(ws)
    summary = await redis.xpending(stream, keys.GROUP)
    consumers = {c["name"].decode(): int(c["pending"]) for c in summary["consumers"]}
    return {"length": await redis.xlen(stream), "pending": int(summary["pending"]), "consumers": consumers}


async def read_until(resp: aiohttp.ClientResponse, needle: bytes, count: int, timeout_s: float = 10) -> bytes:
    seen = b""
    async with asyncio.timeout(timeout_s):
        while seen.count(needle) < count:
            chunk = await resp.content.readany()
            assert chunk, f"stream ended early: {seen[-300:]!r}"
            seen += chunk
    return seen


def fresh_flusher(sc: Sidecar, consumer: str, **ledger: int) -> Flusher:
    """A flusher of a 'new process': its own consumer name, sharing the harness's Redis and Postgres."""
    flusher = Flusher(
        sc.svc.state.redis, sc.svc.pool, sc.svc.balances, msgspec.structs.replace(sc.svc.config.ledger, **ledger)
    )
    flusher.consumer = consumer
    return flusher


@pytest_asyncio.fixture
async def isolated(private_redis, migrated_database_url) -> AsyncIterator[Sidecar]:
    """The harness on a Redis of this test's own. Fault tests never share the machine's Redis: every
    other pytest run on the machine FLUSHDBs it as its tests start, which would wipe holds and streams
    out from under a test that waits for a deadline."""
    sc = await start_sidecar(private_redis.url, migrated_database_url)
    try:
        yield sc
    finally:
        await stop_sidecar(sc)


# --- 1. Postgres stopped while calls flow -------------------------------------------------------------


async def test_postgres_outage_loses_nothing_and_doubles_nothing(private_redis, private_postgres) -> None:
    await migrate_url(private_postgres.url)
    # The auth cache is the only thing a cached caller needs from Postgres: make it last the outage.
    sc = await start_sidecar(private_redis.url, private_postgres.url, auth={"cache_ttl_ms": 5000})
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        status, spare = await sc.admin("POST", f"/workspaces/{ws.id}/keys", {"name": "spare", "rate_limit_rpm": 100})
        assert status == 201
        costs = await calls(sc, ws, range(0, 10))  # balance loaded into Redis, key cached
        await sc.flush()
        assert len(await sc.ledger(ws.id)) == 10

        sc.svc.auth.forget_all()
        costs |= await calls(sc, ws, range(10, 11))  # a fresh auth-cache entry, good for 5 s
        private_postgres.stop()
        outage_started = time.monotonic()

        costs |= await calls(sc, ws, range(11, 26))  # 15 calls with Postgres down: Redis is enough

        # A key that is not cached cannot be checked: refused as unavailable, nothing charged.
        code, _, body = await sc.chat(Workspace(ws.id, spare["key"], spare["id"]), call_body(99, False))
        assert code == 503, body
        assert orjson.loads(body)["error"]["type"]

        # Flushing fails, and the entries stay in the stream, pending, for the next attempt.
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            async with asyncio.timeout(15):
                await sc.svc.flusher.flush_once()
        # Nothing was acknowledged: all 16 entries are still in the stream (read and pending for this
        # consumer, or not read at all, depending on where the outage stopped the flush).
        pending = await stream_pending(sc.svc.state.redis, ws.id)
        assert pending["length"] == 16
        assert pending["consumers"] in ({}, {sc.svc.flusher.consumer: 16})
        assert time.monotonic() - outage_started < 4.5, "the outage outlived the auth cache: test too slow"

        private_postgres.restart()
        costs |= await calls(sc, ws, range(26, 30))
        await sc.flush()

        assert len(costs) == 30
        await assert_one_row_per_call(sc, ws.id, costs)
        identity = await sc.assert_identity(ws.id)
        total = sum(costs.values())
        assert identity["debits"] == total and identity["usage_rows"] == 30
        assert (await pg_account(sc.svc.pool, ws.id))[0] == CREDITS - total
        assert await sc.redis_account(ws.id) == (CREDITS - total, 0)
        assert (await stream_pending(sc.svc.state.redis, ws.id))["length"] == 0
    finally:
        await stop_sidecar(sc)


# --- 2. flusher crash between the Postgres commit and the ack ----------------------------------------


async def test_flush_replayed_after_crash_before_ack_doubles_nothing(isolated: Sidecar, monkeypatch) -> None:
    sidecar = isolated
    redis = sidecar.svc.state.redis
    ws = await sidecar.workspace(credits_micro=CREDITS)
    costs = await calls(sidecar, ws, range(6))
    total = sum(costs.values())
    crashed = sidecar.svc.flusher
    crashed.note_workspace(ws.id)

    async def die_before_ack(entries) -> None:
        raise ConnectionError("the process died between the Postgres commit and XACK")

    monkeypatch.setattr(crashed, "_acknowledge", die_before_ack)
    with pytest.raises(ConnectionError):
        await crashed.flush_once()

    # Committed in Postgres, still pending in Redis.
    await assert_one_row_per_call(sidecar, ws.id, costs)
    balance_after_commit, version_after_commit = await pg_account(sidecar.svc.pool, ws.id)
    assert balance_after_commit == CREDITS - total
    assert await stream_pending(redis, ws.id) == {
        "length": 6,
        "pending": 6,
        "consumers": {crashed.consumer: 6},
    }

    # The replacement process claims the dead consumer's entries and replays the batch.
    replay = fresh_flusher(sidecar, "replacement-consumer", claim_idle_ms=50)
    assert replay.consumer != crashed.consumer
    replay.note_workspace(ws.id)
    await asyncio.sleep(0.1)
    assert await replay.flush_once() == 6

    await assert_one_row_per_call(sidecar, ws.id, costs)
    assert await pg_account(sidecar.svc.pool, ws.id) == (balance_after_commit, version_after_commit)
    assert await sidecar.redis_account(ws.id) == (CREDITS - total, 0)
    assert await stream_pending(redis, ws.id) == {"length": 0, "pending": 0, "consumers": {}}
    assert (await sidecar.assert_identity(ws.id))["debits"] == total


# --- 3. a dead consumer's pending entries are reclaimed ----------------------------------------------


async def test_dead_consumers_pending_entries_are_reclaimed(isolated: Sidecar) -> None:
    sidecar = isolated
    redis = sidecar.svc.state.redis
    ws = await sidecar.workspace(credits_micro=CREDITS)
    costs = await calls(sidecar, ws, range(5))
    total = sum(costs.values())

    dead = fresh_flusher(sidecar, "dead-consumer")
    dead.note_workspace(ws.id)
    read = await dead._read_batch()  # XREADGROUP ... then the process dies: no write, no ack
    assert len(read) == 5
    assert await stream_pending(redis, ws.id) == {
        "length": 5,
        "pending": 5,
        "consumers": {"dead-consumer": 5},
    }

    claim_idle_ms = 300
    live = fresh_flusher(sidecar, "live-consumer", claim_idle_ms=claim_idle_ms)
    live.note_workspace(ws.id)
    # Too fresh to be presumed dead: not taken yet.
    assert await live.flush_once() == 0
    assert await sidecar.ledger(ws.id) == []

    deadline = time.monotonic() + 5
    while len(await sidecar.ledger(ws.id)) < 5:
        assert time.monotonic() < deadline, "the dead consumer's entries were never claimed"
        await asyncio.sleep(0.05)
        await live.flush_once()

    await assert_one_row_per_call(sidecar, ws.id, costs)
    assert await stream_pending(redis, ws.id) == {"length": 0, "pending": 0, "consumers": {}}
    assert (await pg_account(sidecar.svc.pool, ws.id))[0] == CREDITS - total
    assert (await sidecar.assert_identity(ws.id))["debits"] == total


# --- 4. Redis restarted empty ------------------------------------------------------------------------


async def test_redis_restarted_empty_rebuilds_balances_once(private_redis, migrated_database_url, monkeypatch) -> None:
    sc = await start_sidecar(private_redis.url, migrated_database_url)
    in_flight_flush: asyncio.Future | None = None
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        costs = await calls(sc, ws, range(4))
        await sc.flush()
        pg_before, _ = await pg_account(sc.svc.pool, ws.id)
        assert pg_before == CREDITS - sum(costs.values())
        generation_before = await sc.svc.state.generation(ws.id)

        # Three more calls, whose flush is in flight when Redis dies: read from the stream, not yet in
        # Postgres. Their debits then exist only in that flush (the balance reloaded from Postgres lacks them).
        in_flight = await calls(sc, ws, range(4, 7))
        flusher, read, resume = sc.svc.flusher, asyncio.Event(), asyncio.Event()
        write = flusher._write

        async def write_after_restart(rows):
            read.set()
            await resume.wait()
            return await write(rows)

        monkeypatch.setattr(flusher, "_write", write_after_restart)
        in_flight_flush = asyncio.ensure_future(flusher.flush_once())
        await asyncio.wait_for(read.wait(), 5)

        # A slow stream is in flight when Redis dies: its hold dies with Redis.
        slow_chunks = 30
        slow_body = call_body(1001, stream=True)
        url = sc.data.make_url("/v1/chat/completions")
        headers = {
            **JSON,
            "Authorization": f"Bearer {ws.key}",
            "x-mock-chunks": str(slow_chunks),
            "x-mock-delay-ms": "50",
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=orjson.dumps(slow_body), headers=headers) as resp,
        ):
            assert resp.status == 200
            slow_id = resp.headers["x-request-id"]
            seen = await read_until(resp, b"tok", 3)
            in_flight_total = sum(in_flight.values())
            assert await sc.redis_account(ws.id) == (pg_before - in_flight_total, expected_hold(slow_body))

            private_redis.kill()
            shutil.rmtree(private_redis.data_dir / "appendonlydir", ignore_errors=True)  # restart EMPTY
            (private_redis.data_dir / "dump.rdb").unlink(missing_ok=True)
            private_redis.restart()
            probe = aioredis.Redis.from_url(private_redis.url)
            try:
                assert await probe.dbsize() == 0, "Redis did not restart empty"
            finally:
                await probe.aclose()

            # 50 concurrent calls against the empty Redis: the balance is loaded from Postgres once.
            outcomes = await asyncio.gather(*(attempt_call(sc, ws, i) for i in range(100, 150)))
            resume.set()  # the in-flight flush commits now, after the reload: its debits are applied once
            assert await asyncio.wait_for(in_flight_flush, 10) == 3
            async with asyncio.timeout(15):
                while not seen.rstrip().endswith(b"[DONE]"):
                    chunk = await resp.content.readany()
                    assert chunk, seen[-300:]
                    seen += chunk
        burst = {rid: cost for code, rid, cost in outcomes if code == 200}
        refused = [(code, body) for code, _, body in outcomes if code != 200]
        # A refusal is only acceptable as "unavailable, nothing charged" (checked by the money below).
        assert all(code == 503 for code, _ in refused), refused
        usage = stream_usage(seen)
        assert usage["completion_tokens"] == slow_chunks
        slow_cost = expected_cost(slow_body, slow_chunks)
        assert INPUT_MICRO * usage["prompt_tokens"] + OUTPUT_MICRO * usage["completion_tokens"] == slow_cost

        if sc.svc.settling:
            await asyncio.wait(list(sc.svc.settling), timeout=10)
        assert await sc.svc.state.generation(ws.id) not in (None, generation_before)
        burst_total = sum(burst.values())
        # Rebuilt from Postgres exactly once: what Postgres had, minus exactly what ran since.
        assert await sc.redis_account(ws.id) == (pg_before - in_flight_total - burst_total - slow_cost, 0)

        await sc.flush()
        all_costs = costs | in_flight | burst | {slow_id: slow_cost}
        await assert_one_row_per_call(sc, ws.id, all_costs)
        [slow_row] = [r for r in await sc.ledger(ws.id) if r["request_id"] == slow_id]
        assert slow_row["hold_lost"] is True and slow_row["output_tokens"] == slow_chunks
        identity = await sc.assert_identity(ws.id)
        assert identity["debits"] == sum(all_costs.values())
        assert (await pg_account(sc.svc.pool, ws.id))[0] == CREDITS - sum(all_costs.values())
        # Redis is back, yet calls were refused: every pooled connection to the dead server fails its
        # first command, and the client is built without retries (sidecar/app.py open_services).
        assert not refused, f"{len(refused)} of 50 calls refused after Redis was back: {refused[0][1]!r}"
    finally:
        if in_flight_flush is not None and not in_flight_flush.done():
            in_flight_flush.cancel()
        await stop_sidecar(sc)


def expected_hold(body: dict) -> int:
    """The price ceiling the handler holds: input bounded by the body's bytes, plus the output cap."""
    return INPUT_MICRO * len(orjson.dumps(body)) + OUTPUT_MICRO * MAX_OUTPUT_TOKENS_DEFAULT


# --- 5. the sidecar process is killed mid-stream -----------------------------------------------------


async def test_sidecar_killed_mid_stream_hold_expires(tmp_path, private_redis, migrated_database_url) -> None:
    redis_url = private_redis.url
    sc = await start_sidecar(redis_url, migrated_database_url)
    processes: list[SidecarProcess] = []
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        provider_url = str(sc.provider.make_url("/v1"))
        fast_expiry = {
            "holds": {"ttl_ms": 3000, "sweep_interval_ms": 200, "settle_budget_ms": 400},
            "upstream": {"total_timeout_ms": 1000, "first_byte_timeout_ms": 1000, "usage_wait_after_hangup_ms": 0},
            "server": {"drain_timeout_ms": 500},
        }
        first = await SidecarProcess.serve(
            tmp_path / "first", redis_url, migrated_database_url, provider_url, **fast_expiry
        )
        processes.append(first)

        body = call_body(7, stream=True)
        headers = {**JSON, "Authorization": f"Bearer {ws.key}", "x-mock-chunks": "100", "x-mock-delay-ms": "50"}
        async with aiohttp.ClientSession() as http:
            resp = await http.post(first.base_url + "/chat/completions", data=orjson.dumps(body), headers=headers)
            try:
                assert resp.status == 200, await resp.text()
                request_id = resp.headers["x-request-id"]
                await read_until(resp, b"tok", 3)
                hold = expected_hold(body)
                assert await sc.redis_account(ws.id) == (CREDITS, hold)
                first.kill()  # SIGKILL mid-stream: no settle, no flush, no goodbye
                killed_at = time.monotonic()
            finally:
                resp.close()
        assert first.process.returncode == -signal.SIGKILL
        assert await sc.redis_account(ws.id) == (CREDITS, hold), "the hold must outlive its sidecar"

        second = await SidecarProcess.serve(
            tmp_path / "second", redis_url, migrated_database_url, provider_url, **fast_expiry
        )
        processes.append(second)
        # The second sidecar's sweeper voids the hold at its deadline, its flusher writes the row.
        rows = []
        deadline = time.monotonic() + 15
        while not rows:
            assert time.monotonic() < deadline, "no expired ledger row" + second.log_tail()
            await asyncio.sleep(0.1)
            rows = await sc.ledger(ws.id)
        assert time.monotonic() - killed_at > 2.0, "the hold was voided long before its deadline"
        assert await second.stop() == 0, second.log_tail()

        [row] = await sc.ledger(ws.id)
        assert row["request_id"] == request_id
        assert (row["status"], row["cost_micro"], row["balance_impact_micro"]) == ("expired", 0, 0)
        assert row["hold_micro"] == hold
        assert (row["created_at"] - row["started_at"]).total_seconds() >= 2.9  # not before the 3 s deadline
        assert (await pg_account(sc.svc.pool, ws.id))[0] == CREDITS
        assert await sc.redis_account(ws.id) == (CREDITS, 0)
        # Nothing else to void, nothing left to write.
        assert await sweep_all(sc.svc.state, sc.svc.pool, sc.svc.config.holds) == 0
        identity = await sc.assert_identity(ws.id)
        assert identity["debits"] == 0 and identity["usage_rows"] == 1
    finally:
        for process in processes:
            process.kill()
        await stop_sidecar(sc)


# --- 6. graceful shutdown on SIGTERM -----------------------------------------------------------------


async def test_sigterm_drains_in_flight_stream_and_flushes(tmp_path, private_redis, migrated_database_url) -> None:
    redis_url = private_redis.url
    sc = await start_sidecar(redis_url, migrated_database_url)
    process: SidecarProcess | None = None
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        drain_s = 5.0
        process = await SidecarProcess.serve(
            tmp_path / "serve",
            redis_url,
            migrated_database_url,
            str(sc.provider.make_url("/v1")),
            server={"drain_timeout_ms": int(drain_s * 1000)},
            holds={"ttl_ms": 25_000, "settle_budget_ms": 2_000},
            upstream={"total_timeout_ms": 10_000, "first_byte_timeout_ms": 2_000},
        )
        chunks = 30
        body = call_body(3, stream=True)
        headers = {**JSON, "Authorization": f"Bearer {ws.key}", "x-mock-chunks": str(chunks), "x-mock-delay-ms": "50"}
        url = process.base_url + "/chat/completions"
        async with aiohttp.ClientSession() as http:
            resp = await http.post(url, data=orjson.dumps(body), headers=headers)
            try:
                assert resp.status == 200, await resp.text()
                request_id = resp.headers["x-request-id"]
                seen = await read_until(resp, b"tok", 2)

                process.signal(signal.SIGTERM)
                terminated_at = time.monotonic()
                await wait_draining(process)

                # A new call during the drain is refused (the listener is closed, or 503).
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as other:
                    try:
                        async with other.post(url, data=orjson.dumps(call_body(4, False)), headers=headers) as refused:
                            assert refused.status == 503, await refused.text()
                    except aiohttp.ClientConnectionError:
                        pass
                assert b"[DONE]" not in seen, "the stream ended before the drain was tested"

                async with asyncio.timeout(drain_s + 5):
                    while not seen.rstrip().endswith(b"[DONE]"):
                        chunk = await resp.content.readany()
                        assert chunk, f"stream cut during the drain: {seen[-300:]!r}" + process.log_tail()
                        seen += chunk
            finally:
                resp.close()
        usage = stream_usage(seen)
        assert usage["completion_tokens"] == chunks
        cost = expected_cost(body, chunks)

        code = await process.wait_exit(drain_s + 10)
        exited_after = time.monotonic() - terminated_at
        assert code == 0, f"exit code {code}" + process.log_tail()
        assert exited_after < drain_s, f"took {exited_after:.1f} s to exit" + process.log_tail()

        # Flushed by the sidecar itself at shutdown: read Postgres directly, flush nothing.
        conn = await asyncpg.connect(migrated_database_url)
        try:
            rows = await conn.fetch("SELECT * FROM ledger WHERE workspace_id = $1 AND kind = 'usage'", ws.id)
        finally:
            await conn.close()
        assert [(r["request_id"], r["status"], r["cost_micro"]) for r in rows] == [(request_id, "completed", cost)]
        assert (await pg_account(migrated_database_url, ws.id))[0] == CREDITS - cost
        assert await sc.svc.state.redis.xlen(keys.stream(ws.id)) == 0
        assert await sc.redis_account(ws.id) == (CREDITS - cost, 0)
        assert (await sc.assert_identity(ws.id))["debits"] == cost
    finally:
        if process is not None:
            process.kill()
        await stop_sidecar(sc)


async def wait_draining(process: SidecarProcess, timeout_s: float = 5.0) -> None:
    """Until the ops port says the process is draining (it stays up while the data plane drains)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(process.ops_url + "/readyz") as resp:
                    if resp.status == 503 and (await resp.json())["checks"].get("draining") == "yes":
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.02)
    raise AssertionError("the sidecar never reported draining" + process.log_tail())
