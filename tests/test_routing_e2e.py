"""Cost-aware routing, end to end (issue 16.6): a model's targets ordered by priority or by the call's
price on each, a target the workspace cannot cover skipped (402 only when none fits), and the ledger
row saying why its target was chosen."""

from __future__ import annotations

import orjson
import pytest
from support.harness import chat_body, start_sidecar, stop_sidecar

from sidecar.config import ConfigError, parse_config
from sidecar.proxy import routing

WINDOW = {"context_window_tokens": 128000, "max_output_tokens_default": 100}
DEAR = {"provider": "mock", "upstream_model": "dear-model", "price": "fallback-first"}  # 50 / 100 per 1M
CHEAP = {"provider": "mock", "upstream_model": "cheap-model", "price": "fallback-second"}  # 1 / 2 per 1M
ROUTED_MODELS = [
    {"name": "routed-order", "targets": [DEAR, CHEAP], **WINDOW},
    {"name": "routed-cheapest", "routing": "cheapest", "targets": [DEAR, CHEAP], **WINDOW},
    {
        "name": "routed-priority",
        "routing": "priority",
        "targets": [{**CHEAP, "priority": 5}, {**DEAR, "priority": 1}],
        **WINDOW,
    },
    {"name": "routed-fallback", "routing": "cheapest", "targets": [CHEAP, {**DEAR, "provider": "mock-503"}], **WINDOW},
]
CREDITS = 10_000_000


@pytest.fixture
async def sidecar(redis_client, redis_url, migrated_database_url):
    started = await start_sidecar(redis_url, migrated_database_url, more_models=ROUTED_MODELS)
    yield started
    await stop_sidecar(started)


def ceiling(sidecar, price: str, body: dict) -> int:
    pricing = sidecar.svc.config.pricing
    return pricing.ceiling_micro(pricing.price_of(price), len(orjson.dumps(body)), 100)


async def served(sidecar, ws, model: str, content: str = "hello") -> dict:
    status, _, raw = await sidecar.chat(ws, chat_body(content, model=model))
    assert status == 200, raw
    rows = await sidecar.ledger_eventually(ws.id, rows_min=1)
    return rows[-1]


@pytest.mark.parametrize(
    ("model", "upstream", "reason"),
    [
        ("routed-order", "dear-model", "order"),
        ("routed-cheapest", "cheap-model", "cheapest"),
        ("routed-priority", "dear-model", "priority"),
    ],
)
async def test_targets_are_tried_in_the_models_routing_order(sidecar, model, upstream, reason) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    row = await served(sidecar, ws, model)
    assert (row["upstream_model"], row["route_reason"], row["attempts"]) == (upstream, reason, 1)
    body = chat_body("hello", model=model)
    # The hold is the worst case over every target the call may still fall back to.
    assert row["hold_micro"] == max(ceiling(sidecar, p, body) for p in ("fallback-first", "fallback-second"))
    assert (
        row["price_version"]
        == sidecar.svc.config.pricing.price_of(
            "fallback-first" if upstream == "dear-model" else "fallback-second"
        ).version
    )
    await sidecar.assert_identity(ws.id)


async def test_a_fallback_is_recorded_as_the_reason(sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=CREDITS)
    status, _, raw = await sidecar.chat(
        ws, chat_body("hello", model="routed-fallback"), headers={"x-mock-status": "503"}
    )
    # The cheap target (first by price) answers 503 too here: the call falls to the next target.
    rows = await sidecar.ledger_eventually(ws.id)
    [row] = rows
    assert row["attempts"] == 2 and row["route_reason"] == "fallback:2", (status, raw, dict(row))
    assert row["fallback_reason"] == "mock: answered 503"


