"""Payments configuration (issue 9): the Stripe secrets come from a file or the environment and never
appear anywhere; the keys are checked at start with errors that name them."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from support.harness import build_config
from support.payments import SECRET_KEY, WEBHOOK_SECRET, Shop

from sidecar.billing.stripe_gateway import StripeGateway
from sidecar.config import ConfigError, StripeConfig


def _config(**overrides):
    return build_config("redis://x", "postgresql://x", "http://127.0.0.1:1/v1", **overrides)


def test_the_secrets_come_from_a_file_first_then_the_environment(tmp_path: Path):
    key_file = tmp_path / "key"
    key_file.write_text(SECRET_KEY + "\n")
    hook_file = tmp_path / "hook"
    hook_file.write_text(WEBHOOK_SECRET)
    config = StripeConfig(secret_key_file=str(key_file), webhook_secret_file=str(hook_file))
    gateway = StripeGateway.from_config(config, {"STRIPE_SECRET_KEY": "sk_env_loses"})
    assert gateway._webhook_secret == WEBHOOK_SECRET
    StripeGateway.from_config(StripeConfig(), {"STRIPE_SECRET_KEY": "sk_x", "STRIPE_WEBHOOK_SECRET": "whsec_x"})


@pytest.mark.parametrize(
    ("config", "env", "named"),
    [
        (StripeConfig(), {"STRIPE_WEBHOOK_SECRET": "whsec_x"}, "STRIPE_SECRET_KEY"),
        (StripeConfig(), {"STRIPE_SECRET_KEY": "sk_live_abc"}, "STRIPE_WEBHOOK_SECRET"),
        (StripeConfig(secret_key_file="/nonexistent/key"), {"STRIPE_WEBHOOK_SECRET": "whsec_x"}, "/nonexistent/key"),
    ],
)
def test_a_missing_secret_is_named_never_shown(config, env, named):
    with pytest.raises(ConfigError) as refused:
        StripeGateway.from_config(config, env)
    assert named in str(refused.value)
    for value in env.values():
        assert value not in str(refused.value)


def test_payment_keys_are_checked():
    config = _config(fees={"purchase_percent": "2.5"}, tax={"rates_percent": {"DE": "19"}})
    assert config.fees.purchase_percent == "2.5" and config.tax.rates_percent == {"DE": "19"}
    for overrides, words in (
        ({"payments": {"currency": "EUR"}}, "payments.currency"),  # the cost profile is in USD
        ({"fees": {"purchase_percent": "abc"}}, "purchase_percent"),
        ({"fees": {"purchase_percent": "1.00001"}}, "purchase_percent"),
        ({"tax": {"rates_percent": {"de": "19"}}}, "rates_percent"),
        ({"tax": {"rates_percent": {"DE": "101"}}}, "rates_percent.DE"),
        ({"payments": {"order_amount_min": "0"}}, "order_amount_min"),
        ({"payments": {"stripe": {"api_base": "ftp://x"}}}, "api_base"),
        ({"payments": {"stripe": {"webhook_tolerance_ms": 10}}}, "webhook_tolerance_ms"),
        ({"invoices": {"issuer": {"country": "Germany"}}}, "country"),
        ({"invoices": {"issuer": {"number_prefix": "inv-"}}}, "number_prefix"),
    ):
        with pytest.raises(ConfigError) as refused:
            _config(**overrides)
        assert words in str(refused.value), (overrides, str(refused.value))


async def test_no_secret_reaches_a_log_line_or_an_answer(shop: Shop, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    ws = (await shop.sidecar.workspace()).id
    order = await shop.order(ws)
    answers = [orjson.dumps(order)]
    completed, _ = shop.fake.complete_session(order["provider_session_id"])
    payload = orjson.dumps(completed)
    for signature in (shop.fake.sign(payload, secret="whsec_other"), shop.fake.sign(payload)):
        answers.append(orjson.dumps(await shop.post_webhook(payload, signature)))
    answers.append(orjson.dumps(await shop.read(ws, order["id"])))
    exposition = shop.sidecar.svc.metrics.registry
    from prometheus_client import generate_latest

    for secret in (SECRET_KEY, WEBHOOK_SECRET):
        assert secret not in caplog.text
        assert all(secret.encode() not in a for a in answers)
        assert secret.encode() not in generate_latest(exposition)


async def test_the_control_plane_refuses_to_start_without_its_stripe_secrets(
    redis_client, redis_url: str, migrated_database_url: str
):
    from support.harness import TEST_KEK, start_sidecar, stop_sidecar

    from sidecar.app import Runtime

    sidecar = await start_sidecar(
        redis_url, migrated_database_url, env={"SIDECAR_KEK": TEST_KEK}, payments={"stripe": {}}
    )
    try:
        assert "STRIPE_SECRET_KEY" in sidecar.svc.payments_problem
        # The data plane never needs Stripe; the control plane takes its webhooks and cannot start.
        runtime = Runtime(sidecar.svc, data_plane=False, control_plane=True)
        with pytest.raises(SystemExit) as stopped:
            await runtime.start("127.0.0.1", 0, 0)
        assert "STRIPE_SECRET_KEY" in str(stopped.value)
        status, body = await sidecar.admin("POST", "/workspaces", {"id": "ws_nostripe", "name": "x"})
        status, body = await sidecar.admin(
            "POST", "/workspaces/ws_nostripe/orders", {"client_order_id": "a", "amount": "5"}
        )
        assert status == 409 and body["error"]["code"] == "provider_not_configured"
    finally:
        await stop_sidecar(sidecar)
