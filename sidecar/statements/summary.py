"""The usage summary (reference 004): totals over a period, a per-product breakdown (provider and
model), BYOK calls and tokens apart (reference 002), money moved in and out by other kinds of row, and
a daily series.

It reads the daily roll-ups (`ledger_daily`, migration 009), which the ledger's insert trigger keeps in
the transaction that writes the rows: the answer costs the same for ten rows or ten million and always
agrees with the ledger to the micro-credit. Days are UTC days.

Definitions (README, "Statements and reports"):
- calls: usage rows of the credits path, every status (a failed call is a call, charged 0);
- credits_spent: what those calls took from the balance (minus their balance impact), fees included;
- cost: their priced cost; fees: their platform fee (the ledger's fee_micro, 0 until it exists);
- byok: usage rows on the customer's own key: counted and priced, never charged;
- movements: every other kind of row (grant, topup, ...), its count and its net balance impact.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date

import asyncpg

from sidecar.money import format_micro
from sidecar.statements.filters import Period

TOKEN_CLASSES = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "reasoning")
MEASURES = ("rows", *(f"{c}_tokens" for c in TOKEN_CLASSES), "cost_micro", "upstream_cost_micro", "fee_micro")
MEASURES += ("balance_impact_micro",)
USAGE = "usage"
_SUMS = ", ".join(f"sum({m})::bigint AS {m}" for m in MEASURES)
# Postgres sums the period's roll-up rows three ways at once (GROUPING SETS), so what reaches Python is a
# few dozen rows whatever the period or the traffic: the totals, the products and the days. GROUPING()
# says which set a row belongs to (a bit per column summed over: provider 4, model 2, day 1).
TOTALS, PRODUCTS, DAYS = 7, 1, 6
_QUERY = (
    f"SELECT GROUPING(provider, model, day) AS grouping_set, kind, status, byok, provider, model, day, {_SUMS} "
    "FROM ledger_daily WHERE workspace_id = $1 AND day BETWEEN $2 AND $3 "
    "GROUP BY GROUPING SETS ((kind, status, byok), (kind, status, byok, provider, model), (kind, byok, day))"
)


async def rollup_rows(conn: asyncpg.Connection, workspace_id: str, period: Period) -> list[asyncpg.Record]:
    """The period's roll-ups summed per set: totals (kind, status, byok), products, days."""
    return await conn.fetch(_QUERY, workspace_id, period.first, period.last)


class Tally:
    """Sums of one group of roll-up rows: exact integers."""

    __slots__ = ("by_status", "sums")

    def __init__(self) -> None:
        self.sums: dict[str, int] = dict.fromkeys(MEASURES, 0)
        self.by_status: dict[str, int] = defaultdict(int)

    def add(self, row: asyncpg.Record) -> None:
        for measure in MEASURES:
            self.sums[measure] += row[measure]
        if row["status"] is not None:  # the days' set is not by status
            self.by_status[row["status"]] += row["rows"]

    def tokens(self) -> dict[str, int]:
        return {c: self.sums[f"{c}_tokens"] for c in TOKEN_CLASSES}

    def credits_view(self) -> dict:
        spent, cost, fee = -self.sums["balance_impact_micro"], self.sums["cost_micro"], self.sums["fee_micro"]
        return {
            "calls": self.sums["rows"],
            "calls_by_status": dict(sorted(self.by_status.items())),
            "tokens": self.tokens(),
            "credits_spent": format_micro(spent),
            "credits_spent_micro": spent,
            "cost": format_micro(cost),
            "cost_micro": cost,
            "fees": format_micro(fee),
            "fees_micro": fee,
        }

    def byok_view(self) -> dict:
        cost = self.sums["cost_micro"]
        return {
            "calls": self.sums["rows"],
            "calls_by_status": dict(sorted(self.by_status.items())),
            "tokens": self.tokens(),
            "cost": format_micro(cost),  # priced for visibility, never charged
            "cost_micro": cost,
        }


def summarize(workspace_id: str, rows: list[asyncpg.Record], period: Period, series: Period) -> dict:
    """The summary of `period` from its summed roll-ups (rollup_rows), with the daily series over
    `series` (inside it)."""
    credits, byok = Tally(), Tally()
    products: dict[tuple[str, str], tuple[Tally, Tally]] = defaultdict(lambda: (Tally(), Tally()))
    movements: dict[str, Tally] = defaultdict(Tally)
    days: dict[date, tuple[Tally, Tally]] = defaultdict(lambda: (Tally(), Tally()))
    for row in rows:
        which, grouping = (1 if row["byok"] else 0), row["grouping_set"]
        if grouping == TOTALS:
            if row["kind"] != USAGE:
                movements[row["kind"]].add(row)
            else:
                (credits, byok)[which].add(row)
        elif row["kind"] != USAGE:
            continue  # products and days are of calls
        elif grouping == PRODUCTS:
            products[(row["provider"], row["model"])][which].add(row)
        elif grouping == DAYS and series.first <= row["day"] <= series.last:
            days[row["day"]][which].add(row)
    return {
        "object": "usage_summary",
        "workspace_id": workspace_id,
        "period": _period_view(period),
        "totals": credits.credits_view(),
        "byok": byok.byok_view(),
        "movements": [_movement_view(kind, tally) for kind, tally in sorted(movements.items())],
        "products": _products_view(products),
        "daily": [_day_view(day, *days[day]) for day in series.dates()],
    }


def _period_view(period: Period) -> dict:
    return {"from": period.first.isoformat(), "to": period.last.isoformat(), "days": period.days}


def _movement_view(kind: str, tally: Tally) -> dict:
    amount = tally.sums["balance_impact_micro"]
    return {"kind": kind, "count": tally.sums["rows"], "amount": format_micro(amount), "amount_micro": amount}


def _products_view(products: dict[tuple[str, str], tuple[Tally, Tally]]) -> list[dict]:
    views = [
        {"provider": provider, "model": model, **credits.credits_view(), "byok": byok.byok_view()}
        for (provider, model), (credits, byok) in products.items()
    ]
    # Where the credits went first; then by volume; then by name, so the order is stable.
    return sorted(views, key=lambda v: (-v["credits_spent_micro"], -v["calls"], v["provider"], v["model"]))


def _day_view(day: date, credits: Tally, byok: Tally) -> dict:
    spent, fee = -credits.sums["balance_impact_micro"], credits.sums["fee_micro"]
    return {
        "date": day.isoformat(),
        "calls": credits.sums["rows"],
        "tokens": sum(credits.tokens().values()),
        "credits_spent": format_micro(spent),
        "credits_spent_micro": spent,
        "fees": format_micro(fee),
        "fees_micro": fee,
        "byok_calls": byok.sums["rows"],
        "byok_tokens": sum(byok.tokens().values()),
    }


async def usage_summary(conn: asyncpg.Connection, workspace_id: str, period: Period, series: Period) -> dict:
    return summarize(workspace_id, await rollup_rows(conn, workspace_id, period), period, series)
