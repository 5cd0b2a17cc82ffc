"""What a verified Stripe event does to its order (the signature was checked before: stripe_gateway.verify).

Events name their order in their metadata (`order_id`, set on the Checkout Session and on its
PaymentIntent) or, for a refund, by the PaymentIntent the order recorded when it was paid. Every event
is safe to receive any number of times and in any order:
- a payment (checkout.session.completed / async_payment_succeeded with payment_status paid,
  payment_intent.succeeded) credits its order once (crediting.credit); the second of the two events of
  one payment finds the order credited;
- checkout.session.expired / async_payment_failed close an order not paid yet, and nothing else;
- payment_intent.payment_failed fails a reload (off-session) order; a checkout order stays open, its
  customer may try another card on the same page until the session expires;
- charge.refunded (the whole charge) refunds a credited order; one that overtook its payment is
  deferred, and Stripe delivers it again after the payment;
- an event whose order is not in Postgres yet is deferred (503): Stripe redelivers it.
"""

from __future__ import annotations

from sidecar.billing import crediting, orders
from sidecar.billing.crediting import Books, Payment, Result, Review
from sidecar.billing.orders import EventOutcome, OrderStatus, Provider, Purpose
from sidecar.errors import ControlFlow

HANDLED_TYPES = (
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "charge.refunded",
)


class _Malformed(ControlFlow, ValueError):
    """A signed event whose object is not the shape read here -> kept for review (apply)."""


def _int(obj: dict, key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Malformed(f"{key} is not a non-negative integer")
    return value


def _str(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _Malformed(f"{key} is not a string")
    return value


def order_id_of(obj: dict) -> str | None:
    metadata = obj.get("metadata")
    found = metadata.get("order_id") if isinstance(metadata, dict) else None
    if not isinstance(found, str):
        found = obj.get("client_reference_id") if obj.get("object") == "checkout.session" else None
    return found if isinstance(found, str) and found else None


async def apply(books: Books, event: dict) -> tuple[str | None, Result]:
    """(the order id the event names, what it did)."""
    kind, obj = event["type"], event["data"]["object"]
    detail = {"event_id": event["id"], "type": kind}
    order_id = order_id_of(obj)
    try:
        if kind == "charge.refunded":
            return await _refunded(books, obj, detail, order_id)
        if order_id is None:
            return None, Result(EventOutcome.IGNORED, "no order id in its metadata: not an order of this sidecar")
        return order_id, await _for_order(books, kind, obj, detail, order_id)
    except _Malformed as exc:
        return order_id, crediting.review(Review.MALFORMED, f"{kind}: {exc}")


async def _for_order(books: Books, kind: str, obj: dict, detail: dict, order_id: str) -> Result:
    if kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        if obj.get("payment_status") != "paid":
            return Result(EventOutcome.IGNORED, "the session is complete but not paid yet (an async method)")
        payment = Payment(
            amount_minor=_int(obj, "amount_total"),
            currency=_str(obj, "currency") or "",
            provider=Provider.STRIPE,
            payment_id=_str(obj, "payment_intent"),
            session_id=_str(obj, "id"),
            customer_ref=_str(obj, "customer"),
            detail=detail,
        )
        return await crediting.credit(books, order_id, payment)
    if kind == "payment_intent.succeeded":
        payment = Payment(
            amount_minor=_int(obj, "amount_received"),
            currency=_str(obj, "currency") or "",
            provider=Provider.STRIPE,
            payment_id=_str(obj, "id"),
            customer_ref=_str(obj, "customer"),
            payment_method_ref=_str(obj, "payment_method"),
            detail=detail,
        )
        return await crediting.credit(books, order_id, payment)
    if kind == "checkout.session.expired":
        return await crediting.close_unpaid(books.pool, order_id, OrderStatus.EXPIRED, detail)
    if kind == "checkout.session.async_payment_failed":
        return await crediting.close_unpaid(books.pool, order_id, OrderStatus.FAILED, detail)
    if kind == "payment_intent.payment_failed":
        async with books.pool.acquire() as conn:
            order = await orders.order_by_id(conn, order_id)
        if order is None:
            return Result(EventOutcome.DEFERRED, "no such order (yet): the provider delivers it again")
        if order.purpose is not Purpose.RELOAD:
            return Result(EventOutcome.IGNORED, "a failed attempt on a checkout page: the customer may retry")
        error = obj.get("last_payment_error") if isinstance(obj.get("last_payment_error"), dict) else {}
        return await crediting.close_unpaid(
            books.pool, order_id, OrderStatus.FAILED, {**detail, "code": _str(error, "code")}
        )
    return Result(EventOutcome.IGNORED, "not an event the sidecar acts on")


async def _refunded(books: Books, charge: dict, detail: dict, order_id: str | None) -> tuple[str | None, Result]:
    payment_id = _str(charge, "payment_intent")
    async with books.pool.acquire() as conn:
        order = await orders.order_by_payment(conn, payment_id) if payment_id else None
        if order is None and order_id:
            order = await orders.order_by_id(conn, order_id)
    if order is None:
        # Its order has not recorded this payment yet (the refund overtook the payment), or it is no
        # order of ours; Stripe redelivers for days, so the first case resolves itself.
        return order_id, Result(EventOutcome.DEFERRED, "no order has recorded this payment (yet)")
    if not charge.get("refunded"):
        refunded, amount = _int(charge, "amount_refunded"), _int(charge, "amount")
        return order.id, crediting.review(
            Review.PARTIAL_REFUND, f"{refunded} of {amount} (minor units) refunded: decide the credits by hand", order
        )
    return order.id, await crediting.refund(books, order, detail)
