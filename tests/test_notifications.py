"""Notifications (issue 9, point 11): signed webhooks to a workspace's endpoint, verified here the way a
customer would; retried with back-off up to a bound; logged in Postgres and shown by the admin API;
sent once per occurrence (one threshold crossing, one key failure), whatever the number of calls that
observed it. Real Redis, real Postgres, a real HTTP endpoint."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field

import orjson
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from support.harness import TENANT_ADMIN_TOKEN, Sidecar, chat_body, start_sidecar, stop_sidecar

from sidecar.byok import keys as byok_keys
from sidecar.byok.vault import binding
from sidecar.notify import events, expiry, signing
from sidecar.notify.delivery import DeliveryWorker

BACKOFF_MS = 100


@dataclass
class Receiver:
    """The customer's endpoint: answers `fail_first` requests with 500, then 200; keeps what it got."""

    fail_first: int = 0
    always_fail: bool = False
    got: list[tuple[dict, bytes]] = field(default_factory=list)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        if self.always_fail or len(self.got) <= self.fail_first:
            return web.Response(status=500, text="not now")
        return web.Response(status=200, text="ok")

    @property
    def url(self) -> str:
        return str(self.server.make_url("/hooks/sidecar?token=customer-own"))

    def of_type(self, event_type: str) -> list[tuple[dict, bytes]]:
        return [(h, b) for h, b in self.got if orjson.loads(b)["type"] == event_type]


def customer_verifies(secret: str, headers: dict, body: bytes) -> dict:
    """What the customer's code does, written from the README, not from the sidecar's module."""
    fields = dict(part.split("=", 1) for part in headers["Sidecar-Signature"].split(","))
    timestamp = int(fields["t"])
    assert abs(time.time() - timestamp) < 300, "stale"
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, fields["v1"]), "bad signature"
    event = orjson.loads(body)
    assert headers["Sidecar-Event-Id"] == event["id"] and headers["Sidecar-Event-Type"] == event["type"]
    return event


@pytest_asyncio.fixture
async def notifying(redis_client, redis_url, migrated_database_url):
    instance = await start_sidecar(
        redis_url,
        migrated_database_url,
        notifications={"retry_backoff_ms_min": BACKOFF_MS, "attempts_max": 3, "delivery_timeout_ms": 1000},
        balance_watch={"settings_cache_ms": 0},
    )
    try:
        yield instance
    finally:
        await instance.svc.notifier.close()
        await stop_sidecar(instance)


@pytest_asyncio.fixture
async def receiver():
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/sidecar", found.handle)
    found.server = TestServer(app)
    await found.server.start_server()
    try:
        yield found
    finally:
        await found.server.close()


async def _endpoint(sc: Sidecar, ws: str, url: str, **extra) -> dict:
    status, body = await sc.admin("PUT", f"/workspaces/{ws}/notifications/endpoint", {"url": url, **extra})
    assert status == 201, body
    return body


async def _deliver_all(sc: Sidecar, worker: DeliveryWorker | None = None) -> None:
    await sc.svc.watch.run_once()
    await (worker or sc.svc.notifier).run_once()


