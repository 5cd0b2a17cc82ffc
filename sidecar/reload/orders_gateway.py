"""Auto-reload's payments as payment orders (sidecar/billing/): each reload is a `reload` order whose
client order id is the reload id, charged by an off-session Stripe PaymentIntent on the payment method
an earlier checkout saved (Payments.create_reload_order). The credits arrive by Stripe's
payment_intent.succeeded webhook, credited by the orders code exactly once like any order's. The
reload ends to match its order: at once, by a listener the webhook calls (`order_listener`), and, should
that be missed (a listener's error, a restart in between), by the worker reading the order's end
(`payment_outcomes`). Ending a reload twice changes nothing (reload/store.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sidecar.billing import orders
from sidecar.billing.orders import CLOSED_UNPAID, PAID_OR_AFTER, Order, OrderStatus, Purpose
from sidecar.billing.payments import Payments
from sidecar.reload.gateway import PaymentOutcome, ProviderIds, ReloadDeclined, SavedMethod
from sidecar.reload.worker import ReloadWorker

DECLINED = "declined"


class OrdersReloadGateway:
    def __init__(self, payments: Payments) -> None:
        self.payments = payments

    async def start_reload_payment(
        self, ws: str, reload_id: str, amount_micro: int, method: SavedMethod
    ) -> ProviderIds:
        order = await self.payments.create_reload_order(
            ws, reload_id, amount_micro, method.customer_id or "", method.payment_method_id
        )
        if order.status in CLOSED_UNPAID:
            raise ReloadDeclined(await self._why(order.id, order.status), order.provider_payment_id, order.id)
        return ProviderIds(order.provider_payment_id or "", order.id)

    async def payment_outcomes(self, order_ids: list[str]) -> dict[str, PaymentOutcome]:
        if not order_ids:
            return {}
        async with self.payments.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, status FROM payment_orders WHERE id = ANY($1::text[]) AND purpose = $2",
                order_ids,
                Purpose.RELOAD.value,
            )
        found = {}
        for row in rows:
            outcome = await self.outcome(row["id"], OrderStatus(row["status"]))
            if outcome is not None:
                found[row["id"]] = outcome
        return found

    async def outcome(self, order_id: str, status: OrderStatus) -> PaymentOutcome | None:
        """How a reload order's payment ended, or None while it is open."""
        if status in PAID_OR_AFTER:
            return PaymentOutcome(True)
        if status in CLOSED_UNPAID:
            return PaymentOutcome(False, await self._why(order_id, status))
        return None

    async def saved_method(self, ws: str) -> SavedMethod | None:
        async with self.payments.pool.acquire() as conn:
            saved = await orders.saved_payment_method(conn, ws)
        return SavedMethod(*saved) if saved else None

    async def _why(self, order_id: str, status: OrderStatus) -> str:
        """The provider's code from the order's last event (card_declined, ...), else its status."""
        async with self.payments.pool.acquire() as conn:
            events = await orders.order_events(conn, order_id)
        code = events[-1].detail.get("code") if events else None
        return str(code)[:60] if code else (DECLINED if status is OrderStatus.FAILED else status.value)


def order_listener(gateway: OrdersReloadGateway, worker: ReloadWorker) -> Callable[[Order], Awaitable[None]]:
    """For Payments.listeners: a reload order the webhook moved ends its reload (its client order id)."""

    async def on_order(order: Order) -> None:
        if order.purpose is not Purpose.RELOAD:
            return
        outcome = await gateway.outcome(order.id, order.status)
        if outcome is None:
            return
        async with worker.pool.acquire() as conn:
            if outcome.succeeded:
                await worker.payment_succeeded(conn, order.client_order_id)
            else:
                await worker.payment_failed(conn, order.client_order_id, outcome.reason or "failed")

    return on_order
