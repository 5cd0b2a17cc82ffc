"""Auto-reload wired to the payment orders and Stripe (the real `stripe` SDK against the local fake):
a checkout saves the card; a settlement under the threshold starts one off-session PaymentIntent,
idempotent by the reload; its signed payment_intent.succeeded webhook credits the reload order once;
a declined card fails the reload and counts toward disabling."""

from __future__ import annotations

from support.harness import chat_body
from support.payments import Shop

from sidecar.reload import store


async def _checkout(shop: Shop, ws: str) -> None:
    order = await shop.order(ws, "10.00")
    for event in shop.fake.complete_session(order["provider_session_id"]):
        assert (await shop.fake.deliver(event)).status == 200


async def _reloads(shop: Shop, ws: str) -> list[store.Reload]:
    async with shop.sidecar.svc.pool.acquire() as conn:
        return await store.list_reloads(conn, ws, 10)


async def _cross(shop: Shop, ws) -> None:
    assert (await shop.sidecar.chat(ws, chat_body()))[0] == 200
    while await shop.sidecar.svc.watch.run_once():
        pass


async def test_a_crossing_charges_the_saved_card_once_and_the_webhook_credits_it(shop: Shop) -> None:
    sc = shop.sidecar
    ws = await sc.workspace(rpm=10_000)
    path = f"/workspaces/{ws.id}/auto-reload"
    status, refused = await sc.admin("PUT", path, {"threshold": "9.9999", "amount": "10.00"})
    assert status == 409 and refused["error"]["code"] == "no_payment_method", "no checkout paid yet"
    await _checkout(shop, ws.id)
    status, view = await sc.admin("PUT", path, {"threshold": "9.9999", "amount": "10.00"})
    assert status == 200 and view["enabled"], view

    await _cross(shop, ws)
    await sc.svc.reloads.run_once()
    [reload] = await _reloads(shop, ws.id)
    assert reload.state == "processing" and reload.order_id
    method, path_called, params = shop.fake.requests[-1]
    assert (method, path_called) == ("POST", "/v1/payment_intents")
    assert params["off_session"] == "true" and params["confirm"] == "true"
    assert params["payment_method"].startswith("pm_") and params["customer"].startswith("cus_")
    assert params["amount"] == "1050"  # 10.00 + the 5% purchase fee, like any order
    # One reload, one order (its client order id), one PaymentIntent (the order id is Stripe's idempotency key).
    assert f"/v1/payment_intents {reload.order_id}" in shop.fake._idempotency
    order = await shop.read(ws.id, reload.order_id)
    assert order["purpose"] == "reload" and order["client_order_id"] == reload.id
    intents = len(shop.fake.payment_intents)
    method_used = await sc.svc.reloads.gateway.saved_method(ws.id)
    again = await sc.svc.reloads.gateway.start_reload_payment(ws.id, reload.id, reload.amount_micro, method_used)
    assert (again.order_id, again.payment_id) == (reload.order_id, reload.provider_payment_id)
    assert len(shop.fake.payment_intents) == intents, "a started reload started again is the same payment"

    # Nothing is credited until Stripe's signed webhook; then once, however often it comes.
    before = await shop.balance(ws.id)
    [succeeded] = [e for e in shop.fake.events if e["type"] == "payment_intent.succeeded"][-1:]
    for _ in range(3):
        assert (await shop.fake.deliver(succeeded)).status == 200
    assert await shop.balance(ws.id) == before + 10_000_000
    [done] = await _reloads(shop, ws.id)
    assert done.state == "succeeded", "the webhook that credited the order ended the reload"
    await sc.svc.reloads.run_once()
    assert [r.state for r in await _reloads(shop, ws.id)] == ["succeeded"]
    identity = await sc.assert_identity(ws.id)
    assert identity["topups"] == 20_000_000


async def test_a_declined_card_fails_the_reload_and_counts_toward_disabling(shop: Shop) -> None:
    sc = shop.sidecar
    ws = await sc.workspace(rpm=10_000)
    await _checkout(shop, ws.id)
    status, view = await sc.admin(
        "PUT",
        f"/workspaces/{ws.id}/auto-reload",
        {"threshold": "9.9999", "amount": "10.00", "payment_method_id": "pm_declined_1", "customer_id": "cus_1"},
    )
    assert status == 200, view
    await _cross(shop, ws)
    await sc.svc.reloads.run_once()
    [failed] = await _reloads(shop, ws.id)
    assert failed.state == "failed" and failed.failure_reason == "card_declined"
    assert (await shop.read(ws.id, failed.order_id))["status"] == "failed"
    status, view = await sc.admin("GET", f"/workspaces/{ws.id}/auto-reload")
    assert view["consecutive_failures"] == 1 and view["retry_at"] and view["enabled"]
    # Stripe's payment_failed webhook for the same payment changes nothing more.
    for event in [e for e in shop.fake.events if e["type"] == "payment_intent.payment_failed"]:
        await shop.fake.deliver(event)
    await sc.svc.reloads.run_once()
    status, view = await sc.admin("GET", f"/workspaces/{ws.id}/auto-reload")
    assert view["consecutive_failures"] == 1 and len(await _reloads(shop, ws.id)) == 1
    assert await shop.balance(ws.id) < 10_000_000
