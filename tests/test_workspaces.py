"""A deployment per workspace (issue 12.2): a data plane restricted to some workspaces
(`server.workspaces`) answers a valid key of any other workspace with 401 in the envelope of the
protocol the client spoke, forwards nothing and holds nothing for it; its flusher leaves the other
workspaces' ledger streams to the deployment that serves them."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import msgspec
import pytest
import pytest_asyncio
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar
from support.scripts import admit

from sidecar.config import ConfigError, parse_config
from sidecar.state import keys
from sidecar.sweeper import sweep_all

CREDITS = 1_000_000


@pytest.fixture
def served_id() -> str:
    return f"ws_served_{secrets.token_hex(4)}"


@pytest_asyncio.fixture
async def restricted(redis_client, redis_url, migrated_database_url, served_id) -> AsyncIterator[Sidecar]:
    sidecar = await start_sidecar(redis_url, migrated_database_url, server={"workspaces": [served_id]})
    try:
        yield sidecar
    finally:
        await stop_sidecar(sidecar)


async def _post(sidecar: Sidecar, path: str, key: str, body: dict, anthropic: bool = False):
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"} if anthropic else {"Authorization": f"Bearer {key}"}
    async with sidecar.http.post(sidecar.data.make_url(path), json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_a_key_of_another_workspace_gets_401_in_its_protocols_envelope(restricted: Sidecar, served_id: str):
    served = await restricted.workspace(credits_micro=CREDITS, ws_id=served_id)
    foreign = await restricted.workspace(credits_micro=CREDITS)  # exists, funded, its key valid
    forwarded_before = len(restricted.recorded)

    status, body = await _post(restricted, "/v1/chat/completions", foreign.key, chat_body())
    assert status == 401
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "workspace_not_served"
    assert foreign.id not in body["error"]["message"] and foreign.key not in str(body)

    anthropic = {"model": "claude-test", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    status, body = await _post(restricted, "/v1/messages", foreign.key, anthropic, anthropic=True)
    assert status == 401
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"

    async with restricted.http.get(
        restricted.data.make_url("/v1/models"), headers={"Authorization": f"Bearer {foreign.key}"}
    ) as resp:
        assert resp.status == 401
    # Asked again within the auth cache's lifetime: still refused (the cached answer is checked too).
    status, _ = await _post(restricted, "/v1/chat/completions", foreign.key, chat_body())
    assert status == 401

    assert len(restricted.recorded) == forwarded_before, "nothing went upstream for the foreign key"
    assert await restricted.svc.state.active_holds(foreign.id) == 0
    assert await restricted.ledger(foreign.id) == []

    # The served workspace's key works and is billed.
    status, body = await _post(restricted, "/v1/chat/completions", served.key, chat_body())
    assert status == 200, body
    identity = await restricted.assert_identity(served.id)
    assert identity["debits"] > 0


async def test_the_flusher_leaves_other_workspaces_streams_alone(
    restricted: Sidecar, sidecar: Sidecar, served_id: str, redis_client
):
    """Two deployments on one Redis and Postgres: the restricted one flushes its workspace's stream,
    and not the other's, which the deployment serving every workspace flushes."""
    served = await restricted.workspace(credits_micro=CREDITS, ws_id=served_id)
    other = await sidecar.workspace(credits_micro=CREDITS)
    assert (await _post(restricted, "/v1/chat/completions", served.key, chat_body()))[0] == 200
    assert (await _post(sidecar, "/v1/chat/completions", other.key, chat_body()))[0] == 200

    flusher = restricted.svc.flusher
    flusher.config = msgspec.structs.replace(flusher.config, workspace_refresh_ms=0)  # list workspaces now
    for _ in range(20):
        await flusher.flush_once()
    assert await redis_client.xlen(keys.stream(served.id)) == 0
    assert len(await restricted.ledger(served.id)) == 1
    assert await redis_client.xlen(keys.stream(other.id)) == 1, "another deployment's stream was read"
    assert await restricted.ledger(other.id) == []

    await sidecar.flush()
    assert len(await sidecar.ledger(other.id)) == 1


async def _expiring_hold(sidecar: Sidecar, ws, hold_id: str) -> None:
    meta = {
        "event_id": f"00000000-0000-0000-0000-{hold_id[-12:]}",
        "status": "expired",
        "workspace_id": ws.id,
        "key_id": ws.key_id,
        "request_id": hold_id,
        "model": "gpt-4o-mini",
        "hold_micro": 5_000,
        "started_at": 1,
    }
    result = await admit(
        sidecar.svc.state, ws.id, ceiling=5_000, limit=10, hold_id=hold_id, key_id=ws.key_id, hold_ttl_ms=1,
        meta=msgspec.json.encode(meta),
    )  # fmt: skip
    assert result.outcome == 0


async def test_the_sweeper_voids_only_its_own_workspaces_holds(restricted: Sidecar, served_id: str):
    served = await restricted.workspace(credits_micro=CREDITS, ws_id=served_id)
    other = await restricted.workspace(credits_micro=CREDITS)
    await _expiring_hold(restricted, served, "0" * 31 + "a")
    await _expiring_hold(restricted, other, "0" * 31 + "b")
    await asyncio.sleep(0.01)
    svc = restricted.svc
    served_only = frozenset(svc.config.server.workspaces)
    assert await sweep_all(svc.state, svc.pool, svc.config.holds, served_only) == 1
    assert await svc.state.active_holds(served.id) == 0
    assert await svc.state.active_holds(other.id) == 1, "another deployment's hold was voided"
    # The deployment serving every workspace voids it.
    assert await sweep_all(svc.state, svc.pool, svc.config.holds) == 1
    assert await svc.state.active_holds(other.id) == 0


def test_a_workspace_listed_twice_is_a_config_error():
    from support.harness import PRICING, base_config

    raw = base_config("http://127.0.0.1:1/v1", server={"workspaces": ["ws_a", "ws_a"]})
    with pytest.raises(ConfigError, match=r"server.workspaces: a workspace is listed twice"):
        parse_config(raw, PRICING, {}, source="tests")
