"""Bad input, auth, rate limits, idempotency headers, failing dependencies: every refusal is a clear
error in the OpenAI envelope, and none of them forwards or charges anything."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar


def error_of(body: bytes) -> dict:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def assert_nothing_happened(sidecar: Sidecar, ws, forwarded_before: int, balance_micro: int) -> None:
    assert len(sidecar.recorded) == forwarded_before
    identity = await sidecar.assert_identity(ws.id)
    assert identity["usage_rows"] == 0 and identity["account_balance"] == balance_micro


@pytest.mark.parametrize(
    ("raw", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (orjson.dumps({"messages": []}), 400, "model"),
        (orjson.dumps({"model": "gpt-4o-mini"}), 400, "messages"),
        (orjson.dumps({**chat_body(), "max_tokens": -3}), 400, "max_tokens"),
        (orjson.dumps({**chat_body(), "stream": "yes"}), 400, "stream"),
        (orjson.dumps({**chat_body(), "model": "no-such-model"}), 404, "does not exist"),
        (b"{" + b'"x":"' + b"a" * 70_000 + b'"}', 413, "exceeds the limit"),
    ],
)
async def test_bad_requests_get_clear_errors_and_change_nothing(
    sidecar: Sidecar, raw: bytes, status: int, fragment: str
) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    before = len(sidecar.recorded)
    code, headers, body = await sidecar.chat(ws, raw=raw)
    assert code == status
    assert fragment in error_of(body)["message"]
    assert headers["x-request-id"]
    await assert_nothing_happened(sidecar, ws, before, 1_000_000)


@pytest.mark.parametrize("key", ["", "sk-sc-not-a-real-key", "x" * 300])
async def test_unknown_keys_are_401(sidecar: Sidecar, key: str) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    ws.key = key
    code, _, body = await sidecar.chat(ws, chat_body())
    assert code == 401
    error = error_of(body)
    assert error["code"] == "invalid_api_key"
    assert key not in body.decode() or not key


async def test_revoked_key_stops_within_the_cache_ttl(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    status, _ = await sidecar.admin("POST", f"/workspaces/{ws.id}/keys/{ws.key_id}/revoke")
    assert status == 200
    ttl_s = sidecar.svc.config.auth.cache_ttl_ms / 1000
    await asyncio.sleep(ttl_s + 0.05)
    assert (await sidecar.chat(ws, chat_body()))[0] == 401
    _, listed = await sidecar.admin("GET", f"/workspaces/{ws.id}/keys")
    [key] = listed["data"]
    assert key["revoked_at"] and key["last4"] == ws.key[-4:] and "key" not in key


async def test_rate_limit_headers_and_429(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000, rpm=3)
    remaining = []
    for _ in range(3):
        code, headers, _ = await sidecar.chat(ws, chat_body())
        assert code == 200 and headers["X-RateLimit-Limit"] == "3"
        remaining.append(int(headers["X-RateLimit-Remaining"]))
        assert int(headers["X-RateLimit-Reset"]) > 1_700_000_000
    assert remaining == [2, 1, 0]
    before = len(sidecar.recorded)
    code, headers, body = await sidecar.chat(ws, chat_body())
    assert code == 429
    assert error_of(body)["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["X-RateLimit-Remaining"] == "0"
    assert len(sidecar.recorded) == before
    assert (await sidecar.assert_identity(ws.id))["usage_rows"] == 3


async def test_bad_idempotency_key_is_400(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    code, _, body = await sidecar.chat(ws, chat_body(), headers={"Idempotency-Key": "k" * 300})
    assert code == 400 and "idempotency-key" in error_of(body)["message"].lower()


async def test_session_id_is_recorded(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    assert (await sidecar.chat(ws, chat_body(), headers={"x-session-id": "agent-run-7"}))[0] == 200
    await sidecar.flush()
    [row] = await sidecar.ledger(ws.id)
    assert row["session_id"] == "agent-run-7"


async def test_alias_resolves_to_the_model(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    assert (await sidecar.chat(ws, chat_body(model="mini")))[0] == 200
    await sidecar.flush()
    [row] = await sidecar.ledger(ws.id)
    assert row["model"] == "gpt-4o-mini" and row["upstream_model"] == "gpt-4o-mini"


async def test_client_cap_and_choices_bound_the_hold(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    body = chat_body("z" * 40, max_tokens=7, n=3)
    assert (await sidecar.chat(ws, body))[0] == 200
    await sidecar.flush()
    [row] = await sidecar.ledger(ws.id)
    request_bytes = len(orjson.dumps(body))
    assert row["hold_micro"] == request_bytes * 5 + 7 * 3 * 25
    assert sidecar.recorded[-1].json_body["max_tokens"] == 7
    assert "max_completion_tokens" not in sidecar.recorded[-1].json_body


async def test_redis_unreachable_fails_closed_with_503(private_redis, migrated_database_url) -> None:
    sidecar = await start_sidecar(private_redis.url, migrated_database_url)
    try:
        ws = await sidecar.workspace(credits_micro=1_000_000)
        assert (await sidecar.chat(ws, chat_body()))[0] == 200  # the key is now cached
        await sidecar.flush()
        before = len(sidecar.recorded)
        private_redis.stop()
        code, _, body = await sidecar.chat(ws, chat_body())
        assert code == 503
        assert "nothing was charged" in error_of(body)["message"]
        assert len(sidecar.recorded) == before
        private_redis.restart()
        assert (await sidecar.assert_identity(ws.id))["usage_rows"] == 1
    finally:
        await stop_sidecar(sidecar)


async def test_models_catalog_lists_prices(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace()
    async with sidecar.http.get(
        sidecar.data.make_url("/v1/models"), headers={"Authorization": f"Bearer {ws.key}"}
    ) as r:
        assert r.status == 200
        catalog = await r.json()
    by_id = {m["id"]: m for m in catalog["data"]}
    assert by_id["gpt-4o-mini"]["pricing"]["input"] == "5"
    assert by_id["gpt-4o-mini"]["pricing"]["output"] == "25"
    assert by_id["gpt-4o-mini"]["aliases"] == ["mini"]
    async with sidecar.http.get(sidecar.data.make_url("/v1/models")) as r:
        assert r.status == 401


async def test_tokens_per_minute_limit(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    status, created = await sidecar.admin(
        "POST", f"/workspaces/{ws.id}/keys", {"name": "tpm", "rate_limit_rpm": 100, "tokens_per_minute": 900}
    )
    assert status == 201 and created["tokens_per_minute"] == 900
    ws.key, ws.key_id = created["key"], created["id"]
    body = chat_body("x", max_tokens=300)  # ceiling: body bytes + 300 output tokens, under 900
    code, headers, _ = await sidecar.chat(ws, body)
    assert code == 200 and headers["X-RateLimit-Limit-Tokens"] == "900"
    assert int(headers["X-RateLimit-Remaining-Tokens"]) < 900
    # The first call really used ~9 tokens, corrected at settle, so the next ones fit too.
    assert (await sidecar.chat(ws, body))[0] == 200
    assert (await sidecar.chat(ws, body))[0] == 200
    code, _, err = await sidecar.chat(ws, chat_body("x", max_tokens=5000))
    assert code == 400 and error_of(err)["code"] == "tokens_per_minute_exceeded"
    # Calls in flight count at their ceilings: a second slow call of ~770 tokens does not fit.
    big = chat_body("x", max_tokens=700)
    slow = {"x-mock-first-byte-delay-ms": "300"}
    results = await asyncio.gather(*[sidecar.chat(ws, big, headers=slow) for _ in range(2)])
    assert sorted(r[0] for r in results) == [200, 429]
    [limited] = [r for r in results if r[0] == 429]
    assert "tokens per minute" in error_of(limited[2])["message"] and int(limited[1]["Retry-After"]) >= 1
    await sidecar.assert_identity(ws.id)
