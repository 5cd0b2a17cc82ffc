"""Payment orders end to end: create (quote, freeze the tax snapshot, open the provider's payment),
mark paid by hand, cancel, refund by hand, and take the provider's webhooks.

The control plane's routes (sidecar/control/orders.py) call this; so does auto-reload
(`create_reload_order`: an off-session PaymentIntent on a saved payment method). Credits arrive only
through crediting.credit, after a verified webhook or an operator's mark-paid.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from sidecar.balances import Balances
from sidecar.billing import crediting, orders, tax, webhooks
from sidecar.billing.crediting import Books, Payment, Result
from sidecar.billing.orders import EventOutcome, NewOrder, Order, OrderStatus, Provider, Purpose
from sidecar.billing.stripe_gateway import PaymentDeclined, PaymentsUnavailable, StripeGateway
from sidecar.config import Config, ConfigError
from sidecar.errors import DomainError
from sidecar.money import parse_credits
from sidecar.observability.payment_metrics import PaymentMetrics

log = logging.getLogger("sidecar.billing")

REFERENCE_CHARS_MAX = 200


class OrderStateError(DomainError):
    """The order is not in a state that allows this (mark-paid of a closed order, ...) -> admin 409 order_state."""


class OrderNotFound(DomainError):
    """No such order in this workspace -> admin 404 order_not_found."""


class StripeNotConfigured(DomainError):
    """A Stripe order or webhook while payments.stripe is not configured -> admin 409 / webhook 404."""


@dataclass(frozen=True, slots=True)
class WebhookAnswer:
    status: int
    outcome: EventOutcome
    reason: str | None


class Payments:
    def __init__(
        self,
        config: Config,
        pool: asyncpg.Pool,
        balances: Balances,
        metrics: PaymentMetrics,
        gateway: StripeGateway | None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.gateway = gateway
        self.books = Books(pool, balances, config.invoices.issuer)
        self.currency = (config.payments.currency or config.pricing.currency).lower()
        self.fee_ppm = tax.parse_percent_ppm(config.fees.purchase_percent)
        self.rules = tax.TaxRules(
            rates_ppm={c: tax.parse_percent_ppm(r) for c, r in config.tax.rates_percent.items()},
            default_rate_ppm=tax.parse_percent_ppm(config.tax.default_rate_percent),
            issuer_country=config.invoices.issuer.country,
            eu_reverse_charge=config.tax.eu_reverse_charge,
        )
        self.amount_micro_min = parse_credits(config.payments.order_amount_min)
        self.amount_micro_max = parse_credits(config.payments.order_amount_max)
        # Called with the order after a provider event moved it (credited, failed, expired, refunded):
        # auto-reload learns here that its reload succeeded or failed. A listener's error is logged,
        # never fails the webhook (the order's change is committed already).
        self.listeners: list[Callable[[Order], Awaitable[None]]] = []

    async def close(self) -> None:
        if self.gateway is not None:
            await self.gateway.close()

    # --- orders ---------------------------------------------------------------------------------------

    async def quote(self, conn: asyncpg.Connection, ws: str, amount_micro: int) -> tuple[tax.Quote, dict]:
        """The order's figures and its tax snapshot, from the workspace's profile as it is now.
        MoneyError for an amount that is not whole minor units."""
        profile = await orders.profile(conn, ws)
        q = tax.quote(amount_micro, self.currency, self.fee_ppm, tax.tax_rule(profile, self.rules))
        return q, tax.snapshot(q, profile)

    async def create_order(
        self, ws: str, client_order_id: str, amount_micro: int, provider: Provider
    ) -> tuple[Order, bool]:
        """An order (created, or the earlier one of this client id); a Stripe order opens its Checkout
        Session and is `pending` with its URL. PaymentsUnavailable leaves it `created`: the same
        request again opens the session (same idempotency key at Stripe: the same session)."""
        if provider is Provider.STRIPE and self.gateway is None:
            raise StripeNotConfigured("payments.stripe is not configured: only manual orders can be created")
        purpose = Purpose.CHECKOUT if provider is Provider.STRIPE else Purpose.MANUAL
        order, created = await self._insert(ws, client_order_id, amount_micro, provider, purpose)
        if provider is Provider.STRIPE and order.status is OrderStatus.CREATED:
            checkout = await self.gateway.checkout(order)
            order = await self._opened(
                order.id,
                {"by": "stripe", "session_id": checkout.session_id},
                provider_session_id=checkout.session_id,
                checkout_url=checkout.url,
            )
        return order, created

    async def create_reload_order(
        self, ws: str, client_order_id: str, amount_micro: int, customer_ref: str, payment_method_ref: str
    ) -> Order:
        """For auto-reload: an order charged off-session to a payment method saved by an earlier checkout
        (the order's `customer_ref` / `payment_method_ref` after it was paid). Idempotent by
        `client_order_id` (one per reload). Returns the order, `pending` while Stripe confirms it, or
        `failed` if the card was declined at once; its credits arrive by the payment_intent.succeeded
        webhook like any order's. PaymentsUnavailable: Stripe was not reached; call again."""
        if self.gateway is None:
            raise StripeNotConfigured("payments.stripe is not configured")
        order, _ = await self._insert(
            ws, client_order_id, amount_micro, Provider.STRIPE, Purpose.RELOAD, customer_ref, payment_method_ref
        )
        if order.status is not OrderStatus.CREATED:
            return order
        try:
            charge = await self.gateway.charge_off_session(order)
        except PaymentDeclined as exc:
            return await self._move(order.id, OrderStatus.FAILED, {"by": "stripe", "code": exc.code})
        return await self._opened(
            order.id,
            {"by": "stripe", "payment_id": charge.payment_id, "status": charge.status},
            provider_payment_id=charge.payment_id,
        )

    async def _opened(self, order_id: str, detail: dict, **fields: object) -> Order:
        """`created -> pending` with the provider's ids, unless the provider's webhook was faster than
        its own answer and the order moved on already: then only the ids missing are recorded."""
        async with self.pool.acquire() as conn, conn.transaction():
            current = await orders.order_by_id(conn, order_id, lock=True)
            if current.status is not OrderStatus.CREATED:
                missing = {k: v for k, v in fields.items() if getattr(current, k) is None}
                return await orders.transition(conn, order_id, current.status, detail, **missing)
            moved = await orders.transition(conn, order_id, OrderStatus.PENDING, detail, **fields)
        self.metrics.orders.labels(moved.provider.value, moved.status.value).inc()
        return moved

    async def _insert(
        self,
        ws: str,
        client_order_id: str,
        amount_micro: int,
        provider: Provider,
        purpose: Purpose,
        customer_ref: str | None = None,
        payment_method_ref: str | None = None,
    ) -> tuple[Order, bool]:
        async with self.pool.acquire() as conn, conn.transaction():
            q, snapshot = await self.quote(conn, ws, amount_micro)
            new = NewOrder(
                id=f"ord_{secrets.token_hex(12)}",
                workspace_id=ws,
                client_order_id=client_order_id,
                provider=provider,
                purpose=purpose,
                quote=q,
                tax_snapshot=snapshot,
                customer_ref=customer_ref,
                payment_method_ref=payment_method_ref,
            )
            order, created = await orders.insert_order(conn, new)
        if created:
            self.metrics.orders.labels(provider.value, OrderStatus.CREATED.value).inc()
        return order, created

    async def _move(self, order_id: str, to: OrderStatus, detail: dict) -> Order:
        async with self.pool.acquire() as conn:
            order = await orders.transition(conn, order_id, to, detail)
        self.metrics.orders.labels(order.provider.value, to.value).inc()
        return order

    async def order(self, ws: str, order_id: str) -> Order:
        async with self.pool.acquire() as conn:
            order = await orders.order_by_id(conn, order_id)
        if order is None or order.workspace_id != ws:
            raise OrderNotFound(order_id)
        return order

    # --- the operator's hand --------------------------------------------------------------------------

    async def mark_paid(self, ws: str, order_id: str, reference: str, operator: str) -> Result:
        """The manual provider: an operator says the order was paid (bank transfer, invoice), with a
        reference. Credits it like a webhook would, once."""
        order = await self.order(ws, order_id)
        if order.provider is not Provider.MANUAL:
            raise OrderStateError("only a manual order is marked paid by hand; a Stripe order is paid through Stripe")
        if order.status not in (*orders.OPEN, OrderStatus.PAID) and order.payment_reference != reference:
            raise OrderStateError(f"the order is {order.status.value}")
        payment = Payment(
            amount_minor=order.total_minor,
            currency=order.currency,
            provider=Provider.MANUAL,
            reference=reference,
            detail={"by": "operator", "operator": operator, "reference": reference},
        )
        return self._count(order, await crediting.credit(self.books, order.id, payment))

    async def cancel(self, ws: str, order_id: str, operator: str) -> Order:
        """An unpaid order. A Stripe order's Checkout Session is expired first, so it cannot be paid
        after the cancel; if Stripe says it is not open any more, it was paid (or expired): 409."""
        order = await self.order(ws, order_id)
        if order.status in orders.OPEN and order.provider_session_id and self.gateway is not None:
            if not await self.gateway.expire(order):
                raise OrderStateError("the Checkout Session is not open any more (paid or expired): see its webhook")
        result = await crediting.close_unpaid(
            self.pool, order.id, OrderStatus.CANCELED, {"by": "operator", "operator": operator}
        )
        if result.outcome is EventOutcome.IGNORED and result.order.status is not OrderStatus.CANCELED:
            raise OrderStateError(f"the order is {result.order.status.value}: only an unpaid order can be canceled")
        return self._count(order, result).order

    async def refund_manual(self, ws: str, order_id: str, operator: str) -> Result:
        """A manual order's refund (the money went back outside the sidecar). A Stripe order is refunded
        in Stripe; its charge.refunded webhook records it."""
        order = await self.order(ws, order_id)
        if order.provider is not Provider.MANUAL:
            raise OrderStateError("a Stripe order is refunded in Stripe; its charge.refunded webhook records it")
        if order.status not in (OrderStatus.PAID, OrderStatus.CREDITED, OrderStatus.REFUNDED):
            raise OrderStateError(f"the order is {order.status.value}: only a paid order can be refunded")
        return self._count(order, await crediting.refund(self.books, order, {"by": "operator", "operator": operator}))

    # --- the provider's webhooks ----------------------------------------------------------------------

    async def stripe_webhook(self, payload: bytes, signature: str | None) -> WebhookAnswer:
        """Verify (WebhookRefused: 400, nothing changes), apply, record. 503 when the event must come
        again later (its order is not there yet): Stripe redelivers on any non-2xx answer."""
        if self.gateway is None:
            raise StripeNotConfigured("payments.stripe is not configured")
        event = self.gateway.verify(payload, signature)
        order_id, result = await webhooks.apply(self.books, event)
        async with self.pool.acquire() as conn:
            await orders.record_event(
                conn, Provider.STRIPE, event["id"], event["type"], order_id, result.outcome, result.reason
            )
        kind = event["type"] if event["type"] in webhooks.HANDLED_TYPES else "other"
        self.metrics.webhooks.labels(kind, result.outcome.value).inc()
        if result.order is not None:
            self._count(result.order, result)
            if result.outcome is EventOutcome.APPLIED:
                await self._tell(result.order)
        if result.outcome is EventOutcome.REVIEW:
            log.error(
                "payment event kept for review: it credits nothing until an operator decides",
                extra={"order_id": order_id, "event_type": event["type"], "reason": result.reason},
            )
        status = 503 if result.outcome is EventOutcome.DEFERRED else 200
        return WebhookAnswer(status, result.outcome, result.reason)

    async def _tell(self, order: Order) -> None:
        for listener in self.listeners:
            try:
                await listener(order)
            except Exception:
                log.exception("a payment order listener failed", extra={"order_id": order.id})

    def _count(self, order: Order, result: Result) -> Result:
        m = self.metrics
        provider = order.provider.value
        if result.review is not None:
            m.reviews.labels(result.review.value).inc()
        if result.outcome is EventOutcome.APPLIED and result.order is not None:
            m.orders.labels(provider, result.order.status.value).inc()
        if result.credited_micro:
            m.credited.labels(provider).inc(result.credited_micro)
        if result.refunded_micro:
            m.refunded.labels(provider).inc(result.refunded_micro)
        if result.invoice_number:
            m.invoices.inc()
        return result


def open_payments(
    config: Config, pool: asyncpg.Pool, balances: Balances, metrics: PaymentMetrics, env: dict[str, str]
) -> tuple[Payments, str | None]:
    """The payments service, and why Stripe is unusable (a missing secret) or None. The data plane
    never needs Stripe, so only the control plane refuses to start without its secrets."""
    gateway, problem = None, None
    if config.payments.stripe is not None:
        try:
            gateway = StripeGateway.from_config(config.payments.stripe, env)
        except ConfigError as exc:  # a secret missing or unreadable, said without its value
            problem = str(exc)
    return Payments(config, pool, balances, metrics, gateway), problem


__all__ = ["Payments", "PaymentsUnavailable", "WebhookAnswer", "open_payments"]
