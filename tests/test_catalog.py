"""The model catalog (issue 16): upstream prices from genai-prices' bundled snapshot, exactly, with the
operator's margin, offered by glob; a call's cost equals genai-prices' own calculation to the micro-credit."""

from __future__ import annotations

import math
import warnings
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

import genai_prices
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import catalog
from sidecar.config import ConfigError, parse_config
from sidecar.money import MICRO_PER_CREDIT
from sidecar.pricing import EXTRA_TOKEN_CLASSES, CostProfile, ModelPrice, Reach, TokenPrices, Usage

AT = datetime.now(tz=UTC)
# A sample of providers: OpenAI and Anthropic (search-tool fees, audio and image classes, Anthropic's
# long-context tiers), Perplexity (per-request fees), Google (tiers, audio, image output), and providers
# whose models use other shapes (no cache prices, time-of-day prices, OCR pages).
SAMPLED_PROVIDERS = ("openai", "anthropic", "perplexity", "google", "mistral", "groq", "deepseek", "x-ai", "together")
SAMPLED = [(pid, m) for pid in SAMPLED_PROVIDERS for m in catalog.models_of(pid, AT) if m.offerable]
# Besides, every model of every provider priced by more than plain token classes (tiers, fees, audio,
# image, reasoning): the shapes the catalog used to refuse.
SPECIAL = [
    (pid, m)
    for pid in catalog.provider_ids()
    if pid not in SAMPLED_PROVIDERS
    for m in catalog.models_of(pid, AT)
    if m.offerable
    and (
        m.prices.tiers or m.prices.request_fee or any(getattr(m.prices, cls) is not None for cls in EXTRA_TOKEN_CLASSES)
    )
]
CHARGE_MICRO_MIN = 3


def provider(name: str = "openai", **extra) -> dict:
    return {"name": name, "protocol": "openai", "base_url": "http://x/v1", "price_source": name, **extra}


def config(providers: list[dict], models: list[dict] = (), pricing: dict | None = None):
    return parse_config({"providers": providers, "models": list(models)}, pricing or {}, {})


def test_the_sample_is_large_and_covers_every_shape() -> None:
    assert len(SAMPLED) > 200
    shapes = {(m.prices.cache_read != m.prices.input, m.prices.cache_write_1h != m.prices.input) for _, m in SAMPLED}
    assert shapes >= {(False, False), (True, False), (True, True)}
    everything = SAMPLED + SPECIAL
    assert any(m.prices.tiers for _, m in SAMPLED) and any(len(m.prices.tiers) > 1 for _, m in everything)
    assert any(m.prices.request_fee for _, m in SAMPLED) and any(m.prices.web_search_fee for _, m in SAMPLED)
    assert any(m.prices.file_search_fee for _, m in SAMPLED)
    for cls in EXTRA_TOKEN_CLASSES:
        assert any(getattr(m.prices, cls) is not None for _, m in everything), cls


# --- 4. the cost of a call equals genai-prices' calculation ------------------------------------------


def genai_usage(usage: Usage) -> genai_prices.Usage:
    """Our disjoint classes as genai-prices' nested ones: input counts every input class, output every
    output class; a class only our usage splits off is counted in its parent too."""
    return genai_prices.Usage(
        input_tokens=usage.total_input_tokens,  # theirs counts cached, audio and image tokens in input
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_5m_tokens + usage.cache_write_1h_tokens,
        cache_write_5m_tokens=usage.cache_write_5m_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
        input_audio_tokens=usage.input_audio_tokens,
        input_image_tokens=usage.input_image_tokens,
        cache_audio_read_tokens=0,  # never reported apart by these protocols (catalog.py)
        cache_image_read_tokens=0,
        output_tokens=usage.total_output_tokens,
        output_reasoning_tokens=usage.reasoning_tokens,
        output_audio_tokens=usage.output_audio_tokens,
        output_image_tokens=usage.output_image_tokens,
        web_searches=usage.web_searches,
        storage_searches=usage.file_searches,
    )


def genai_total(provider_id: str, model_id: str, usage: Usage, when: datetime = AT) -> Fraction:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown usage key would be silently unpriced
        calc = genai_prices.calc_price(
            genai_usage(usage), model_id, provider_id=provider_id, genai_request_timestamp=when
        )
    assert calc.model.id == model_id
    return Fraction(calc.total_price)


