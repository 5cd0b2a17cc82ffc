"""BYOK end to end: the customer's own provider keys, sealed, resolved by provider (office over
workspace), injected at runtime, never charged, falling back to the platform key on refusal."""

from __future__ import annotations

import base64
import logging

import pytest
from prometheus_client import generate_latest
from support.harness import (
    ADMIN_TOKEN,
    KEYS_ADMIN_TOKEN,
    PLATFORM_KEY,
    TENANT_ADMIN_TOKEN,
    TEST_KEK,
    Sidecar,
    Workspace,
    chat_body,
    start_sidecar,
    stop_sidecar,
)

from sidecar.app import open_services
from sidecar.byok.rotate import rotate_all
from sidecar.devtools import mock_provider
from sidecar.ledger.migrate import migrate_url

CUSTOMER_KEY = "sk-customer-own-key-abcd"
OFFICE_KEY = "sk-office-own-key-wxyz"


async def add_key(sidecar: Sidecar, ws: str, key: str, office: str | None = None, provider: str = "mock"):
    scope = f"/workspaces/{ws}/offices/{office}" if office else f"/workspaces/{ws}"
    return await sidecar.admin(
        "POST", f"{scope}/byok-keys", {"provider": provider, "key": key}, token=TENANT_ADMIN_TOKEN
    )


def sent_key(sidecar: Sidecar) -> str:
    return sidecar.recorded[-1].headers["authorization"].removeprefix("Bearer ")


async def test_byok_calls_use_the_customers_key_and_never_touch_the_balance(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=0)  # no credits at all: BYOK calls still work
    status, view = await add_key(sidecar, ws.id, CUSTOMER_KEY)
    assert status == 201, view
    assert view["last4"] == "abcd" and view["status"] == "active" and "key" not in view
    assert sidecar.recorded[-1].path == "/v1/models"  # validated against the provider first
    assert sent_key(sidecar) == CUSTOMER_KEY

    code, headers, _ = await sidecar.chat(ws, chat_body(stream=False))
    assert code == 200 and sent_key(sidecar) == CUSTOMER_KEY
    assert (await sidecar.chat(ws, chat_body(stream=True)))[0] == 200
    assert sent_key(sidecar) == CUSTOMER_KEY
    identity = await sidecar.assert_identity(ws.id)
    assert identity["debits"] == 0 and identity["account_balance"] == 0
    rows = await sidecar.ledger(ws.id)
    assert len(rows) == 2 and all(r["byok"] for r in rows)
    assert all(r["cost_micro"] > 0 and r["balance_impact_micro"] == 0 and r["hold_micro"] == 0 for r in rows)
    assert int(headers["x-sidecar-cost-micro"]) == rows[0]["cost_micro"]
    _, listed = await sidecar.admin("GET", f"/workspaces/{ws.id}/byok-keys", token=TENANT_ADMIN_TOKEN)
    assert listed["data"][0]["last_used_at"] is not None


async def test_office_key_overrides_and_deactivation_returns_to_credits(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000, office="paris")
    assert (await add_key(sidecar, ws.id, CUSTOMER_KEY))[0] == 201
    status, office_key = await add_key(sidecar, ws.id, OFFICE_KEY, office="paris")
    assert status == 201 and office_key["scope"] == "office"
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    assert sent_key(sidecar) == OFFICE_KEY  # the caller's key belongs to office paris

    status, _ = await sidecar.admin(
        "POST", f"/workspaces/{ws.id}/offices/paris/byok-keys/{office_key['id']}/deactivate", token=TENANT_ADMIN_TOKEN
    )
    assert status == 200
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    assert sent_key(sidecar) == CUSTOMER_KEY  # the workspace's key now

    [workspace_key] = [
        k
        for k in (await sidecar.admin("GET", f"/workspaces/{ws.id}/byok-keys", token=TENANT_ADMIN_TOKEN))[1]["data"]
        if k["scope"] == "workspace"
    ]
    await sidecar.admin(
        "POST", f"/workspaces/{ws.id}/byok-keys/{workspace_key['id']}/deactivate", token=TENANT_ADMIN_TOKEN
    )
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    assert sent_key(sidecar) == PLATFORM_KEY  # no customer key left: platform key and credits
    identity = await sidecar.assert_identity(ws.id)
    rows = await sidecar.ledger(ws.id)
    assert [r["byok"] for r in rows] == [True, True, False]
    assert identity["debits"] == rows[-1]["cost_micro"] > 0


