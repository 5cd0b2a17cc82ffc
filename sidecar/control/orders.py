"""Admin routes of money in (README, "Buying credits"): billing profiles, payment orders, invoices, and
the public `POST /webhooks/stripe` (no admin token: Stripe's signature is its authentication)."""

from __future__ import annotations

import logging
from datetime import datetime

from aiohttp import web
from redis.exceptions import RedisError

from sidecar import db
from sidecar.billing import invoices, orders
from sidecar.billing.crediting import Result
from sidecar.billing.orders import EventOutcome, Order, OrderConflict, OrderStatus, Provider
from sidecar.billing.payments import OrderNotFound, OrderStateError, Payments, StripeNotConfigured
from sidecar.billing.stripe_gateway import PaymentsUnavailable, WebhookRefused
from sidecar.billing.tax import EU_COUNTRIES, Profile, format_money
from sidecar.control.http import (
    SERVICES,
    AdminError,
    bounded_int,
    credits_amount,
    error_response,
    existing_workspace,
    json_response,
    read_object,
    valid_id,
)
from sidecar.money import AMOUNT_MICRO_MAX, MoneyError, format_micro
from sidecar.services import Services

log = logging.getLogger("sidecar.control.orders")

PAGE_ROWS_MAX = 200
TEXT_CHARS_MAX = 500
WEBHOOK_BODY_BYTES_MAX = 512 * 1024  # Stripe's events are a few KB; far above any
_OPERATOR = "admin"  # who an admin-API action is recorded as: tokens are platform-wide, never named here


def _payments(request: web.Request) -> Payments:
    return request.app[SERVICES].payments


def _money(order: Order, micro: int) -> str:
    return format_money(micro, order.tax_snapshot["decimals"])


def order_view(order: Order) -> dict:
    return {
        "id": order.id,
        "workspace_id": order.workspace_id,
        "client_order_id": order.client_order_id,
        "provider": order.provider.value,
        "purpose": order.purpose.value,
        "status": order.status.value,
        "amount_micro": order.amount_micro,
        "amount": format_micro(order.amount_micro),
        "fee_micro": order.fee_micro,
        "tax_micro": order.tax_micro,
        "total_micro": order.total_micro,
        "currency": order.currency,
        "total_minor": order.total_minor,
        "price": {
            "amount": _money(order, order.amount_micro),
            "fee": _money(order, order.fee_micro),
            "tax": _money(order, order.tax_micro),
            "total": _money(order, order.total_micro),
        },
        "tax_snapshot": order.tax_snapshot,
        "checkout_url": order.checkout_url,
        "provider_session_id": order.provider_session_id,
        "provider_payment_id": order.provider_payment_id,
        "payment_reference": order.payment_reference,
        "customer_ref": order.customer_ref,
        "payment_method_ref": order.payment_method_ref,
        "refunded_micro": order.refunded_micro,
        "refund_spent_micro": order.refund_spent_micro,
        "created_at": order.created_at.isoformat(),
        "updated_at": order.updated_at.isoformat(),
    }


def _text(payload: dict, key: str, required: bool = False) -> str | None:
    value = payload.get(key)
    if value is None or value == "":
        if required:
            raise AdminError(400, f"{key} is required", "invalid_field")
        return None
    if not isinstance(value, str) or len(value) > TEXT_CHARS_MAX or "\x00" in value:
        raise AdminError(400, f"{key} must be a string of at most {TEXT_CHARS_MAX} characters", "invalid_field")
    return value


def order_amount(payments: Payments, payload: dict) -> int:
    """The amount of a new order (`amount` credits or `amount_micro`), within the configured bounds."""
    amount = credits_amount(payload, "amount")
    low, high = payments.amount_micro_min, min(payments.amount_micro_max, AMOUNT_MICRO_MAX)
    if not low <= amount <= high:
        raise AdminError(
            400, f"amount must be from {format_micro(low)} to {format_micro(high)} credits", "invalid_amount"
        )
    return amount