def genai_cost_micro(provider_id: str, model_id: str, usage: Usage, markup: Fraction, prices: TokenPrices) -> int:
    """The price database's own cost for `usage`, with the markup, by the money rule (DESIGN.md §4):
    computed exactly, rounded up once to a micro-credit, then the minimum charge; nothing for no usage."""
    if usage.is_empty or prices.is_free:
        return 0
    exact = genai_total(provider_id, model_id, usage) * (1 + markup) * MICRO_PER_CREDIT
    return max(math.ceil(exact), CHARGE_MICRO_MIN)


tokens = st.integers(min_value=0, max_value=2_000_000)
maybe = st.one_of(st.just(0), tokens)
calls = st.one_of(st.just(0), st.integers(min_value=0, max_value=20))


@st.composite
def usages(draw) -> Usage:
    output = draw(tokens)
    return Usage(
        input_tokens=draw(tokens),
        output_tokens=output,
        cache_read_tokens=draw(maybe),
        cache_write_5m_tokens=draw(maybe),
        cache_write_1h_tokens=draw(maybe),
        reasoning_tokens=draw(st.integers(min_value=0, max_value=output)),
        input_audio_tokens=draw(maybe),
        input_image_tokens=draw(maybe),
        output_audio_tokens=draw(maybe),
        output_image_tokens=draw(maybe),
        web_searches=draw(calls),
        file_searches=draw(calls),
    )


def assert_costs_match(provider_id: str, model, usage: Usage, markup_text: str) -> None:
    markup = Fraction(Decimal(markup_text)) / 100
    sell = catalog.with_markup(model.prices, Decimal(markup_text), model.model_id)
    profile = CostProfile("t", "USD", CHARGE_MICRO_MIN, {})
    price = ModelPrice(model.model_id, sell=sell, upstream=model.prices)
    ours = profile.cost_micro(price, usage)
    assert ours == genai_cost_micro(provider_id, model.model_id, usage, markup, model.prices), (
        provider_id,
        model.model_id,
        usage,
    )
    theirs_upstream = (
        0 if usage.is_empty else math.ceil(genai_total(provider_id, model.model_id, usage) * MICRO_PER_CREDIT)
    )
    assert profile.upstream_cost_micro(price, usage) == theirs_upstream


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(usage=usages(), markup_text=st.sampled_from(["0", "10", "12.5", "100"]))
def test_every_sampled_model_costs_what_genai_prices_says(usage: Usage, markup_text: str) -> None:
    for provider_id, model in SAMPLED + SPECIAL:  # every model of the sample, for each drawn usage
        assert_costs_match(provider_id, model, usage, markup_text)


TIERED = [(pid, m) for pid, m in SAMPLED + SPECIAL if m.prices.tiers]


@pytest.mark.parametrize(("provider_id", "model"), TIERED, ids=[f"{p}:{m.model_id}" for p, m in TIERED])
def test_every_tier_of_every_tiered_model_costs_what_genai_prices_says(provider_id: str, model) -> None:
    """At each tier's edge (its start, where the tier below still applies, and one token past it, where it
    starts), with the input split over every input class, and with output, searches and fees."""
    assert model.prices.tiers
    for start, _ in model.prices.tiers:
        for total in (start - 1, start, start + 1, start * 2):
            parts = total // 4
            usage = Usage(
                input_tokens=total - 3 * parts,
                cache_read_tokens=parts,
                cache_write_5m_tokens=parts // 2,
                cache_write_1h_tokens=parts - parts // 2,
                input_audio_tokens=parts,
                output_tokens=1_234,
                reasoning_tokens=200,
                output_audio_tokens=17,
                web_searches=2,
            )
            assert usage.total_input_tokens == total
            for markup in ("0", "10"):
                assert_costs_match(provider_id, model, usage, markup)
            reached = model.prices.at(total)
            assert reached is (model.prices if total <= start and reached is model.prices else reached)
    # The highest tier is the one a call past every start pays.
    assert model.prices.at(model.prices.tiers[-1][0] + 1) is model.prices.tiers[-1][1]


