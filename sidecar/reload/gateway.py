"""What auto-reload needs from a payment provider: start one off-session payment, idempotently, and
later say how it ended.

The implementation (orders_gateway.py: a reload payment order, charged by an off-session Stripe
PaymentIntent on the saved payment method, the reload id as the order's idempotency id) creates the
payment order the credits arrive on; the credits come by the provider's webhook like any order's. The
reload worker then reads the order's end (`payment_outcomes`) and ends the reload to match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from sidecar.errors import DomainError


@dataclass(frozen=True, slots=True)
class SavedMethod:
    """A payment method saved by an earlier checkout, as the provider names it."""

    customer_id: str | None
    payment_method_id: str


@dataclass(frozen=True, slots=True)
class ProviderIds:
    payment_id: str  # e.g. the PaymentIntent's id
    order_id: str | None = None  # the payment order the credits will arrive on


@dataclass(frozen=True, slots=True)
class PaymentOutcome:
    succeeded: bool
    reason: str | None = None  # why it failed, in the provider's words (a code, never a secret)


class ReloadDeclined(DomainError):
    """The provider refused the payment outright (a declined card, authentication required): the
    reload failed and counts toward disabling. `reason` is the provider's code, never a secret."""

    def __init__(self, reason: str, payment_id: str | None = None, order_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.payment_id, self.order_id = reason, payment_id, order_id


class ReloadGateway(Protocol):
    async def start_reload_payment(
        self, ws: str, reload_id: str, amount_micro: int, method: SavedMethod
    ) -> ProviderIds:
        """Start (or, for a reload id seen before, find) the payment. ReloadDeclined: refused for good;
        any other exception: not started, tried again on the next round."""
        ...

    async def payment_outcomes(self, order_ids: list[str]) -> dict[str, PaymentOutcome]:
        """The orders (of started reloads) whose payment has ended; those still open are left out."""
        ...

    async def saved_method(self, ws: str) -> SavedMethod | None:
        """The payment method the workspace's latest paid checkout saved, if any."""
        ...