async def test_the_secret_is_shown_once_stored_sealed_and_never_logged(notifying: Sidecar, receiver, caplog) -> None:
    sc = notifying
    caplog.set_level(logging.DEBUG)
    ws = await sc.workspace()
    created = await _endpoint(sc, ws.id, receiver.url)
    secret = created["secret"]
    assert secret.startswith("whsec_") and created["secret_last4"] == secret[-4:]
    status, shown = await sc.admin("GET", f"/workspaces/{ws.id}/notifications/endpoint")
    assert status == 200 and "secret" not in shown and shown["secret_last4"] == secret[-4:]
    status, changed = await sc.admin("PUT", f"/workspaces/{ws.id}/notifications/endpoint", {"url": receiver.url})
    assert status == 200 and "secret" not in changed
    async with sc.svc.pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM notification_endpoints WHERE workspace_id = $1", ws.id)
    assert secret.encode() not in b"".join(v for v in row.values() if isinstance(v, bytes))
    assert secret not in str(dict(row))

    assert (await sc.admin("POST", f"/workspaces/{ws.id}/notifications/test"))[0] == 202
    await _deliver_all(sc)
    [(headers, body)] = receiver.got
    assert customer_verifies(secret, headers, body)["type"] == "ping"
    rotated = (
        await sc.admin(
            "PUT", f"/workspaces/{ws.id}/notifications/endpoint", {"url": receiver.url, "rotate_secret": True}
        )
    )[1]
    assert rotated["secret"] != secret
    assert (await sc.admin("POST", f"/workspaces/{ws.id}/notifications/test"))[0] == 202
    await _deliver_all(sc)
    customer_verifies(rotated["secret"], *receiver.got[1])
    ours = [r for r in caplog.records if r.name.startswith("sidecar")]  # not the customer's own access log
    everything_logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in ours)
    assert secret not in everything_logged and rotated["secret"] not in everything_logged
    assert "customer-own" not in everything_logged  # the endpoint's URL may carry the customer's token


async def test_a_low_balance_is_notified_once_per_crossing(notifying: Sidecar, receiver) -> None:
    sc = notifying
    ws = await sc.workspace(credits_micro=10_000, rpm=10_000)
    created = await _endpoint(sc, ws.id, receiver.url, low_balance_threshold_micro=9_900)
    assert created["low_balance_threshold"] == "0.009900"
    # Calls cost ~200 each (and hold ~3,000): the first crosses, the next ones stay under and notify
    # nothing more.
    results = await asyncio.gather(*[sc.chat(ws, chat_body(f"call {i}")) for i in range(3)])
    assert {r[0] for r in results} == {200}
    await _deliver_all(sc)
    for _ in range(3):
        assert (await sc.chat(ws, chat_body()))[0] == 200
        await _deliver_all(sc)
    [(headers, body)] = receiver.of_type("balance.below_threshold")
    event = customer_verifies(created["secret"], headers, body)
    assert event["workspace_id"] == ws.id and event["data"]["threshold_micro"] == 9_900
    assert event["data"]["available_micro"] < 9_900

    # Back above (a top-up; the next settlement re-arms), then under again: a second crossing, a second event.
    balance, _ = await sc.redis_account(ws.id)
    await sc.grant(ws.id, 9_900 - balance + 600)
    for _ in range(6):
        assert (await sc.chat(ws, chat_body()))[0] == 200
        await _deliver_all(sc)
    second = receiver.of_type("balance.below_threshold")
    assert len(second) == 2 and orjson.loads(second[1][1])["id"] != event["id"]
    status, log = await sc.admin("GET", f"/workspaces/{ws.id}/notifications/deliveries?state=delivered")
    assert status == 200 and [d["type"] for d in log["data"]] == ["balance.below_threshold"] * 2


async def test_a_crossing_seen_by_many_replicas_at_once_is_one_event(notifying: Sidecar, receiver) -> None:
    from sidecar.watch import BalanceWatch, Observation

    sc = notifying
    ws = await sc.workspace()
    await _endpoint(sc, ws.id, receiver.url, low_balance_threshold_micro=1_000)
    replicas = [BalanceWatch(sc.svc.pool, sc.svc.config, sc.svc.metrics) for _ in range(20)]
    await asyncio.gather(*[w.check(ws.id, Observation(500, 1_000_000 + i % 3)) for i, w in enumerate(replicas)])
    async with sc.svc.pool.acquire() as conn:
        rows = await conn.fetch("SELECT event_type FROM notification_deliveries WHERE workspace_id = $1", ws.id)
    assert [r["event_type"] for r in rows] == ["balance.below_threshold"]
    # An observation above, older than the crossing, arriving late, does not re-arm it.
    await replicas[0].check(ws.id, Observation(5_000, 999_999))
    await replicas[1].check(ws.id, Observation(500, 1_000_010))
    async with sc.svc.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM notification_deliveries WHERE workspace_id = $1", ws.id) == 1


