"""The margin report (reference 001): per provider and model over a period, what customers were charged
against what the platform paid upstream (the cost profile's `upstream` prices, recorded per call as
upstream_cost_micro), and BYOK usage apart (the customer's key: nothing charged, nothing paid).

Read from the daily roll-ups, so a year of every workspace costs a few thousand roll-up rows. Periods
are whole UTC days. Usage rows only: grants and top-ups are money in, not margin.

- charged: what the calls took from balances (minus their balance impact), fees included;
- upstream_cost: what the platform paid for them; margin = charged - upstream_cost;
- byok_*: calls, tokens and priced cost on customers' own keys, outside the margin.
"""

from __future__ import annotations

import csv
import io

import asyncpg

from sidecar.money import format_micro
from sidecar.statements.filters import Period
from sidecar.statements.summary import TOKEN_CLASSES

_TOKENS = " + ".join(f"{c}_tokens" for c in TOKEN_CLASSES)
_QUERY = (
    "SELECT provider, model, "
    "coalesce(sum(rows) FILTER (WHERE NOT byok), 0)::bigint AS calls, "
    f"coalesce(sum({_TOKENS}) FILTER (WHERE NOT byok), 0)::bigint AS tokens, "
    "coalesce(-sum(balance_impact_micro) FILTER (WHERE NOT byok), 0)::bigint AS charged_micro, "
    "coalesce(sum(fee_micro) FILTER (WHERE NOT byok), 0)::bigint AS fees_micro, "
    "coalesce(sum(upstream_cost_micro) FILTER (WHERE NOT byok), 0)::bigint AS upstream_cost_micro, "
    "coalesce(sum(rows) FILTER (WHERE byok), 0)::bigint AS byok_calls, "
    f"coalesce(sum({_TOKENS}) FILTER (WHERE byok), 0)::bigint AS byok_tokens, "
    "coalesce(sum(cost_micro) FILTER (WHERE byok), 0)::bigint AS byok_cost_micro "
    "FROM ledger_daily WHERE kind = 'usage' AND day BETWEEN $1 AND $2 AND ($3::text IS NULL OR workspace_id = $3) "
    "GROUP BY provider, model ORDER BY provider, model"
)
COUNTS = ("calls", "tokens", "byok_calls", "byok_tokens")
AMOUNTS = ("charged", "fees", "upstream_cost", "margin", "byok_cost")
CSV_HEADER = ("provider", "model", *COUNTS, *(f"{a}{s}" for a in AMOUNTS for s in ("", "_micro")))


def _line(provider: str, model: str, sums: dict[str, int]) -> dict:
    line: dict = {"provider": provider, "model": model, **{c: sums[c] for c in COUNTS}}
    micro = {a: sums[f"{a}_micro"] for a in AMOUNTS if a != "margin"}
    micro["margin"] = micro["charged"] - micro["upstream_cost"]
    for amount in AMOUNTS:
        line[amount], line[f"{amount}_micro"] = format_micro(micro[amount]), micro[amount]
    return line


async def margin_report(conn: asyncpg.Connection, period: Period, workspace_id: str | None) -> dict:
    rows = await conn.fetch(_QUERY, period.first, period.last, workspace_id)
    totals = dict.fromkeys((*COUNTS, *(f"{a}_micro" for a in AMOUNTS if a != "margin")), 0)
    for row in rows:
        for name in totals:
            totals[name] += row[name]
    return {
        "object": "margin_report",
        "period": {"from": period.first.isoformat(), "to": period.last.isoformat(), "days": period.days},
        "workspace_id": workspace_id,
        "data": [_line(r["provider"], r["model"], dict(r)) for r in rows],
        "totals": _line("", "", totals),
    }


def to_csv(report: dict) -> bytes:
    """The report's lines, then a `total` line; amounts as decimal strings and micro-credits."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for line in [*report["data"], {**report["totals"], "provider": "total", "model": ""}]:
        writer.writerow([line[name] for name in CSV_HEADER])
    return out.getvalue().encode()
