"""A flood of bad keys does not reach Postgres (issue 8.8): keys of the wrong shape cost no query,
an unknown key is remembered (bounded, apart from the known keys), and a source address that keeps
failing is refused with 429 in the protocol's envelope while other addresses are served."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio
from support.harness import Sidecar, start_sidecar, stop_sidecar

from sidecar.auth import Authenticator, new_key

FAILED_AUTH_MAX = 10


@pytest_asyncio.fixture
async def limited(redis_client, redis_url, migrated_database_url) -> AsyncIterator[Sidecar]:
    sidecar = await start_sidecar(
        redis_url, migrated_database_url, auth={"failed_auth_max": FAILED_AUTH_MAX, "failed_auth_window_ms": 60_000}
    )
    try:
        yield sidecar
    finally:
        await stop_sidecar(sidecar)


@pytest_asyncio.fixture
async def unlimited(redis_client, redis_url, migrated_database_url) -> AsyncIterator[Sidecar]:
    sidecar = await start_sidecar(redis_url, migrated_database_url, auth={"failed_auth_max": 0, "cache_ttl_ms": 5000})
    try:
        yield sidecar
    finally:
        await stop_sidecar(sidecar)


async def _models(sidecar: Sidecar, key: str, path: str = "/v1/models", local_host: str | None = None):
    connector = aiohttp.TCPConnector(local_addr=(local_host, 0)) if local_host else None
    async with aiohttp.ClientSession(connector=connector) as http:
        headers = {"x-api-key": key} if path == "/v1/messages" else {"Authorization": f"Bearer {key}"}
        method = "POST" if path != "/v1/models" else "GET"
        async with http.request(method, sidecar.data.make_url(path), headers=headers, json={}) as response:
            return response.status, response.headers.copy(), await response.json()


async def test_keys_not_shaped_like_keys_cost_no_lookup(unlimited: Sidecar):
    before = unlimited.svc.auth.lookups
    for junk in ["sk-sc-short", "x" * 300, "sk-sc-" + "!" * 43, "Bearer", "sk-" + secrets.token_urlsafe(32)]:
        status, _, body = await _models(unlimited, junk)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert unlimited.svc.auth.lookups == before


async def test_an_unknown_key_is_looked_up_once_per_ttl(unlimited: Sidecar):
    unknown = new_key()
    before = unlimited.svc.auth.lookups
    for _ in range(20):
        status, _, _ = await _models(unlimited, unknown)
        assert status == 401
    assert unlimited.svc.auth.lookups == before + 1


async def test_a_source_that_keeps_failing_is_refused_without_lookups_and_others_are_served(limited: Sidecar):
    ws = await limited.workspace(credits_micro=1_000_000)
    before = limited.svc.auth.lookups
    for _ in range(FAILED_AUTH_MAX):
        status, _, _ = await _models(limited, new_key())
        assert status == 401
    for path in ("/v1/models", "/v1/chat/completions", "/v1/messages"):
        status, headers, body = await _models(limited, new_key(), path)
        assert status == 429, body
        assert int(headers["Retry-After"]) >= 1
        if path == "/v1/messages":
            assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
        else:
            assert body["error"]["type"] == "rate_limit_error"
            assert body["error"]["code"] == "too_many_failed_authentications"
    assert limited.svc.auth.lookups == before + FAILED_AUTH_MAX  # the refused ones cost nothing
    # Another address is not affected (the whole 127/8 is loopback on Linux).
    status, _, _ = await _models(limited, ws.key, local_host="127.0.0.2")
    assert status == 200


async def test_successes_do_not_count_as_failures(limited: Sidecar):
    ws = await limited.workspace(credits_micro=1_000_000)
    for _ in range(FAILED_AUTH_MAX * 2):
        status, _, _ = await _models(limited, ws.key)
        assert status == 200


async def test_the_miss_cache_is_bounded_and_cannot_evict_known_keys(unlimited: Sidecar):
    ws = await unlimited.workspace()
    auth = Authenticator(unlimited.svc.pool, cache_ttl_ms=5000, max_entries=100, max_misses=5)
    assert await auth.authenticate(ws.key) is not None
    unknown = [new_key() for _ in range(50)]
    for key in unknown:
        assert await auth.authenticate(key) is None
    lookups = auth.lookups
    assert await auth.authenticate(ws.key) is not None  # still cached: the flood did not evict it
    assert auth.lookups == lookups
    assert await auth.authenticate(unknown[-1]) is None  # among the last five misses: cached
    assert auth.lookups == lookups
    assert await auth.authenticate(unknown[0]) is None  # dropped from the bounded miss cache
    assert auth.lookups == lookups + 1