async def test_deliveries_are_retried_with_back_off_logged_and_bounded(notifying: Sidecar, receiver) -> None:
    sc = notifying
    receiver.fail_first = 2
    ws = await sc.workspace()
    await _endpoint(sc, ws.id, receiver.url)
    assert (await sc.admin("POST", f"/workspaces/{ws.id}/notifications/test"))[0] == 202
    await _deliver_all(sc)
    await _deliver_all(sc)  # within the back-off: nothing is due
    assert len(receiver.got) == 1
    await asyncio.sleep(BACKOFF_MS / 1000 + 0.05)
    await _deliver_all(sc)
    assert len(receiver.got) == 2
    await asyncio.sleep(2 * BACKOFF_MS / 1000 + 0.05)  # doubled
    await _deliver_all(sc)
    assert len(receiver.got) == 3
    assert len({orjson.loads(b)["id"] for _, b in receiver.got}) == 1, "the same event each time"
    status, log = await sc.admin("GET", f"/workspaces/{ws.id}/notifications/deliveries")
    assert status == 200
    [delivery] = log["data"]
    assert delivery["state"] == "delivered" and delivery["attempts"] == 3
    assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 500, 200]
    assert delivery["attempt_log"][0]["error"] == "the endpoint answered 500"

    receiver.always_fail = True
    assert (await sc.admin("POST", f"/workspaces/{ws.id}/notifications/test"))[0] == 202
    for _ in range(6):
        await _deliver_all(sc)
        await asyncio.sleep(4 * BACKOFF_MS / 1000)
    _, log = await sc.admin("GET", f"/workspaces/{ws.id}/notifications/deliveries?state=failed")
    [gave_up] = log["data"]
    assert gave_up["attempts"] == 3 and len(gave_up["attempt_log"]) == 3  # attempts_max
    assert len(receiver.got) == 6


async def test_pending_deliveries_survive_a_restart_and_a_dead_sender(notifying: Sidecar, receiver) -> None:
    sc = notifying
    ws = await sc.workspace()
    created = await _endpoint(sc, ws.id, receiver.url)
    for _ in range(2):
        assert (await sc.admin("POST", f"/workspaces/{ws.id}/notifications/test"))[0] == 202
    # One sender claims both and dies before sending: its lease ends, another process sends them.
    async with sc.svc.pool.acquire() as conn:
        claimed = await events.claim_due(conn, 10, lease_s=0.3)
    assert {d.workspace_id for d in claimed} >= {ws.id}
    restarted = DeliveryWorker(sc.svc.pool, sc.svc.vault, sc.svc.config.notifications, sc.svc.metrics)
    try:
        await restarted.run_once()
        assert receiver.got == []  # still leased
        await asyncio.sleep(0.4)
        await restarted.run_once()
    finally:
        await restarted.close()
    assert len(receiver.got) == 2
    for headers, body in receiver.got:
        customer_verifies(created["secret"], headers, body)


async def test_a_failing_byok_key_is_notified_once_per_failure(notifying: Sidecar, receiver) -> None:
    sc = notifying
    ws = await sc.workspace()
    created = await _endpoint(sc, ws.id, receiver.url, events=["byok_key.failing"])
    async with sc.svc.pool.acquire() as conn:
        sealed = sc.svc.vault.seal("sk-customer-key-1234", binding(ws.id, None, "mock"))
        key = await byok_keys.insert(conn, ws.id, None, "mock", sealed, "1234")
    await asyncio.gather(*[sc.svc.byok.mark_failing(key, "answered 401", 60) for _ in range(20)])
    await _deliver_all(sc)
    [(headers, body)] = receiver.got
    event = customer_verifies(created["secret"], headers, body)
    assert event["type"] == "byok_key.failing" and event["data"]["key_id"] == key.id
    assert event["data"]["last4"] == "1234" and "sk-customer" not in body.decode()
    # Subscribed to key failures only: a low balance or a ping is not sent to it.
    assert (await sc.admin("POST", f"/workspaces/{ws.id}/notifications/test"))[0] == 202
    await _deliver_all(sc)
    assert len(receiver.got) == 2  # ping is always sent: it is how an endpoint is tested


