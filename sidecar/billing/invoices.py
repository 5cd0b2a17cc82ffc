"""Invoices of credited orders: a gapless number per issuer and year, and the PDF.

The number is assigned in the crediting transaction (crediting.credit) from a counter row per issuer
and year: the row lock serialises concurrent creditings, and a crediting that rolls back gives its
number back with everything else, so numbers have no gap and no duplicate. The invoice freezes the
issuer as configured at that moment; the buyer and the tax come from the order's tax snapshot, which
was frozen when the order was created. The PDF is rendered on request from those frozen rows, so it
is the same every time it is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson

from sidecar.billing.orders import Order
from sidecar.billing.tax import format_money
from sidecar.config import InvoiceIssuerConfig
from sidecar.money import format_micro


@dataclass(frozen=True, slots=True)
class Invoice:
    number: str
    issuer: str
    year: int
    seq: int
    order_id: str
    workspace_id: str
    issuer_snapshot: dict
    issued_at: datetime


def issuer_snapshot(issuer: InvoiceIssuerConfig) -> dict:
    return {
        "id": issuer.id,
        "legal_name": issuer.legal_name,
        "address": issuer.address,
        "country": issuer.country,
        "tax_id": issuer.tax_id,
        "email": issuer.email,
    }


async def assign(conn: asyncpg.Connection, order: Order, issuer: InvoiceIssuerConfig) -> str:
    """The order's invoice number, taken in the caller's transaction (which must credit the order)."""
    counter = await conn.fetchrow(
        "INSERT INTO invoice_counters AS c (issuer, year, last) "
        "VALUES ($1, extract(year FROM now() AT TIME ZONE 'UTC')::int, 1) "
        "ON CONFLICT (issuer, year) DO UPDATE SET last = c.last + 1 RETURNING year, last",
        issuer.id,
    )
    number = f"{issuer.number_prefix}-{counter['year']}-{counter['last']:06d}"
    await conn.execute(
        "INSERT INTO invoices (number, issuer, year, seq, order_id, workspace_id, issuer_snapshot) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)",
        number,
        issuer.id,
        counter["year"],
        counter["last"],
        order.id,
        order.workspace_id,
        orjson.dumps(issuer_snapshot(issuer)).decode(),
    )
    return number


_COLUMNS = "number, issuer, year, seq, order_id, workspace_id, issuer_snapshot, issued_at"


def _invoice(row: asyncpg.Record | None) -> Invoice | None:
    if row is None:
        return None
    values = dict(row)
    values["issuer_snapshot"] = orjson.loads(values["issuer_snapshot"])
    return Invoice(**values)


async def list_invoices(conn: asyncpg.Connection, ws: str, limit: int, after: str | None) -> list[Invoice]:
    """Oldest first, keyset-paginated by number (numbers sort in issue order within an issuer and year)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM invoices WHERE workspace_id = $1 AND ($2::text IS NULL OR number > $2) "
        "ORDER BY number LIMIT $3",
        ws,
        after,
        limit,
    )
    return [_invoice(r) for r in rows]


async def invoice(conn: asyncpg.Connection, ws: str, number: str) -> Invoice | None:
    return _invoice(
        await conn.fetchrow(f"SELECT {_COLUMNS} FROM invoices WHERE workspace_id = $1 AND number = $2", ws, number)
    )


async def invoice_of_order(conn: asyncpg.Connection, order_id: str) -> str | None:
    return await conn.fetchval("SELECT number FROM invoices WHERE order_id = $1", order_id)


# --- the PDF -----------------------------------------------------------------------------------------


def pdf_text(text: str) -> str:
    """The PDF's core font covers Latin-1; anything else is shown as '?', never dropped silently."""
    return text.encode("latin-1", "replace").decode("latin-1")


def lines(order: Order) -> list[tuple[str, str]]:
    """The invoice's lines and totals as (label, amount in the order's currency): what the PDF prints."""
    snap = order.tax_snapshot
    decimals = snap["decimals"]
    money = lambda micro: format_money(micro, decimals)  # noqa: E731
    currency = order.currency.upper()
    return [
        (f"Credits: {format_micro(order.amount_micro)}", money(order.amount_micro)),
        (f"Purchase fee ({snap['fee_percent']}%)", money(order.fee_micro)),
        ("Subtotal (taxable)", money(snap["taxable_micro"])),
        (f"{snap['label']}", money(order.tax_micro)),
        (f"Total ({currency})", money(order.total_micro)),
    ]


def render_pdf(inv: Invoice, order: Order) -> bytes:
    from fpdf import FPDF  # a second of import: only the process that renders an invoice pays it

    pdf = FPDF(format="A4")
    pdf.set_title(inv.number)
    pdf.set_creator("ai-metering-sidecar")
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 10, pdf_text(f"Invoice {inv.number}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=10)
    issuer = inv.issuer_snapshot
    buyer = order.tax_snapshot.get("profile") or {}
    for text in (
        f"Date: {inv.issued_at.date().isoformat()}",
        f"Order: {order.id}",
        f"Payment reference: {order.payment_reference or order.provider_payment_id or '-'}",
        "",
        "From:",
        *_party(issuer),
        "",
        "Bill to:",
        *(_party(buyer) if buyer else [f"Workspace {order.workspace_id}"]),
        "",
    ):
        pdf.cell(0, 5, pdf_text(text), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=11)
    with pdf.table(col_widths=(130, 50), text_align=("LEFT", "RIGHT")) as table:
        table.row(("Description", f"Amount ({order.currency.upper()})"))
        for label, amount in lines(order):
            table.row((pdf_text(label), amount))
    pdf.set_font("Helvetica", size=9)
    if order.tax_snapshot["rule"] == "reverse_charge":
        pdf.cell(0, 8, "Reverse charge: VAT to be accounted for by the recipient.", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def _party(p: dict) -> list[str]:
    out = [p.get("legal_name") or ""]
    out += [line for line in (p.get("address") or "").split("\n") if line]
    if p.get("country"):
        out.append(p["country"])
    if p.get("tax_id"):
        out.append(f"Tax id: {p['tax_id']}")
    if p.get("email"):
        out.append(p["email"])
    return out
