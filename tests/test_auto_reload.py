"""Auto-reload (issue 9, point 5): a settlement leaving the available balance under the threshold starts
exactly one reload, however many calls cross it at once and in however many processes; a failed reload
backs off, then, after `failures_max` in a row, turns auto-reload off. Real Redis, real Postgres; the
payment provider is a stub of the gateway interface that records what it was asked."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import pytest_asyncio
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar

from sidecar.reload import store
from sidecar.reload.gateway import PaymentOutcome, ProviderIds, ReloadDeclined, SavedMethod
from sidecar.watch import BalanceWatch

CALLS = 200
BACKOFF_MS = 200


class StubGateway:
    """The payment provider's side: records each start; declines while `decline` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, SavedMethod]] = []
        self.decline: str | None = None

    async def payment_outcomes(self, order_ids: list[str]) -> dict[str, PaymentOutcome]:
        return {}  # these tests end reloads by hand, as the orders side would

    async def saved_method(self, ws: str) -> SavedMethod | None:
        return None

    def of(self, ws: str) -> list[tuple[str, str, int, SavedMethod]]:
        """The starts for one workspace (the database, and so the worker, is shared by the tests)."""
        return [c for c in self.calls if c[0] == ws]

    async def start_reload_payment(self, ws: str, reload_id: str, amount_micro: int, method: SavedMethod):
        self.calls.append((ws, reload_id, amount_micro, method))
        if self.decline:
            raise ReloadDeclined(self.decline)
        return ProviderIds(f"pi_{reload_id}", f"ord_{reload_id}")


@pytest_asyncio.fixture
async def reloading(redis_client, redis_url, migrated_database_url):
    instance = await start_sidecar(
        redis_url,
        migrated_database_url,
        auto_reload={"retry_backoff_ms_min": BACKOFF_MS, "retry_backoff_ms_max": 10 * BACKOFF_MS, "failures_max": 3},
        balance_watch={"settings_cache_ms": 0},
    )
    instance.svc.reloads.gateway = StubGateway()
    try:
        yield instance
    finally:
        await stop_sidecar(instance)


async def _enable(sc: Sidecar, ws: str, threshold_micro: int, amount_micro: int) -> dict:
    status, body = await sc.admin(
        "PUT",
        f"/workspaces/{ws}/auto-reload",
        {
            "threshold_micro": threshold_micro,
            "amount_micro": amount_micro,
            "payment_method_id": "pm_saved",
            "customer_id": "cus_1",
        },
    )
    assert status == 200, body
    return body


async def _drain_watch(sc: Sidecar, *others: BalanceWatch) -> None:
    for _ in range(50):
        done = [await w.run_once() for w in (sc.svc.watch, *others)]
        if not any(done):
            return
    raise AssertionError("the balance watch did not drain")


async def _reloads(sc: Sidecar, ws: str) -> list[store.Reload]:
    async with sc.svc.pool.acquire() as conn:
        return await store.list_reloads(conn, ws, 100)


async def test_200_concurrent_calls_crossing_the_threshold_start_exactly_one_reload(reloading: Sidecar) -> None:
    sc = reloading
    ws = await sc.workspace(credits_micro=1_000_000, rpm=10_000)
    await _enable(sc, ws.id, threshold_micro=990_000, amount_micro=2_000_000)
    # A second replica's watch sees the same settlements: the crossing is still decided once.
    other = BalanceWatch(sc.svc.pool, sc.svc.config, sc.svc.metrics)
    observe = sc.svc.watch.observe

    def both(ws_id: str, available: int, at_ms: int) -> None:
        observe(ws_id, available, at_ms)
        other.observe(ws_id, available, at_ms)

    sc.svc.watch.observe = both
    stop = asyncio.Event()
    watchers = [asyncio.create_task(w.run(stop)) for w in (sc.svc.watch, other)]
    results = await asyncio.gather(*[sc.chat(ws, chat_body(f"call {i}")) for i in range(CALLS)])
    stop.set()
    await asyncio.gather(*watchers)
    await _drain_watch(sc, other)
    assert {code for code, _, _ in results} == {200}
    balance, _ = await sc.redis_account(ws.id)
    assert balance < 990_000, "the burst must take the balance under the threshold"

    reloads = await _reloads(sc, ws.id)
    assert len(reloads) == 1 and reloads[0].state == "pending" and reloads[0].reason == "threshold"
    assert reloads[0].amount_micro == 2_000_000
    await sc.svc.reloads.run_once()
    await sc.svc.reloads.run_once()
    gateway = sc.svc.reloads.gateway
    assert [(c[0], c[1], c[2]) for c in gateway.of(ws.id)] == [(ws.id, reloads[0].id, 2_000_000)]
    assert gateway.of(ws.id)[0][3] == SavedMethod("cus_1", "pm_saved")
    [started] = await _reloads(sc, ws.id)
    assert started.state == "processing" and started.provider_payment_id == f"pi_{started.id}"

    # More calls under the threshold while it is in flight start nothing more.
    for i in range(5):
        assert (await sc.chat(ws, chat_body(f"more {i}")))[0] == 200
    await _drain_watch(sc)
    await sc.svc.reloads.run_once()
    assert len(await _reloads(sc, ws.id)) == 1 and len(gateway.of(ws.id)) == 1
    await sc.assert_identity(ws.id)


