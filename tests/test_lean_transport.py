"""The hot path's own Redis transport (state/lean.py): same answers as redis-py, on one pipelined
connection, and the same behaviour when Redis fails (reconnect, NOSCRIPT, a reply that never comes)."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.state import transport
from sidecar.state.batching import ScriptBatcher
from sidecar.state.lean import Endpoint, LeanScripts
from sidecar.state.store import Admission, IdempotencyRecord, SettleOutcome, State

WS = "ws_lean"


async def _admit(state: State, hold_id: str, ceiling_micro: int = 1_000):
    return await state.admit(
        ws=WS,
        key_id="key_1",
        hold_id=hold_id,
        ceiling_micro=ceiling_micro,
        rate_limit=1_000_000,
        window_ms=60_000,
        hold_ttl_ms=60_000,
        idempotency_key=None,
        fingerprint="",
        idempotency_ttl_ms=60_000,
        meta=b"{}",
        unflushed_max=1_000_000,
    )


async def _settle(state: State, hold_id: str, cost_micro: int):
    return await state.settle(
        ws=WS,
        key_id="key_1",
        hold_id=hold_id,
        cost_micro=cost_micro,
        billed=True,
        event=b'{"event_id": "x"}',
        idempotency_key=None,
        idempotency=IdempotencyRecord.FORGET,
        status=0,
        content_type="",
        body=b"",
        idempotency_ttl_ms=60_000,
    )


def test_the_choice_of_transport() -> None:
    single = aioredis.Redis.from_url("redis://127.0.0.1:6390/3")
    endpoint = transport.endpoint_of(single)
    assert endpoint == Endpoint(host="127.0.0.1", port=6390, db=3, reply_timeout_s=5.0)
    assert isinstance(transport.hot_path(single), LeanScripts)
    assert isinstance(transport.hot_path(single, lean=False), ScriptBatcher)
    # TLS and Redis Cluster stay on redis-py.
    assert isinstance(transport.hot_path(aioredis.Redis.from_url("rediss://127.0.0.1:6390/0")), ScriptBatcher)
    cluster = aioredis.RedisCluster(host="127.0.0.1", port=6390)
    assert isinstance(transport.hot_path(cluster), ScriptBatcher)
    unix = transport.endpoint_of(aioredis.Redis.from_url("unix:///tmp/redis.sock?db=2"))
    assert unix is not None and unix.path == "/tmp/redis.sock" and unix.db == 2


async def test_admit_and_settle_hold_the_money_rules_under_concurrency(redis_client, redis_url) -> None:
    state = State(aioredis.Redis.from_url(redis_url), lean=True)
    assert isinstance(state._batcher, LeanScripts)
    try:
        assert await state.load(WS, balance_micro=1_000_000, pg_version=1)
        holds = [f"h{i:04d}" for i in range(400)]
        admitted = await asyncio.gather(*(_admit(state, h) for h in holds))
        assert [a.outcome for a in admitted] == [Admission.ADMITTED] * len(holds)
        assert (await state.account(WS)).held_micro == 400 * 1_000
        costs = {h: random.randrange(0, 1_001) for h in holds}
        # Each hold settled twice at once: exactly one settlement per hold changes anything.
        settled = await asyncio.gather(*(_settle(state, h, costs[h]) for h in holds for _ in range(2)))
        by_hold: dict[str, list] = {}
        for (h, _), r in zip(((h, n) for h in holds for n in range(2)), settled, strict=True):
            by_hold.setdefault(h, []).append(r.outcome)
        assert all(sorted(v) == [SettleOutcome.SETTLED, SettleOutcome.ALREADY_RESOLVED] for v in by_hold.values())
        account = await state.account(WS)
        assert account.held_micro == 0
        assert account.balance_micro == 1_000_000 - sum(costs.values())
        assert len(state._batcher._link.waiting) == 0  # every reply matched its call
    finally:
        await state.aclose()


async def test_the_connection_sends_without_waiting_for_acks(redis_client, redis_url) -> None:
    """TCP_NODELAY: one small write per loop turn must not wait for Nagle or a delayed ACK."""
    runner = transport.hot_path(aioredis.Redis.from_url(redis_url))
    echo = redis_client.register_script("return ARGV[1]")
    try:
        assert await runner.run(echo, [], ["x"]) == b"x"
        sock = runner._link.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        await transport.close(runner)


async def test_replies_stay_in_order_when_callers_are_cancelled(redis_client, redis_url) -> None:
    runner = transport.hot_path(aioredis.Redis.from_url(redis_url))
    echo = redis_client.register_script("return ARGV[1]")
    try:
        tasks = [asyncio.ensure_future(runner.run(echo, [], [str(i)])) for i in range(600)]
        await asyncio.sleep(0)
        for task in tasks[::3]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 3 == 0:
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert result == str(i).encode()
        assert await runner.run(echo, [], ["after"]) == b"after"
    finally:
        await transport.close(runner)


async def test_an_error_reply_fails_only_its_own_call(redis_client, redis_url) -> None:
    runner = transport.hot_path(aioredis.Redis.from_url(redis_url))
    echo = redis_client.register_script("return ARGV[1]")
    broken = redis_client.register_script("return redis.error_reply('BAD nope')")
    try:
        results = await asyncio.gather(
            runner.run(echo, [], ["a"]), runner.run(broken, [], []), runner.run(echo, [], ["b"]), return_exceptions=True
        )
        assert results[0] == b"a" and results[2] == b"b"
        assert isinstance(results[1], ResponseError) and "nope" in str(results[1])
    finally:
        await transport.close(runner)


async def test_scripts_load_again_after_redis_forgot_them(redis_client, redis_url) -> None:
    state = State(aioredis.Redis.from_url(redis_url), lean=True)
    try:
        await state.load(WS, balance_micro=10_000, pg_version=1)
        assert (await _admit(state, "h1")).outcome is Admission.ADMITTED
        await redis_client.script_flush()
        assert (await _admit(state, "h2")).outcome is Admission.ADMITTED
        assert (await _settle(state, "h1", 7)).outcome is SettleOutcome.SETTLED
        assert (await state.account(WS)).balance_micro == 10_000 - 7
    finally:
        await state.aclose()


async def test_a_restarted_redis_is_reconnected_to(private_redis) -> None:
    # redis-py (the checks below) reconnects on its retry; the lean transport by itself.
    client = aioredis.Redis.from_url(
        private_redis.url, retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError]
    )
    state = State(client, lean=True)
    try:
        await state.load(WS, balance_micro=10_000, pg_version=1)
        assert (await _admit(state, "h1")).outcome is Admission.ADMITTED
        private_redis.restart()  # AOF on: the hold survives, the connection and the scripts do not
        assert (await _settle(state, "h1", 5)).outcome is SettleOutcome.SETTLED
        assert (await state.account(WS)).balance_micro == 10_000 - 5
    finally:
        await state.aclose()


async def test_a_dead_redis_fails_the_call_with_redis_errors(private_redis) -> None:
    runner = transport.hot_path(aioredis.Redis.from_url(private_redis.url))
    echo = aioredis.Redis.from_url(private_redis.url).register_script("return ARGV[1]")
    try:
        assert await runner.run(echo, [], ["up"]) == b"up"
        private_redis.kill()
        with pytest.raises(RedisConnectionError):
            await runner.run(echo, [], ["down"])
    finally:
        await transport.close(runner)


async def test_a_reply_that_never_comes_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)  # reads the command, never answers
        await asyncio.sleep(10)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    runner = LeanScripts(Endpoint(host="127.0.0.1", port=port, reply_timeout_s=0.2))
    script = aioredis.Redis().register_script("return 1")
    try:
        async with asyncio.timeout(5):
            with pytest.raises(RedisTimeoutError):
                await runner.run(script, [], [])
    finally:
        await runner.aclose()
        server.close()


async def test_a_closed_transport_refuses_calls(redis_client, redis_url) -> None:
    runner = transport.hot_path(aioredis.Redis.from_url(redis_url))
    echo = redis_client.register_script("return ARGV[1]")
    assert await runner.run(echo, [], ["x"]) == b"x"
    await transport.close(runner)
    with pytest.raises(RedisConnectionError):
        await runner.run(echo, [], ["y"])


async def test_a_primary_demoted_to_replica_is_left_for_a_new_connection(private_redis) -> None:
    admin = aioredis.Redis.from_url(private_redis.url)
    runner = transport.hot_path(aioredis.Redis.from_url(private_redis.url))
    write = admin.register_script("return redis.call('INCR', KEYS[1])")
    try:
        assert await runner.run(write, ["n"], []) == 1
        first = runner._link
        await admin.execute_command("REPLICAOF", "127.0.0.1", "1")  # a failover demoted it
        with pytest.raises(ReadOnlyError):
            await runner.run(write, ["n"], [])
        await admin.execute_command("REPLICAOF", "NO", "ONE")  # the address names a primary again
        assert await runner.run(write, ["n"], []) == 2
        assert runner._link is not first and first.dead
    finally:
        await transport.close(runner)
        await admin.aclose()
