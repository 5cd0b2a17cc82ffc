"""Integer money. Every amount is micro-credits (1 credit = 1_000_000 micro).

A price per 1M tokens, in credits, is numerically the price of ONE token in micro-credits
(P credits / 1e6 tokens = P * 1e6 micro / 1e6 tokens). We keep prices as integers scaled by
PRICE_SCALE (nano-micro-credits per token) so that a call's cost is an exact integer sum, rounded
up once at the end. No float ever touches money.
"""

from __future__ import annotations

import re

from sidecar.errors import DomainError

MICRO_PER_CREDIT = 1_000_000
PRICE_SCALE = 1_000_000_000  # a price is stored as (micro-credits per token) * PRICE_SCALE
PRICE_DECIMALS_MAX = 9
# Lua numbers are doubles: exact only below 2^53 (and written in exponent form from 10^17). Every
# balance, hold and grant stays at most this, far under 2^53, so Redis's arithmetic stays exact.
AMOUNT_MICRO_MAX = 10**15  # a billion credits

_DECIMAL_RE = re.compile(r"^(0|[1-9][0-9]{0,11})(?:\.([0-9]{1,9}))?$")


class MoneyError(DomainError, ValueError):
    pass


def parse_decimal_scaled(text: str, decimals: int) -> int:
    """Parse a non-negative decimal string exactly into an integer scaled by 10**decimals."""
    if not isinstance(text, str):
        raise MoneyError(f'must be a decimal string like "2.50", got {type(text).__name__} {text!r}')
    match = _DECIMAL_RE.match(text.strip())
    if match is None:
        raise MoneyError(
            f"must be a non-negative decimal string below 10^12 with at most {decimals} decimals, got {text!r}"
        )
    whole, frac = match.group(1), match.group(2) or ""
    if len(frac) > decimals:
        raise MoneyError(f"has more than {decimals} decimals: {text!r}")
    return int(whole) * 10**decimals + int(frac.ljust(decimals, "0") or "0")


def parse_price_per_million(text: str) -> int:
    """'5.00' credits per 1M tokens -> scaled price per token (see PRICE_SCALE)."""
    return parse_decimal_scaled(text, PRICE_DECIMALS_MAX)


def parse_credits(text: str) -> int:
    """'12.5' credits -> 12_500_000 micro-credits."""
    return parse_decimal_scaled(text, 6)


def ceil_div(numerator: int, denominator: int) -> int:
    assert denominator > 0
    assert numerator >= 0
    return -(-numerator // denominator)


def format_micro(amount_micro: int) -> str:
    """12_500_000 -> '12.500000' (exact, for humans and JSON)."""
    sign = "-" if amount_micro < 0 else ""
    whole, frac = divmod(abs(amount_micro), MICRO_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"