async def test_a_reload_credited_by_its_webhook_rearms_the_next_crossing(reloading: Sidecar) -> None:
    sc = reloading
    # Each call holds ~3,000 and costs ~200: the balance stays above a hold throughout.
    ws = await sc.workspace(credits_micro=4_100, rpm=10_000)
    await _enable(sc, ws.id, threshold_micro=4_000, amount_micro=4_000)
    assert (await sc.chat(ws, chat_body()))[0] == 200
    await _drain_watch(sc)
    await sc.svc.reloads.run_once()
    [first] = await _reloads(sc, ws.id)
    # What the payment webhook does: credit the order once, and end the reload in the same breath.
    await sc.svc.balances.grant(ws.id, first.order_id, "topup", first.amount_micro)
    async with sc.svc.pool.acquire() as conn:
        assert await sc.svc.reloads.payment_succeeded(conn, first.id) is store.Ended.RECORDED
        assert await sc.svc.reloads.payment_succeeded(conn, first.id) is store.Ended.ALREADY  # a replay
    # Above the threshold now: the next settlement re-arms the watch; calls then take it under again.
    for i in range(40):
        assert (await sc.chat(ws, chat_body(f"spend {i}")))[0] == 200
        await _drain_watch(sc)
        if len(await _reloads(sc, ws.id)) == 2:
            break
    reloads = await _reloads(sc, ws.id)
    assert [r.state for r in reloads] == ["pending", "succeeded"]
    assert reloads[0].attempt == 1 and reloads[0].reason == "threshold"
    await sc.assert_identity(ws.id)


async def test_a_failed_reload_backs_off_then_disables_after_repeated_failures(reloading: Sidecar) -> None:
    sc = reloading
    gateway = sc.svc.reloads.gateway
    gateway.decline = "card_declined"
    ws = await sc.workspace(credits_micro=100_000, rpm=10_000)
    await _enable(sc, ws.id, threshold_micro=99_900, amount_micro=99_900)
    assert (await sc.chat(ws, chat_body()))[0] == 200
    await _drain_watch(sc)

    await sc.svc.reloads.run_once()
    [failed] = await _reloads(sc, ws.id)
    assert failed.state == "failed" and failed.failure_reason == "card_declined"
    status, view = await sc.admin("GET", f"/workspaces/{ws.id}/auto-reload")
    assert view["consecutive_failures"] == 1 and view["enabled"] and view["retry_at"]

    # Within the back-off nothing new starts, whatever the calls do.
    assert (await sc.chat(ws, chat_body()))[0] == 200
    await _drain_watch(sc)
    await sc.svc.reloads.run_once()
    assert len(await _reloads(sc, ws.id)) == 1 and len(gateway.of(ws.id)) == 1

    # After it, a retry; its back-off doubles; the third failure in a row turns auto-reload off.
    for expected_failures in (2, 3):
        await asyncio.sleep(BACKOFF_MS * 2 ** (expected_failures - 2) / 1000 + 0.05)
        await sc.svc.reloads.run_once()
        await sc.svc.reloads.run_once()
        reloads = await _reloads(sc, ws.id)
        assert len(reloads) == expected_failures
        assert reloads[0].reason == "retry" and reloads[0].attempt == expected_failures
        assert reloads[0].state == "failed"
    status, view = await sc.admin("GET", f"/workspaces/{ws.id}/auto-reload")
    assert status == 200 and view["enabled"] is False
    assert view["consecutive_failures"] == 3 and "3 consecutive reloads failed" in view["disabled_reason"]
    assert sc.svc.metrics.auto_reload_disabled_workspaces._value.get() >= 1
    assert sc.svc.metrics.child(sc.svc.metrics.auto_reloads, "disabled")._value.get() >= 1

    # Disabled: neither time nor calls start another.
    await asyncio.sleep(BACKOFF_MS * 8 / 1000)
    assert (await sc.chat(ws, chat_body()))[0] == 200
    await _drain_watch(sc)
    await sc.svc.reloads.run_once()
    assert len(await _reloads(sc, ws.id)) == 3

    # Turning it back on clears the count; the next crossing reloads again.
    gateway.decline = None
    body = await _enable(sc, ws.id, threshold_micro=99_900, amount_micro=99_900)
    assert body["enabled"] and body["consecutive_failures"] == 0 and body["disabled_reason"] is None
    assert (await sc.chat(ws, chat_body()))[0] == 200
    await _drain_watch(sc)
    await sc.svc.reloads.run_once()
    reloads = await _reloads(sc, ws.id)
    assert len(reloads) == 4 and reloads[0].state == "processing" and reloads[0].attempt == 1


