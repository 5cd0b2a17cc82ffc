"""Money in through Stripe (issue 9, points 1 and 2): the real `stripe` SDK against the local fake;
every credit only after a verified webhook, exactly once per order, whatever arrives how often, when,
and in what order; a bad or stale signature changes nothing; a mismatched payment credits nothing."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import orjson
from support.payments import Shop, start_shop, stop_shop

from sidecar.billing import orders


async def _paid(shop: Shop, amount: str = "10.00") -> tuple[str, dict, list[dict]]:
    ws = (await shop.sidecar.workspace()).id
    order = await shop.order(ws, amount)
    events = shop.fake.complete_session(order["provider_session_id"])
    return ws, order, events


async def test_checkout_then_signed_webhook_credits_once(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    order = await shop.order(ws, "10.00")
    assert order["status"] == "pending"
    assert order["checkout_url"].startswith(shop.fake.public_url + "/pay/cs_test_")
    # 10.00 + 5% fee = 10.50, no profile: default rate 0.
    assert (order["amount_micro"], order["fee_micro"], order["tax_micro"]) == (10_000_000, 500_000, 0)
    assert order["total_minor"] == 1050 and order["currency"] == "usd"

    method, path, params = shop.fake.requests[-1]
    assert (method, path) == ("POST", "/v1/checkout/sessions")
    assert params["metadata"]["order_id"] == order["id"]
    assert params["payment_intent_data"]["metadata"]["order_id"] == order["id"]
    assert params["line_items"][0]["price_data"]["unit_amount"] == "1050"
    scope = f"/v1/checkout/sessions {order['id']}"
    assert scope in shop.fake._idempotency, "the order id is the Stripe idempotency key"

    assert await shop.balance(ws) == 0, "nothing is credited before the webhook"
    completed, succeeded = shop.fake.complete_session(order["provider_session_id"])
    assert (await shop.fake.deliver(completed)).status == 200
    assert await shop.balance(ws) == 10_000_000
    assert (await shop.fake.deliver(succeeded)).status == 200  # the same payment's other event
    assert await shop.balance(ws) == 10_000_000

    read = await shop.read(ws, order["id"])
    assert read["status"] == "credited"
    assert [(e["from"], e["to"]) for e in read["events"]] == [
        (None, "created"),
        ("created", "pending"),
        ("pending", "paid"),
        ("paid", "credited"),
    ]
    assert read["events"][2]["detail"]["event_id"] == completed["id"]
    assert read["invoice_number"].startswith("INV-")
    assert read["provider_payment_id"] == succeeded["data"]["object"]["id"]
    identity = await shop.sidecar.assert_identity(ws)
    assert identity["topups"] == 10_000_000
    assert shop.metric("sidecar_credits_purchased_micro_total", provider="stripe") >= 10_000_000


async def test_the_same_client_order_id_is_the_same_order(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    first = await shop.order(ws, "10.00", client_order_id="buy-1")
    sessions_before = len(shop.fake.sessions)
    status, again = await shop.sidecar.admin(
        "POST", f"/workspaces/{ws}/orders", {"client_order_id": "buy-1", "amount": "10.00"}
    )
    assert status == 200 and again["id"] == first["id"] and again["created"] is False
    assert again["checkout_url"] == first["checkout_url"]
    assert len(shop.fake.sessions) == sessions_before, "no second Checkout Session"
    status, body = await shop.sidecar.admin(
        "POST", f"/workspaces/{ws}/orders", {"client_order_id": "buy-1", "amount": "11.00"}
    )
    assert status == 409 and body["error"]["code"] == "order_conflict"


async def test_the_same_event_twenty_times_at_once_credits_once(shop: Shop):
    ws, order, (completed, succeeded) = await _paid(shop, "7.00")
    deliveries = await asyncio.gather(*(shop.fake.deliver(e) for e in [completed] * 20 + [succeeded] * 5))
    assert {d.status for d in deliveries} == {200}
    assert await shop.balance(ws) == 7_000_000
    async with shop.sidecar.svc.pool.acquire() as conn:
        grants = await conn.fetch("SELECT * FROM grants WHERE workspace_id = $1", ws)
        events = await orders.order_events(conn, order["id"])
        recorded = await orders.payment_event(conn, orders.Provider.STRIPE, completed["id"])
    assert len(grants) == 1 and grants[0]["grant_id"] == f"order:{order['id']}"
    assert [e.to_status for e in events].count("credited") == 1
    assert recorded["deliveries"] == 20 and recorded["outcome"] == "applied"
    await shop.sidecar.assert_identity(ws)


async def test_a_replay_a_week_later_changes_nothing(shop: Shop):
    ws, order, (completed, _) = await _paid(shop)
    assert (await shop.fake.deliver(completed)).status == 200
    # Stripe signs every delivery anew: a redelivery a week later carries a fresh, valid signature.
    assert (await shop.fake.deliver(completed)).status == 200
    assert await shop.balance(ws) == 10_000_000
    # A captured delivery replayed a week later keeps its week-old signature: stale, refused.
    week_ago = int(time.time()) - 7 * 86_400
    payload = orjson.dumps(completed)
    status, body = await shop.post_webhook(payload, shop.fake.sign(payload, timestamp=week_ago))
    assert status == 400 and body["error"]["code"] == "invalid_signature"
    assert await shop.balance(ws) == 10_000_000
    assert (await shop.read(ws, order["id"]))["status"] == "credited"


async def test_an_event_before_its_orders_commit_is_deferred_then_credited(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    payments = shop.sidecar.svc.payments
    conn = await shop.sidecar.svc.pool.acquire()
    try:
        tx = conn.transaction()
        await tx.start()
        q, snapshot = await payments.quote(conn, ws, 5_000_000)
        new = orders.NewOrder("ord_early", ws, "early", orders.Provider.STRIPE, orders.Purpose.CHECKOUT, q, snapshot)
        await orders.insert_order(conn, new)
        session = {
            "id": "cs_test_early",
            "object": "checkout.session",
            "payment_status": "paid",
            "amount_total": q.total_minor,
            "currency": "usd",
            "payment_intent": "pi_early",
            "metadata": {"order_id": "ord_early"},
        }
        event = shop.fake.event("checkout.session.completed", session)
        shop.fake.retry_delay_s = 0.3
        delivering = asyncio.create_task(shop.fake.deliver(event))
        await asyncio.sleep(0.15)  # the first attempt is answered 503 while the order is uncommitted
        assert await shop.balance(ws) == 0
        await tx.commit()
    finally:
        await shop.sidecar.svc.pool.release(conn)
    delivery = await delivering
    assert delivery.status == 200 and delivery.attempts >= 2
    assert await shop.balance(ws) == 5_000_000
    assert (await shop.read(ws, "ord_early"))["status"] == "credited"
    await shop.sidecar.assert_identity(ws)


async def test_events_out_of_order_credit_once_and_never_move_back(shop: Shop):
    ws, order, (completed, succeeded) = await _paid(shop)
    expired = shop.fake.event("checkout.session.expired", {**completed["data"]["object"], "status": "expired"})
    # The PaymentIntent's event first, then the session's, then a stale expiry.
    for evt in (succeeded, completed, expired):
        assert (await shop.fake.deliver(evt)).status == 200
    read = await shop.read(ws, order["id"])
    assert read["status"] == "credited"
    assert await shop.balance(ws) == 10_000_000

    # An expiry that arrives first closes the order; the payment after it credits nothing and is
    # kept for review (someone paid for a closed order: refund it, or credit by hand).
    ws2 = (await shop.sidecar.workspace()).id
    order2 = await shop.order(ws2)
    expired2 = shop.fake.expire_session(order2["provider_session_id"])
    assert (await shop.fake.deliver(expired2)).status == 200
    paid2 = shop.fake.complete_session(order2["provider_session_id"])
    assert (await shop.fake.deliver(paid2[0])).status == 200
    read2 = await shop.read(ws2, order2["id"])
    assert read2["status"] == "expired" and read2["reviews"][0]["type"] == "checkout.session.completed"
    assert await shop.balance(ws2) == 0


async def test_a_bad_signature_is_400_and_changes_nothing(shop: Shop):
    ws, order, (completed, _) = await _paid(shop)
    payload = orjson.dumps(completed)
    refused_before = shop.metric("sidecar_payment_webhooks_refused_total", reason="signature")
    cases = [
        None,  # no header
        "garbage",
        shop.fake.sign(payload, secret="whsec_someone_else"),
        shop.fake.sign(payload + b" "),  # signed another body
    ]
    for signature in cases:
        status, body = await shop.post_webhook(payload, signature)
        assert status == 400, signature
        assert body["error"]["code"] == "invalid_signature"
        assert "whsec" not in str(body)
    tampered = orjson.dumps({**completed, "type": "checkout.session.completed", "id": "evt_forged"})
    status, _ = await shop.post_webhook(tampered, shop.fake.sign(payload))
    assert status == 400
    assert await shop.balance(ws) == 0
    assert (await shop.read(ws, order["id"]))["status"] == "pending"
    assert shop.metric("sidecar_payment_webhooks_refused_total", reason="signature") == refused_before + 5
    async with shop.sidecar.svc.pool.acquire() as conn:
        assert await orders.payment_event(conn, orders.Provider.STRIPE, completed["id"]) is None


async def test_a_stale_signature_is_400_and_changes_nothing(shop: Shop):
    ws, order, (completed, _) = await _paid(shop)
    payload = orjson.dumps(completed)
    tolerance_s = shop.sidecar.svc.config.payments.stripe.webhook_tolerance_ms // 1000
    stale = shop.fake.sign(payload, timestamp=int(time.time()) - tolerance_s - 5)
    status, body = await shop.post_webhook(payload, stale)
    assert status == 400 and "stale" in body["error"]["message"]
    assert shop.metric("sidecar_payment_webhooks_refused_total", reason="stale") >= 1
    assert await shop.balance(ws) == 0
    assert (await shop.read(ws, order["id"]))["status"] == "pending"


async def test_a_mismatched_amount_or_currency_is_kept_for_review_and_credits_nothing(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    for amount, currency in ((1049, None), (1050, "eur")):
        order = await shop.order(ws, "10.00")
        reviews_before = shop.metric("sidecar_payment_reviews_total", reason="mismatch")
        events = shop.fake.complete_session(order["provider_session_id"], amount_total=amount, currency=currency)
        for evt in events:  # the session's and the PaymentIntent's: both refused
            assert (await shop.fake.deliver(evt)).status == 200
        read = await shop.read(ws, order["id"])
        assert read["status"] == "pending"
        assert len(read["reviews"]) == 2 and "the order is 1050 usd" in read["reviews"][0]["reason"]
        assert shop.metric("sidecar_payment_reviews_total", reason="mismatch") == reviews_before + 2
    assert await shop.balance(ws) == 0
    await shop.sidecar.assert_identity(ws)


async def test_an_expired_session_closes_its_order(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    order = await shop.order(ws)
    expired = shop.fake.expire_session(order["provider_session_id"])
    assert (await shop.fake.deliver(expired)).status == 200
    assert (await shop.read(ws, order["id"]))["status"] == "expired"


async def test_an_event_of_no_order_of_ours_is_ignored(shop: Shop):
    evt = shop.fake.event("checkout.session.completed", {"id": "cs_x", "object": "checkout.session", "metadata": {}})
    assert (await shop.fake.deliver(evt)).status == 200
    other = shop.fake.event("customer.created", {"id": "cus_x", "object": "customer"})
    assert (await shop.fake.deliver(other)).status == 200


async def test_manual_orders_are_marked_paid_by_an_operator_with_a_reference(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    order = await shop.order(ws, "25.00", provider="manual")
    assert order["status"] == "created" and order["checkout_url"] is None
    path = f"/workspaces/{ws}/orders/{order['id']}/mark-paid"
    from support.harness import KEYS_ADMIN_TOKEN

    status, body = await shop.sidecar.admin("POST", path, {"reference": "wire 42"}, token=KEYS_ADMIN_TOKEN)
    assert status == 403 and body["error"]["code"] == "permission_denied"
    status, body = await shop.sidecar.admin("POST", path, {})
    assert status == 400
    results = await asyncio.gather(*(shop.sidecar.admin("POST", path, {"reference": "wire 42"}) for _ in range(5)))
    assert {s for s, _ in results} == {200}
    assert sorted(b["outcome"] for _, b in results) == ["applied"] + ["ignored"] * 4
    status, body = await shop.sidecar.admin("POST", path, {"reference": "another"})
    assert status == 409
    assert await shop.balance(ws) == 25_000_000
    read = await shop.read(ws, order["id"])
    assert read["status"] == "credited" and read["payment_reference"] == "wire 42"
    paid = next(e for e in read["events"] if e["to"] == "paid")
    assert paid["detail"]["reference"] == "wire 42" and paid["detail"]["by"] == "operator"


async def test_a_stripe_order_cannot_be_marked_paid_by_hand_and_an_open_one_can_be_canceled(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    order = await shop.order(ws)
    status, body = await shop.sidecar.admin(
        "POST", f"/workspaces/{ws}/orders/{order['id']}/mark-paid", {"reference": "x"}
    )
    assert status == 409 and body["error"]["code"] == "order_state"
    status, body = await shop.sidecar.admin("POST", f"/workspaces/{ws}/orders/{order['id']}/cancel")
    assert status == 200 and body["status"] == "canceled"
    assert shop.fake.sessions[order["provider_session_id"]]["status"] == "expired", "it cannot be paid any more"
    # Paid all the same (a race at Stripe): refused for review, nothing credited.
    completed, _ = shop.fake.complete_session(order["provider_session_id"])
    assert (await shop.fake.deliver(completed)).status == 200
    assert await shop.balance(ws) == 0
    # An order whose session was paid cannot be canceled: Stripe refuses to expire it.
    paid = await shop.order(ws)
    shop.fake.complete_session(paid["provider_session_id"])
    status, body = await shop.sidecar.admin("POST", f"/workspaces/{ws}/orders/{paid['id']}/cancel")
    assert status == 409 and body["error"]["code"] == "order_state"
    # A Stripe event naming a manual order credits nothing.
    manual = await shop.order(ws, provider="manual")
    forged = shop.fake.event(
        "payment_intent.succeeded",
        {
            "id": "pi_m",
            "object": "payment_intent",
            "amount_received": manual["total_minor"],
            "currency": "usd",
            "metadata": {"order_id": manual["id"]},
        },
    )
    assert (await shop.fake.deliver(forged)).status == 200
    assert (await shop.read(ws, manual["id"]))["status"] == "created"
    assert await shop.balance(ws) == 0


async def test_the_database_refuses_a_backward_move_or_a_changed_amount(shop: Shop):
    import asyncpg
    import pytest

    ws, order, (completed, _) = await _paid(shop)
    await shop.fake.deliver(completed)
    async with shop.sidecar.svc.pool.acquire() as conn:
        for sql in (
            "UPDATE payment_orders SET status = 'pending' WHERE id = $1",
            "UPDATE payment_orders SET status = 'expired' WHERE id = $1",
            "UPDATE payment_orders SET amount_micro = amount_micro + 1, total_micro = total_micro + 1 WHERE id = $1",
            "UPDATE payment_orders SET tax_snapshot = '{}' WHERE id = $1",
            "UPDATE payment_orders SET provider_payment_id = 'pi_other' WHERE id = $1",
            "DELETE FROM payment_orders WHERE id = $1",
            "DELETE FROM payment_order_events WHERE order_id = $1",
            "UPDATE payment_order_events SET to_status = 'x' WHERE order_id = $1",
            "UPDATE invoices SET seq = seq + 1000 WHERE order_id = $1",
        ):
            with pytest.raises(asyncpg.PostgresError):
                await conn.execute(sql, order["id"])
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute(
                "INSERT INTO payment_orders (id, workspace_id, client_order_id, provider, purpose, status, "
                "amount_micro, fee_micro, tax_micro, total_micro, currency, total_minor, tax_snapshot) "
                "VALUES ('ord_x', $1, 'x', 'manual', 'manual', 'credited', 1, 0, 0, 1, 'usd', 1, '{}')",
                ws,
            )
    assert (await shop.read(ws, order["id"]))["status"] == "credited"


async def test_admin_input_is_checked(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    cases = [
        ({"amount": "10.00"}, "invalid_id"),
        ({"client_order_id": "a", "amount": "10.005"}, "invalid_amount"),  # not whole cents
        ({"client_order_id": "a", "amount": "0"}, "invalid_amount"),
        ({"client_order_id": "a", "amount": "1000000"}, "invalid_amount"),  # over order_amount_max
        ({"client_order_id": "a", "amount": 10}, "invalid_amount"),
        ({"client_order_id": "a", "amount": "10", "provider": "paypal"}, "invalid_provider"),
    ]
    for body, code in cases:
        status, answer = await shop.sidecar.admin("POST", f"/workspaces/{ws}/orders", body)
        assert status == 400 and answer["error"]["code"] == code, (body, answer)
    status, answer = await shop.sidecar.admin("GET", f"/workspaces/{ws}/orders?status=nope")
    assert status == 400
    status, answer = await shop.sidecar.admin("GET", f"/workspaces/{ws}/orders/ord_nope")
    assert status == 404 and answer["error"]["code"] == "order_not_found"
    status, answer = await shop.sidecar.admin("GET", f"/workspaces/{ws}/orders")
    assert status == 200 and answer["data"] == []


async def test_orders_list_pages_in_a_stable_order(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    made = [await shop.order(ws, "1.00", provider="manual") for _ in range(5)]
    seen, cursor = [], None
    while True:
        query = f"?limit=2&after={cursor}" if cursor else "?limit=2"
        status, page = await shop.sidecar.admin("GET", f"/workspaces/{ws}/orders{query.replace('+', '%2B')}")
        assert status == 200, page
        seen += [o["id"] for o in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [o["id"] for o in made]


async def test_a_payment_whose_webhook_beats_the_checkout_answer_is_credited_once(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    shop.fake.pay_before_answering = True
    order = await shop.order(ws, "3.00")
    assert order["status"] == "credited", "the webhook moved it on before Stripe answered the create"
    assert order["provider_session_id"] and order["checkout_url"], "the ids are still recorded"
    assert await shop.balance(ws) == 3_000_000
    read = await shop.read(ws, order["id"])
    assert [e["to"] for e in read["events"]] == ["created", "paid", "credited"]
    await shop.sidecar.assert_identity(ws)


async def test_a_credited_order_moves_the_expiry_and_revives_no_expired_balance(
    redis_client, redis_url: str, migrated_database_url: str
):
    """With expiry on, crediting an order (its own transaction, with the invoice) moves the expiry a
    month past now, once however often the payment is marked; a balance already expired is forfeited
    first, so the purchase does not revive it."""
    shop = await start_shop(redis_url, migrated_database_url, wallet={"expiry_enabled": True})
    try:
        sidecar = shop.sidecar
        ws = (await sidecar.workspace(credits_micro=3_000_000)).id
        past = datetime.now(UTC) - timedelta(seconds=1)
        status, _ = await sidecar.admin("POST", f"/workspaces/{ws}/wallet", {"expires_at": past.isoformat()})
        assert status == 200
        order = await shop.order(ws, "2.00", provider="manual")
        path = f"/workspaces/{ws}/orders/{order['id']}/mark-paid"
        results = await asyncio.gather(*(sidecar.admin("POST", path, {"reference": "wire 7"}) for _ in range(3)))
        assert sorted(b["outcome"] for _, b in results) == ["applied", "ignored", "ignored"]
        status, view = await sidecar.admin("GET", f"/workspaces/{ws}/wallet")
        expires = datetime.fromisoformat(view["expires_at"])
        assert timedelta(days=27) < expires - datetime.now(UTC) <= timedelta(days=31)
        [forfeited] = await sidecar.ledger(ws, "expiry")
        assert forfeited["balance_impact_micro"] == -3_000_000
        assert await shop.balance(ws) == 2_000_000
        identity = await sidecar.assert_identity(ws)
        assert identity["expiries"] == 3_000_000
    finally:
        await stop_shop(shop)
