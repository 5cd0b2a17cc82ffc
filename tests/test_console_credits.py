"""The console's credits page over plain HTTP (the browser flow is in test_console_browser.py): a bad
amount is refused with its reason and creates nothing, the confirmation shows the figures the order then
freezes, a confirmation sent twice is one order, a reader sees the page but no way to buy."""

from __future__ import annotations

import asyncio
import re

from support.console import signed_in
from support.harness import ADMIN_TOKEN, SCOPED_READER_TOKEN, SCOPED_WORKSPACE
from support.payments import Shop


async def _orders(shop: Shop, ws: str) -> list[dict]:
    status, body = await shop.sidecar.admin("GET", f"/workspaces/{ws}/orders")
    assert status == 200, body
    return body["data"]


async def test_a_bad_amount_is_refused_with_its_reason_and_creates_nothing(shop: Shop) -> None:
    ws = (await shop.sidecar.workspace()).id
    client = await signed_in(shop.sidecar, ADMIN_TOKEN)
    try:
        for amount, reason in (
            ("abc", "decimal string"),
            ("0.50", "amount must be from"),
            ("10.001", "minor units"),
            ("", "decimal string"),
        ):
            for path in ("quote", "orders"):
                form = {"amount": amount, "client_order_id": "console-bad"}
                status, page, _ = await client.post(f"/console/w/{ws}/credits/{path}", form)
                assert status == 400 and reason in page, (path, amount, status)
        status, page, _ = await client.post(f"/console/w/{ws}/credits/orders", {"amount": "10.00"})
        assert status == 400 and "client_order_id" in page
    finally:
        await client.close()
    assert await _orders(shop, ws) == []


async def test_the_confirmed_order_is_the_quote_shown_and_sending_it_twice_is_one_order(shop: Shop) -> None:
    ws = (await shop.sidecar.workspace()).id
    profile = {"legal_name": "Client SARL", "address": "Rue 1", "country": "FR"}
    assert (await shop.sidecar.admin("PUT", f"/workspaces/{ws}/billing-profile", profile))[0] == 200
    client = await signed_in(shop.sidecar, ADMIN_TOKEN)
    try:
        status, page, _ = await client.post(f"/console/w/{ws}/credits/quote", {"amount": "33.33"})
        assert status == 200
        # 3333 cents; fee 5% = 166.65 -> 167; tax 20% (FR) of 3500 = 700; total 4200.
        assert "Purchase fee (5%)" in page and "1.67" in page and "tax 20% (FR)" in page and "7.00" in page
        total = re.search(r'data-test="total">([^<]+)<', page).group(1)
        client_order_id = re.search(r'name="client_order_id" value="([^"]+)"', page).group(1)
        form = {"amount": "33.330000", "client_order_id": client_order_id}
        for _ in range(2):
            status, page, _ = await client.post(f"/console/w/{ws}/credits/orders", form)
            assert status == 200 and "data-redirect" in page
        found = await _orders(shop, ws)
        assert len(found) == 1
        order = found[0]
        assert order["status"] == "pending" and order["amount_micro"] == 33_330_000
        assert f"{order['price']['total']} {order['currency'].upper()}" == total == "42.00 USD"
        assert order["checkout_url"] in page
        status, page, _ = await client.get(f"/console/w/{ws}/credits")
        assert status == 200 and order["id"] in page and "pending" in page
        status, page, _ = await client.get(f"/console/w/{ws}/invoices/INV-2026-999999/pdf")
        assert status == 404 and "no such invoice" in page
    finally:
        await client.close()


async def test_a_reader_sees_credits_but_cannot_buy(shop: Shop) -> None:
    await shop.sidecar.admin("POST", "/workspaces", {"id": SCOPED_WORKSPACE, "name": "Scoped Inc."})
    await shop.order(SCOPED_WORKSPACE, "5.00")
    client = await signed_in(shop.sidecar, SCOPED_READER_TOKEN)
    try:
        status, page, _ = await client.get(f"/console/w/{SCOPED_WORKSPACE}/credits")
        assert status == 200 and "pending" in page and "Auto-reload" in page
        assert "Review purchase" not in page and "Save auto-reload" not in page
        status, page, _ = await client.post(f"/console/w/{SCOPED_WORKSPACE}/credits/orders", {"amount": "5.00"})
        assert status == 403 and "lacks the" in page
    finally:
        await client.close()
    assert len(await _orders(shop, SCOPED_WORKSPACE)) == 1


async def test_a_confirmation_sent_at_once_twice_is_one_order_and_after_payment_goes_back(shop: Shop) -> None:
    ws = (await shop.sidecar.workspace(credits_micro=0)).id
    client = await signed_in(shop.sidecar, ADMIN_TOKEN)
    try:
        form = {"amount": "10.00", "client_order_id": "console-race"}
        answers = await asyncio.gather(*(client.post(f"/console/w/{ws}/credits/orders", form) for _ in range(4)))
        assert [status for status, _, _ in answers] == [200] * 4
        (order,) = await _orders(shop, ws)
        assert all(order["checkout_url"] in page for _, page, _ in answers)
        url = f"{shop.fake.public_url}/_fake/sessions/{order['provider_session_id']}/complete"
        async with shop.sidecar.http.post(url) as resp:
            assert resp.status == 200 and (await resp.json())["deliveries"] == [200, 200]
        assert await shop.balance(ws) == 10_000_000
        # The same confirmation again (a reload of the page): no second order, back to the credits page.
        status, _, resp = await client.post(f"/console/w/{ws}/credits/orders", form)
        assert status == 303 and resp.headers["Location"].endswith("/credits?notice=order_closed")
        assert len(await _orders(shop, ws)) == 1 and await shop.balance(ws) == 10_000_000
        status, page, _ = await client.get(f"/console/w/{ws}/credits")
        assert "credited" in page and "INV-" in page
    finally:
        await client.close()