@settings(max_examples=40, deadline=None)
@given(
    usage=usages(),
    slack_input=st.integers(min_value=0, max_value=1000),
    slack_output=st.integers(min_value=0, max_value=1000),
    slack_calls=st.integers(min_value=0, max_value=3),
)
def test_the_hold_bounds_every_priced_class_tier_and_fee_of_every_sampled_model(
    usage, slack_input, slack_output, slack_calls
) -> None:
    """The hold, for a request that may incur every class (audio, images, searches), bounds the cost of
    any usage within its bounds: every tier its input can reach, every per-call and per-request fee."""
    reach = Reach(
        audio_in=True,
        audio_out=True,
        image_in=True,
        web_searches_max=usage.web_searches + slack_calls,
        file_searches_max=usage.file_searches + slack_calls,
    )
    for _, model in SAMPLED + SPECIAL:
        profile = CostProfile("t", "USD", CHARGE_MICRO_MIN, {})
        price = ModelPrice(model.model_id, sell=model.prices, upstream=model.prices)
        ceiling = profile.ceiling_micro(
            price, usage.total_input_tokens + slack_input, usage.total_output_tokens + slack_output, reach
        )
        assert profile.cost_micro(price, usage) <= ceiling, model.model_id


@settings(max_examples=40, deadline=None)
@given(usage=usages())
def test_a_text_only_request_is_held_for_text_only(usage) -> None:
    """Without audio in the request, the hold does not assume audio prices; with it, it does; and a text
    call's cost (no audio, no searches) stays under the text hold."""
    text = Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )
    for _, model in SAMPLED + SPECIAL:
        profile = CostProfile("t", "USD", CHARGE_MICRO_MIN, {})
        price = ModelPrice(model.model_id, sell=model.prices, upstream=model.prices)
        plain = profile.ceiling_micro(price, text.total_input_tokens, text.total_output_tokens)
        audio = profile.ceiling_micro(price, text.total_input_tokens, text.total_output_tokens, Reach(audio_in=True))
        assert profile.cost_micro(price, text) <= plain <= audio


def test_a_request_fee_and_searches_are_in_the_hold_and_the_cost() -> None:
    sonar = catalog.find("perplexity", "sonar", AT)
    assert sonar.prices.request_fee == 12_000 * 10**9  # $12 per 1000 calls: 12,000 micro-credits a call
    profile = CostProfile("t", "USD", 0, {})
    price = ModelPrice("sonar", sell=sonar.prices, upstream=sonar.prices)
    assert profile.cost_micro(price, Usage(input_tokens=1)) == 12_001
    assert profile.cost_micro(price, Usage()) == 0  # a failed call: nothing, the fee neither
    assert profile.ceiling_micro(price, 0, 0) == 12_000
    opus = catalog.find("anthropic", "claude-opus-4-5", AT)
    price = ModelPrice("opus", sell=opus.prices, upstream=opus.prices)
    fee = opus.prices.web_search_fee // 10**9  # micro-credits per search
    assert fee == 10_000
    base = profile.ceiling_micro(price, 10, 10)
    assert profile.ceiling_micro(price, 10, 10, Reach(web_searches_max=3)) == base + 3 * fee
    assert profile.cost_micro(price, Usage(output_tokens=1, web_searches=2)) == 2 * fee + 25


def test_the_hold_assumes_the_worst_tier_the_input_can_reach() -> None:
    sonnet = catalog.find("anthropic", "claude-sonnet-4-5", AT)
    [(start, long)] = sonnet.prices.tiers
    assert start == 200_000 and long.input == 2 * sonnet.prices.input
    profile = CostProfile("t", "USD", 0, {})
    price = ModelPrice("s", sell=sonnet.prices, upstream=sonnet.prices)
    below = profile.ceiling_micro(price, start, 0)
    above = profile.ceiling_micro(price, start + 1, 0)
    assert below == start * sonnet.prices.max_input_class // 10**9
    assert above == (start + 1) * long.max_input_class // 10**9


# --- 1. exact conversion, and what the profile cannot express is refused -----------------------------


def test_prices_convert_exactly_or_not_at_all() -> None:
    assert catalog.scale_exact(Decimal("0.075"), "x") == 75_000_000
    assert catalog.scale_exact(Decimal("0.000000001"), "x") == 1
    with pytest.raises(catalog.CatalogError, match="cannot be billed exactly"):
        catalog.scale_exact(Decimal("0.0833333333333333"), "x")


