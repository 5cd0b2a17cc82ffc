"""Redis Cluster: selected by the URL, every key of a workspace on one shard, and a primary that fails
over to its replica mid-load loses no settled event and no hold (its workspaces are reloaded).

The money-path tests themselves run against the cluster too (the `both_redis` marker, conftest.py)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from redis.cluster import key_slot
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar
from support.redis_cluster import RedisClusterProcesses, running_cluster

from sidecar.observability.metrics import Metrics
from sidecar.ops import check_redis_safety, eviction_policy, eviction_problem
from sidecar.proxy.settlement import replay_spool
from sidecar.state import keys, servers
from sidecar.state.store import State

pytestmark = pytest.mark.cluster  # make test-cluster

CALLS = 120


def test_the_cluster_is_chosen_by_the_url() -> None:
    assert servers.is_cluster_url("redis+cluster://10.0.0.1:6379,10.0.0.2:6380")
    assert servers.is_cluster_url("rediss+cluster://user:secret@redis.internal:6380")
    assert not servers.is_cluster_url("redis://127.0.0.1:6379/0")
    plain, nodes = servers.cluster_startup_nodes("rediss+cluster://user:secret@a.internal:6380,b.internal:6381")
    assert plain == "rediss://user:secret@a.internal:6380"
    assert [(n.host, n.port) for n in nodes] == [("a.internal", 6380), ("b.internal", 6381)]
    with pytest.raises(ValueError, match="host:port"):
        servers.cluster_startup_nodes("redis+cluster://nohostport")


def test_every_key_of_a_workspace_is_in_one_slot() -> None:
    ws = "ws_acme"
    every = [
        keys.acct(ws),
        keys.holds(ws),
        keys.hold_deadlines(ws),
        keys.hold_meta(ws),
        keys.settled(ws),
        keys.applied(ws),
        keys.stream(ws),
        keys.dead_letters(ws),
        keys.rate(ws, "k1"),
        keys.tokens(ws, "k1"),
        keys.idempotency(ws, "k1", "chat", "any:thing{with}braces"),
        keys.hold_keys(ws),
        keys.hold_idempotency(ws),
        keys.expired_holds(ws),
        keys.live_per_key(ws),
        keys.idempotency_bytes(ws),
    ]
    assert {key_slot(k.encode()) for k in every} == {key_slot(keys.acct(ws).encode())}


@pytest.mark.both_redis
async def test_run_ids_are_per_primary(redis_client) -> None:
    state = State(redis_client)
    ids = await state.run_ids()
    assert all(ids.values())
    if servers.is_cluster(redis_client):
        assert len(ids) == 3 and len(set(ids.values())) == 3
        spread = {state.server_of(f"ws_{i}") for i in range(50)}
        assert spread == set(ids), "workspaces spread over every shard"
    else:
        assert list(ids) == [servers.SINGLE]
    assert await state.run_id("ws_a") == ids[state.server_of("ws_a")]


@pytest.fixture
def failover_cluster(tmp_path: Path):
    with running_cluster(tmp_path / "cluster") as cluster:
        yield cluster


async def _failover(cluster: RedisClusterProcesses, primary_port: int) -> None:
    [primary] = [n for n in cluster.nodes if n.port == primary_port]
    replica = cluster.replica_of(primary)
    with replica.client() as c:
        c.execute_command("CLUSTER FAILOVER")
    for _ in range(400):  # the replica takes over once it has every write of the primary
        if replica.role() == "master" and primary.role() == "slave":
            break
        await asyncio.sleep(0.025)
    else:
        raise AssertionError("the failover did not complete")
    await asyncio.to_thread(cluster.wait_healthy)


async def test_a_primary_failing_over_mid_load_loses_no_event_and_no_hold(
    failover_cluster: RedisClusterProcesses, migrated_database_url: str
) -> None:
    # No concurrency limit: every call of the burst is admitted (429s would only thin the load).
    unlimited = {"concurrent_calls_per_key": 0, "concurrent_calls_per_workspace": 0}
    sc: Sidecar = await start_sidecar(failover_cluster.url, migrated_database_url, limits=unlimited)
    try:
        ws = await sc.workspace(credits_micro=10_000_000, rpm=100_000)
        other = await sc.workspace(credits_micro=1_000_000, rpm=100_000)
        assert (await sc.chat(ws, chat_body()))[0] == 200  # loaded: its run_id recorded
        state = sc.svc.state
        owner = state.server_of(ws.id)
        _, loaded_under = await state.load_marks(ws.id)
        assert loaded_under == (await state.run_ids())[owner]
        rng = random.Random(3)

        spans: list[tuple[float, float]] = []

        async def one(i: int) -> tuple[int, str]:
            target = ws if i % 4 else other
            headers = {"x-mock-chunks": str(rng.randint(5, 15)), "x-mock-delay-ms": str(rng.randint(10, 40))}
            started = time.monotonic()
            code, resp_headers, _ = await sc.chat(target, chat_body(f"call {i}", stream=i % 2 == 0), headers=headers)
            spans.append((started, time.monotonic()))
            return code, resp_headers.get("x-request-id", "")

        calls = [asyncio.ensure_future(one(i)) for i in range(CALLS)]
        await asyncio.sleep(0.15)  # mid-load: holds live on the shard that fails over
        switch_started = time.monotonic()
        await _failover(failover_cluster, int(owner.rsplit(":", 1)[1]))
        switch_ended = time.monotonic()
        results = await asyncio.gather(*calls)
        spanning = [1 for started, ended in spans if started < switch_started and ended > switch_ended]
        assert spanning, "some calls held across the failover and settled after it"
        admitted = {rid for code, rid in results if code == 200}
        # A call admitted before or after the failover is served; one that hit the switch itself may be
        # refused (503) before anything was held or sent. None may be charged without a row.
        assert {code for code, _ in results} <= {200, 503}
        assert len(admitted) >= CALLS // 2
        # A settlement the switch delayed past its budget waits in the spool; the spool loop replays it.
        for _ in range(50):
            if sc.svc.spool.size() == 0:
                break
            await replay_spool(sc.svc)
            await asyncio.sleep(0.1)
        assert sc.svc.spool.size() == 0
        await sc.svc.balances.revalidate(await sc.workspace_ids())  # the flusher does this each round
        new_owner_run = (await state.run_ids())[state.server_of(ws.id)]
        assert new_owner_run != loaded_under, "a new primary serves the workspace's slot"
        _, reloaded_under = await state.load_marks(ws.id)
        assert reloaded_under == new_owner_run, "the failover was detected and the workspace reloaded"
        rows = {}
        for w in (ws, other):
            await sc.assert_identity(w.id)  # Redis and Postgres agree, nothing left held
            rows.update(await sc.rows_per_request(w.id))
        first = 1  # the call that loaded the workspace before the load
        assert admitted <= set(rows), "every served call has its settled event in the ledger"
        assert set(rows.values()) == {1}, "no event twice"
        assert len(rows) == len(admitted) + first
    finally:
        await stop_sidecar(sc)


async def test_the_eviction_and_aof_checks_cover_every_primary(redis_cluster: RedisClusterProcesses) -> None:
    client = servers.from_url(redis_cluster.url)
    await servers.ready(client)
    metrics = Metrics()
    [evicting, *_] = redis_cluster.current_primaries()
    try:
        assert await check_redis_safety(client, metrics) == ("noeviction", False)
        with evicting.client() as c:
            c.config_set("maxmemory-policy", "allkeys-lru")  # one shard of three may evict
        assert await eviction_policy(client) == "allkeys-lru"
        assert eviction_problem(await eviction_policy(client)) is not None
    finally:
        with evicting.client() as c:
            c.config_set("maxmemory-policy", "noeviction")
        await client.aclose()
