"""What auto-reload needs from a payment provider: start one off-session payment, idempotently.

The provider's implementation (Stripe: an off-session PaymentIntent on the saved payment method, with
the reload id as its idempotency key and in its metadata) creates the payment order the credits
arrive on; the credits then come by the provider's webhook like any order's, and the webhook reports
the reload's end through reload.store.payment_succeeded / payment_failed.
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


class ReloadDeclined(DomainError):
    """The provider refused the payment outright (a declined card, authentication required): the
    reload failed and counts toward disabling. `reason` is the provider's code, never a secret."""

    def __init__(self, reason: str, payment_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.payment_id = reason, payment_id


class ReloadGateway(Protocol):
    async def start_reload_payment(
        self, ws: str, reload_id: str, amount_micro: int, method: SavedMethod
    ) -> ProviderIds:
        """Start (or, for a reload id seen before, find) the payment. ReloadDeclined: refused for good;
        any other exception: not started, tried again on the next round."""
        ...