def test_a_snapshot_price_that_is_not_exact_refuses_its_model() -> None:
    refused = {m.model_id: m.refused for m in catalog.models_of("openrouter", AT) if not m.offerable}
    assert "cannot be billed exactly" in refused["google/gemini-2.5-flash"]


@pytest.mark.parametrize(
    ("provider_id", "reason"),
    [
        ("deepseek", "time of day"),
        ("mistral", "input_document_kpages"),
        ("perplexity", "output_citation_mtok"),
        ("google", "web_searches_kcount"),  # Google's grounding searches: not a tool a request names
        ("x-ai", "input_text_messages_kcount"),
        ("groq", "input_mchars"),
    ],
)
def test_what_the_profile_cannot_express_refuses_the_model(provider_id: str, reason: str) -> None:
    refused = [m for m in catalog.models_of(provider_id, AT) if m.refused and reason in m.refused]
    assert refused, f"no model of {provider_id} is refused for {reason}"
    name = refused[0].model_id
    # Asked for by name, it stops the start with the reason; a glob skips it.
    with pytest.raises(ConfigError, match=f"offer\\[0\\]: '{name}' cannot be priced from the catalog: .*{reason}"):
        config([provider(provider_id, offer=[name], context_window_tokens=1000)])
    with pytest.raises(ConfigError, match=f"cannot be priced from the catalog of '{provider_id}'.*{reason}"):
        config([provider(provider_id)], [{"name": "m", "provider": provider_id, "upstream_model": name}])
    glob = config([provider(provider_id, offer=["*"], context_window_tokens=1000)])
    assert name not in glob.models and glob.models


def test_search_fees_of_server_tools_are_priced_per_call() -> None:
    """OpenAI's web and file search are server tools a request names, bounded per call: their fees are
    priced ($25 and $2.50 per 1000 calls for gpt-4o), and its token prices are exact."""
    gpt_4o = catalog.find("openai", "gpt-4o", AT)
    assert gpt_4o.offerable
    assert (gpt_4o.prices.input, gpt_4o.prices.output, gpt_4o.prices.cache_read) == (
        2_500_000_000,
        10_000_000_000,
        1_250_000_000,
    )
    assert gpt_4o.prices.web_search_fee is not None and gpt_4o.prices.file_search_fee is not None


# --- 1-3. config: price_source, explicit prices win, markups, offers ---------------------------------


def test_a_model_is_priced_by_its_upstream_id_alone() -> None:
    loaded = config([provider()], [{"name": "fast", "provider": "openai", "upstream_model": "gpt-4o-mini"}])
    model = loaded.model("fast")
    price = loaded.pricing.price_of(model.targets[0].price)
    assert price.upstream == price.sell == catalog.find("openai", "gpt-4o-mini", AT).prices
    assert model.context_window_tokens == 128_000  # from the catalog
    assert model.max_output_tokens_default == 4096  # the provider's default for catalog models


def test_explicit_prices_in_pricing_yaml_win() -> None:
    pricing = {"models": {"fast": {"input": "9", "output": "99"}}}
    loaded = config([provider()], [{"name": "fast", "provider": "openai", "upstream_model": "gpt-4o-mini"}], pricing)
    assert loaded.pricing.price_of("fast").sell.output == 99_000_000_000


def test_a_model_the_catalog_does_not_know_needs_a_price() -> None:
    with pytest.raises(ConfigError, match="'no-such-model' is not in the catalog of 'openai'"):
        config([provider()], [{"name": "x", "provider": "openai", "upstream_model": "no-such-model"}])
    with pytest.raises(ConfigError, match=r"providers\[0\]\.price_source: .*unknown price source 'nope'"):
        config([provider("openai", price_source="nope")], [{"name": "x", "provider": "openai"}])


def test_markups_per_provider_and_per_model() -> None:
    loaded = config(
        [provider(markup_percent="10")],
        [
            {"name": "a", "provider": "openai", "upstream_model": "gpt-4o"},
            {"name": "b", "provider": "openai", "upstream_model": "gpt-4o", "markup_percent": "12.5"},
        ],
    )
    a, b = loaded.pricing.price_of("a"), loaded.pricing.price_of("b")
    assert a.upstream == b.upstream and a.upstream.input == 2_500_000_000
    assert (a.sell.input, a.sell.output, a.sell.cache_read) == (2_750_000_000, 11_000_000_000, 1_375_000_000)
    assert (b.sell.input, b.sell.output) == (2_812_500_000, 11_250_000_000)


