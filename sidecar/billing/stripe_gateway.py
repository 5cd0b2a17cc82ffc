"""Stripe, through its official SDK: Checkout Sessions, off-session PaymentIntents, webhook signatures.

Nothing here decides what a payment means (sidecar/billing/webhooks.py does); this module only talks
to Stripe. Every request that creates something carries the order id as its Stripe idempotency key,
so a retried create (ours or the SDK's) returns the same session or PaymentIntent, never a second one.
The secret key and the webhook secret are read once at start and live only in this object.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import orjson
import stripe

from sidecar import scrub
from sidecar.billing.orders import Order
from sidecar.billing.tax import format_money
from sidecar.config import ConfigError, StripeConfig
from sidecar.errors import DomainError
from sidecar.money import format_micro

log = logging.getLogger("sidecar.billing.stripe")


class PaymentsUnavailable(DomainError):
    """Stripe could not be reached or refused the request -> admin 502 payment_provider_error; the
    order stays as it was, and the same request again retries with the same idempotency key."""


class PaymentDeclined(DomainError):
    """An off-session PaymentIntent was declined (a card error) -> the reload order fails."""

    def __init__(self, code: str | None) -> None:
        super().__init__(f"the payment was declined ({code or 'no code'})")
        self.code = code


class WebhookRefusal(StrEnum):
    """Why a webhook delivery was refused with 400 (a metric label)."""

    SIGNATURE = "signature"  # missing, malformed or not signed by the endpoint secret
    STALE = "stale"  # signed longer ago than the tolerance: a replayed capture
    MALFORMED = "malformed"  # signed, but not a Stripe event


class WebhookRefused(DomainError):
    """A webhook that is not verifiably Stripe's -> 400, nothing changes."""

    def __init__(self, reason: WebhookRefusal) -> None:
        super().__init__(f"webhook refused: {reason.value}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Checkout:
    session_id: str
    url: str


@dataclass(frozen=True, slots=True)
class Charge:
    payment_id: str
    status: str  # Stripe's PaymentIntent status: succeeded, processing, requires_action, ...


def _secret(env: dict[str, str], file: str, env_name: str, what: str) -> str:
    if file:
        try:
            value = Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"payments.stripe: cannot read the {what} file {file!r}: {exc.strerror}") from None
    else:
        value = env.get(env_name, "").strip()
    if not value:
        raise ConfigError(
            f"payments.stripe: no {what}: set {env_name} or payments.stripe.{what.replace(' ', '_')}_file"
        )
    return value


