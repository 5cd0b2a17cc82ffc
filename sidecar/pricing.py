"""Cost profiles and the price of a call.

A call is priced once, exactly, from integer token counts and integer scaled prices, then rounded up
to a whole micro-credit, then the profile's minimum charge applies. The price ceiling of a call is
the same formula applied to its worst case, so a call never costs more than its ceiling.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from sidecar.money import PRICE_SCALE, ceil_div


@dataclass(frozen=True, slots=True)
class Usage:
    """Counts by billing class. Token classes are disjoint: `input_tokens` is uncached text input (cached,
    audio and image input are counted in their own class), `output_tokens` is text output; audio and image
    output have their own class. `reasoning_tokens` is part of `output_tokens` (priced at the model's
    reasoning price when it has one, else as output). `web_searches` and `file_searches` count server-tool
    calls, each priced per call."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    output_audio_tokens: int = 0
    output_image_tokens: int = 0
    web_searches: int = 0
    file_searches: int = 0

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            assert isinstance(value, int) and value >= 0, f"{name} must be a non-negative int, got {value!r}"

    @property
    def total_input_tokens(self) -> int:
        """Every input token, of every class: what a context-length tier is chosen by."""
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_5m_tokens
            + self.cache_write_1h_tokens
            + self.input_audio_tokens
            + self.input_image_tokens
        )

    @property
    def total_output_tokens(self) -> int:
        return self.output_tokens + self.output_audio_tokens + self.output_image_tokens

    @property
    def is_empty(self) -> bool:
        return self.total_input_tokens == 0 and self.total_output_tokens == 0 and not self.tool_calls

    @property
    def tool_calls(self) -> int:
        return self.web_searches + self.file_searches


# Classes a model may price on its own; None: no price of its own. A token of such a class is then billed
# at its parent class (audio and image input as input, audio and image output and reasoning as output),
# as the price database does; a request asking for audio in or out of a target without an audio price is
# refused (400: the provider bills audio apart, TokenPrices.unpriced_for).
EXTRA_TOKEN_CLASSES = ("input_audio", "input_image", "output_audio", "output_image", "reasoning")
# Per-call fees of server tools; None: not priced, and a request using the tool is refused (400).
TOOL_FEES = ("web_search_fee", "file_search_fee")
BASE_TOKEN_CLASSES = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")


