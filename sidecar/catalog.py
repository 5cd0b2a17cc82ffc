"""The model catalog: upstream prices from the `genai-prices` package's bundled snapshot.

The snapshot ships inside the package, so the prices are pinned by the package's version (pyproject)
and never fetched at run time. A provider's `price_source` names the package's provider id; a model
is then priced by its upstream id alone.

Every price is converted EXACTLY into the cost profile's integers (pricing.TokenPrices: micro-credits
per token * PRICE_SCALE); a price that does not fit is refused, never rounded. A model whose prices the
profile cannot express is refused with the reason, rather than billed as plain text:
- context-length tiers (the price of every token depends on the call's input size),
- per-request fees, and token classes other than input/output/cache read/cache write
  (image, video, reasoning, citation tokens, pages, characters, messages),
- time-of-day prices.
Classes whose only use the protocols already refuse per request (audio input and output: 400
`unsupported_feature`; OpenAI's and Anthropic's web and file search: their server tools are refused)
do not refuse the model:
those requests never reach the provider, so their fee is never incurred.
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
from sidecar.pricing import TokenPrices

CATALOG_CURRENCY = "USD"  # genai-prices' prices are in US dollars

# genai-prices price key -> the cost profile's class; the cache write keys are resolved in _token_prices.
_TOKEN_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok", "cache_write_5m_mtok")
_TOKEN_KEYS += ("cache_write_1h_mtok",)
# Used only by requests the protocols refuse with 400 unsupported_feature (protocols/base.py).
_REFUSED_PER_REQUEST = frozenset(
    {
        "input_audio_mtok",
        "output_audio_mtok",
        "cache_audio_read_mtok",
        "audio_hours",
        "input_audio_hours",
    }
)
# Search fees incurred only through a server tool the protocols refuse (`web_search*` and `file_search`
# tools, `web_search_options`), at the providers whose API offers search that way and no other. Elsewhere
# (Perplexity's sonar, Google's grounding tool, which is not refused) search is part of the call: refused.
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


def package_version() -> str:
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
    given = {k: v for k, v in model.get_prices(at).__dict__.items() if v is not None and not k.startswith("_")}
    for key, value in given.items():
        if isinstance(value, types.TieredPrices):
            raise CatalogError(f"{key} has context-length tiers")
        if key in _TOOL_SEARCH_FEES and provider_id in _TOOL_SEARCH_PROVIDERS:
            continue
        if key not in _TOKEN_KEYS and key not in _REFUSED_PER_REQUEST:
            raise CatalogError(f"it is priced by {key}, which the cost profile cannot express")
    if "input_mtok" not in given and "output_mtok" not in given:
        raise CatalogError("it has no token prices")
    scaled = {key: scale_exact(given[key], f"{model.id}: {key}") for key in _TOKEN_KEYS if key in given}
    plain_input = scaled.get("input_mtok", 0)
    # Mirrors genai-prices' leaf arithmetic: an unpriced class is counted in its parent class, so cache
    # writes without their own duration's price cost the generic cache write price, else input.
    cache_write = scaled.get("cache_write_mtok", plain_input)
    return TokenPrices(
        input=plain_input,
        output=scaled.get("output_mtok", 0),
        cache_read=scaled.get("cache_read_mtok", plain_input),
        cache_write_5m=scaled.get("cache_write_5m_mtok", cache_write),
        cache_write_1h=scaled.get("cache_write_1h_mtok", cache_write),
    )


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
    """Each class's price times (1 + markup/100), exactly; a price the markup makes inexact is refused."""
    if markup_percent == 0:
        return prices
    factor = 1 + Fraction(markup_percent) / 100
    marked = {}
    for cls in ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h"):
        exact = Fraction(getattr(prices, cls)) * factor
        if exact.denominator != 1:
            raise CatalogError(
                f"{what}: a {markup_percent}% markup on its {cls} price gives more than 9 decimals per 1M "
                "tokens; choose another markup or give an explicit sell price in pricing.yaml"
            )
        marked[cls] = int(exact)
    return TokenPrices(**marked)
