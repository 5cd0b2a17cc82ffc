"""Integer money and the price of a call: exact, rounded up once, never above the ceiling."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import ConfigError, parse_pricing
from sidecar.money import MoneyError, format_micro, parse_credits, parse_price_per_million
from sidecar.pricing import Usage

PRICING = parse_pricing(
    {
        "charge_min": "0.001",
        "models": {
            "opus": {
                "input": "5.00",
                "output": "25.00",
                "cache_read": "0.50",
                "cache_write_5m": "6.25",
                "cache_write_1h": "10",
            },
            "deepseek": {"input": "0.27", "output": "1.10"},
            "odd": {"input": "0.000000001", "output": "0.333333333"},
            "free": {"input": "0", "output": "0"},
        },
    },
    "test",
)


def test_the_reference_examples() -> None:
    opus, deepseek = PRICING.models["opus"], PRICING.models["deepseek"]
    assert PRICING.cost_micro(opus, Usage(input_tokens=10_000, output_tokens=2_000)) == 100_000  # 0.100000
    assert PRICING.cost_micro(deepseek, Usage(input_tokens=50_000, output_tokens=5_000)) == 19_000  # 0.019
    assert format_micro(100_000) == "0.100000"


def test_minimum_charge_and_free_calls() -> None:
    deepseek = PRICING.models["deepseek"]
    assert PRICING.cost_micro(deepseek, Usage(input_tokens=1)) == 1_000  # 0.27 micro -> minimum 0.001
    assert PRICING.cost_micro(deepseek, Usage()) == 0  # nothing used, nothing charged
    assert PRICING.cost_micro(PRICING.models["free"], Usage(input_tokens=10**9)) == 0
    assert PRICING.ceiling_micro(PRICING.models["free"], 10**9, 10**9) == 0


def test_rounding_happens_once_upwards() -> None:
    odd = PRICING.models["odd"]
    # 3 output tokens at 0.333333333 micro each = 0.999999999 micro, plus 1 input at 1e-9: exactly 1 micro.
    # Rounding each class separately would give 2.
    cost = PRICING.cost_micro(odd, Usage(input_tokens=1, output_tokens=3))
    assert cost == max(1, PRICING.charge_micro_min)


def test_cache_classes_are_priced_per_model() -> None:
    opus = PRICING.models["opus"]
    usage = Usage(input_tokens=2_095, output_tokens=503, cache_write_1h_tokens=1_000, cache_read_tokens=400)
    assert PRICING.cost_micro(opus, usage) == 2_095 * 5 + 503 * 25 + 1_000 * 10 + 400 // 2


@given(
    input_tokens=st.integers(0, 2_000_000),
    output_tokens=st.integers(0, 200_000),
    cached=st.integers(0, 2_000_000),
    model=st.sampled_from(["opus", "deepseek", "odd"]),
)
def test_cost_never_exceeds_the_ceiling(input_tokens: int, output_tokens: int, cached: int, model: str) -> None:
    price = PRICING.models[model]
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached)
    ceiling = PRICING.ceiling_micro(price, usage.total_input_tokens, output_tokens)
    cost = PRICING.cost_micro(price, usage)
    assert isinstance(cost, int) and 0 <= cost <= ceiling
    # Exact: the cost is the smallest whole micro-credit at or above the true price.
    exact_nano = price.sell.scaled_cost(usage)
    if not usage.is_empty and cost > PRICING.charge_micro_min:
        assert (cost - 1) * 10**9 < exact_nano <= cost * 10**9


@given(st.integers(0, 10**12 - 1), st.integers(0, 999_999))
def test_credits_round_trip(whole: int, frac: int) -> None:
    text = f"{whole}.{frac:06d}"
    assert parse_credits(text) == whole * 1_000_000 + frac
    assert format_micro(parse_credits(text)) == text


@pytest.mark.parametrize("bad", ["-1", "1e3", "0.1234567891", "abc", "", " ", "1.", ".5", 1.5, None])
def test_bad_prices_are_refused(bad) -> None:
    with pytest.raises(MoneyError):
        parse_price_per_million(bad)


def test_a_float_price_in_the_profile_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"models\.m\.output"):
        parse_pricing({"models": {"m": {"input": "1", "output": 2.5}}}, "pricing")