async def test_credits_about_to_expire_are_warned_once_per_expiry(notifying: Sidecar, receiver) -> None:
    # Expiry belongs to the wallet (issue 9, point 6): its `wallets.expires_at`, written here by hand.
    sc = notifying
    ws = await sc.workspace(credits_micro=5_000)
    created = await _endpoint(sc, ws.id, receiver.url)
    async with sc.svc.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO wallets (workspace_id, expires_at) VALUES ($1, now() + interval '2 days') "
            "ON CONFLICT (workspace_id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
            ws.id,
        )
        config = sc.svc.config.notifications
        assert await expiry.warn_expiring(conn, config) >= 1
        assert await expiry.warn_expiring(conn, config) == 0  # once per expiry instant
    await _deliver_all(sc)
    [(headers, body)] = receiver.of_type("credits.expiring")
    event = customer_verifies(created["secret"], headers, body)
    assert event["data"]["balance_micro"] == 5_000
    async with sc.svc.pool.acquire() as conn:  # a purchase moved the expiry: a new instant, a new warning
        await conn.execute("UPDATE wallets SET expires_at = now() + interval '3 days' WHERE workspace_id = $1", ws.id)
        assert await expiry.warn_expiring(conn, sc.svc.config.notifications) >= 1


async def test_endpoint_input_is_checked_and_needs_its_permission(notifying: Sidecar, receiver) -> None:
    sc = notifying
    ws = await sc.workspace()
    path = f"/workspaces/{ws.id}/notifications/endpoint"
    for body, code in [
        ({}, "invalid_url"),
        ({"url": "ftp://example.com/x"}, "invalid_url"),
        ({"url": "https://user:pw@example.com/x"}, "invalid_url"),
        ({"url": "/relative"}, "invalid_url"),
        ({"url": receiver.url, "events": ["nope"]}, "invalid_events"),
        ({"url": receiver.url, "events": []}, "invalid_events"),
        ({"url": receiver.url, "low_balance_threshold": "abc"}, "invalid_amount"),
        ({"url": receiver.url, "rotate_secret": "yes"}, "invalid_rotate_secret"),
    ]:
        status, answer = await sc.admin("PUT", path, body)
        assert status == 400 and answer["error"]["code"] == code, (body, answer)
    assert (await sc.admin("GET", path))[0] == 404
    status, answer = await sc.admin("PUT", path, {"url": receiver.url}, token=TENANT_ADMIN_TOKEN)
    assert status == 403 and answer["error"]["code"] == "permission_denied"
    assert (await sc.admin("GET", f"/workspaces/{ws.id}/notifications/deliveries?limit=0"))[0] == 400
    assert (await sc.admin("GET", f"/workspaces/{ws.id}/notifications/deliveries?state=odd"))[0] == 400
    assert (await sc.admin("POST", f"/workspaces/{ws.id}/notifications/test"))[0] == 404
    await _endpoint(sc, ws.id, receiver.url)
    status, deleted = await sc.admin("DELETE", path)
    assert status == 200 and deleted["deleted"] is True
    assert (await sc.admin("DELETE", path))[0] == 404


def test_the_signature_module_verifies_what_it_signs_and_nothing_else() -> None:
    secret, body, now = signing.new_secret(), b'{"id":"evt_1"}', 1_800_000_000
    header = signing.sign(secret, body, now)
    assert signing.verify(secret, body, header, now + 10) == now
    for bad_secret, bad_body, bad_header, at in [
        ("whsec_other", body, header, now),
        (secret, body + b" ", header, now),
        (secret, body, header, now + signing.TOLERANCE_S + 1),
        (secret, body, header.replace("t=", "x="), now),
        (secret, body, "t=1,v1=", now),
    ]:
        try:
            signing.verify(bad_secret, bad_body, bad_header, at)
        except signing.SignatureInvalid:
            continue
        raise AssertionError(f"verified: {bad_header}")