async def test_the_database_allows_one_reload_in_flight_and_states_only_forward(reloading: Sidecar) -> None:
    sc = reloading
    ws = await sc.workspace(credits_micro=10_000)
    await _enable(sc, ws.id, threshold_micro=5_000, amount_micro=5_000)

    async def begin() -> str | None:
        async with sc.svc.pool.acquire() as conn:
            return await store.begin(conn, ws.id, store.ReloadReason.THRESHOLD, 1)

    started = [r for r in await asyncio.gather(*[begin() for _ in range(50)]) if r]
    assert len(started) == 1
    async with sc.svc.pool.acquire() as conn:
        assert await store.payment_failed(conn, started[0], "x", sc.svc.config.auto_reload, 10) is not None
        with pytest.raises(asyncpg.RaiseError, match="cannot move from failed to processing"):
            await conn.execute("UPDATE auto_reloads SET state = 'processing' WHERE id = $1", started[0])
        with pytest.raises(asyncpg.RaiseError, match="never deleted"):
            await conn.execute("DELETE FROM auto_reloads WHERE id = $1", started[0])
        assert await conn.fetchval("SELECT state FROM auto_reloads WHERE id = $1", started[0]) == "failed"


async def test_settings_are_checked_and_need_the_right_permission(reloading: Sidecar) -> None:
    sc = reloading
    ws = await sc.workspace()
    path = f"/workspaces/{ws.id}/auto-reload"
    bad = [
        ({"threshold": "5", "amount": "1"}, "invalid_amount"),
        ({"threshold": "-1", "amount": "10"}, "invalid_amount"),
        ({"threshold": "1.5"}, "invalid_amount"),
        ({"threshold": "1", "amount": "2", "enabled": "yes"}, "invalid_enabled"),
        ({"threshold": "1", "amount": "2"}, "no_payment_method"),
        ({"threshold": "1", "amount": "2", "payment_method_id": ""}, "invalid_id"),
    ]
    for body, code in bad:
        status, answer = await sc.admin("PUT", path, body)
        assert status in (400, 409) and answer["error"]["code"] == code, (body, answer)
    status, view = await sc.admin("GET", path)
    assert status == 200 and view["configured"] is False
    from support.harness import TENANT_ADMIN_TOKEN

    status, answer = await sc.admin(
        "PUT", path, {"threshold": "1", "amount": "2", "payment_method_id": "pm"}, token=TENANT_ADMIN_TOKEN
    )
    assert status == 403 and answer["error"]["code"] == "permission_denied"
    status, view = await sc.admin("PUT", path, {"threshold": "1.5", "amount": "20", "payment_method_id": "pm_x"})
    assert status == 200 and view["threshold_micro"] == 1_500_000 and view["amount"] == "20.000000"
    assert "pm_x" not in str(view)  # the method is the provider's; the API says only that one is saved
    status, view = await sc.admin("DELETE", path)
    assert status == 200 and view["enabled"] is False
    sc.svc.reloads.gateway = None
    status, answer = await sc.admin("PUT", path, {"threshold": "1", "amount": "2"})
    assert status == 409 and answer["error"]["code"] == "no_payment_provider"


def test_observing_a_settlement_does_no_io_and_is_bounded() -> None:
    """What a settlement pays before the call's answer: a dict update (no pool is even given here),
    one pending observation per workspace, at most `pending_workspaces_max` workspaces waiting."""
    from support.harness import build_config

    from sidecar.observability.metrics import Metrics

    config = build_config(
        "redis://unused", "postgresql://unused", "http://unused/v1", balance_watch={"pending_workspaces_max": 2}
    )
    metrics = Metrics()
    watch = BalanceWatch(None, config, metrics)
    watch.observe("a", 10, 5)
    watch.observe("a", 7, 4)  # older: the later observation stays
    watch.observe("b", 3, 6)
    watch.observe("c", 3, 6)  # a third workspace: past the bound, counted and skipped
    assert {ws: (o.available_micro, o.at_ms) for ws, o in watch._pending.items()} == {"a": (10, 5), "b": (3, 6)}
    assert metrics.balance_watch_skipped._value.get() == 1