def test_a_markup_that_makes_a_price_inexact_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"markup on its .* price gives more than 9 decimals"):
        config(
            [provider(markup_percent="33.333333")], [{"name": "a", "provider": "openai", "upstream_model": "gpt-4o"}]
        )
    with pytest.raises(ConfigError, match="markup_percent: must be a non-negative decimal"):
        config([provider(markup_percent="-5")], [{"name": "a", "provider": "openai", "upstream_model": "gpt-4o"}])


def test_offer_globs_add_every_priceable_model_and_keep_configured_names() -> None:
    pricing = {"models": {"gpt-4o": {"input": "1", "output": "1"}}}
    loaded = config(
        [provider(offer=["gpt-4o*", "o3-mini"], markup_percent="10")],
        [{"name": "gpt-4o", "provider": "openai", "max_output_tokens_default": 7, "context_window_tokens": 9}],
        pricing,
    )
    matched = catalog.offered("openai", ("gpt-4o*", "o3-mini"), AT)
    # Those the catalog cannot price, or knows no context window of (the provider gives none), are skipped.
    expected = {m.model_id for m in matched if m.offerable and m.context_window_tokens}
    assert "o3-mini" in expected and "gpt-4o-mini" in expected and len(expected) < len(matched)
    assert {m.name for m in loaded.catalog()} == expected
    assert loaded.model("gpt-4o").max_output_tokens_default == 7  # the configured model, not the offer
    assert loaded.pricing.price_of("gpt-4o").sell.input == 1_000_000_000
    mini = loaded.pricing.price_of(loaded.model("gpt-4o-mini").targets[0].price)
    assert (mini.upstream.input, mini.sell.input) == (150_000_000, 165_000_000)


def test_offer_needs_a_price_source_and_the_catalog_is_in_dollars() -> None:
    with pytest.raises(ConfigError, match=r"providers\[0\]\.offer: needs price_source"):
        config([{"name": "p", "protocol": "openai", "base_url": "http://x", "offer": ["*"]}])
    with pytest.raises(ConfigError, match="the catalog's prices are in USD, the cost profile's currency is EUR"):
        config([provider(offer=["gpt-4o"])], pricing={"currency": "EUR"})


def test_a_fallback_target_priced_from_another_catalog_gets_its_own_price() -> None:
    loaded = config(
        [provider("anthropic", protocol="anthropic"), provider("openrouter", openrouter=True)],
        [
            {
                "name": "opus",
                "targets": [
                    {"provider": "anthropic", "upstream_model": "claude-opus-4-5"},
                    {"provider": "openrouter", "upstream_model": "anthropic/claude-opus-4.5"},
                ],
            }
        ],
    )
    first, second = loaded.model("opus").targets
    assert (first.price, second.price) == ("opus", "opus@openrouter")
    assert loaded.pricing.price_of(second.price).upstream == catalog.find("openrouter", second.upstream_model).prices


def test_a_sell_price_by_hand_takes_its_upstream_price_from_the_catalog() -> None:
    pricing = {"models": {"fast": {"input": "0.2", "output": "0.8"}, "pinned": {"input": "1", "output": "1"}}}
    pricing["models"]["pinned"]["upstream"] = {"input": "0.5", "output": "0.5"}
    models = [
        {"name": "fast", "provider": "openai", "upstream_model": "gpt-4o-mini"},
        {"name": "pinned", "provider": "openai", "upstream_model": "gpt-4o-mini"},
    ]
    loaded = config([provider()], models, pricing)
    fast, pinned = loaded.pricing.price_of("fast"), loaded.pricing.price_of("pinned")
    assert (fast.sell.input, fast.upstream.input) == (200_000_000, 150_000_000)
    assert (pinned.sell.input, pinned.upstream.input) == (1_000_000_000, 500_000_000)  # an upstream by hand wins
    assert loaded.pricing_by_hand == {"fast", "pinned"}


# --- `sidecar catalog` ----------------------------------------------------------------------------------


