"""Money-path hardening (issue 15): calls that must not end unpaid because of the sidecar's own limits,
a Redis outage as they end, or a fallback longer than the hold's first deadline.

Prices (tests/support/harness.py): gpt-4o-mini costs 5 micro-credits per input token and 25 per output
token; the mock provider's usage is a pure function of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import uuid

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar

from sidecar.devtools.mock_provider import prompt_tokens_for
from sidecar.proxy.settlement import replay_spool
from sidecar.sweeper import sweep_all

# The money path runs against a single Redis and against a Redis Cluster (conftest.py).
pytestmark = pytest.mark.both_redis

CREDITS = 1_000_000
INPUT_MICRO, OUTPUT_MICRO = 5, 25
JSON = {"Content-Type": "application/json"}


async def _stream(sc: Sidecar, key: str, body: dict, headers: dict) -> bytes:
    async with sc.http.post(
        sc.data.make_url("/v1/chat/completions"),
        data=orjson.dumps(body),
        headers={"Authorization": f"Bearer {key}", **JSON, **headers},
    ) as resp:
        assert resp.status == 200, await resp.read()
        return await resp.read()


async def _spooled_call(sc: Sidecar, private_redis, key: str, want: int = 1) -> dict:
    """A stream that ends while Redis is down: its settlement waits in the spool (`want` files in all)."""
    body = chat_body("spool me", stream=True, stream_options={"include_usage": True})
    headers = {"Authorization": f"Bearer {key}", **JSON, "x-mock-chunks": "10", "x-mock-delay-ms": "50"}
    async with sc.http.post(sc.data.make_url("/v1/chat/completions"), data=orjson.dumps(body), headers=headers) as resp:
        seen = await asyncio.wait_for(resp.content.readany(), 5)
        private_redis.kill()
        seen += await asyncio.wait_for(resp.read(), 10)
    assert b"[DONE]" in seen
    for _ in range(100):
        if sc.svc.spool.size() == want:
            break
        await asyncio.sleep(0.05)
    assert sc.svc.spool.size() == want
    return body


# --- 15.3: the sidecar's own cut-offs bill what was observed ------------------------------------------


async def test_total_timeout_cut_bills_what_was_relayed(redis_client, redis_url, migrated_database_url) -> None:
    sc = await start_sidecar(redis_url, migrated_database_url, upstream={"total_timeout_ms": 800})
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        body = chat_body("cut me off", stream=True, max_tokens=100)
        raw = await _stream(sc, ws.key, body, {"x-mock-chunks": "60", "x-mock-delay-ms": "40"})
        assert b"tok3" in raw and b"[DONE]" not in raw
        assert b"total timeout" in raw, "the client is told the sidecar cut the stream"
        [row] = await sc.ledger_eventually(ws.id)
        assert row["status"] == "cancelled" and row["estimated"] is True
        assert "total timeout" in row["error"]
        # Tokens were relayed: what was observed is billed, never 0.
        assert row["output_tokens"] >= 3
        assert 0 < row["cost_micro"] <= row["hold_micro"]
        identity = await sc.assert_identity(ws.id)
        assert identity["debits"] == row["cost_micro"]
    finally:
        await stop_sidecar(sc)


async def test_idle_timeout_cut_bills_what_was_relayed(redis_client, redis_url, migrated_database_url) -> None:
    sc = await start_sidecar(redis_url, migrated_database_url, upstream={"idle_timeout_ms": 300})
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        body = chat_body("stall after the role chunk", stream=True)
        raw = await _stream(sc, ws.key, body, {"x-mock-chunks": "5", "x-mock-delay-ms": "1500"})
        assert b"went idle" in raw
        [row] = await sc.ledger_eventually(ws.id)
        assert row["status"] == "cancelled" and "idle" in row["error"]
        assert row["cost_micro"] > 0, "the input was sent and used: the call is not free"
        await sc.assert_identity(ws.id)
    finally:
        await stop_sidecar(sc)


# --- 15.1: a Redis outage as the call ends: retried, then spooled, then settled once ------------------


async def test_redis_down_at_settlement_is_spooled_and_settled_once(private_redis, migrated_database_url) -> None:
    sc = await start_sidecar(private_redis.url, migrated_database_url, holds={"settle_budget_ms": 1000})
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        body = chat_body("finish while redis is down", stream=True, stream_options={"include_usage": True})
        headers = {"Authorization": f"Bearer {ws.key}", **JSON, "x-mock-chunks": "20", "x-mock-delay-ms": "40"}
        async with sc.http.post(
            sc.data.make_url("/v1/chat/completions"), data=orjson.dumps(body), headers=headers
        ) as resp:
            assert resp.status == 200
            seen = b""
            while seen.count(b"tok") < 3:
                seen += await asyncio.wait_for(resp.content.readany(), 5)
            private_redis.kill()  # Redis dies while tokens flow; the stream itself needs no Redis
            seen += await asyncio.wait_for(resp.read(), 10)
        assert b"[DONE]" in seen, "the client got its whole answer"

        for _ in range(100):  # the settle budget (1 s) runs out, then the settlement is spooled
            if sc.svc.spool.size() == 1:
                break
            await asyncio.sleep(0.05)
        assert sc.svc.spool.size() == 1
        [spooled] = sc.svc.spool.pending(10)
        copy = spooled.read_bytes()

        private_redis.restart()  # AOF: the hold is still there
        assert await replay_spool(sc.svc) == 1
        assert sc.svc.spool.size() == 0

        # A replay whose first try did land (its reply lost) changes nothing.
        spooled.write_bytes(copy)
        assert await replay_spool(sc.svc) == 1
        assert sc.svc.spool.size() == 0

        [row] = await sc.ledger_eventually(ws.id)
        expected = INPUT_MICRO * prompt_tokens_for(body) + OUTPUT_MICRO * 20
        assert row["status"] == "completed" and row["cost_micro"] == expected
        identity = await sc.assert_identity(ws.id)
        assert identity["debits"] == expected and identity["usage_rows"] == 1
    finally:
        with contextlib.suppress(Exception):
            await stop_sidecar(sc)


# --- 15.2: a fallback over several stalled targets outlives the hold's first deadline ---------------


async def _stalling_provider() -> TestServer:
    """Accepts the call and never answers: each attempt on it waits out the first-byte timeout."""

    async def stall(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stall)
    server = TestServer(app)
    await server.start_server()
    return server


async def test_fallback_over_stalled_targets_keeps_its_hold(redis_client, redis_url, migrated_database_url) -> None:
    stalling = await _stalling_provider()
    stall_url = str(stalling.make_url("/v1"))
    timing = {
        # A hold outlives one attempt; three stalled attempts and a stream take longer than that.
        "upstream": {"first_byte_timeout_ms": 800, "total_timeout_ms": 2500, "usage_wait_after_hangup_ms": 0},
        "server": {"drain_timeout_ms": 100},
        "holds": {"ttl_ms": 3800, "settle_budget_ms": 300},
    }
    common = {"protocol": "openai", "base_url": stall_url, "api_key_env": "MOCK_PLATFORM_KEY"}
    stalls = [{"name": f"stall{i}", **common} for i in range(3)]
    targets = [{"provider": f"stall{i}", "upstream_model": "gpt-4o-mini", "price": "gpt-4o-mini"} for i in range(3)]
    model = {
        "name": "slow-fallback",
        "targets": [*targets, {"provider": "mock", "upstream_model": "gpt-4o-mini", "price": "gpt-4o-mini"}],
        "max_output_tokens_default": 100,
        "context_window_tokens": 128000,
    }
    sc = await start_sidecar(redis_url, migrated_database_url, more_providers=stalls, more_models=[model], **timing)
    stop = asyncio.Event()

    async def sweep_while_running() -> None:
        while not stop.is_set():
            await sweep_all(sc.svc.state, sc.svc.pool, sc.svc.config.holds)
            await asyncio.sleep(0.1)

    sweeper = asyncio.create_task(sweep_while_running())
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        body = chat_body("fall back three times", model="slow-fallback", stream=True)
        raw = await _stream(sc, ws.key, body, {"x-mock-chunks": "28", "x-mock-delay-ms": "80"})
        assert b"[DONE]" in raw
        stop.set()
        await sweeper
        [row] = await sc.ledger_eventually(ws.id)
        assert row["status"] == "completed", "a running call's hold was voided by the sweeper"
        assert row["attempts"] == 4 and row["cost_micro"] > 0
        await sc.assert_identity(ws.id)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await sweeper
        await stop_sidecar(sc)
        await stalling.close()


# --- the spool directory must be writable at start ---------------------------------------------------


def test_spool_refuses_an_unwritable_directory(tmp_path) -> None:
    from sidecar.proxy.spool import Spool

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    spool = Spool(blocker / "spool", max_entries=10)
    try:
        spool.open()
    except OSError:
        pass
    else:
        raise AssertionError("a spool under a regular file cannot be created")
    good = Spool(tmp_path / "spool", max_entries=1)
    good.open()
    assert good.put("a" * 32, {"x": 1}) is True
    assert good.put("b" * 32, {"x": 2}) is False, "the spool is bounded"
    shutil.rmtree(tmp_path / "spool")


# --- 15.19: a shutdown's cancellation cannot turn a completed call into a cancelled one at 0 --------


async def test_cancellation_during_settlement_keeps_the_completed_outcome(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    real_settle = sidecar.svc.state.settle
    settling = asyncio.Event()

    async def slow_settle(**kwargs):
        settling.set()
        await asyncio.sleep(0.3)
        return await real_settle(**kwargs)

    sidecar.svc.state.settle = slow_settle
    body = chat_body("complete, then shut down", stream=True, stream_options={"include_usage": True})
    headers = {"Authorization": f"Bearer {ws.key}", **JSON, "x-mock-chunks": "6"}
    async with sidecar.http.post(
        sidecar.data.make_url("/v1/chat/completions"), data=orjson.dumps(body), headers=headers
    ) as resp:
        seen = b""
        while b"[DONE]" not in seen:
            seen += await asyncio.wait_for(resp.content.readany(), 5)
        await asyncio.wait_for(settling.wait(), 5)
        # A shutdown past its drain time: the handler is cancelled while its settlement runs.
        sidecar.svc.draining = True
        resp.close()
    sidecar.svc.state.settle = real_settle
    sidecar.svc.draining = False
    [row] = await sidecar.ledger_eventually(ws.id)
    assert row["status"] == "completed"
    assert row["cost_micro"] == INPUT_MICRO * prompt_tokens_for(body) + OUTPUT_MICRO * 6
    await sidecar.assert_identity(ws.id)


async def test_a_spooled_settlement_outlives_its_holds_deadline(private_redis, migrated_database_url) -> None:
    """Redis stays down past the hold's deadline; when it is back the sweeper leaves the hold alone for
    `holds.sweep_grace_ms`, so the spooled settlement lands and the call is billed, not expired at 0."""
    timing = {
        "upstream": {"first_byte_timeout_ms": 500, "total_timeout_ms": 1500, "usage_wait_after_hangup_ms": 0},
        "server": {"drain_timeout_ms": 100},
        "holds": {"ttl_ms": 2500, "settle_budget_ms": 300, "sweep_grace_ms": 5000},
    }
    sc = await start_sidecar(private_redis.url, migrated_database_url, **timing)
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        body = await _spooled_call(sc, private_redis, ws.key)
        await asyncio.sleep(2.6)  # past the hold's deadline while Redis is still down
        private_redis.restart()
        assert await sweep_all(sc.svc.state, sc.svc.pool, sc.svc.config.holds) == 0, "within the grace"
        assert await replay_spool(sc.svc) == 1
        [row] = await sc.ledger_eventually(ws.id)
        assert row["status"] == "completed"
        assert row["cost_micro"] == INPUT_MICRO * prompt_tokens_for(body) + OUTPUT_MICRO * 10
        await sc.assert_identity(ws.id)
    finally:
        with contextlib.suppress(Exception):
            await stop_sidecar(sc)


async def test_at_shutdown_a_stuck_settlement_spools_at_the_cutoff(private_redis, migrated_database_url) -> None:
    """The settle budget may be longer than the pod's grace period: once shutdown sets the cutoff, a
    settlement still waiting for Redis goes to the spool instead of being killed with the process."""
    sc = await start_sidecar(
        private_redis.url, migrated_database_url, holds={"settle_budget_ms": 20_000, "ttl_ms": 60_000}
    )
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        body = chat_body("finish during shutdown", stream=True, stream_options={"include_usage": True})
        headers = {"Authorization": f"Bearer {ws.key}", **JSON, "x-mock-chunks": "10", "x-mock-delay-ms": "30"}
        loop = asyncio.get_running_loop()
        async with sc.http.post(
            sc.data.make_url("/v1/chat/completions"), data=orjson.dumps(body), headers=headers
        ) as resp:
            seen = await asyncio.wait_for(resp.content.readany(), 5)
            private_redis.kill()
            sc.svc.settle_cutoff_s = loop.time() + 0.5  # as Runtime.shutdown sets it
            started = loop.time()
            seen += await asyncio.wait_for(resp.read(), 10)
        assert b"[DONE]" in seen
        assert sc.svc.spool.size() == 1, "spooled at the cutoff, not after the 20 s budget"
        assert loop.time() - started < 5
        private_redis.restart()
        assert await replay_spool(sc.svc) == 1
        [row] = await sc.ledger_eventually(ws.id)
        assert row["status"] == "completed"
    finally:
        with contextlib.suppress(Exception):
            await stop_sidecar(sc)


# --- review findings: the spool never drops money in silence, and never stops ---------------------


async def test_a_replay_after_the_sweeper_expired_the_hold_is_set_aside_loudly(
    private_redis, migrated_database_url
) -> None:
    """Redis came back after deadline + grace and the sweeper won the race: the spooled usage is not
    deleted as if replayed, but set aside (dead/) and counted as a lost settlement for the alert."""
    timing = {
        "upstream": {"first_byte_timeout_ms": 500, "total_timeout_ms": 1500, "usage_wait_after_hangup_ms": 0},
        "server": {"drain_timeout_ms": 100},
        "holds": {"ttl_ms": 2500, "settle_budget_ms": 300, "sweep_grace_ms": 500},
    }
    sc = await start_sidecar(private_redis.url, migrated_database_url, **timing)
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        await _spooled_call(sc, private_redis, ws.key)
        await asyncio.sleep(3.2)  # Redis down past deadline + grace
        private_redis.restart()
        assert await sweep_all(sc.svc.state, sc.svc.pool, sc.svc.config.holds) == 1
        assert await replay_spool(sc.svc) == 0, "not counted as replayed"
        assert sc.svc.spool.size() == 0
        assert len(list((sc.svc.spool.directory / "dead").iterdir())) == 1, "kept for the operator"
        assert sc.svc.metrics.settlements_lost._value.get() == 1
    finally:
        with contextlib.suppress(Exception):
            await stop_sidecar(sc)


async def test_the_sweeper_waits_out_its_grace_after_redis_comes_back(
    redis_client, redis_url, migrated_database_url
) -> None:
    """At start (and after any Redis outage) the sweeper voids nothing until Redis has answered for
    `holds.sweep_grace_ms`: the spools replay first."""
    from support.scripts import admit

    from sidecar import sweeper

    sc = await start_sidecar(redis_url, migrated_database_url, holds={"sweep_grace_ms": 1500, "sweep_interval_ms": 100})
    stop = asyncio.Event()
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        await sc.svc.balances.ensure_loaded(ws.id)
        admitted = await admit(sc.svc.state, ws.id, ceiling=100, hold_ttl_ms=1, key_id=ws.key_id)
        assert admitted.outcome.name == "ADMITTED"
        await asyncio.sleep(0.05)  # past its deadline already
        task = asyncio.create_task(sweeper.run(sc.svc.state, sc.svc.pool, sc.svc.config.holds, sc.svc.metrics, stop))
        await asyncio.sleep(0.6)
        assert await sc.svc.state.active_holds(ws.id) == 1, "not voided within the grace after start"
        for _ in range(60):  # bounded: 3 s
            if await sc.svc.state.active_holds(ws.id) == 0:
                break
            await asyncio.sleep(0.05)
        assert await sc.svc.state.active_holds(ws.id) == 0, "voided once the grace has passed"
        stop.set()
        await task
    finally:
        stop.set()
        await stop_sidecar(sc)


async def test_a_torn_spool_file_is_set_aside_and_replay_goes_on(private_redis, migrated_database_url) -> None:
    sc = await start_sidecar(private_redis.url, migrated_database_url, holds={"settle_budget_ms": 300})
    try:
        ws = await sc.workspace(credits_micro=CREDITS)
        torn = sc.svc.spool.directory / ("0" * 32 + ".json")
        torn.write_bytes(b'{"ws": "x", "hol')
        body = await _spooled_call(sc, private_redis, ws.key, want=2)
        private_redis.restart()
        assert await replay_spool(sc.svc) == 1, "the good file behind the torn one is replayed"
        assert sc.svc.spool.size() == 0 and (sc.svc.spool.directory / "dead" / torn.name).exists()
        [row] = await sc.ledger_eventually(ws.id)
        assert row["status"] == "completed"
        assert row["cost_micro"] == INPUT_MICRO * prompt_tokens_for(body) + OUTPUT_MICRO * 10
    finally:
        with contextlib.suppress(Exception):
            await stop_sidecar(sc)


async def test_a_postgres_outage_while_settlement_reloads_a_lost_balance_spools_the_call(
    sidecar: Sidecar, redis_client
) -> None:
    """Redis lost the workspace during the call and Postgres is restarting as it settles: the settlement
    is retried and then spooled, never dropped (and the client's answer is not a 500)."""
    import asyncpg

    from sidecar.state import keys

    ws = await sidecar.workspace(credits_micro=CREDITS)
    real_settle, real_load = sidecar.svc.state.settle, sidecar.svc.balances.ensure_loaded

    async def settle_after_redis_lost_everything(**kwargs):
        await redis_client.delete(keys.acct(ws.id), keys.holds(ws.id), keys.hold_deadlines(ws.id), keys.settled(ws.id))
        sidecar.svc.state.settle = real_settle
        return await real_settle(**kwargs)

    async def postgres_restarting(_ws):
        raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")

    sidecar.svc.state.settle = settle_after_redis_lost_everything
    sidecar.svc.balances.ensure_loaded = postgres_restarting
    try:
        status, _, _ = await sidecar.chat(ws, chat_body("finish"))
    finally:
        sidecar.svc.balances.ensure_loaded = real_load
    assert status == 200, "the provider answered; the client gets it"
    assert sidecar.svc.spool.size() == 1, "the settlement waits in the spool"
    assert await replay_spool(sidecar.svc) == 1
    [row] = await sidecar.ledger_eventually(ws.id)
    assert row["status"] == "completed" and row["cost_micro"] > 0


async def test_a_settlement_whose_reply_was_lost_reports_no_cost_rather_than_zero(sidecar: Sidecar) -> None:
    """The settle script ran, its reply was lost, the retry finds the hold resolved: the answer carries no
    cost header (unknown here) instead of a wrong 0, and the call is billed once (found by make chaos)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    ws = await sidecar.workspace(credits_micro=CREDITS)
    real_settle = sidecar.svc.state.settle

    async def reply_lost_once(**kwargs):
        await real_settle(**kwargs)
        sidecar.svc.state.settle = real_settle
        raise RedisConnectionError("connection lost after the script ran")

    sidecar.svc.state.settle = reply_lost_once
    body = chat_body("lose my reply")
    status, headers, _ = await sidecar.chat(ws, body)
    assert status == 200
    assert "x-sidecar-cost-micro" not in headers and "x-sidecar-cost" not in headers
    [row] = await sidecar.ledger_eventually(ws.id)
    assert row["status"] == "completed"
    assert row["cost_micro"] == INPUT_MICRO * prompt_tokens_for(body) + OUTPUT_MICRO * 8
    assert (await sidecar.assert_identity(ws.id))["debits"] == row["cost_micro"]


# --- a process dies mid-call, then Redis loses the hold: the journal still records the call ----------


async def test_a_dead_process_call_whose_hold_redis_lost_is_recorded_expired(sidecar: Sidecar, redis_client) -> None:
    """The double fault `make chaos` found: the process serving a call is SIGKILLed, then Redis restarts
    without its AOF before the hold's deadline. The dead process's journal (proxy/inflight.py) lets the
    next process record the call `expired` at 0, once; a hold still held is left to the sweeper."""
    from support.scripts import admit

    from sidecar.proxy.inflight import Inflight
    from sidecar.proxy.settlement import recover_orphans
    from sidecar.state import keys

    ws = await sidecar.workspace(credits_micro=CREDITS)
    await sidecar.svc.balances.ensure_loaded(ws.id)
    dead = Inflight(sidecar.svc.spool.directory)  # the process that will die
    dead.open()
    # Fresh ids: the ledger keeps each event id once per database, and this test runs once per Redis.
    held, lost = uuid.uuid4().hex, uuid.uuid4().hex
    for hold_id in (held, lost):
        admitted = await admit(sidecar.svc.state, ws.id, ceiling=100, hold_id=hold_id, key_id=ws.key_id)
        assert admitted.outcome.name == "ADMITTED"
        template = orjson.dumps(
            {
                "event_id": f"{hold_id[:8]}-{hold_id[8:12]}-{hold_id[12:16]}-{hold_id[16:20]}-{hold_id[20:]}",
                "status": "expired",
                "workspace_id": ws.id,
                "key_id": ws.key_id,
                "request_id": hold_id,
                "protocol": "openai_chat",
                "model": "gpt-4o-mini",
                "upstream_model": "gpt-4o-mini",
                "attempts": 1,
                "input_tokens": 0,
                "output_tokens": 0,
                "cache_read_tokens": 0,
                "cache_write_5m_tokens": 0,
                "cache_write_1h_tokens": 0,
                "reasoning_tokens": 0,
                "upstream_cost_micro": 0,
                "hold_micro": 100,
                "byok": False,
                "estimated": False,
                "started_at": 1,
                "ended_at": 2,
            }
        )
        dead.admitted(hold_id, ws.id, template)
    assert await recover_orphans(sidecar.svc) == 0, "its process still lives: nothing is touched"
    os.close(dead._lock_fd)  # SIGKILL: the kernel drops the lock
    # Redis restarted without its AOF took the second hold (and nothing else matters here).
    await redis_client.hdel(keys.holds(ws.id), lost)
    await redis_client.zrem(keys.hold_deadlines(ws.id), lost)
    await redis_client.hincrby(keys.acct(ws.id), "held", -100)
    assert await recover_orphans(sidecar.svc) == 1
    assert await recover_orphans(sidecar.svc) == 0, "recorded once"
    [row] = await sidecar.ledger_eventually(ws.id)
    assert row["request_id"] == lost and row["status"] == "expired" and row["cost_micro"] == 0
    assert await sidecar.svc.state.active_holds(ws.id) == 1, "the held one is the sweeper's"
    assert [o.hold_id for o in sidecar.svc.inflight.orphans()] == [held], "only the held call stays open"