async def test_refused_customer_key_falls_back_to_credits_and_cools_down(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    assert (await add_key(sidecar, ws.id, CUSTOMER_KEY))[0] == 201
    sidecar.provider.app[mock_provider.REJECTED_KEYS].add(CUSTOMER_KEY)  # revoked at the provider since
    before = len(sidecar.recorded)
    code, _, body = await sidecar.chat(ws, chat_body())
    assert code == 200 and b"tok0" in body, "the client still gets its answer"
    tried = [r.headers["authorization"] for r in list(sidecar.recorded)[before:]]
    assert tried == [f"Bearer {CUSTOMER_KEY}", f"Bearer {PLATFORM_KEY}"]
    identity = await sidecar.assert_identity(ws.id)
    [row] = await sidecar.ledger(ws.id)
    assert row["byok"] is False and row["status"] == "completed"
    assert "abcd" in row["byok_fallback_reason"] and "rejected" in row["byok_fallback_reason"]
    assert identity["debits"] == row["cost_micro"] > 0 and row["hold_micro"] > 0
    metrics = generate_latest(sidecar.svc.metrics.registry).decode()
    assert 'sidecar_byok_fallbacks_total{provider="mock",reason="rejected by the provider"} 1.0' in metrics
    _, listed = await sidecar.admin("GET", f"/workspaces/{ws.id}/byok-keys", token=TENANT_ADMIN_TOKEN)
    assert listed["data"][0]["status"] == "failing" and listed["data"][0]["failure_reason"]

    # During the cool-down the bad key is not tried again.
    before = len(sidecar.recorded)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    assert [r.headers["authorization"] for r in list(sidecar.recorded)[before:]] == [f"Bearer {PLATFORM_KEY}"]
    await sidecar.assert_identity(ws.id)


async def test_fallback_needs_credits_402_otherwise(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=5)
    assert (await add_key(sidecar, ws.id, CUSTOMER_KEY))[0] == 201
    sidecar.provider.app[mock_provider.REJECTED_KEYS].add(CUSTOMER_KEY)
    code, _, body = await sidecar.chat(ws, chat_body())
    assert code == 402 and b"PAYMENT_REQUIRED" in body
    identity = await sidecar.assert_identity(ws.id)
    [row] = await sidecar.ledger(ws.id)
    assert (row["status"], row["cost_micro"], identity["account_balance"]) == ("failed", 0, 5)


async def test_a_rejected_key_is_not_stored(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace()
    sidecar.provider.app[mock_provider.REJECTED_KEYS].add("sk-bad-key-0000")
    status, body = await add_key(sidecar, ws.id, "sk-bad-key-0000")
    assert status == 400 and body["error"]["code"] == "key_rejected"
    assert "sk-bad-key" not in str(body)
    _, listed = await sidecar.admin("GET", f"/workspaces/{ws.id}/byok-keys", token=TENANT_ADMIN_TOKEN)
    assert listed["data"] == []


async def test_only_tenant_managers_manage_byok_keys(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace()
    path = f"/workspaces/{ws.id}/byok-keys"
    status, body = await sidecar.admin("POST", path, {"provider": "mock", "key": CUSTOMER_KEY}, token=KEYS_ADMIN_TOKEN)
    assert status == 403 and body["error"]["code"] == "permission_denied"
    assert (await sidecar.admin("GET", path, token=KEYS_ADMIN_TOKEN))[0] == 403
    assert (await sidecar.admin("GET", path, token="nope"))[0] == 401
    # ... and the tenant token cannot do what it was not given.
    assert (
        await sidecar.admin(
            "POST", f"/workspaces/{ws.id}/grants", {"grant_id": "g", "amount": "1"}, token=TENANT_ADMIN_TOKEN
        )
    )[0] == 403
    assert (await sidecar.admin("GET", path, token=ADMIN_TOKEN))[0] == 200


@pytest.mark.parametrize("tamper", ["moved", "flipped"])
async def test_tampered_ciphertext_fails_closed(sidecar: Sidecar, tamper: str) -> None:
    victim = await sidecar.workspace(credits_micro=1_000_000)
    other = await sidecar.workspace()
    assert (await add_key(sidecar, victim.id, CUSTOMER_KEY))[0] == 201
    assert (await add_key(sidecar, other.id, "sk-other-workspace-key-9999"))[0] == 201
    async with sidecar.svc.pool.acquire() as conn:
        if tamper == "moved":  # the other workspace's ciphertext copied into the victim's row
            await conn.execute(
                "UPDATE byok_keys v SET wrapped_dek = o.wrapped_dek, ciphertext = o.ciphertext FROM byok_keys o "
                "WHERE v.workspace_id = $1 AND o.workspace_id = $2",
                victim.id,
                other.id,
            )
        else:
            await conn.execute(
                "UPDATE byok_keys SET ciphertext = overlay(ciphertext placing "
                "set_byte(substring(ciphertext from 20 for 1), 0, get_byte(ciphertext, 19) # 1) from 20 for 1) "
                "WHERE workspace_id = $1",
                victim.id,
            )
    sidecar.svc.byok.forget()
    before = len(sidecar.recorded)
    code, _, body = await sidecar.chat(victim, chat_body())
    assert code == 500 and b"byok_key_unusable" in body and b"altered" in body
    assert len(sidecar.recorded) == before, "no call went upstream"
    assert b"sk-other" not in body
    identity = await sidecar.assert_identity(victim.id)
    # Refused before admission, like any request that cannot be served: nothing held, nothing recorded.
    assert await sidecar.ledger(victim.id) == [] and identity["debits"] == 0


async def test_kek_rotation_then_old_kek_removed(redis_client, redis_url, private_postgres) -> None:
    # A database of its own: start-up checks every stored key's KEK, whichever test stored it.
    migrated_database_url = private_postgres.url
    await migrate_url(migrated_database_url)
    new_kek = "testkek2:" + base64.b64encode(bytes(range(100, 132))).decode()
    sidecar = await start_sidecar(redis_url, migrated_database_url)  # sealed under TEST_KEK
    try:
        ws = await sidecar.workspace()
        assert (await add_key(sidecar, ws.id, CUSTOMER_KEY))[0] == 201
        rewrapped, total, failed = await rotate_all(migrated_database_url, {"SIDECAR_KEK": f"{TEST_KEK},{new_kek}"})
        assert (rewrapped, total, failed) == (1, 1, [])
        async with sidecar.svc.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM byok_keys WHERE workspace_id = $1", ws.id)
        assert row["kek_id"] == "testkek2"
    finally:
        await stop_sidecar(sidecar)
    # A sidecar that only knows the new KEK still uses the key.
    sidecar = await start_sidecar(redis_url, migrated_database_url, env={"SIDECAR_KEK": new_kek})
    try:
        status, created = await sidecar.admin("POST", f"/workspaces/{ws.id}/keys", {"name": "k"})
        assert status == 201
        ws_caller = Workspace(ws.id, created["key"], created["id"])
        assert (await sidecar.chat(ws_caller, chat_body()))[0] == 200
        assert sent_key(sidecar) == CUSTOMER_KEY
    finally:
        await stop_sidecar(sidecar)


async def test_startup_refuses_without_the_kek_of_stored_keys(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace()
    assert (await add_key(sidecar, ws.id, CUSTOMER_KEY))[0] == 201
    with pytest.raises(SystemExit, match="SIDECAR_KEK"):
        await open_services(sidecar.svc.config, env={"MOCK_PLATFORM_KEY": PLATFORM_KEY})


async def test_startup_says_in_one_line_that_the_kek_is_malformed(sidecar: Sidecar) -> None:
    malformed = "not-a-key-" + "x" * 20
    with pytest.raises(SystemExit, match="SIDECAR_KEK") as exited:
        await open_services(sidecar.svc.config, env={"MOCK_PLATFORM_KEY": PLATFORM_KEY, "SIDECAR_KEK": malformed})
    assert malformed not in str(exited.value)


async def test_customer_keys_never_leak(sidecar: Sidecar, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    ws = await sidecar.workspace(credits_micro=1_000_000)
    seen = [str(await add_key(sidecar, ws.id, CUSTOMER_KEY))]
    seen.append(str(await sidecar.chat(ws, chat_body())))
    seen.append(str(await sidecar.chat(ws, chat_body(stream=True))))
    sidecar.provider.app[mock_provider.REJECTED_KEYS].add(CUSTOMER_KEY)
    seen.append(str(await sidecar.chat(ws, chat_body())))  # refused: fallback, failure recorded
    seen.append(str(await sidecar.admin("GET", f"/workspaces/{ws.id}/byok-keys", token=TENANT_ADMIN_TOKEN)))
    await sidecar.flush()
    seen += [str(dict(r)) for r in await sidecar.ledger(ws.id)]
    seen.append(generate_latest(sidecar.svc.metrics.registry).decode())
    seen.append(caplog.text)
    async with sidecar.svc.pool.acquire() as conn:
        stored = [dict(r) for r in await conn.fetch("SELECT * FROM byok_keys WHERE workspace_id = $1", ws.id)]
    seen.append(repr(stored))
    everything = "\n".join(seen)
    assert len(caplog.records) > 3
    for secret in (CUSTOMER_KEY, CUSTOMER_KEY[:-4], TEST_KEK.split(":")[1]):
        assert secret not in everything
    assert stored[0]["last4"] == "abcd"
    assert CUSTOMER_KEY.encode() not in b"".join(stored[0]["ciphertext"] for _ in [0])


@pytest.mark.parametrize("provider", ["mock-anthropic", "mock-openrouter"])
async def test_each_provider_validates_and_receives_keys_its_own_way(sidecar: Sidecar, provider: str) -> None:
    ws = await sidecar.workspace(credits_micro=0)
    status, view = await add_key(sidecar, ws.id, CUSTOMER_KEY, provider=provider)
    assert status == 201 and view["provider"] == provider
    openrouter = sidecar.extra[1].app[mock_provider.RECORDED]
    if provider == "mock-anthropic":
        check = sidecar.recorded[-1]
        assert check.path == "/v1/models" and check.headers["x-api-key"] == CUSTOMER_KEY
        assert check.headers["anthropic-version"]
        body = {"model": "claude-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
        async with sidecar.http.post(
            sidecar.data.make_url("/v1/messages"), json=body, headers={"x-api-key": ws.key}
        ) as resp:
            assert resp.status == 200
        call = sidecar.recorded[-1]
        assert call.headers["x-api-key"] == CUSTOMER_KEY and "authorization" not in call.headers
    else:
        check = openrouter[-1]
        assert check.path == "/api/v1/key" and check.headers["authorization"] == f"Bearer {CUSTOMER_KEY}"
        assert (await sidecar.chat(ws, chat_body(model="router-model")))[0] == 200
        assert openrouter[-1].headers["authorization"] == f"Bearer {CUSTOMER_KEY}"
    identity = await sidecar.assert_identity(ws.id)
    [row] = await sidecar.ledger(ws.id)
    assert row["byok"] is True and row["cost_micro"] > 0 and identity["debits"] == 0


async def test_a_cooling_office_key_yields_to_the_workspace_key_and_scopes_stay_apart(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000, office="lyon")
    other = await sidecar.workspace()
    assert (await add_key(sidecar, ws.id, CUSTOMER_KEY))[0] == 201
    _, office_key = await add_key(sidecar, ws.id, OFFICE_KEY, office="lyon")
    _, others = await add_key(sidecar, other.id, "sk-other-workspace-key-9999")
    # Reactivating another workspace's key through this workspace's URL changes nothing anywhere.
    status, _ = await sidecar.admin(
        "POST", f"/workspaces/{ws.id}/byok-keys/{others['id']}/reactivate", token=TENANT_ADMIN_TOKEN
    )
    assert status == 404
    _, listed = await sidecar.admin("GET", f"/workspaces/{ws.id}/byok-keys", token=TENANT_ADMIN_TOKEN)
    assert sorted(k["status"] for k in listed["data"]) == ["active", "active"]

    sidecar.provider.app[mock_provider.REJECTED_KEYS].add(OFFICE_KEY)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200  # office key refused: platform fallback
    before = len(sidecar.recorded)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    # While the office key cools down, the workspace's own key serves: still BYOK, not credits.
    assert [r.headers["authorization"] for r in list(sidecar.recorded)[before:]] == [f"Bearer {CUSTOMER_KEY}"]
    await sidecar.flush()
    rows = await sidecar.ledger(ws.id)
    assert [r["byok"] for r in rows] == [False, True]
    assert office_key["id"] not in str(rows[1]["byok_fallback_reason"] or "")
    await sidecar.assert_identity(ws.id)


@pytest.mark.parametrize("key", ['sk-quote"key-1234', "sk-back\\slash-1234"])
async def test_a_byok_key_the_scrubber_cannot_find_in_json_is_refused(sidecar: Sidecar, key: str) -> None:
    """Found by `make fuzz`: a provider quoting a key in a JSON body spells `"` and `\\` as `\\"` and
    `\\\\`, which the relay's scrubber (raw and \\uXXXX spellings) does not match, so such a key would
    reach the client. No provider issues one; it is refused when stored."""
    ws = await sidecar.workspace(credits_micro=0)
    status, body = await add_key(sidecar, ws.id, key)
    assert status == 400, body
    assert body["error"]["code"] == "invalid_key"
    _, listed = await sidecar.admin("GET", f"/workspaces/{ws.id}/byok-keys", token=TENANT_ADMIN_TOKEN)
    assert listed["data"] == []
