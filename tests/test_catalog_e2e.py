"""A model priced from the catalog, end to end (issue 16): listed with its sell prices by GET /v1/models,
and a call's ledger row costs what genai-prices computes for the usage the provider reported."""

from __future__ import annotations

import math
from fractions import Fraction

import genai_prices
import orjson
from support.harness import chat_body, start_sidecar, stop_sidecar

CREDITS = 10_000_000
CATALOG_MODELS = [
    {"name": "cat-4o", "provider": "mock-catalog", "upstream_model": "gpt-4o", "markup_percent": "20"},
    {"name": "cat-o3-mini", "provider": "mock-catalog", "upstream_model": "o3-mini"},
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


async def test_the_fees_a_catalog_model_is_offered_despite_are_refused_per_request(
    redis_client, redis_url, migrated_database_url
) -> None:
    """gpt-4o's catalog entry has per-search fees and audio prices the profile cannot express; it is
    offered because every request that would incur them gets a 400 and never reaches the provider."""
    sidecar = await start_sidecar(redis_url, migrated_database_url, more_models=CATALOG_MODELS)
    try:
        ws = await sidecar.workspace(credits_micro=CREDITS)
        before = len(sidecar.recorded)
        for extra in (
            {"web_search_options": {}},
            {"tools": [{"type": "web_search_preview"}]},
            {"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]},
            {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
        ):
            status, _, raw = await sidecar.chat(ws, chat_body(model="cat-4o", **extra))
            assert status == 400, (extra, raw)
            assert orjson.loads(raw)["error"]["code"] == "unsupported_feature", raw
        assert len(sidecar.recorded) == before
        identity = await sidecar.assert_identity(ws.id)
        assert identity["account_balance"] == CREDITS
    finally:
        await stop_sidecar(sidecar)
