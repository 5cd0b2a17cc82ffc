"""Refunds (issue 9, point 10): a refunded payment removes its order's credits with one `refund` row, at
most what remains; the part already spent is recorded as such; the order becomes `refunded`; once,
however often and in whatever order the refund arrives."""

from __future__ import annotations

import asyncio

from support.payments import Shop


async def _credited(shop: Shop, amount: str = "10.00"):
    ws = await shop.sidecar.workspace()
    order = await shop.order(ws.id, amount)
    completed, succeeded = shop.fake.complete_session(order["provider_session_id"])
    assert (await shop.fake.deliver(completed)).status == 200
    return ws, order, succeeded["data"]["object"]["id"]


async def test_a_refund_removes_what_remains_and_records_the_spent_part(shop: Shop):
    ws, order, payment_id = await _credited(shop)
    status, _, _ = await shop.sidecar.chat(ws)  # spends a little of the credits
    assert status == 200
    await shop.sidecar.ledger_eventually(ws.id)
    spent = 10_000_000 - await shop.balance(ws.id)
    assert spent > 0

    refund = shop.fake.refund(payment_id)
    deliveries = await asyncio.gather(*(shop.fake.deliver(refund) for _ in range(20)))
    assert {d.status for d in deliveries} == {200}
    read = await shop.read(ws.id, order["id"])
    assert read["status"] == "refunded"
    assert (read["refunded_micro"], read["refund_spent_micro"]) == (10_000_000 - spent, spent)
    assert read["events"][-1]["from"] == "credited" and read["events"][-1]["detail"]["spent_micro"] == spent
    assert await shop.balance(ws.id) == 0
    rows = await shop.sidecar.ledger(ws.id, kind="refund")
    assert len(rows) == 1 and -rows[0]["balance_impact_micro"] == 10_000_000 - spent
    identity = await shop.sidecar.assert_identity(ws.id)
    assert identity["refunds"] == 10_000_000 - spent
    assert shop.metric("sidecar_credits_refunded_micro_total", provider="stripe") >= 10_000_000 - spent


async def test_a_refund_that_overtakes_its_payment_waits_for_it(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    order = await shop.order(ws)
    completed, succeeded = shop.fake.complete_session(order["provider_session_id"])
    refund = shop.fake.refund(succeeded["data"]["object"]["id"])
    shop.fake.delivery_attempts_max = 1
    assert (await shop.fake.deliver(refund)).status == 503, "deferred: Stripe delivers it again later"
    assert (await shop.read(ws, order["id"]))["status"] == "pending"
    assert (await shop.fake.deliver(completed)).status == 200
    assert await shop.balance(ws) == 10_000_000
    assert (await shop.fake.deliver(refund)).status == 200
    assert (await shop.read(ws, order["id"]))["status"] == "refunded"
    assert await shop.balance(ws) == 0
    await shop.sidecar.assert_identity(ws)


async def test_a_partial_refund_is_kept_for_review(shop: Shop):
    ws, order, payment_id = await _credited(shop)
    refund = shop.fake.refund(payment_id)
    charge = refund["data"]["object"]
    charge.update(refunded=False, amount_refunded=charge["amount"] // 2)
    assert (await shop.fake.deliver(refund)).status == 200
    read = await shop.read(ws.id, order["id"])
    assert read["status"] == "credited" and read["reviews"][0]["type"] == "charge.refunded"
    assert shop.metric("sidecar_payment_reviews_total", reason="partial_refund") >= 1
    assert await shop.balance(ws.id) == 10_000_000


async def test_an_operator_refunds_a_manual_order_once(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    order = await shop.order(ws, "4.00", provider="manual")
    path = f"/workspaces/{ws}/orders/{order['id']}"
    status, _ = await shop.sidecar.admin("POST", f"{path}/refund")
    assert status == 409, "not paid yet"
    assert (await shop.sidecar.admin("POST", f"{path}/mark-paid", {"reference": "cash"}))[0] == 200
    await shop.sidecar.grant(ws, 1_000_000)
    results = await asyncio.gather(*(shop.sidecar.admin("POST", f"{path}/refund") for _ in range(5)))
    assert {s for s, _ in results} == {200}
    assert sorted(b["outcome"] for _, b in results).count("applied") == 1
    assert await shop.balance(ws) == 1_000_000
    await shop.sidecar.assert_identity(ws)
    stripe_order = await shop.order(ws)
    status, body = await shop.sidecar.admin("POST", f"/workspaces/{ws}/orders/{stripe_order['id']}/refund")
    assert status == 409 and "Stripe" in body["error"]["message"]