def test_the_catalog_command_shows_offers_prices_and_what_the_catalog_says_differently(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    (tmp_path / "sidecar.yaml").write_text(
        yaml.safe_dump(
            {
                "providers": [
                    provider(offer=["o3-mini"], markup_percent="10"),
                    provider("anthropic", protocol="anthropic"),
                ],
                "models": [
                    {"name": "fast", "provider": "openai", "upstream_model": "gpt-4o-mini"},
                    {"name": "opus", "provider": "anthropic", "upstream_model": "claude-opus-4-5"},
                ],
            }
        )
    )
    pinned = {"input": "0.2", "output": "0.8", "upstream": {"input": "0.1", "output": "0.5"}}
    (tmp_path / "pricing.yaml").write_text(yaml.safe_dump({"models": {"fast": pinned}}))
    sidecar = Path(sys.executable).with_name("sidecar")
    run = [str(sidecar), "catalog", "--config", str(tmp_path / "sidecar.yaml")]
    shown = subprocess.run([*run, "--json"], capture_output=True, text=True, check=True, timeout=60).stdout
    rows = {r["upstream_model"]: r for r in map(json.loads, shown.splitlines())}
    assert set(rows) == {"gpt-4o-mini", "o3-mini", "claude-opus-4-5"}
    assert rows["o3-mini"]["model"] == "o3-mini" and rows["o3-mini"]["price_from"] == "catalog"
    assert (rows["o3-mini"]["upstream"]["input"], rows["o3-mini"]["sell"]["input"]) == ("1.1", "1.21")
    assert rows["gpt-4o-mini"]["price_from"] == "pricing.yaml"
    assert rows["gpt-4o-mini"]["note"] == "catalog upstream differs: 0.15/0.6/0.075/0.15/0.15"
    assert rows["claude-opus-4-5"]["sell"]["cache_write_1h"] == "10"
    # The version each is billed at now (ledger rows' price_version), and its fees.
    from sidecar.config import load_config

    loaded = load_config(tmp_path / "sidecar.yaml", env={})
    assert rows["o3-mini"]["price_version"] == loaded.pricing.price_of("o3-mini").version
    assert rows["claude-opus-4-5"]["sell"]["web_search_fee"] == "0.01" and rows["o3-mini"]["changes"] == []
    everything = subprocess.run(
        [*run, "--provider", "anthropic", "--all"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "genai-prices 0.2.3" in everything and "claude-sonnet-4-5" in everything
    assert "o3-mini" not in everything
    unknown = subprocess.run([*run, "--provider", "nope"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "no provider 'nope'" in unknown.stderr


# --- dated price changes (issue 16.5, without the ledger's record) -----------------------------------

DATED = [(pid, m) for pid in ("google",) for m in catalog.models_of(pid, AT) if m.offerable and m.changes]


def test_a_dated_price_change_of_the_snapshot_applies_from_its_date_without_a_restart() -> None:
    assert DATED, "the snapshot has no dated price change to test with"
    _, model = DATED[0]
    [change] = model.changes
    loaded = config([provider("google", offer=[model.model_id], markup_percent="10", context_window_tokens=1000)])
    key = loaded.model(model.model_id).targets[0].price
    effective_ms = int(change.effective_at.timestamp() * 1000)
    assert change.effective_at.time().isoformat() == "00:00:00" and change.effective_at > AT
    before = loaded.pricing.price_of(key, effective_ms - 1)
    after = loaded.pricing.price_of(key, effective_ms)
    assert before.upstream == catalog.find("google", model.model_id, AT).prices
    assert after.upstream == catalog.find("google", model.model_id, change.effective_at).prices
    assert after.upstream != before.upstream and after.effective_ms == effective_ms
    assert after.sell == catalog.with_markup(after.upstream, Decimal(10), "x")
    assert loaded.pricing.price_of(key) == before  # now
    from sidecar import catalog_report

    [row] = catalog_report.rows(loaded)
    assert f"from {change.effective_at.date()} ({after.version}): upstream " in row.note
    assert row.upstream == before.upstream and row.price_version == before.version != after.version
    assert [c["price_version"] for c in row.changes] == [after.version]


@settings(max_examples=30, deadline=None)
@given(usage=usages(), days_after=st.integers(min_value=0, max_value=400))
def test_after_a_dated_change_the_cost_still_equals_genai_prices(usage: Usage, days_after: int) -> None:
    from datetime import timedelta

    for provider_id, model in DATED:
        loaded = config([provider(provider_id, offer=[model.model_id], context_window_tokens=1000)])
        when = model.changes[-1].effective_at + timedelta(days=days_after, hours=5)
        price = loaded.pricing.price_of(model.model_id, int(when.timestamp() * 1000))
        theirs = genai_total(provider_id, model.model_id, usage, when)
        exact_micro = math.ceil(theirs * MICRO_PER_CREDIT)
        expected = 0 if usage.is_empty or price.sell.is_free else max(exact_micro, loaded.pricing.charge_micro_min)
        assert loaded.pricing.cost_micro(price, usage) == expected, (model.model_id, when, usage)


def test_a_dated_change_the_profile_cannot_express_refuses_the_model_now() -> None:
    from datetime import date

    from genai_prices import types

    def model_with(future: types.ModelPrice) -> types.ModelInfo:
        return types.ModelInfo(
            id="m",
            match=types.ClauseEquals(equals="m"),
            context_window=1000,
            prices=[
                types.ConditionalPrice(prices=types.ModelPrice(input_mtok=Decimal(1), output_mtok=Decimal(2))),
                types.ConditionalPrice(
                    constraint=types.StartDateConstraint(start_date=date(2099, 1, 1)), prices=future
                ),
            ],
        )

    fine = catalog.describe("openai", model_with(types.ModelPrice(input_mtok=Decimal(3), output_mtok=Decimal(4))), AT)
    assert fine.offerable and [c.prices.output for c in fine.changes] == [4_000_000_000]
    tiered = types.TieredPrices(base=Decimal(3), tiers=[types.Tier(start=200_000, price=Decimal(6))])
    fine = catalog.describe("openai", model_with(types.ModelPrice(input_mtok=tiered, output_mtok=Decimal(4))), AT)
    assert fine.offerable and fine.changes[0].prices.tiers[0][1].input == 6_000_000_000
    pages = types.ModelPrice(input_mtok=Decimal(3), input_document_kpages=Decimal(1))
    refused = catalog.describe("openai", model_with(pages), AT)
    assert not refused.offerable
    assert refused.refused == (
        "its price changes on 2099-01-01 to one that cannot be billed: it is priced by input_document_kpages, "
        "which the cost profile cannot express"
    )


def test_pricing_yaml_expresses_fees_extra_classes_and_tiers() -> None:
    pricing = {
        "models": {
            "m": {
                "input": "1",
                "output": "2",
                "input_audio": "40",
                "request_fee": "0.005",
                "web_search_fee": "0.01",
                "tiers": [{"input_tokens_above": 1000, "input": "2", "output": "4"}],
            }
        }
    }
    model = {"name": "m", "provider": "p", "max_output_tokens_default": 1, "context_window_tokens": 10}
    loaded = parse_config(
        {"providers": [{"name": "p", "protocol": "openai", "base_url": "http://x"}], "models": [model]}, pricing, {}
    )
    sell = loaded.pricing.price_of("m").sell
    assert (sell.input_audio, sell.request_fee, sell.web_search_fee) == (40 * 10**9, 5_000 * 10**9, 10_000 * 10**9)
    assert sell.output_audio is None  # no price of its own: audio output is refused, billed as output if reported
    [(start, tier)] = sell.tiers
    assert (start, tier.input, tier.output, tier.input_audio, tier.request_fee) == (
        1000,
        2 * 10**9,
        4 * 10**9,
        40 * 10**9,
        5_000 * 10**9,
    )
    profile = loaded.pricing
    assert profile.cost_micro(loaded.pricing.price_of("m"), Usage(input_tokens=1000)) == 1000 + 5_000
    assert profile.cost_micro(loaded.pricing.price_of("m"), Usage(input_tokens=1001)) == 2002 + 5_000
    bad = {"models": {"m": {**pricing["models"]["m"], "tiers": [{"input_tokens_above": 5}, {"input_tokens_above": 5}]}}}
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.input_tokens_above: must be an integer above"):
        parse_config(
            {"providers": [{"name": "p", "protocol": "openai", "base_url": "http://x"}], "models": [model]}, bad, {}
        )
