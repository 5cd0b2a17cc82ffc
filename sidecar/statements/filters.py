"""Which ledger rows a history page or a statement shows: the query's filters, parsed and checked
(pure, no I/O), and the SQL condition they make. Every value reaches Postgres as a parameter."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from sidecar.errors import DomainError

ROWS_PER_PAGE_DEFAULT = 100
ROWS_PER_PAGE_MAX = 1000
TEXT_CHARS_MAX = 200
VALUES_PER_FILTER_MAX = 20
PERIOD_DAYS_MAX = 366  # a summary or margin period, in days

_WORD_RE = re.compile(r"[a-z_]{1,32}\Z")  # a kind or a status
# Text filters: anything printable; commas separate values.
TEXT_FILTERS = ("model", "provider", "key_id", "office_id", "session_id")
WORD_FILTERS = ("kind", "status")
KNOWN_PARAMS = frozenset(("from", "to", "byok", "order", "limit", "cursor", "format", *TEXT_FILTERS, *WORD_FILTERS))


class QueryRefused(DomainError, ValueError):
    """A filter, period or cursor that cannot be read: the route answers 400 with `code`."""

    def __init__(self, message: str, code: str = "invalid_filter") -> None:
        super().__init__(message)
        self.message, self.code = message, code


@dataclass(frozen=True, slots=True)
class Filters:
    time_from: datetime | None = None  # inclusive
    time_to: datetime | None = None  # exclusive
    values: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, accepted values), sorted by column
    byok: bool | None = None
    descending: bool = True

    def fingerprint(self) -> str:
        """What a cursor is bound to: the same filters and order, or the cursor is refused."""
        text = repr((self.time_from, self.time_to, self.values, self.byok, self.descending))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def where(self, workspace_param: int = 1) -> tuple[list[str], list[object]]:
        """SQL conditions (after `workspace_id = $1`) and their arguments, numbered from $2."""
        conditions, args = [], []

        def arg(value: object) -> str:
            args.append(value)
            return f"${workspace_param + len(args)}"

        if self.time_from is not None:
            conditions.append(f"created_at >= {arg(self.time_from)}")
        if self.time_to is not None:
            conditions.append(f"created_at < {arg(self.time_to)}")
        for column, accepted in self.values:
            conditions.append(f"{column} = ANY({arg(list(accepted))}::text[])")
        if self.byok is not None:
            conditions.append(f"byok = {arg(self.byok)}")
        return conditions, args


def parse_time(text: str, what: str) -> datetime:
    """An RFC 3339 timestamp with its offset (`2026-12-01T00:00:00Z`), or a UTC date (`2026-12-01`)."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise QueryRefused(f"{what} must be an RFC 3339 time (2026-12-01T00:00:00Z) or a date (2026-12-01)") from None
    if parsed.tzinfo is None:
        raise QueryRefused(f"{what} must carry its UTC offset (e.g. 'Z'), or be a date")
    return parsed.astimezone(UTC)


def _values(text: str, name: str) -> tuple[str, ...]:
    values = tuple(sorted({v.strip() for v in text.split(",") if v.strip()}))
    if not values or len(values) > VALUES_PER_FILTER_MAX:
        raise QueryRefused(f"{name} must list 1 to {VALUES_PER_FILTER_MAX} comma-separated values")
    for value in values:
        if name in WORD_FILTERS and not _WORD_RE.match(value):
            raise QueryRefused(f"{name} values are lowercase words, like 'usage' or 'completed'")
        if len(value) > TEXT_CHARS_MAX or not value.isprintable():
            raise QueryRefused(f"{name} values are printable text of at most {TEXT_CHARS_MAX} characters")
    return values


def _flag(text: str, name: str) -> bool:
    if text not in ("true", "false"):
        raise QueryRefused(f"{name} must be true or false")
    return text == "true"


def parse_filters(query: Mapping[str, str]) -> Filters:
    """The filters of a history or CSV request (its query string). Unknown names are refused, so a
    misspelt filter cannot silently widen an export."""
    unknown = sorted(set(query) - KNOWN_PARAMS)
    if unknown:
        raise QueryRefused(f"unknown parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_PARAMS))}")
    time_from = parse_time(query["from"], "from") if "from" in query else None
    time_to = parse_time(query["to"], "to") if "to" in query else None
    if time_from and time_to and time_from >= time_to:
        raise QueryRefused("from must be before to")
    named = sorted(name for name in (*TEXT_FILTERS, *WORD_FILTERS) if name in query)
    values = tuple((name, _values(query[name], name)) for name in named)
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise QueryRefused("order must be asc or desc")
    byok = _flag(query["byok"], "byok") if "byok" in query else None
    return Filters(time_from, time_to, values, byok, order == "desc")


def parse_limit(text: str | None) -> int:
    if text is None:
        return ROWS_PER_PAGE_DEFAULT
    if not text.isdigit() or not 1 <= int(text) <= ROWS_PER_PAGE_MAX:
        raise QueryRefused(f"limit must be an integer from 1 to {ROWS_PER_PAGE_MAX}", "invalid_limit")
    return int(text)


@dataclass(frozen=True, slots=True)
class Period:
    """Whole UTC days, both ends included."""

    first: date
    last: date

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    def dates(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range(self.days)]


def parse_period(first: str | None, last: str | None, today: date, days_default: int) -> Period:
    """`from`/`to` as UTC dates, both included; by default the `days_default` days ending today."""
    try:
        last_day = date.fromisoformat(last) if last else today
        first_day = date.fromisoformat(first) if first else last_day - timedelta(days=days_default - 1)
    except (ValueError, TypeError):
        message = "from and to must be dates like 2026-12-01 (UTC days, both included)"
        raise QueryRefused(message, "invalid_period") from None
    if first_day > last_day:
        raise QueryRefused("from must not be after to", "invalid_period")
    period = Period(first_day, last_day)
    if period.days > PERIOD_DAYS_MAX:
        raise QueryRefused(f"a period spans at most {PERIOD_DAYS_MAX} days", "invalid_period")
    return period
