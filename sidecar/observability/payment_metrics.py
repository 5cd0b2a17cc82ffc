"""Metrics of money in (sidecar/billing/): orders, provider webhooks, reviews, credits bought and refunded.

Labels are bounded sets: event types the sidecar handles (else "other"), outcomes, review and refusal
reasons, order statuses and providers. Never an order id, a workspace or a secret.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class PaymentMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.orders = Counter(
            "sidecar_payment_order_transitions",
            "Payment order status changes, by provider and the status reached",
            ["provider", "status"],
            registry=r,
        )
        self.webhooks = Counter(
            "sidecar_payment_webhooks",
            "Verified provider webhook deliveries, by event type and what they did",
            ["type", "outcome"],
            registry=r,
        )
        self.webhooks_refused = Counter(
            "sidecar_payment_webhooks_refused",
            "Webhook deliveries refused with 400 (bad or missing signature, stale timestamp, malformed)",
            ["reason"],
            registry=r,
        )
        self.reviews = Counter(
            "sidecar_payment_reviews",
            "Payment events refused and kept for an operator (amount or currency mismatch, ...): alert on any",
            ["reason"],
            registry=r,
        )
        self.credited = Counter(
            "sidecar_credits_purchased_micro", "Micro-credits credited from paid orders", ["provider"], registry=r
        )
        self.refunded = Counter(
            "sidecar_credits_refunded_micro", "Micro-credits removed by refunds of orders", ["provider"], registry=r
        )
        self.invoices = Counter("sidecar_invoices_issued", "Invoices numbered for credited orders", registry=r)