@dataclass(frozen=True, slots=True)
class Reach:
    """What a call can incur beyond text tokens, read from its request: the classes its ceiling must
    include, and the most server-tool calls it may make."""

    audio_in: bool = False
    audio_out: bool = False
    image_in: bool = False
    web_searches_max: int = 0
    file_searches_max: int = 0
    # The request field that makes each feature reachable (feature -> param), for a 400 that names it.
    params: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def param_of(self, feature: str) -> str | None:
        return dict(self.params).get(feature)


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """Scaled prices (micro-credits * PRICE_SCALE) per token of each class, per server-tool call and
    per request.

    `tiers`: context-length tiers, as (start, prices): when a call's total input tokens exceed `start`,
    every token and fee of the call is priced by that tier's prices (the highest such tier), else by these.
    A tier's own prices have no tiers."""

    input: int
    output: int
    cache_read: int
    cache_write_5m: int
    cache_write_1h: int
    input_audio: int | None = None
    input_image: int | None = None
    output_audio: int | None = None
    output_image: int | None = None
    reasoning: int | None = None
    request_fee: int = 0  # per call that used anything
    web_search_fee: int | None = None
    file_search_fee: int | None = None
    tiers: tuple[tuple[int, TokenPrices], ...] = ()

    def __post_init__(self) -> None:
        starts = [start for start, _ in self.tiers]
        assert starts == sorted(set(starts)), "tiers must be in ascending order of their start"
        assert all(not tier.tiers for _, tier in self.tiers), "a tier has no tiers of its own"

    def at(self, total_input_tokens: int) -> TokenPrices:
        """The prices of the tier a call with this many input tokens falls in."""
        chosen = self
        for start, tier in self.tiers:
            if total_input_tokens > start:
                chosen = tier
        return chosen

    def reachable(self, max_input_tokens: int) -> list[TokenPrices]:
        """Every tier a call with at most this many input tokens may fall in."""
        return [self] + [tier for start, tier in self.tiers if max_input_tokens > start]

    def scaled_cost(self, usage: Usage) -> int:
        if usage.is_empty:
            return 0
        p = self.at(usage.total_input_tokens)
        reasoning = min(usage.reasoning_tokens, usage.output_tokens)
        return (
            usage.input_tokens * p.input
            + (usage.output_tokens - reasoning) * p.output
            + usage.cache_read_tokens * p.cache_read
            + usage.cache_write_5m_tokens * p.cache_write_5m
            + usage.cache_write_1h_tokens * p.cache_write_1h
            + usage.input_audio_tokens * _or(p.input_audio, p.input)
            + usage.input_image_tokens * _or(p.input_image, p.input)
            + usage.output_audio_tokens * _or(p.output_audio, p.output)
            + usage.output_image_tokens * _or(p.output_image, p.output)
            + reasoning * _or(p.reasoning, p.output)
            + usage.web_searches * (p.web_search_fee or 0)
            + usage.file_searches * (p.file_search_fee or 0)
            + p.request_fee
        )

    def scaled_ceiling(self, max_input_tokens: int, max_output_tokens: int, reach: Reach) -> int:
        """The worst case over every tier the input can reach: each input token at the dearest input class
        the request can incur, each output token at the dearest output class, every tool call it may make,
        and the request fee."""
        return max(
            p._flat_ceiling(max_input_tokens, max_output_tokens, reach) for p in self.reachable(max_input_tokens)
        )

    def _flat_ceiling(self, max_input_tokens: int, max_output_tokens: int, reach: Reach) -> int:
        inputs = [self.input, self.cache_read, self.cache_write_5m, self.cache_write_1h]
        inputs += [_or(self.input_audio, self.input)] if reach.audio_in else []
        inputs += [_or(self.input_image, self.input)] if reach.image_in else []
        # Image output is not asked for by any request field a gateway can read: always in the worst case.
        outputs = [self.output, _or(self.reasoning, self.output), _or(self.output_image, self.output)]
        outputs += [_or(self.output_audio, self.output)] if reach.audio_out else []
        return (
            max_input_tokens * max(inputs)
            + max_output_tokens * max(outputs)
            + reach.web_searches_max * (self.web_search_fee or 0)
            + reach.file_searches_max * (self.file_search_fee or 0)
            + self.request_fee
        )

    def unpriced_for(self, reach: Reach) -> str | None:
        """The first thing this request would incur that has no price of its own here, or None."""
        for tier in self.reachable(10**18):
            if reach.audio_in and tier.input_audio is None:
                return "audio input"
            if reach.audio_out and tier.output_audio is None:
                return "audio output"
            if reach.web_searches_max and tier.web_search_fee is None:
                return "web search"
            if reach.file_searches_max and tier.file_search_fee is None:
                return "file search"
        return None

    @property
    def max_input_class(self) -> int:
        return max(self.input, self.cache_read, self.cache_write_5m, self.cache_write_1h)

    @property
    def is_free(self) -> bool:
        return all(p._flat_free for p in self.reachable(10**18))

    @property
    def _flat_free(self) -> bool:
        priced = [getattr(self, cls) for cls in (*BASE_TOKEN_CLASSES, *EXTRA_TOKEN_CLASSES, *TOOL_FEES)]
        return self.request_fee == 0 and not any(priced)

    def mapped(self, each) -> TokenPrices:
        """These prices with `each(price)` applied to every price, tiers included (None stays None)."""
        values = {name: _map(each, getattr(self, name)) for name in PRICE_FIELDS}
        return TokenPrices(**values, tiers=tuple((start, tier.mapped(each)) for start, tier in self.tiers))

    def as_json(self) -> dict:
        """Every price as its scaled integer (None: no price of its own), tiers as a list: stable, for hashing."""
        out: dict = {name: getattr(self, name) for name in PRICE_FIELDS}
        if self.tiers:
            out["tiers"] = [[start, tier.as_json()] for start, tier in self.tiers]
        return out


PRICE_FIELDS = (*BASE_TOKEN_CLASSES, *EXTRA_TOKEN_CLASSES, "request_fee", *TOOL_FEES)


def per_million(scaled: int) -> str:
    """A scaled price per token (see money.PRICE_SCALE) as its exact decimal price per 1M tokens."""
    whole, frac = divmod(scaled, PRICE_SCALE)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(whole)


