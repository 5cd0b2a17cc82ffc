"""The model catalog: upstream prices from the `genai-prices` package's bundled snapshot.

The snapshot ships inside the package, so the prices are pinned by the package's version (pyproject)
and never fetched at run time. A provider's `price_source` names the package's provider id; a model
is then priced by its upstream id alone.

Every price is converted EXACTLY into the cost profile's integers (pricing.TokenPrices: micro-credits
per token, per tool call or per request, * PRICE_SCALE); a price that does not fit is refused, never
rounded. What the profile expresses: input, output, cache read, cache writes (5-minute and 1-hour),
audio and image input and output tokens, reasoning tokens, a per-request fee, web and file search fees
(per call, at OpenAI and Anthropic, whose searches are server tools a request names), and context-length
tiers of all of them (the tier chosen by the call's total input tokens, as genai-prices chooses it). A model
priced by anything else is refused with the reason rather than billed as plain text:
- token classes the providers' usage never reports through these protocols (video, citation, tool-use
  prompt tokens, text-only modality prices), pages, characters, messages, pixels, audio hours together
  with audio tokens, search fees where searching is not a tool the request names,
- time-of-day prices, and price sets genai-prices itself cannot compute.
Cached audio and image reads are priced by the catalog but never reported apart by these protocols'
usage: such tokens are billed as the usage reports them (cache reads), as genai-prices' own extractors do.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import UTC, datetime, time
from decimal import Decimal
from fractions import Fraction
from functools import cache
from importlib.metadata import version as _package_version

from sidecar.errors import DomainError
from sidecar.money import PRICE_SCALE
from sidecar.pricing import PRICE_FIELDS, TokenPrices

CATALOG_CURRENCY = "USD"  # genai-prices' prices are in US dollars

# genai-prices price key -> the cost profile's field (pricing.TokenPrices); the generic cache write price
# is resolved into the 5-minute and 1-hour ones in _flat_prices.
_PRICE_KEYS = {
    "input_mtok": "input",
    "output_mtok": "output",
    "cache_read_mtok": "cache_read",
    "cache_write_5m_mtok": "cache_write_5m",
    "cache_write_1h_mtok": "cache_write_1h",
    "input_audio_mtok": "input_audio",
    "input_image_mtok": "input_image",
    "output_audio_mtok": "output_audio",
    "output_image_mtok": "output_image",
    "output_reasoning_mtok": "reasoning",
    "requests_kcount": "request_fee",
    "web_searches_kcount": "web_search_fee",
    "storage_searches_kcount": "file_search_fee",
}
# Prices whose class the protocols' usage never reports apart: the tokens are billed as reported, as
# genai-prices' own extractors bill them (cache reads). Audio hours price speech models' audio, which
# they take only in requests refused per request (audio input without an audio token price).
_NEVER_REPORTED = frozenset({"cache_write_mtok", "cache_audio_read_mtok", "cache_image_read_mtok"})
_AUDIO_DURATION = frozenset({"audio_hours", "input_audio_hours"})
# A genai-prices price is per `per` units; the profile's is per unit, scaled by PRICE_SCALE, in
# micro-credits: a price per 1M tokens in credits is already micro-credits per token.
_PER_MILLION = 1
_PER_THOUSAND = 1000  # credits per 1000 calls = 1000 micro-credits per call
_SCALE = {key: (_PER_THOUSAND if key.endswith("_kcount") else _PER_MILLION) for key in _PRICE_KEYS}
# Search fees are incurred through a server tool the protocols recognise (`web_search*`, `file_search`,
# `web_search_options`), bounded and counted per call, only at these providers. Elsewhere (Perplexity's
# sonar-deep-research, Google's grounding tool) search is part of the call, unbounded: refused.
_TOOL_SEARCH_FEES = frozenset({"web_searches_kcount", "storage_searches_kcount"})
_TOOL_SEARCH_PROVIDERS = frozenset({"openai", "anthropic"})


class CatalogError(DomainError, ValueError):
    pass


@dataclass(frozen=True, slots=True)
class PriceChange:
    """A dated price of the snapshot, in force from `effective_at` (00:00 UTC of its start date)."""

    effective_at: datetime
    prices: TokenPrices


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """One model of a provider in the snapshot, priced (`prices`, and the dated `changes` to come) or
    refused (`refused`, why)."""

    provider_id: str
    model_id: str
    name: str | None
    context_window_tokens: int | None
    prices: TokenPrices | None
    refused: str | None
    changes: tuple[PriceChange, ...] = ()

    @property
    def offerable(self) -> bool:
        return self.prices is not None


@cache
def package_version() -> str:  # reading package metadata costs ~10 ms: once per process
    return _package_version("genai-prices")


@cache
def _snapshot():
    from genai_prices import data_snapshot  # imported when a provider names a price source

    return data_snapshot.get_snapshot()


def provider_ids() -> list[str]:
    return sorted(p.id for p in _snapshot().providers)


def _provider(provider_id: str):
    for provider in _snapshot().providers:
        if provider.id == provider_id:
            return provider
    raise CatalogError(
        f"unknown price source {provider_id!r} (genai-prices {package_version()} knows: {', '.join(provider_ids())})"
    )


def models_of(provider_id: str, at: datetime | None = None) -> list[CatalogModel]:
    """Every model the snapshot lists for this provider, as priced at `at` (default: now)."""
    provider = _provider(provider_id)
    return [describe(provider.id, model, at or datetime.now(tz=UTC)) for model in provider.models]


def find(provider_id: str, model_ref: str, at: datetime | None = None) -> CatalogModel | None:
    """The model `model_ref` resolves to at this provider (its aliases and fallback providers included,
    as genai-prices' own calc_price resolves it), or None."""
    provider = _provider(provider_id)
    model = provider.find_model(model_ref, all_providers=_snapshot().providers)
    return None if model is None else describe(provider.id, model, at or datetime.now(tz=UTC))


def offered(provider_id: str, patterns: tuple[str, ...], at: datetime | None = None) -> list[CatalogModel]:
    """The provider's models whose id matches one of the globs (fnmatch, case-sensitive)."""
    return [m for m in models_of(provider_id, at) if any(fnmatch.fnmatchcase(m.model_id, p) for p in patterns)]


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def describe(provider_id: str, model, at: datetime) -> CatalogModel:
    """A genai-prices ModelInfo as priced at `at` by this catalog, or the reason it cannot be."""
    prices, refused, changes = None, None, ()
    try:
        if not model.is_match(model.id):  # e.g. 'ft:gpt-4o' stands for the fine-tunes 'ft:gpt-4o:<org>:...'
            raise CatalogError("its id names a family of models, not a model a call can ask for")
        prices = _token_prices(model, at, provider_id)
        changes = _changes(model, at, provider_id)
    except CatalogError as exc:
        prices, refused = None, str(exc)
    return CatalogModel(provider_id, model.id, model.name, model.context_window, prices, refused, changes)


def _changes(model, at: datetime, provider_id: str) -> tuple[PriceChange, ...]:
    """The snapshot's price changes dated after `at`; one the profile cannot express refuses the model now,
    so that it is not offered at a price it would have to drop."""
    from genai_prices import types

    if not isinstance(model.prices, list):
        return ()
    today = at.astimezone(UTC).date()
    starts = sorted(
        {
            c.constraint.start_date
            for c in model.prices
            if isinstance(c.constraint, types.StartDateConstraint) and c.constraint.start_date > today
        }
    )
    changes = []
    for start in starts:
        effective_at = datetime.combine(start, time(), tzinfo=UTC)
        try:
            changes.append(PriceChange(effective_at, _token_prices(model, effective_at, provider_id)))
        except CatalogError as exc:
            raise CatalogError(f"its price changes on {start} to one that cannot be billed: {exc}") from None
    return tuple(changes)


def _token_prices(model, at: datetime, provider_id: str) -> TokenPrices:
    from genai_prices import types

    if isinstance(model.prices, list):
        if any(isinstance(c.constraint, types.TimeOfDateConstraint) for c in model.prices):
            raise CatalogError("its price depends on the time of day")
    price = model.get_prices(at)
    given = {k: v for k, v in price.__dict__.items() if v is not None and not k.startswith("_")}
    _check_keys(given, provider_id)
    if "input_mtok" not in given and "output_mtok" not in given:
        raise CatalogError("it has no token prices")
    problem = _uncomputable(frozenset(given))
    if problem:
        raise CatalogError(f"genai-prices cannot compute its price: {problem}")
    starts = sorted({tier.start for v in given.values() if isinstance(v, types.TieredPrices) for tier in v.tiers})
    base = _flat_prices({k: _tier_price(v, None) for k, v in given.items()}, model.id)
    tiers = tuple((s, _flat_prices({k: _tier_price(v, s) for k, v in given.items()}, model.id)) for s in starts)
    return TokenPrices(**{name: getattr(base, name) for name in PRICE_FIELDS}, tiers=tiers)


@cache
def _uncomputable(keys: frozenset[str]) -> str | None:
    """genai-prices' own check that a set of priced keys is computable (every class's ancestors and joins
    priced), as its calc_price runs it: depends on the keys only, so once per set."""
    from genai_prices import Usage as GenaiUsage
    from genai_prices import types

    try:
        types.ModelPrice(**dict.fromkeys(keys, Decimal(1))).calc_price(GenaiUsage())
    except ValueError as exc:
        return str(exc)
    return None


def _check_keys(given: dict, provider_id: str) -> None:
    for key in given:
        if key in _TOOL_SEARCH_FEES and provider_id not in _TOOL_SEARCH_PROVIDERS:
            raise CatalogError(f"it is priced by {key}, searches this provider makes without a tool the request names")
        if key in _AUDIO_DURATION and "input_audio_mtok" in given:
            raise CatalogError(f"it is priced by {key} and audio tokens, which the cost profile cannot express")
        if key not in _PRICE_KEYS and key not in _NEVER_REPORTED and key not in _AUDIO_DURATION:
            raise CatalogError(f"it is priced by {key}, which the cost profile cannot express")


def _tier_price(value, start: int | None) -> Decimal:
    """The price in force when a call's input exceeds `start` (None: the base), as genai-prices chooses it:
    the highest tier whose start the input exceeds."""
    from genai_prices import types

    if not isinstance(value, types.TieredPrices):
        return value
    chosen = value.base
    for tier in value.tiers:
        if start is not None and start + 1 > tier.start:
            chosen = tier.price
    return chosen


def _flat_prices(given: dict[str, Decimal], model_id: str) -> TokenPrices:
    scaled = {
        _PRICE_KEYS[key]: scale_exact(value * _SCALE[key], f"{model_id}: {key}")
        for key, value in given.items()
        if key in _PRICE_KEYS
    }
    plain_input = scaled.get("input", 0)
    # Mirrors genai-prices' leaf arithmetic: an unpriced class is counted in its parent class, so cache
    # writes without their own duration's price cost the generic cache write price, else input.
    cache_write = (
        scale_exact(given["cache_write_mtok"], f"{model_id}: cache_write_mtok")
        if "cache_write_mtok" in given
        else plain_input
    )
    scaled.setdefault("input", plain_input)
    scaled.setdefault("output", 0)
    scaled.setdefault("cache_read", plain_input)
    scaled.setdefault("cache_write_5m", cache_write)
    scaled.setdefault("cache_write_1h", cache_write)
    scaled.setdefault("request_fee", 0)
    return TokenPrices(**scaled)


def scale_exact(price_per_million: Decimal | Fraction, what: str) -> int:
    """A price per 1M tokens (credits) as the profile's integer, or CatalogError if it is not exact."""
    scaled = Fraction(price_per_million) * PRICE_SCALE
    if scaled.denominator != 1 or scaled < 0:
        raise CatalogError(
            f"{what}: the price {price_per_million} per 1M tokens is not a non-negative multiple of "
            f"{Fraction(1, PRICE_SCALE)} credit: it cannot be billed exactly"
        )
    return int(scaled)


def with_markup(prices: TokenPrices, markup_percent: Decimal, what: str) -> TokenPrices:
    """Every price (each class, fee and tier) times (1 + markup/100), exactly; a price the markup makes
    inexact is refused."""
    if markup_percent == 0:
        return prices
    factor = 1 + Fraction(markup_percent) / 100

    def marked(price: int) -> int:
        exact = Fraction(price) * factor
        if exact.denominator != 1:
            raise CatalogError(
                f"{what}: a {markup_percent}% markup on its {Fraction(price, PRICE_SCALE)} price gives more "
                "than 9 decimals per 1M tokens; choose another markup or give an explicit sell price in pricing.yaml"
            )
        return int(exact)

    return prices.mapped(marked)
