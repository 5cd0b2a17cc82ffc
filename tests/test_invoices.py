"""Invoices of credited orders (issue 10, point 4): a gapless number per issuer and year assigned in the
crediting transaction, a PDF whose every figure is read back, and billing profiles frozen into the
order's tax snapshot (issue 9, point 9)."""

from __future__ import annotations

import asyncio
import io

from pypdf import PdfReader
from support.payments import ISSUER, Shop

from sidecar.billing import invoices


async def _pdf_text(shop: Shop, ws: str, number: str) -> str:
    url = shop.sidecar.control.make_url(f"/admin/v1/workspaces/{ws}/invoices/{number}/pdf")
    async with shop.sidecar.http.get(url, headers={"Authorization": "Bearer test-admin-token"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/pdf"
        body = await resp.read()
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(body)).pages)


async def test_the_invoice_pdf_shows_every_figure_of_the_order(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    profile = {"legal_name": "Kunde GmbH", "address": "Weg 1\n80331 Muenchen", "country": "DE", "email": "a@b.de"}
    status, _ = await shop.sidecar.admin("PUT", f"/workspaces/{ws}/billing-profile", profile)
    assert status == 200
    order = await shop.order(ws, "10.00")
    # 10.00 + 5 % fee 0.50 = 10.50 taxable; 19 % of it is 1.995 -> 2.00; total 12.50.
    assert order["price"] == {"amount": "10.00", "fee": "0.50", "tax": "2.00", "total": "12.50"}
    assert order["tax_snapshot"]["rule"] == "country" and order["tax_snapshot"]["rate_percent"] == "19"
    completed, succeeded = shop.fake.complete_session(order["provider_session_id"])
    assert (await shop.fake.deliver(completed)).status == 200
    assert await shop.balance(ws) == 10_000_000, "the customer paid 12.50 and received 10 credits"

    status, listed = await shop.sidecar.admin("GET", f"/workspaces/{ws}/invoices")
    assert status == 200 and len(listed["data"]) == 1
    number = listed["data"][0]["number"]
    assert number.startswith("INV-20") and len(number.split("-")[2]) == 6
    text = await _pdf_text(shop, ws, number)
    for expected in (
        f"Invoice {number}",
        ISSUER["legal_name"],
        "Hauptstrasse 1",
        f"Tax id: {ISSUER['tax_id']}",
        "Kunde GmbH",
        "80331 Muenchen",
        "Credits: 10.000000",
        "10.00",
        "Purchase fee (5%)",
        "0.50",
        "Subtotal (taxable)",
        "10.50",
        "tax 19% (DE)",
        "2.00",
        "Total (USD)",
        "12.50",
        f"Payment reference: {succeeded['data']['object']['id']}",
        f"Order: {order['id']}",
    ):
        assert expected in text, (expected, text)

    # A later change of the profile changes new orders only: the order and its invoice keep the copy.
    status, _ = await shop.sidecar.admin(
        "PUT", f"/workspaces/{ws}/billing-profile", {**profile, "legal_name": "Renamed AG", "country": "FR"}
    )
    assert status == 200
    read = await shop.read(ws, order["id"])
    assert read["tax_snapshot"] == order["tax_snapshot"]
    assert "Kunde GmbH" in await _pdf_text(shop, ws, number)
    later = await shop.order(ws, "10.00")
    assert later["tax_snapshot"]["profile"]["legal_name"] == "Renamed AG"
    assert later["tax_snapshot"]["rate_percent"] == "20"


async def test_reverse_charge_is_on_the_invoice(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    profile = {"legal_name": "Client SARL", "country": "FR", "tax_id": "FR12345678901"}
    assert (await shop.sidecar.admin("PUT", f"/workspaces/{ws}/billing-profile", profile))[0] == 200
    order = await shop.order(ws, "20.00", provider="manual")
    assert order["tax_micro"] == 0 and order["tax_snapshot"]["rule"] == "reverse_charge"
    status, paid = await shop.sidecar.admin(
        "POST", f"/workspaces/{ws}/orders/{order['id']}/mark-paid", {"reference": "SEPA-77"}
    )
    assert status == 200
    text = await _pdf_text(shop, ws, paid["invoice_number"])
    assert "Reverse charge" in text and "FR12345678901" in text and "Payment reference: SEPA-77" in text
    assert "21.00" in text  # 20.00 + 5 % fee, no tax


async def test_profile_input_is_checked(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    for body in ({"legal_name": "x"}, {"legal_name": "x", "country": "de"}, {"country": "DE"}):
        status, answer = await shop.sidecar.admin("PUT", f"/workspaces/{ws}/billing-profile", body)
        assert status == 400, body
    status, answer = await shop.sidecar.admin("GET", f"/workspaces/{ws}/billing-profile")
    assert status == 404 and answer["error"]["code"] == "profile_not_found"


async def test_no_gap_and_no_duplicate_under_100_concurrent_creditings(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    made = await asyncio.gather(*(shop.order(ws, "1.00", provider="manual") for _ in range(100)))
    results = await asyncio.gather(
        *(
            shop.sidecar.admin("POST", f"/workspaces/{ws}/orders/{o['id']}/mark-paid", {"reference": f"r{i}"})
            for i, o in enumerate(made)
        )
    )
    assert {s for s, _ in results} == {200}, results
    numbers = [b["invoice_number"] for _, b in results]
    assert len(set(numbers)) == 100
    async with shop.sidecar.svc.pool.acquire() as conn:
        rows = await conn.fetch("SELECT year, seq, number FROM invoices WHERE issuer = $1", ISSUER["id"])
    by_year: dict[int, list[int]] = {}
    for r in rows:
        by_year.setdefault(r["year"], []).append(r["seq"])
        assert r["number"] == f"INV-{r['year']}-{r['seq']:06d}"
    for seqs in by_year.values():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), "gapless and without duplicates"
    assert await shop.balance(ws) == 100_000_000
    await shop.sidecar.assert_identity(ws)


async def test_a_rolled_back_crediting_gives_its_number_back(shop: Shop):
    ws = (await shop.sidecar.workspace()).id
    order = await shop.order(ws, "1.00", provider="manual")
    async with shop.sidecar.svc.pool.acquire() as conn:
        from sidecar.billing import orders

        found = await orders.order_by_id(conn, order["id"])
        tx = conn.transaction()
        await tx.start()
        taken = await invoices.assign(conn, found, shop.sidecar.svc.config.invoices.issuer)
        await tx.rollback()
    status, paid = await shop.sidecar.admin(
        "POST", f"/workspaces/{ws}/orders/{order['id']}/mark-paid", {"reference": "r"}
    )
    assert status == 200 and paid["invoice_number"] == taken
