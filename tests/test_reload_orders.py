"""Off-session orders for auto-reload (issue 9, point 5 uses them): a PaymentIntent on the payment method
an earlier checkout saved, idempotent per reload; its credits arrive by webhook like any order's."""

from __future__ import annotations

import asyncio

from support.payments import Shop

from sidecar.billing.orders import OrderStatus, Purpose, saved_payment_method


async def _saved_method(shop: Shop) -> tuple[str, str, str]:
    ws = (await shop.sidecar.workspace()).id
    order = await shop.order(ws, "10.00")
    for evt in shop.fake.complete_session(order["provider_session_id"]):
        assert (await shop.fake.deliver(evt)).status == 200
    read = await shop.read(ws, order["id"])
    assert read["customer_ref"] and read["payment_method_ref"], "the checkout saved who pays and how"
    return ws, read["customer_ref"], read["payment_method_ref"]


async def _wait_status(shop: Shop, ws: str, order_id: str, status: str) -> dict:
    for _ in range(100):
        read = await shop.read(ws, order_id)
        if read["status"] == status:
            return read
        await asyncio.sleep(0.05)
    raise AssertionError(f"order {order_id} stayed {read['status']}")


async def test_a_reload_order_is_charged_off_session_and_credited_by_its_webhook(shop: Shop):
    ws, customer, method = await _saved_method(shop)
    async with shop.sidecar.svc.pool.acquire() as conn:
        assert await saved_payment_method(conn, ws) == (customer, method)
    shop.fake.auto_deliver = True
    payments = shop.sidecar.svc.payments
    told: list = []

    async def listener(order) -> None:
        told.append((order.id, order.status))

    payments.listeners.append(listener)
    orders = await asyncio.gather(
        *(payments.create_reload_order(ws, "reload-1", 20_000_000, customer, method) for _ in range(5))
    )
    assert len({o.id for o in orders}) == 1 and orders[0].purpose is Purpose.RELOAD
    intents = [r for r in shop.fake.requests if r[1] == "/v1/payment_intents"]
    assert len({p["metadata"]["order_id"] for _, _, p in intents}) == 1
    assert len(shop.fake.payment_intents) == 2, "the checkout's and ONE reload's (the same idempotency key)"
    params = intents[0][2]
    assert params["off_session"] == "true" and params["confirm"] == "true"
    assert params["payment_method"] == method and params["customer"] == customer
    await _wait_status(shop, ws, orders[0].id, "credited")
    assert await shop.balance(ws) == 30_000_000
    assert (orders[0].id, OrderStatus.CREDITED) in told
    await shop.sidecar.assert_identity(ws)


async def test_a_declined_reload_fails_and_credits_nothing(shop: Shop):
    ws, customer, _ = await _saved_method(shop)
    shop.fake.auto_deliver = True
    payments = shop.sidecar.svc.payments
    order = await payments.create_reload_order(ws, "reload-declined", 20_000_000, customer, "pm_card_declined")
    assert order.status is OrderStatus.FAILED
    read = await shop.read(ws, order.id)
    assert read["events"][-1]["detail"]["code"] == "card_declined"
    for _ in range(100):  # the payment_intent.payment_failed webhook arrives: nothing more happens
        if shop.metric("sidecar_payment_webhooks_total", type="payment_intent.payment_failed", outcome="ignored"):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the payment_failed webhook was not taken")
    assert (await shop.read(ws, order.id))["status"] == "failed"
    assert await shop.balance(ws) == 10_000_000