def per_call(scaled: int) -> str:
    """A scaled fee per call (micro-credits * PRICE_SCALE) as its exact decimal in credits."""
    whole, frac = divmod(scaled, PRICE_SCALE * 1_000_000)
    return f"{whole}.{frac:015d}".rstrip("0").rstrip(".") if frac else str(whole)


def decimal_json(prices: TokenPrices) -> dict:
    """Every price as an exact decimal string, for people and APIs: token classes per 1M tokens (a class
    without a price of its own left out), fees per call in credits, tiers by the input they start above."""
    shown = {cls: per_million(getattr(prices, cls)) for cls in BASE_TOKEN_CLASSES}
    shown |= {c: per_million(getattr(prices, c)) for c in EXTRA_TOKEN_CLASSES if getattr(prices, c) is not None}
    shown |= {fee: per_call(getattr(prices, fee)) for fee in ("request_fee", *TOOL_FEES) if getattr(prices, fee)}
    if prices.tiers:
        shown["tiers"] = [{"input_tokens_above": start, **decimal_json(tier)} for start, tier in prices.tiers]
    return shown


def _or(price: int | None, parent: int) -> int:
    return parent if price is None else price


def _map(each, value: int | None) -> int | None:
    return None if value is None else each(value)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    model: str
    sell: TokenPrices  # what the workspace is charged
    upstream: TokenPrices  # what the platform pays the provider (margin reporting)
    effective_ms: int = 0  # in force from (Unix ms); 0: always
    source: str = "config"  # where the prices come from: "config", or the catalog ("genai-prices==0.2.3")
    version: str = field(default="", compare=False)  # content hash of all of the above (price_version)

    def __post_init__(self) -> None:
        if not self.version:
            object.__setattr__(self, "version", price_version(self))

    def as_json(self) -> dict:
        return {
            "price": self.model,
            "source": self.source,
            "effective_ms": self.effective_ms,
            "sell": self.sell.as_json(),
            "upstream": self.upstream.as_json(),
        }


def price_version(price: ModelPrice) -> str:
    """A content hash of a price entry: its name, source, sell and upstream prices, and when it takes
    effect. The same prices give the same id on every replica and every restart."""
    canonical = json.dumps(price.as_json(), sort_keys=True, separators=(",", ":"))
    return "pv_" + hashlib.sha256(canonical.encode()).hexdigest()[:20]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class CostProfile:
    name: str
    currency: str
    charge_micro_min: int
    models: dict[str, ModelPrice]
    # Dated price changes (the model catalog's), by entry, oldest first: a call is priced by the version
    # in force when its price is looked up (admission), so a dated change applies without a restart.
    changes: dict[str, tuple[ModelPrice, ...]] = field(default_factory=dict)

    def price_of(self, model: str, now_ms: int | None = None) -> ModelPrice | None:
        price = self.models.get(model)
        dated = self.changes.get(model)
        if dated:
            now_ms = _now_ms() if now_ms is None else now_ms
            for version in dated:
                if version.effective_ms <= now_ms:
                    price = version
        return price

    def cost_micro(self, price: ModelPrice, usage: Usage) -> int:
        """The exact cost of `usage`, rounded up once, with the minimum charge.

        A call with no tokens at all costs 0: a failed call is never charged the minimum.
        """
        if usage.is_empty or price.sell.is_free:
            return 0
        return max(ceil_div(price.sell.scaled_cost(usage), PRICE_SCALE), self.charge_micro_min)

    def upstream_cost_micro(self, price: ModelPrice, usage: Usage) -> int:
        return ceil_div(price.upstream.scaled_cost(usage), PRICE_SCALE)

    def ceiling_micro(
        self, price: ModelPrice, max_input_tokens: int, max_output_tokens: int, reach: Reach = Reach()
    ) -> int:
        """The worst-case cost: every input token at the dearest input class of the dearest tier the input
        can reach, every output token capped, every tool call and fee the request can incur."""
        assert max_input_tokens >= 0 and max_output_tokens >= 0
        if price.sell.is_free:
            return 0
        scaled = price.sell.scaled_ceiling(max_input_tokens, max_output_tokens, reach)
        return max(ceil_div(scaled, PRICE_SCALE), self.charge_micro_min)
