"""A workspace's money rules beyond its balance, as pure functions: the usage fee and its waiver, key
budget periods, and expiry dates. The hot-path scripts (admit.lua, settle.lua) apply the same rules
inside Redis; the functions here are the reference the tests hold them to, and what Python needs
(the hold, the rebuild of a key budget from Postgres, the admin API's figures).

Usage fee: `fee = ceil(cost * ppm / 10^6)` micro-credits, rounded up once per call, where ppm is the
configured percent in parts per million (1% = 10,000 ppm, exact: the percent has at most 4 decimals).
The fee waiver takes the first N micro-credits of fees: per call, `waived = min(fee, waiver left)`,
the rest is charged. A call's hold covers its worst-case cost plus the fee of that cost.

Key budget periods (UTC, by Redis's clock): `total` (since the budget was set), `daily` (from 00:00),
`monthly` (from the 1st, 00:00). A period's id is what the scripts compare: `t`, `d<days since the
epoch>`, `m<year * 12 + month - 1>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sidecar.config import WalletConfig
from sidecar.money import parse_credits, parse_decimal_scaled

PPM = 1_000_000
DAY_MS = 86_400_000


class Mode(StrEnum):
    PREPAID = "prepaid"  # hold the worst case, debit at most the hold
    POSTPAID = "postpaid"  # hold nothing; admit while balance > -credit limit; debit the actual cost


class BudgetPeriod(StrEnum):
    TOTAL = "total"
    MONTHLY = "monthly"
    DAILY = "daily"


@dataclass(frozen=True, slots=True)
class Policy:
    """The deployment's wallet settings, parsed once (config `wallet`)."""

    fee_ppm: int = 0
    fee_waiver_micro: int = 0
    allowance_micro: int = 0
    allowance_on_first_use: bool = False
    expiry_enabled: bool = False
    expiry_extend_months: int = 1
    expiry_ahead_months_max: int = 3

    @classmethod
    def from_config(cls, config: WalletConfig) -> Policy:
        return cls(
            fee_ppm=percent_to_ppm(config.usage_fee_percent),
            fee_waiver_micro=parse_credits(config.fee_waiver_credits),
            allowance_micro=parse_credits(config.allowance_credits),
            allowance_on_first_use=config.allowance_on == "first_use",
            expiry_enabled=config.expiry_enabled,
            expiry_extend_months=config.expiry_extend_months,
            expiry_ahead_months_max=config.expiry_ahead_months_max,
        )


def percent_to_ppm(text: str) -> int:
    """'2.5' -> 25_000 parts per million; at most 4 decimals (0.0001% = 1 ppm), so the value is exact."""
    return parse_decimal_scaled(text, 4)


def fee_micro(cost_micro: int, ppm: int) -> int:
    """The usage fee of a cost, rounded up once: ceil(cost * ppm / 10^6)."""
    return -(-cost_micro * ppm // PPM)


def fee_charged(cost_micro: int, ppm: int, waiver_left_micro: int) -> tuple[int, int]:
    """(fee charged, fee waived) for one call, the waiver taking the first micro-credits."""
    fee = fee_micro(cost_micro, ppm)
    waived = min(fee, max(waiver_left_micro, 0))
    return fee - waived, waived


def period_id(period: BudgetPeriod, now_ms: int) -> str:
    if period is BudgetPeriod.TOTAL:
        return "t"
    day = now_ms // DAY_MS
    if period is BudgetPeriod.DAILY:
        return f"d{day}"
    at = datetime.fromtimestamp(day * 86_400, UTC)
    return f"m{at.year * 12 + at.month - 1}"


def period_start_ms(period: BudgetPeriod, now_ms: int, since_ms: int) -> int:
    """When the period holding now_ms began; for `total`, when the budget was set."""
    if period is BudgetPeriod.TOTAL:
        return since_ms
    day = now_ms // DAY_MS
    if period is BudgetPeriod.DAILY:
        return day * DAY_MS
    at = datetime.fromtimestamp(day * 86_400, UTC)
    return int(datetime(at.year, at.month, 1, tzinfo=UTC).timestamp()) * 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_ms(at: datetime) -> int:
    """Milliseconds since the epoch, floored, exactly (no float): what the scripts compare with Redis
    time, and what names an expiry's forfeiture (Postgres: floor(extract(epoch) * 1000))."""
    return (at - _EPOCH) // timedelta(milliseconds=1)


def add_months(at: datetime, months: int) -> datetime:
    """The same day `months` later, clamped to the month's last day (Jan 31 + 1 month = Feb 28/29)."""
    index = at.year * 12 + at.month - 1 + months
    year, month = divmod(index, 12)
    month += 1
    next_first = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=at.tzinfo)
    last_day = (next_first - datetime(year, month, 1, tzinfo=at.tzinfo)).days
    return at.replace(year=year, month=month, day=min(at.day, last_day))


def extended_expiry(now: datetime, current: datetime | None, extend_months: int, ahead_months_max: int) -> datetime:
    """A purchase moves expiry to `extend_months` past the later of now and the current expiry, at
    most `ahead_months_max` past now."""
    start = max(now, current) if current is not None else now
    return min(add_months(start, extend_months), add_months(now, ahead_months_max))