class StripeGateway:
    def __init__(self, config: StripeConfig, secret_key: str, webhook_secret: str) -> None:
        scrub.remember(secret_key)
        scrub.remember(webhook_secret)
        self.config = config
        self._webhook_secret = webhook_secret
        self._http = stripe.AIOHTTPClient(timeout=config.timeout_ms / 1000)
        self._client = stripe.StripeClient(
            secret_key,
            base_addresses={"api": config.api_base} if config.api_base else None,
            http_client=self._http,
            max_network_retries=config.max_network_retries,
        )

    @classmethod
    def from_config(cls, config: StripeConfig, env: dict[str, str]) -> StripeGateway:
        """ConfigError when a secret is missing (said by name, never by value)."""
        key = _secret(env, config.secret_key_file, config.secret_key_env, "secret key")
        webhook = _secret(env, config.webhook_secret_file, config.webhook_secret_env, "webhook secret")
        return cls(config, key, webhook)

    async def close(self) -> None:
        await self._http.close_async()

    async def checkout(self, order: Order) -> Checkout:
        """A Checkout Session charging the order's total; the order id is its idempotency key and
        metadata (also on its PaymentIntent, so every event names the order)."""
        metadata = {"order_id": order.id, "workspace_id": order.workspace_id}
        decimals = order.tax_snapshot.get("decimals", 2)
        name = f"{self.config.product_name}: {format_micro(order.amount_micro)}"
        params = {
            "mode": "payment",
            "client_reference_id": order.id,
            "metadata": metadata,
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": order.currency,
                        "unit_amount": order.total_minor,
                        "product_data": {
                            "name": name,
                            "description": (
                                f"{format_money(order.amount_micro, decimals)} + fee "
                                f"{format_money(order.fee_micro, decimals)} + tax "
                                f"{format_money(order.tax_micro, decimals)} {order.currency.upper()}"
                            ),
                        },
                    },
                }
            ],
            # Saved for auto-reload: a later off-session PaymentIntent may charge the same method.
            "payment_intent_data": {"metadata": metadata, "setup_future_usage": "off_session"},
            "success_url": self.config.success_url.replace("{ORDER_ID}", order.id),
            "cancel_url": self.config.cancel_url.replace("{ORDER_ID}", order.id),
        }
        if order.customer_ref:
            params["customer"] = order.customer_ref
        else:
            params["customer_creation"] = "always"
        session = await self._call(self._client.v1.checkout.sessions.create_async, params, order.id)
        return Checkout(session_id=session["id"], url=session["url"])

    async def charge_off_session(self, order: Order) -> Charge:
        """An off-session PaymentIntent on the order's saved payment method (auto-reload), confirmed at
        once. PaymentDeclined when the card is refused; the outcome also arrives by webhook."""
        params = {
            "amount": order.total_minor,
            "currency": order.currency,
            "customer": order.customer_ref,
            "payment_method": order.payment_method_ref,
            "off_session": True,
            "confirm": True,
            "metadata": {"order_id": order.id, "workspace_id": order.workspace_id},
        }
        try:
            intent = await self._call(self._client.v1.payment_intents.create_async, params, order.id)
        except stripe.CardError as exc:
            raise PaymentDeclined(exc.code) from None
        return Charge(payment_id=intent["id"], status=intent["status"])

    async def expire(self, order: Order) -> bool:
        """Close the order's Checkout Session so it can no longer be paid. False when Stripe refuses
        because the session is not open any more (paid, or expired already: its webhook tells which)."""
        try:
            session = await self._client.v1.checkout.sessions.expire_async(order.provider_session_id)
        except stripe.InvalidRequestError:
            return False
        except stripe.StripeError as exc:
            log.warning(
                "stripe refused or could not be reached",
                extra={"order_id": order.id, "error": type(exc).__name__, "http_status": exc.http_status},
            )
            raise PaymentsUnavailable(f"the payment provider answered {type(exc).__name__}") from None
        return session["status"] == "expired"

    async def _call(self, create, params: dict, order_id: str):
        try:
            return await create(params, {"idempotency_key": order_id})
        except stripe.CardError:
            raise
        except stripe.StripeError as exc:
            # The SDK's message names no secret; its class and HTTP status say enough to act on.
            log.warning(
                "stripe refused or could not be reached",
                extra={"order_id": order_id, "error": type(exc).__name__, "http_status": exc.http_status},
            )
            raise PaymentsUnavailable(f"the payment provider answered {type(exc).__name__}") from None

    def verify(self, payload: bytes, signature: str | None) -> dict:
        """The event, once the SDK has verified its signature and timestamp against the endpoint secret."""
        try:
            event = self._client.construct_event(
                payload, signature, self._webhook_secret, self.config.webhook_tolerance_ms // 1000
            )
        except stripe.SignatureVerificationError as exc:
            stale = "tolerance" in str(exc).lower()
            raise WebhookRefused(WebhookRefusal.STALE if stale else WebhookRefusal.SIGNATURE) from None
        except (ValueError, UnicodeDecodeError):
            raise WebhookRefused(WebhookRefusal.MALFORMED) from None
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise WebhookRefused(WebhookRefusal.MALFORMED) from None
        if not (
            isinstance(data, dict)
            and isinstance(data.get("id"), str)
            and isinstance(data.get("type"), str)
            and isinstance((data.get("data") or {}).get("object"), dict)
            and event.id == data["id"]
        ):
            raise WebhookRefused(WebhookRefusal.MALFORMED)
        return data