async def quote_view(svc: Services, ws: str, amount_micro: int) -> dict:
    """What an order of this amount would cost now (Payments.quote, as create_order freezes it)."""
    async with svc.pool.acquire() as conn:
        try:
            q, snapshot = await svc.payments.quote(conn, ws, amount_micro)
        except MoneyError as exc:
            raise AdminError(400, f"amount {exc}", "invalid_amount") from None
    return {
        **snapshot,
        "amount": format_money(q.amount_micro, q.decimals),
        "fee": format_money(q.fee_micro, q.decimals),
        "tax": format_money(q.tax_micro, q.decimals),
        "total": format_money(q.total_micro, q.decimals),
    }


async def order_create(
    svc: Services, ws: str, client_order_id: str, amount_micro: int, provider: Provider = Provider.STRIPE
) -> tuple[Order, bool]:
    """An order through Payments.create_order, its refusals as AdminErrors (the admin API and the console)."""
    try:
        return await svc.payments.create_order(ws, client_order_id, amount_micro, provider)
    except MoneyError as exc:
        raise AdminError(400, f"amount {exc}", "invalid_amount") from None
    except OrderConflict:
        raise AdminError(
            409, "this client_order_id was already used with another amount or provider", "order_conflict"
        ) from None
    except StripeNotConfigured as exc:
        raise AdminError(409, str(exc), "provider_not_configured") from None
    except PaymentsUnavailable as exc:
        raise AdminError(
            502, f"{exc}; the order is kept, send the same request again", "payment_provider_error"
        ) from None