async def test_a_target_the_workspace_cannot_cover_is_skipped_not_refused(sidecar) -> None:
    body = chat_body("x" * 2000, model="routed-order")
    dear, cheap = ceiling(sidecar, "fallback-first", body), ceiling(sidecar, "fallback-second", body)
    assert dear > 10 * cheap
    ws = await sidecar.workspace(credits_micro=(dear + cheap) // 2)  # covers the cheap target only
    status, _, raw = await sidecar.chat(ws, body)
    assert status == 200, raw
    [row] = await sidecar.ledger_eventually(ws.id)
    assert row["upstream_model"] == "cheap-model" and row["hold_micro"] == cheap
    assert row["route_reason"] == "order;skipped_unaffordable:mock/dear-model"
    assert sidecar.recorded[-1].json_body["model"] == "cheap-model"
    await sidecar.assert_identity(ws.id)

    # With less than the cheapest target's worst case, nothing fits: a 402, nothing sent or charged.
    poor = await sidecar.workspace(credits_micro=cheap - 1)
    before = len(sidecar.recorded)
    status, _, raw = await sidecar.chat(poor, body)
    assert status == 402 and orjson.loads(raw)["error"]["code"] == "PAYMENT_REQUIRED"
    assert len(sidecar.recorded) == before and await sidecar.ledger(poor.id) == []


async def test_skipping_holds_under_concurrency(sidecar) -> None:
    """Calls racing for a balance that covers a few cheap holds: each is served on a target it could
    cover, or refused with a 402; the balance never goes below zero and the ledger reconstructs it."""
    import asyncio

    body = chat_body("x" * 2000, model="routed-order")
    dear, cheap = ceiling(sidecar, "fallback-first", body), ceiling(sidecar, "fallback-second", body)
    ws = await sidecar.workspace(credits_micro=dear + 3 * cheap)
    answers = await asyncio.gather(*(sidecar.chat(ws, body, headers={"x-mock-delay-ms": "200"}) for _ in range(8)))
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) <= {200, 402} and statuses.count(200) >= 1, statuses
    rows = await sidecar.ledger_eventually(ws.id, rows_min=statuses.count(200))
    assert len(rows) == statuses.count(200)
    for row in rows:
        assert row["hold_micro"] in (dear, cheap) and row["cost_micro"] <= row["hold_micro"]
        assert (row["hold_micro"] == cheap) == ("skipped_unaffordable:mock/dear-model" in row["route_reason"])
    identity = await sidecar.assert_identity(ws.id)
    assert identity["account_balance"] >= 0


def test_the_plan_orders_and_skips_without_io() -> None:
    from sidecar.config import ModelConfig, Target
    from sidecar.pricing import ModelPrice, Reach, TokenPrices

    targets = (Target(provider="a", upstream_model="x", price="x"), Target(provider="b", upstream_model="y", price="y"))
    prices = {"x": ModelPrice("x", TokenPrices(9, 9, 9, 9, 9), TokenPrices(9, 9, 9, 9, 9))}
    prices["y"] = ModelPrice("y", TokenPrices(1, 1, 1, 1, 1), TokenPrices(1, 1, 1, 1, 1))
    model = ModelConfig(name="m", targets=targets, routing="cheapest")
    plan = routing.plan(model, targets, lambda t: prices[t.price], lambda p: p.sell.input, Reach(), False)
    assert [t.price for t in plan.targets] == ["y", "x"] and plan.ceiling_micro == 9
    assert plan.reason(0) == "cheapest" and plan.reason(1) == "fallback:2"
    cheaper = routing.affordable(plan, 5)
    assert [t.price for t in cheaper.targets] == ["y"] and cheaper.reason(0) == "cheapest;skipped_unaffordable:a/x"
    assert routing.affordable(plan, 0) is None and routing.affordable(plan, 9) is None
    # A request incurring audio: only a target with an audio price may serve it.
    audio = ModelPrice("z", TokenPrices(1, 1, 1, 1, 1, input_audio=7), TokenPrices(1, 1, 1, 1, 1))
    prices["x"] = audio
    plan = routing.plan(model, targets, lambda t: prices[t.price], lambda p: 1, Reach(audio_in=True), False)
    assert [t.price for t in plan.targets] == ["x"] and plan.skipped == ("skipped_unpriced:b/y",)


def test_routing_config_is_checked() -> None:
    base = {"providers": [{"name": "p", "protocol": "openai", "base_url": "http://x"}]}
    pricing = {"models": {"m": {"input": "1", "output": "1"}}}
    model = {"name": "m", "max_output_tokens_default": 1, "context_window_tokens": 1}
    with pytest.raises(ConfigError, match="with routing: priority, every target needs a priority"):
        parse_config(
            {**base, "models": [{**model, "routing": "priority", "targets": [{"provider": "p"}]}]}, pricing, {}
        )
    with pytest.raises(ConfigError, match="set routing: priority to use it"):
        parse_config({**base, "models": [{**model, "targets": [{"provider": "p", "priority": 1}]}]}, pricing, {})
    with pytest.raises(ConfigError, match="routing: unknown routing 'fastest'"):
        parse_config({**base, "models": [{**model, "routing": "fastest", "provider": "p"}]}, pricing, {})
