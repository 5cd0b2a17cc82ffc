"""Auto-reload's payments as payment orders (sidecar/billing/): each reload is a `reload` order whose
client order id is the reload id, charged by an off-session Stripe PaymentIntent on the payment method
an earlier checkout saved (Payments.create_reload_order). The credits arrive by Stripe's
payment_intent.succeeded webhook, credited by the orders code exactly once like any order's; the reload
worker reads the order's end from here and ends the reload to match (reload/store.py).
"""

from __future__ import annotations

from sidecar.billing import orders
from sidecar.billing.orders import CLOSED_UNPAID, PAID_OR_AFTER, OrderStatus, Purpose
from sidecar.billing.payments import Payments
from sidecar.reload.gateway import PaymentOutcome, ProviderIds, ReloadDeclined, SavedMethod

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
            status = OrderStatus(row["status"])
            if status in PAID_OR_AFTER:
                found[row["id"]] = PaymentOutcome(True)
            elif status in CLOSED_UNPAID:
                found[row["id"]] = PaymentOutcome(False, await self._why(row["id"], status))
        return found

    async def saved_method(self, ws: str) -> SavedMethod | None:
        async with self.payments.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT customer_ref, payment_method_ref FROM payment_orders WHERE workspace_id = $1 "
                "AND purpose = $2 AND payment_method_ref IS NOT NULL AND customer_ref IS NOT NULL "
                "AND status = ANY($3::text[]) ORDER BY updated_at DESC, id LIMIT 1",
                ws,
                Purpose.CHECKOUT.value,
                [s.value for s in PAID_OR_AFTER],
            )
        return SavedMethod(row["customer_ref"], row["payment_method_ref"]) if row else None

    async def _why(self, order_id: str, status: OrderStatus) -> str:
        """The provider's code from the order's last event (card_declined, ...), else its status."""
        async with self.payments.pool.acquire() as conn:
            events = await orders.order_events(conn, order_id)
        code = events[-1].detail.get("code") if events else None
        return str(code)[:60] if code else (DECLINED if status is OrderStatus.FAILED else status.value)
