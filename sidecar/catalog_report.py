"""`sidecar catalog`: what each provider offers, at what upstream and sell prices, and what the catalog
(genai-prices' bundled snapshot) says that differs from the prices in force.

Reads the config only; no server, no network.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sidecar import catalog
from sidecar.config import Config
from sidecar.pricing import EXTRA_TOKEN_CLASSES, TOOL_FEES, TokenPrices, decimal_json, per_call, per_million

CLASSES = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
# Per call, in credits: a price per 1000 calls is this * 1000.
FEES = ("request_fee", *TOOL_FEES)


@dataclass(frozen=True)
class Row:
    provider: str
    upstream_model: str
    model: str | None  # the public name it is offered as; None: not offered
    price_from: str  # "catalog", "pricing.yaml", or "" when not offered
    upstream: TokenPrices | None
    sell: TokenPrices | None
    note: str = ""  # why the catalog cannot price it, or how the catalog differs from the prices in force
    price_version: str | None = None  # the version in force now (ledger rows' price_version)
    changes: tuple[dict, ...] = ()  # the dated changes to come: {effective_at, price_version, upstream, sell}

    def as_json(self) -> dict:
        return {
            "provider": self.provider,
            "upstream_model": self.upstream_model,
            "model": self.model,
            "price_from": self.price_from,
            "upstream": _prices_json(self.upstream),
            "sell": _prices_json(self.sell),
            "note": self.note,
            "price_version": self.price_version,
            "changes": list(self.changes),
        }


def _prices_json(prices: TokenPrices | None) -> dict | None:
    return None if prices is None else decimal_json(prices)


def rows(config: Config, provider: str | None = None, everything: bool = False) -> list[Row]:
    """The offered models of each configured provider (or of `provider`); with `everything`, also the
    models of its price source that are not offered, each with its price or the reason it has none."""
    at = datetime.now(tz=UTC)
    found: list[Row] = []
    for name, settings in config.providers.items():
        if provider is not None and name != provider:
            continue
        offered_ids = set()
        for model in config.catalog():
            for target in model.targets:
                if target.provider != name:
                    continue
                offered_ids.add(target.upstream_model)
                found.append(_offered_row(config, name, settings.price_source, model.name, target, at))
        if everything and settings.price_source:
            for entry in catalog.models_of(settings.price_source, at):
                if entry.model_id not in offered_ids:
                    note = entry.refused or ("no context window known" if not entry.context_window_tokens else "")
                    found.append(Row(name, entry.model_id, None, "", entry.prices, None, note))
    return found


def _offered_row(config: Config, provider: str, source: str | None, model: str, target, at: datetime) -> Row:
    price = config.pricing.price_of(target.price)
    known = catalog.find(source, target.upstream_model, at) if source else None
    from_catalog = target.price not in config.pricing_by_hand
    note = ""
    if known is not None and known.prices is not None and known.prices != price.upstream:
        note = "catalog upstream differs: " + _text(known.prices)
    elif known is not None and known.prices is None and source:
        note = f"catalog cannot price it ({known.refused})"
    changes = []
    for change in config.pricing.changes.get(target.price, ()):
        when = datetime.fromtimestamp(change.effective_ms / 1000, UTC)
        note = f"{note}; " if note else ""
        note += f"from {when.date()} ({change.version}): upstream {_text(change.upstream)}, sell {_text(change.sell)}"
        changes.append(
            {
                "effective_at": when.isoformat(),
                "price_version": change.version,
                "upstream": _prices_json(change.upstream),
                "sell": _prices_json(change.sell),
            }
        )
    note = _extras(price.sell, note)
    price_from = "catalog" if from_catalog else "pricing.yaml"
    return Row(
        provider,
        target.upstream_model,
        model,
        price_from,
        price.upstream,
        price.sell,
        note,
        price.version,
        tuple(changes),
    )


def _extras(sell: TokenPrices, note: str) -> str:
    """What the five-class columns do not show: tiers, fees, audio/image/reasoning classes (sell prices)."""
    parts = [
        f"{cls} {per_million(getattr(sell, cls))}" for cls in EXTRA_TOKEN_CLASSES if getattr(sell, cls) is not None
    ]
    parts += [f"{fee.replace('_', ' ')} {per_call(getattr(sell, fee))}/call" for fee in FEES if getattr(sell, fee)]
    parts += [f"above {start} input tokens: {_text(tier)}" for start, tier in sell.tiers]
    return "; ".join([note, *parts] if note else parts)


def _text(prices: TokenPrices | None) -> str:
    if prices is None:
        return "-"
    return "/".join(per_million(getattr(prices, cls)) for cls in CLASSES)


def text(found: list[Row]) -> str:
    header = (
        "provider",
        "upstream model",
        "offered as",
        "price from",
        "version",
        "upstream " + "/".join(CLASSES),
        "sell",
        "note",
    )
    table = [header] + [
        (
            r.provider,
            r.upstream_model,
            r.model or "-",
            r.price_from or "-",
            r.price_version or "-",
            _text(r.upstream),
            _text(r.sell),
            r.note,
        )
        for r in found
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1] for line in table
    ]
    lines.append(
        f"prices per 1M tokens ({', '.join(CLASSES)}); catalog: genai-prices {catalog.package_version()}, "
        f"bundled snapshot"
    )
    return "\n".join(line.rstrip() for line in lines)
