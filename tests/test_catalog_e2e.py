"""A model priced from the catalog, end to end (issue 16): listed with its sell prices by GET /v1/models,
and a call's ledger row costs what genai-prices computes for the usage the provider reported."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from fractions import Fraction

import genai_prices
import orjson
from support.harness import chat_body, start_sidecar, stop_sidecar

from sidecar import price_versions
from sidecar.pricing import ModelPrice, Reach, TokenPrices
from sidecar.protocols.base import TOOL_CALLS_MAX_DEFAULT

CREDITS = 10_000_000
CATALOG_MODELS = [
    {"name": "cat-4o", "provider": "mock-catalog", "upstream_model": "gpt-4o", "markup_percent": "20"},
    {"name": "cat-o3-mini", "provider": "mock-catalog", "upstream_model": "o3-mini"},
    {"name": "cat-sonnet", "provider": "mock-anthropic-catalog", "upstream_model": "claude-sonnet-4-5"},
]


async def test_a_catalog_model_is_listed_and_billed_as_genai_prices_computes(
    redis_client, redis_url, migrated_database_url
):
    sidecar = await start_sidecar(redis_url, migrated_database_url, more_models=CATALOG_MODELS)
    try:
        ws = await sidecar.workspace(credits_micro=CREDITS)
        async with sidecar.http.get(
            sidecar.data.make_url("/v1/models"), headers={"Authorization": f"Bearer {ws.key}"}
        ) as resp:
            listed = {m["id"]: m for m in (await resp.json())["data"]}
        # Sell prices: gpt-4o's 2.50/10.00/1.25 plus 20%; o3-mini's at the upstream price.
        assert listed["cat-4o"]["pricing"]["input"] == "3"
        assert listed["cat-4o"]["pricing"]["output"] == "12"
        assert listed["cat-4o"]["pricing"]["cache_read"] == "1.5"
        assert listed["cat-o3-mini"]["pricing"]["output"] == "4.4"

        status, _, raw = await sidecar.chat(
            ws, chat_body("x" * 4000, model="cat-4o"), headers={"x-mock-cache-read": "700"}
        )
        assert status == 200, raw
        usage = orjson.loads(raw)["usage"]
        await sidecar.flush()
        [row] = await sidecar.ledger(ws.id)
        theirs = genai_prices.calc_price(
            genai_prices.Usage(
                input_tokens=usage["prompt_tokens"],
                cache_read_tokens=usage["prompt_tokens_details"]["cached_tokens"],
                output_tokens=usage["completion_tokens"],
            ),
            "gpt-4o",
            provider_id="openai",
        )
        assert usage["prompt_tokens_details"]["cached_tokens"] == 700
        assert row["upstream_cost_micro"] == math.ceil(Fraction(theirs.total_price) * 1_000_000)
        assert row["cost_micro"] == math.ceil(Fraction(theirs.total_price) * Fraction(6, 5) * 1_000_000)
        assert row["upstream_model"] == "gpt-4o"
        identity = await sidecar.assert_identity(ws.id)
        assert identity["account_balance"] == CREDITS - row["cost_micro"]
    finally:
        await stop_sidecar(sidecar)


async def test_a_search_fee_is_held_billed_and_recorded_with_the_price_version(
    redis_client, redis_url, migrated_database_url
) -> None:
    """gpt-4o prices web search per call: chat's `web_search_options` (one search per call) is served,
    held and billed with the fee, as genai-prices computes it; the row names the price version it was
    billed at, registered with its prices. What the catalog cannot price is a 400, nothing forwarded."""
    sidecar = await start_sidecar(redis_url, migrated_database_url, more_models=CATALOG_MODELS)
    try:
        ws = await sidecar.workspace(credits_micro=CREDITS)
        status, _, raw = await sidecar.chat(ws, chat_body("x" * 400, model="cat-4o", web_search_options={}))
        assert status == 200, raw
        usage = orjson.loads(raw)["usage"]
        [row] = await sidecar.ledger_eventually(ws.id)
        theirs = genai_prices.calc_price(
            genai_prices.Usage(
                input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"], web_searches=1
            ),
            "gpt-4o",
            provider_id="openai",
        )
        assert row["web_searches"] == 1
        assert row["cost_micro"] == math.ceil(Fraction(theirs.total_price) * Fraction(6, 5) * 1_000_000)
        fee_micro = 10_000 * 6 // 5  # $10 per 1000 searches, +20%
        assert row["hold_micro"] > fee_micro and row["cost_micro"] > fee_micro
        price = sidecar.svc.config.pricing.price_of("cat-4o")
        assert row["price_version"] == price.version and row["route_reason"] == "order"
        async with sidecar.svc.pool.acquire() as conn:
            registered = await price_versions.at_version(conn, row["price_version"])
        assert registered["source"] == f"genai-prices=={genai_prices.__version__}"
        assert registered["prices"]["sell"]["web_search_fee"] == fee_micro * 10**9

        before = len(sidecar.recorded)
        for extra, param in (
            ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools"),  # not on chat
            ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "modalities"),
            ({"tools": [{"type": "code_interpreter"}]}, "tools"),
        ):
            status, _, raw = await sidecar.chat(ws, chat_body(model="cat-4o", **extra))
            assert status == 400, (extra, raw)
            error = orjson.loads(raw)["error"]
            assert error["code"] == "unsupported_feature" and error["param"] == param, raw
        assert len(sidecar.recorded) == before
        await sidecar.assert_identity(ws.id)
    finally:
        await stop_sidecar(sidecar)


async def test_a_dated_price_change_bills_each_call_at_the_version_in_force_when_it_arrived(
    redis_client, redis_url, migrated_database_url
) -> None:
    sidecar = await start_sidecar(redis_url, migrated_database_url, more_models=CATALOG_MODELS)
    try:
        pricing = sidecar.svc.config.pricing
        now = pricing.price_of("cat-4o")
        doubled = now.sell.mapped(lambda p: 2 * p)
        effective_ms = int(time.time() * 1000) + 1500
        later = ModelPrice("cat-4o", doubled, now.upstream, effective_ms=effective_ms, source=now.source)
        changed = dataclasses.replace(pricing, changes={**pricing.changes, "cat-4o": (later,)})
        sidecar.svc.config = dataclasses.replace(sidecar.svc.config, pricing=changed)
        await price_versions.register(sidecar.svc.pool, changed)
        ws = await sidecar.workspace(credits_micro=CREDITS)
        body = chat_body("x" * 400, model="cat-4o")
        assert (await sidecar.chat(ws, body))[0] == 200
        await asyncio.sleep(max(effective_ms / 1000 - time.time(), 0) + 0.05)
        assert (await sidecar.chat(ws, body))[0] == 200
        first, second = await sidecar.ledger_eventually(ws.id, rows_min=2)
        assert (first["price_version"], second["price_version"]) == (now.version, later.version)
        assert second["cost_micro"] in (2 * first["cost_micro"], 2 * first["cost_micro"] - 1)
        async with sidecar.svc.pool.acquire() as conn:
            registered = await price_versions.at_version(conn, later.version)
        assert registered["effective_at"].timestamp() * 1000 == effective_ms
        assert registered["prices"]["sell"]["input"] == 2 * now.sell.input
    finally:
        await stop_sidecar(sidecar)


async def test_anthropic_web_searches_are_bounded_held_and_billed_per_search(
    redis_client, redis_url, migrated_database_url
) -> None:
    """A web_search tool without `max_uses` gets the default bound injected upstream; the hold covers that
    many searches; the searches the provider reports are billed at the catalog's fee, as genai-prices
    computes the call."""
    sidecar = await start_sidecar(redis_url, migrated_database_url, more_models=CATALOG_MODELS)
    try:
        ws = await sidecar.workspace(credits_micro=CREDITS)
        body = {
            "model": "cat-sonnet",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "search the web for something"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        }
        url = sidecar.data.make_url("/v1/messages")
        headers = {"x-api-key": ws.key, "anthropic-version": "2023-06-01", "x-mock-web-searches": "3"}
        async with sidecar.http.post(url, json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
        assert sidecar.recorded[-1].json_body["tools"][0]["max_uses"] == TOOL_CALLS_MAX_DEFAULT
        assert answer["usage"]["server_tool_use"]["web_search_requests"] == 3
        [row] = await sidecar.ledger_eventually(ws.id)
        price = sidecar.svc.config.pricing.price_of("cat-sonnet")
        fee_micro = price.sell.web_search_fee // 10**9
        assert row["web_searches"] == 3 and fee_micro == 10_000
        window = sidecar.svc.config.model("cat-sonnet").context_window_tokens  # a server tool: input unbounded
        assert row["hold_micro"] == sidecar.svc.config.pricing.ceiling_micro(
            price, window, 20, Reach(web_searches_max=TOOL_CALLS_MAX_DEFAULT)
        )
        usage = answer["usage"]
        theirs = genai_prices.calc_price(
            genai_prices.Usage(
                input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"], web_searches=3
            ),
            "claude-sonnet-4-5",
            provider_id="anthropic",
        )
        assert row["cost_micro"] == math.ceil(Fraction(theirs.total_price) * 1_000_000) > 3 * fee_micro
        await sidecar.assert_identity(ws.id)
    finally:
        await stop_sidecar(sidecar)


def test_price_versions_are_content_hashes() -> None:
    price = ModelPrice("m", TokenPrices(1, 2, 3, 4, 5), TokenPrices(1, 1, 1, 1, 1))
    assert price.version == ModelPrice("m", TokenPrices(1, 2, 3, 4, 5), TokenPrices(1, 1, 1, 1, 1)).version
    for other in (
        ModelPrice("m2", price.sell, price.upstream),
        ModelPrice("m", TokenPrices(1, 2, 3, 4, 6), price.upstream),
        ModelPrice("m", price.sell, TokenPrices(1, 1, 1, 1, 2)),
        ModelPrice("m", price.sell, price.upstream, effective_ms=1),
        ModelPrice("m", price.sell, price.upstream, source="genai-prices==0.2.3"),
        ModelPrice("m", TokenPrices(1, 2, 3, 4, 5, request_fee=1), price.upstream),
        ModelPrice("m", TokenPrices(1, 2, 3, 4, 5, tiers=((10, TokenPrices(2, 2, 3, 4, 5)),)), price.upstream),
    ):
        assert other.version != price.version
