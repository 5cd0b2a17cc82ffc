"""A sidecar with payments configured against the local fake Stripe (sidecar/devtools/fake_stripe.py),
which the real `stripe` SDK talks to, and which signs and delivers webhooks as Stripe does."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sidecar.devtools import fake_stripe
from sidecar.devtools.fake_stripe import FakeStripe
from support.harness import TEST_KEK, Sidecar, start_sidecar, stop_sidecar

SECRET_KEY = "sk_test_" + "k" * 24
WEBHOOK_SECRET = "whsec_" + "w" * 24
ISSUER = {
    "id": "acme",
    "number_prefix": "INV",
    "legal_name": "Acme Metering GmbH",
    "address": "Hauptstrasse 1\n10115 Berlin",
    "country": "DE",
    "tax_id": "DE999999999",
    "email": "billing@acme.example",
}


@dataclass
class Shop:
    sidecar: Sidecar
    fake: FakeStripe
    runner: web.AppRunner

    @property
    def webhook_url(self) -> str:
        return str(self.sidecar.control.make_url("/webhooks/stripe"))

    async def order(self, ws: str, amount: str = "10.00", provider: str = "stripe", **extra: Any) -> dict:
        body = {"client_order_id": extra.pop("client_order_id", secrets.token_hex(6)), "amount": amount}
        status, order = await self.sidecar.admin("POST", f"/workspaces/{ws}/orders", {**body, "provider": provider})
        assert status == 201, order
        return order

    async def read(self, ws: str, order_id: str) -> dict:
        status, order = await self.sidecar.admin("GET", f"/workspaces/{ws}/orders/{order_id}")
        assert status == 200, order
        return order

    async def balance(self, ws: str) -> int:
        status, body = await self.sidecar.admin("GET", f"/workspaces/{ws}/balance")
        assert status == 200, body
        return body["balance_micro"]

    async def post_webhook(self, payload: bytes, signature: str | None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        async with self.sidecar.http.post(self.webhook_url, data=payload, headers=headers) as resp:
            return resp.status, await resp.json()

    def metric(self, name: str, **labels: str) -> float:
        value = self.sidecar.svc.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


async def start_shop(redis_url: str, database_url: str, **overrides: Any) -> Shop:
    runner, fake, url = await fake_stripe.start(
        fake=FakeStripe(secret_key=SECRET_KEY, webhook_secret=WEBHOOK_SECRET, retry_delay_s=0.05, auto_deliver=False)
    )
    payments = {"stripe": {"api_base": url, "max_network_retries": 0}, **overrides.pop("payments", {})}
    sidecar = await start_sidecar(
        redis_url,
        database_url,
        env={"SIDECAR_KEK": TEST_KEK, "STRIPE_SECRET_KEY": SECRET_KEY, "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET},
        payments=payments,
        fees=overrides.pop("fees", {"purchase_percent": "5"}),
        tax=overrides.pop("tax", {"rates_percent": {"DE": "19", "FR": "20"}, "default_rate_percent": "0"}),
        invoices=overrides.pop("invoices", {"issuer": ISSUER}),
        **overrides,
    )
    shop = Shop(sidecar, fake, runner)
    fake.webhook_url = shop.webhook_url
    return shop


async def stop_shop(shop: Shop) -> None:
    await stop_sidecar(shop.sidecar)
    await shop.runner.cleanup()
