"""Cost profiles and the price of a call.

A call is priced once, exactly, from integer token counts and integer scaled prices, then rounded up
to a whole micro-credit, then the profile's minimum charge applies. The price ceiling of a call is
the same formula applied to its worst case, so a call never costs more than its ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.money import PRICE_SCALE, ceil_div


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts by billing class. Classes are disjoint: `input_tokens` excludes cached tokens.

    `reasoning_tokens` is informational: it is already part of `output_tokens`.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            assert isinstance(value, int) and value >= 0, f"{name} must be a non-negative int, got {value!r}"

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def is_empty(self) -> bool:
        return self.total_input_tokens == 0 and self.output_tokens == 0


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """Scaled prices per token (micro-credits per token * PRICE_SCALE) for each class."""

    input: int
    output: int
    cache_read: int
    cache_write_5m: int
    cache_write_1h: int

    def scaled_cost(self, usage: Usage) -> int:
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_read_tokens * self.cache_read
            + usage.cache_write_5m_tokens * self.cache_write_5m
            + usage.cache_write_1h_tokens * self.cache_write_1h
        )

    @property
    def max_input_class(self) -> int:
        return max(self.input, self.cache_read, self.cache_write_5m, self.cache_write_1h)

    @property
    def is_free(self) -> bool:
        return self.output == 0 and self.max_input_class == 0


@dataclass(frozen=True, slots=True)
class ModelPrice:
    model: str
    sell: TokenPrices  # what the workspace is charged
    upstream: TokenPrices  # what the platform pays the provider (margin reporting)


@dataclass(frozen=True, slots=True)
class CostProfile:
    name: str
    currency: str
    charge_micro_min: int
    models: dict[str, ModelPrice]

    def price_of(self, model: str) -> ModelPrice | None:
        return self.models.get(model)

    def cost_micro(self, price: ModelPrice, usage: Usage) -> int:
        """The exact cost of `usage`, rounded up once, with the minimum charge.

        A call with no tokens at all costs 0: a failed call is never charged the minimum.
        """
        if usage.is_empty or price.sell.is_free:
            return 0
        return max(ceil_div(price.sell.scaled_cost(usage), PRICE_SCALE), self.charge_micro_min)

    def upstream_cost_micro(self, price: ModelPrice, usage: Usage) -> int:
        return ceil_div(price.upstream.scaled_cost(usage), PRICE_SCALE)

    def ceiling_micro(self, price: ModelPrice, max_input_tokens: int, max_output_tokens: int) -> int:
        """The worst-case cost: every input token at the dearest input class, every output token capped."""
        assert max_input_tokens >= 0 and max_output_tokens >= 0
        if price.sell.is_free:
            return 0
        scaled = max_input_tokens * price.sell.max_input_class + max_output_tokens * price.sell.output
        return max(ceil_div(scaled, PRICE_SCALE), self.charge_micro_min)
