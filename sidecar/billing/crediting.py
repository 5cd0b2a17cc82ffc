"""Crediting a paid order and refunding it: the two places money crosses from an order to a balance.

Crediting is ONE Postgres transaction, with the order's row locked: the order moves to `paid` then
`credited`, its credits go through the operator grant's path (db.grant, keyed `order:<id>`: a second
attempt is a no-op even past the order's own check), and its invoice number is assigned. Then the
grant reaches the Redis balance (Balances.apply_grant; if Redis is away the data plane's flusher
applies it). So however many deliveries of a payment arrive, and in whatever order, the order is
credited once: the first to take the lock credits it, the rest find it credited.

A refund debits the order's credits (at most what remains: the spent part is recorded as such) through
the debit path, keyed `refund:<id>`, then moves the order to `refunded`. The debit is idempotent by its
key, so a crash between the two steps is finished by the next delivery.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import asyncpg

from sidecar import db
from sidecar.balances import Balances
from sidecar.billing import invoices, orders
from sidecar.billing.orders import CLOSED_UNPAID, OPEN, EventOutcome, Order, OrderStatus, Provider
from sidecar.config import InvoiceIssuerConfig
from sidecar.movements import Kind


@dataclass(frozen=True, slots=True)
class Payment:
    """What the provider (or an operator) says was paid for an order."""

    amount_minor: int
    currency: str
    provider: Provider
    payment_id: str | None = None  # Stripe's PaymentIntent
    session_id: str | None = None
    customer_ref: str | None = None
    payment_method_ref: str | None = None
    reference: str | None = None  # manual: the operator's reference
    detail: dict = field(default_factory=dict)  # for the order's event: which provider event, which operator


class Review(StrEnum):
    """Why a payment event was refused and kept for an operator (a metric label)."""

    MISMATCH = "mismatch"  # the amount or currency paid is not the order's
    CLOSED = "closed"  # paid (or refunded) after the order expired, failed or was canceled
    SECOND_PAYMENT = "second_payment"  # another payment for an order already paid
    PARTIAL_REFUND = "partial_refund"  # only part of the payment refunded: an operator decides the credits
    MALFORMED = "malformed"  # signed by the provider, but not the shape the sidecar reads


@dataclass(frozen=True, slots=True)
class Books:
    """What crediting and refunding write to: Postgres, the balances, the invoice issuer."""

    pool: asyncpg.Pool
    balances: Balances
    issuer: InvoiceIssuerConfig


@dataclass(frozen=True, slots=True)
class Result:
    outcome: EventOutcome
    reason: str | None = None
    order: Order | None = None
    invoice_number: str | None = None
    credited_micro: int = 0  # credits this call added (0 on every replay)
    refunded_micro: int = 0
    review: Review | None = None


def refusal(order: Order, payment: Payment) -> tuple[Review, str] | None:
    """Why this payment cannot credit this order (kept for review), or None."""
    if payment.provider is not order.provider:
        return Review.MISMATCH, f"paid through {payment.provider.value}, the order is a {order.provider.value} order"
    if payment.currency.lower() != order.currency or payment.amount_minor != order.total_minor:
        paid = f"{payment.amount_minor} {payment.currency.lower()}"
        return Review.MISMATCH, f"paid {paid} (minor units), the order is {order.total_minor} {order.currency}"
    if order.status in CLOSED_UNPAID:
        return Review.CLOSED, f"paid after the order was {order.status.value}: refund it or credit it by hand"
    if order.provider_payment_id and payment.payment_id and payment.payment_id != order.provider_payment_id:
        return Review.SECOND_PAYMENT, "a second payment for an order that was already paid"
    return None


def review(kind: Review, reason: str, order: Order | None = None) -> Result:
    return Result(EventOutcome.REVIEW, reason, order, review=kind)


async def credit(books: Books, order_id: str, payment: Payment) -> Result:
    try:
        return await _credit(books, order_id, payment)
    except db.ExpiryPending as exc:  # nothing recorded: the provider delivers it again, the operator retries
        return Result(EventOutcome.DEFERRED, str(exc))


async def _credit(books: Books, order_id: str, payment: Payment) -> Result:
    async with books.pool.acquire() as conn:
        found = await orders.order_by_id(conn, order_id)
    if found is None:
        return Result(EventOutcome.DEFERRED, "no such order (yet): the provider delivers it again")
    # A purchase moves the workspace's expiry (when expiry is on); a balance already expired is
    # forfeited first, so the purchase does not revive it.
    done = found.status in (OrderStatus.CREDITED, OrderStatus.REFUNDED)  # a replay: nothing to prepare
    extends = False if done else await books.balances.before_credit(found.workspace_id, Kind.TOPUP)
    async with books.pool.acquire() as conn, conn.transaction():
        order = await orders.order_by_id(conn, order_id, lock=True)
        assert order is not None, "orders are never deleted"
        refused = refusal(order, payment)
        if refused is not None:
            return review(*refused, order)
        if order.status in (OrderStatus.CREDITED, OrderStatus.REFUNDED):
            order = await _remember_payment_method(conn, order, payment)
            return Result(EventOutcome.IGNORED, f"already {order.status.value}", order)
        fields = {
            "provider_payment_id": payment.payment_id,
            "provider_session_id": payment.session_id,
            "customer_ref": payment.customer_ref,
            "payment_method_ref": payment.payment_method_ref,
            "payment_reference": payment.reference,
        }
        if order.status is not OrderStatus.PAID:
            order = await orders.transition(conn, order.id, OrderStatus.PAID, payment.detail, **fields)
        grant = await db.credit(
            conn,
            order.workspace_id,
            f"order:{order.id}",
            Kind.TOPUP,
            order.amount_micro,
            books.balances.expiry_months(extends),
        )
        detail = {**payment.detail, "grant_event_id": str(grant.event_id)}
        order = await orders.transition(conn, order.id, OrderStatus.CREDITED, detail)
        number = await invoices.assign(conn, order, books.issuer)
    await books.balances.after_credit(order.workspace_id, grant, extends)
    return Result(EventOutcome.APPLIED, None, order, number, credited_micro=order.amount_micro)


async def _remember_payment_method(conn: asyncpg.Connection, order: Order, payment: Payment) -> Order:
    """The second event of one payment may name what the first did not (payment_intent.succeeded
    carries the payment method; checkout.session.completed does not): keep it for auto-reload."""
    missing = {
        name: value
        for name, value in (("customer_ref", payment.customer_ref), ("payment_method_ref", payment.payment_method_ref))
        if value and getattr(order, name) is None
    }
    if not missing:
        return order
    return await orders.transition(conn, order.id, order.status, payment.detail, **missing)


async def close_unpaid(pool: asyncpg.Pool, order_id: str, to: OrderStatus, detail: dict) -> Result:
    """expired / failed / canceled: only an order not paid yet; a later one changes nothing."""
    async with pool.acquire() as conn, conn.transaction():
        order = await orders.order_by_id(conn, order_id, lock=True)
        if order is None:
            return Result(EventOutcome.DEFERRED, "no such order (yet): the provider delivers it again")
        if order.status not in OPEN:
            return Result(EventOutcome.IGNORED, f"the order is {order.status.value}", order)
        order = await orders.transition(conn, order.id, to, detail)
    return Result(EventOutcome.APPLIED, None, order)


async def refund(books: Books, order: Order, detail: dict) -> Result:
    if order.status is OrderStatus.REFUNDED:
        return Result(EventOutcome.IGNORED, "already refunded", order)
    if order.status in OPEN:  # the refund overtook the payment: wait for the payment to arrive first
        return Result(EventOutcome.DEFERRED, "refunded before its payment was seen: delivered again later", order)
    if order.status in CLOSED_UNPAID:
        return review(Review.CLOSED, f"a refund of an order that was {order.status.value}", order)
    debit = await books.balances.debit(order.workspace_id, f"refund:{order.id}", Kind.REFUND, order.amount_micro)
    async with books.pool.acquire() as conn, conn.transaction():
        current = await orders.order_by_id(conn, order.id, lock=True)
        if current.status is OrderStatus.REFUNDED:
            return Result(EventOutcome.IGNORED, "already refunded", current)
        done = await orders.transition(
            conn,
            order.id,
            OrderStatus.REFUNDED,
            {**detail, "refunded_micro": debit.taken_micro, "spent_micro": debit.short_micro},
            refunded_micro=debit.taken_micro,
            refund_spent_micro=debit.short_micro,
        )
    return Result(EventOutcome.APPLIED, None, done, refunded_micro=debit.taken_micro)