async def create_order(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    payload = await read_object(request)
    client_order_id = valid_id(payload.get("client_order_id"), "client_order_id")
    try:
        provider = Provider(payload.get("provider", "stripe"))
    except ValueError:
        raise AdminError(400, "provider must be 'stripe' or 'manual'", "invalid_provider") from None
    amount = order_amount(_payments(request), payload)
    order, created = await order_create(request.app[SERVICES], ws, client_order_id, amount, provider)
    return json_response({**order_view(order), "created": created}, 201 if created else 200)


def _after(request: web.Request) -> tuple[datetime, str] | None:
    cursor = request.query.get("after")
    if not cursor:
        return None
    stamp, _, order_id = cursor.partition("|")
    try:
        return datetime.fromisoformat(stamp), valid_id(order_id, "after (cursor)")
    except ValueError:
        raise AdminError(400, "after must be the next_cursor of an earlier page", "invalid_cursor") from None


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", "50")
    if not text.isdigit():
        raise AdminError(400, f"limit must be an integer from 1 to {PAGE_ROWS_MAX}", "invalid_limit")
    return bounded_int(int(text), "limit", 1, PAGE_ROWS_MAX, "invalid_limit")


async def list_orders(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    status = request.query.get("status")
    if status is not None and status not in OrderStatus.__members__.values():
        raise AdminError(400, f"status must be one of {', '.join(s.value for s in OrderStatus)}", "invalid_status")
    limit = _limit(request)
    async with request.app[SERVICES].pool.acquire() as conn:
        found = await orders.list_orders(conn, ws, OrderStatus(status) if status else None, limit, _after(request))
    cursor = f"{found[-1].created_at.isoformat()}|{found[-1].id}" if len(found) == limit else None
    return json_response({"data": [order_view(o) for o in found], "next_cursor": cursor})


async def orders_page(svc: Services, ws: str, limit: int) -> list[dict]:
    """The workspace's first orders, oldest first (the console's list)."""
    async with svc.pool.acquire() as conn:
        return [order_view(o) for o in await orders.list_orders(conn, ws, None, limit, None)]


async def _order(request: web.Request) -> tuple[str, Order]:
    ws = await existing_workspace(request)
    order_id = valid_id(request.match_info["order_id"], "order id")
    try:
        return ws, await _payments(request).order(ws, order_id)
    except OrderNotFound:
        raise AdminError(404, "no such order in this workspace", "order_not_found") from None


async def read_order(request: web.Request) -> web.Response:
    _, order = await _order(request)
    async with request.app[SERVICES].pool.acquire() as conn:
        events = await orders.order_events(conn, order.id)
        reviews = await orders.reviews(conn, order.id)
        number = await invoices.invoice_of_order(conn, order.id)
    body = {
        **order_view(order),
        "invoice_number": number,
        "events": [
            {"from": e.from_status, "to": e.to_status, "detail": e.detail, "at": e.created_at.isoformat()}
            for e in events
        ],
        "reviews": reviews,
    }
    return json_response(body)


def _result_view(result: Result) -> dict:
    return {
        **order_view(result.order),
        "outcome": result.outcome.value,
        "reason": result.reason,
        "invoice_number": result.invoice_number,
    }


async def mark_paid(request: web.Request) -> web.Response:
    ws, order = await _order(request)
    reference = _text(await read_object(request), "reference", required=True)
    try:
        result = await _payments(request).mark_paid(ws, order.id, reference, _OPERATOR)
    except OrderStateError as exc:
        raise AdminError(409, str(exc), "order_state") from None
    if result.review is not None:
        raise AdminError(409, result.reason or "refused", "order_state")
    if result.outcome is EventOutcome.DEFERRED:  # an expired balance still held by calls: nothing changed
        raise AdminError(409, result.reason or "retry shortly", "expiry_pending")
    return json_response(_result_view(result))


async def cancel_order(request: web.Request) -> web.Response:
    ws, order = await _order(request)
    try:
        canceled = await _payments(request).cancel(ws, order.id, _OPERATOR)
    except OrderStateError as exc:
        raise AdminError(409, str(exc), "order_state") from None
    except PaymentsUnavailable as exc:
        raise AdminError(502, f"{exc}; nothing changed, try again", "payment_provider_error") from None
    return json_response(order_view(canceled))


async def refund_order(request: web.Request) -> web.Response:
    ws, order = await _order(request)
    try:
        result = await _payments(request).refund_manual(ws, order.id, _OPERATOR)
    except OrderStateError as exc:
        raise AdminError(409, str(exc), "order_state") from None
    return json_response(_result_view(result))


# --- billing profiles ---------------------------------------------------------------------------------


def _profile_view(ws: str, p: Profile | None) -> dict:
    return {"workspace_id": ws, **(p.as_dict() if p else dict.fromkeys(("legal_name", "address", "country")))}


async def put_profile(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    payload = await read_object(request)
    country = _text(payload, "country", required=True)
    if len(country) != 2 or not country.isascii() or not country.isalpha() or not country.isupper():
        raise AdminError(400, "country must be an ISO 3166 alpha-2 code in capitals (e.g. DE)", "invalid_field")
    tax_id = _text(payload, "tax_id")
    if tax_id and country in EU_COUNTRIES and not tax_id[:2].isalpha():
        raise AdminError(400, "an EU VAT number starts with its country prefix (e.g. DE123456789)", "invalid_field")
    profile = Profile(
        legal_name=_text(payload, "legal_name", required=True),
        address=_text(payload, "address") or "",
        country=country,
        tax_id=tax_id,
        email=_text(payload, "email"),
    )
    async with request.app[SERVICES].pool.acquire() as conn:
        await orders.put_profile(conn, ws, profile)
    return json_response(_profile_view(ws, profile))


async def get_profile(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    async with request.app[SERVICES].pool.acquire() as conn:
        found = await orders.profile(conn, ws)
    if found is None:
        raise AdminError(404, "this workspace has no billing profile", "profile_not_found")
    return json_response(_profile_view(ws, found))


# --- invoices -----------------------------------------------------------------------------------------


def _invoice_view(inv: invoices.Invoice) -> dict:
    return {
        "number": inv.number,
        "issuer": inv.issuer,
        "order_id": inv.order_id,
        "workspace_id": inv.workspace_id,
        "issued_at": inv.issued_at.isoformat(),
        "pdf": f"/admin/v1/workspaces/{inv.workspace_id}/invoices/{inv.number}/pdf",
    }


async def invoices_page(svc: Services, ws: str, limit: int) -> list[dict]:
    """The workspace's first invoices, oldest first (the console's list)."""
    async with svc.pool.acquire() as conn:
        return [_invoice_view(i) for i in await invoices.list_invoices(conn, ws, limit, None)]


async def list_invoices(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    limit = _limit(request)
    after = request.query.get("after")
    if after is not None:
        valid_id(after, "after")
    async with request.app[SERVICES].pool.acquire() as conn:
        found = await invoices.list_invoices(conn, ws, limit, after)
    cursor = found[-1].number if len(found) == limit else None
    return json_response({"data": [_invoice_view(i) for i in found], "next_cursor": cursor})


async def invoice_pdf_response(svc: Services, ws: str, number: str) -> web.Response:
    """The invoice's PDF as a download (the admin API and the console)."""
    number = valid_id(number, "invoice number")
    async with svc.pool.acquire() as conn:
        inv = await invoices.invoice(conn, ws, number)
        order = await orders.order_by_id(conn, inv.order_id) if inv else None
    if inv is None or order is None:
        raise AdminError(404, "no such invoice in this workspace", "invoice_not_found")
    return web.Response(
        body=invoices.render_pdf(inv, order),
        content_type="application/pdf",
        headers={"Content-Disposition": f'attachment; filename="{inv.number}.pdf"'},
    )


async def invoice_pdf(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    return await invoice_pdf_response(request.app[SERVICES], ws, request.match_info["number"])


# --- the provider's webhook ---------------------------------------------------------------------------


async def stripe_webhook(request: web.Request) -> web.Response:
    payments = _payments(request)
    if payments is None or payments.gateway is None:
        return error_response(404, "Stripe payments are not configured", "provider_not_configured")
    if (request.content_length or 0) > WEBHOOK_BODY_BYTES_MAX:
        return error_response(413, "webhook body too large", "body_too_large")
    payload = await request.read()
    try:
        answer = await payments.stripe_webhook(payload, request.headers.get("Stripe-Signature"))
    except WebhookRefused as exc:
        payments.metrics.webhooks_refused.labels(exc.reason.value).inc()
        log.warning("stripe webhook refused", extra={"reason": exc.reason.value})
        return error_response(400, f"webhook refused: {exc.reason.value}", "invalid_signature")
    except (*db.POSTGRES_OUTAGE, RedisError):  # nothing was credited that is not recorded: deliver it again
        return error_response(503, "the ledger is unavailable: deliver it again", "unavailable")
    body = {"received": True, "outcome": answer.outcome.value}
    return json_response(body, answer.status)


PREFIX_ROUTES = (
    ("POST", "/{ws}/orders", create_order, "CREDITS_MANAGE"),
    ("GET", "/{ws}/orders", list_orders, "READ"),
    ("GET", "/{ws}/orders/{order_id}", read_order, "READ"),
    ("POST", "/{ws}/orders/{order_id}/mark-paid", mark_paid, "CREDITS_MANAGE"),
    ("POST", "/{ws}/orders/{order_id}/cancel", cancel_order, "CREDITS_MANAGE"),
    ("POST", "/{ws}/orders/{order_id}/refund", refund_order, "CREDITS_MANAGE"),
    ("PUT", "/{ws}/billing-profile", put_profile, "WORKSPACES_MANAGE"),
    ("GET", "/{ws}/billing-profile", get_profile, "READ"),
    ("GET", "/{ws}/invoices", list_invoices, "READ"),
    ("GET", "/{ws}/invoices/{number}/pdf", invoice_pdf, "READ"),
)
PUBLIC_ROUTES = (("POST", "/webhooks/stripe", stripe_webhook),)
