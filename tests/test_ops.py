"""The ops port, and the rule that no secret reaches a log line, a metric, a ledger row or a response."""

from __future__ import annotations

import asyncio
import logging
import subprocess

import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from redis.exceptions import RedisError
from support.harness import ADMIN_TOKEN, PLATFORM_KEY, Sidecar, chat_body, start_sidecar, stop_sidecar

from sidecar.devtools.embedded import find_redis_server, free_port
from sidecar.observability.logging import JsonFormatter
from sidecar.ops import build_ops_app, eviction_policy, eviction_problem


async def test_health_ready_and_metrics(sidecar: Sidecar) -> None:
    ops = TestServer(build_ops_app(sidecar.svc))
    await ops.start_server()
    try:
        ws = await sidecar.workspace(credits_micro=10, rpm=1)
        assert (await sidecar.chat(ws, chat_body()))[0] == 402  # refused before any write: no rate slot used
        assert (await sidecar.chat(ws, chat_body(model="mock-free")))[0] == 200  # free: never gated by balance
        assert (await sidecar.chat(ws, chat_body(model="mock-free")))[0] == 429  # the minute's one request is used
        ws2 = await sidecar.workspace(credits_micro=1_000_000)
        await sidecar.chat(ws2, chat_body(stream=True))
        await sidecar.flush()
        async with sidecar.http.get(ops.make_url("/healthz")) as r:
            assert r.status == 200
        async with sidecar.http.get(ops.make_url("/readyz")) as r:
            ready = await r.json()
            assert r.status == 200 and ready["checks"] == {
                "redis": "ok",
                "scripts": "ok",
                "redis_eviction": "ok",
                "postgres": "ok",
            }
        async with sidecar.http.get(ops.make_url("/metrics")) as r:
            text = await r.text()
        for name in (
            'sidecar_requests_total{model="gpt-4o-mini",route="/v1/chat/completions",status="402"} 1.0',
            'sidecar_requests_total{model="gpt-4o-mini",route="/v1/chat/completions",status="200"} 1.0',
            'sidecar_rate_limited_total{route="/v1/chat/completions"} 1.0',
            'sidecar_payment_required_total{route="/v1/chat/completions"} 1.0',
            'sidecar_settlements_total{status="completed"} 2.0',
            "sidecar_upstream_ttfb_seconds_count",
            "sidecar_upstream_latency_seconds_count",
            "sidecar_overhead_seconds_count",
            'sidecar_tokens_total{model="gpt-4o-mini",token_class="output"} 8.0',
            'sidecar_credits_debited_micro_total{model="gpt-4o-mini"}',
            "sidecar_holds_active 0.0",
            "sidecar_ledger_stream_lag 0.0",
            "sidecar_ledger_flush_batch_rows_count",
            "sidecar_ledger_flush_duration_seconds_count",
            "sidecar_ledger_flush_failures_total 0.0",
        ):
            assert name in text, name
    finally:
        await ops.close()


async def test_no_secret_reaches_logs_metrics_ledger_or_responses(sidecar: Sidecar, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    ws = await sidecar.workspace(credits_micro=1_000_000)
    for headers, body in (
        ({}, chat_body()),
        ({}, chat_body(stream=True)),
        ({"x-mock-status": "401"}, chat_body()),  # the provider refuses the platform key
        ({"x-mock-status": "500"}, chat_body(stream=True)),
        ({"x-mock-cut-after": "2"}, chat_body(stream=True)),
    ):
        code, resp_headers, resp_body = await sidecar.chat(ws, body, headers=headers)
        seen += [str(code), str(dict(resp_headers)), resp_body.decode(errors="replace")]
    wrong = type(ws)(ws.id, ws.key[:-1] + "X", ws.key_id)
    code, resp_headers, resp_body = await sidecar.chat(wrong, chat_body())
    seen += [str(dict(resp_headers)), resp_body.decode()]
    _, keys_listed = await sidecar.admin("GET", f"/workspaces/{ws.id}/keys")
    seen.append(str(keys_listed))
    await sidecar.flush()
    seen += [str(dict(row)) for row in await sidecar.ledger(ws.id)]
    ops = TestServer(build_ops_app(sidecar.svc))
    await ops.start_server()
    try:
        async with sidecar.http.get(ops.make_url("/metrics")) as r:
            seen.append(await r.text())
    finally:
        await ops.close()
    formatter = JsonFormatter()
    seen += [formatter.format(record) for record in caplog.records]
    seen.append(caplog.text)
    everything = "\n".join(seen)
    assert len(caplog.records) > 3
    for secret in (ws.key, wrong.key, PLATFORM_KEY, ADMIN_TOKEN, ws.key[6:]):
        assert secret not in everything
    assert ws.key[-4:] in str(keys_listed)  # only the last 4 characters are ever shown


async def test_not_ready_unless_redis_refuses_to_evict(private_redis, migrated_database_url, caplog) -> None:
    probe = aioredis.Redis.from_url(private_redis.url)
    await probe.config_set("maxmemory-policy", "volatile-lru")  # a managed Redis's usual default
    caplog.set_level(logging.WARNING, logger="sidecar.ops")
    sc = await start_sidecar(private_redis.url, migrated_database_url)
    ops = TestServer(build_ops_app(sc.svc))
    await ops.start_server()
    try:
        assert any("noeviction" in r.getMessage() for r in caplog.records), "no warning at start"
        async with sc.http.get(ops.make_url("/readyz")) as r:
            ready = await r.json()
        assert r.status == 503 and ready["ready"] is False
        assert "volatile-lru" in ready["checks"]["redis_eviction"]
        assert "noeviction" in ready["checks"]["redis_eviction"]
        await probe.config_set("maxmemory-policy", "noeviction")
        async with sc.http.get(ops.make_url("/readyz")) as r:
            assert r.status == 200 and (await r.json())["checks"]["redis_eviction"] == "ok"
    finally:
        await ops.close()
        await stop_sidecar(sc)
        await probe.aclose()


async def test_eviction_policy_is_read_from_info_where_config_is_disabled(tmp_path) -> None:
    port = free_port()
    argv = [str(find_redis_server()), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(tmp_path), "--maxmemory-policy", "allkeys-lru", "--rename-command", "CONFIG", ""]
    server = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = aioredis.Redis(port=port)
    try:
        for _ in range(100):
            try:
                await client.ping()
                break
            except (OSError, RedisError):
                await asyncio.sleep(0.05)
        policy = await eviction_policy(client)
        assert policy == "allkeys-lru"
        assert "allkeys-lru" in eviction_problem(policy)
        assert "could not read" in eviction_problem(None)
    finally:
        await client.aclose()
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)
