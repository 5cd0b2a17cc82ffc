"""The ledger event: what the request handler records at admission and settlement, and how a
Redis stream entry becomes a Postgres row.

The handler builds the descriptive part (who, what, tokens, timings) as JSON; the settle script
adds the money part (cost, balance impact, balance after) and the time, atomically with the debit.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson

from sidecar.errors import DomainError
from sidecar.movements import DEBIT_KINDS, Kind

COLUMNS = (
    "event_id",
    "created_at",
    "kind",
    "status",
    "workspace_id",
    "office_id",
    "key_id",
    "request_id",
    "idempotency_key",
    "session_id",
    "provider",
    "model",
    "upstream_model",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "cost_micro",
    "upstream_cost_micro",
    "hold_micro",
    "balance_impact_micro",
    "balance_after_micro",
    "byok",
    "estimated",
    "hold_lost",
    "error",
    "started_at",
    "first_byte_at",
    "ended_at",
    "attempts",
    "fallback_reason",
    "protocol",
    "byok_fallback_reason",
    # 006: the price version billed at, why the target was chosen, the classes beyond text tokens
    "price_version",
    "route_reason",
    "input_audio_tokens",
    "input_image_tokens",
    "output_audio_tokens",
    "output_image_tokens",
    "web_searches",
    "file_searches",
    # 007: a debit's untaken part, the usage fee and its waived part, post-charge rows
    "short_micro",
    "fee_micro",
    "fee_waived_micro",
    "postpaid",
)

STATUSES = ("completed", "failed", "cancelled", "expired")
_TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
)
# Counted like tokens: zero on an expired row (nothing observed).
_EXTRA_COUNT_FIELDS = (
    "input_audio_tokens",
    "input_image_tokens",
    "output_audio_tokens",
    "output_image_tokens",
    "web_searches",
    "file_searches",
)
_TEXT_FIELDS = (
    "office_id",
    "key_id",
    "request_id",
    "idempotency_key",
    "session_id",
    "provider",
    "model",
    "upstream_model",
    "error",
)


class InvalidEvent(DomainError, ValueError):
    """A stream entry that cannot become a ledger row. An explicit check, not an `assert`: python -O
    removes asserts, and a bad event must be dead-lettered whatever the interpreter's flags."""


def _text(value: object) -> str | None:
    # Postgres text cannot hold NUL, and a provider's error message may carry one.
    return None if value is None else str(value).replace("\x00", "")[:2000]


def _time(ms: object) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if isinstance(ms, int) else None


def row_from_entry(fields: dict[bytes, bytes]) -> tuple:
    """A stream entry (as written by settle.lua, expire.lua or debit.lua) -> a ledger row in COLUMNS order."""
    event = orjson.loads(fields[b"e"])
    if not isinstance(event, dict):
        raise InvalidEvent(f"the event is a JSON {type(event).__name__}, not an object")
    status = fields.get(b"status", b"").decode() or event.get("status")
    if status not in STATUSES:
        raise InvalidEvent(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
    for name in ("event_id", "workspace_id"):
        if not isinstance(event.get(name), str) or not event[name]:
            raise InvalidEvent(f"{name} is missing or not a string")
    kind = fields.get(b"kind", b"usage").decode()
    if kind != Kind.USAGE and kind not in DEBIT_KINDS:  # credits are written by Postgres, never streamed
        raise InvalidEvent(f"unknown kind {kind!r} in a ledger stream")
    after = fields.get(b"after", b"")
    text = {name: _text(event.get(name)) for name in _TEXT_FIELDS}
    tokens = {name: int(event.get(name, 0)) for name in _TOKEN_FIELDS}
    extra = {name: int(event.get(name, 0)) for name in _EXTRA_COUNT_FIELDS}
    if status == "expired":  # the call never settled: nothing observed, nothing charged
        tokens = dict.fromkeys(_TOKEN_FIELDS, 0)
        extra = dict.fromkeys(_EXTRA_COUNT_FIELDS, 0)
        text["error"] = "sidecar stopped before the call settled; hold voided at its deadline"
    return (
        uuid.UUID(event["event_id"]),
        _time(int(fields[b"at"])),
        kind,
        status,
        event["workspace_id"],
        text["office_id"],
        text["key_id"],
        text["request_id"],
        text["idempotency_key"],
        text["session_id"],
        text["provider"],
        text["model"],
        text["upstream_model"],
        *tokens.values(),
        int(fields[b"cost"]),
        int(event.get("upstream_cost_micro", 0)) if status != "expired" else 0,
        int(event.get("hold_micro", 0)),
        int(fields[b"impact"]),
        int(after) if after else None,
        bool(event.get("byok", False)),
        bool(event.get("estimated", False)) and status != "expired",
        fields.get(b"lost", b"0") == b"1",
        text["error"],
        _time(event.get("started_at")),
        _time(event.get("first_byte_at")) if status != "expired" else None,
        _time(event.get("ended_at")),
        max(int(event.get("attempts", 1)), 1),
        _text(event.get("fallback_reason")),
        _text(event.get("protocol")),
        _text(event.get("byok_fallback_reason")),
        _text(event.get("price_version")),
        _text(event.get("route_reason")),
        *extra.values(),
        int(fields.get(b"short", b"0")),
        int(fields.get(b"fee", b"0")),
        int(fields.get(b"waived", b"0")),
        fields.get(b"postpaid", b"0") == b"1",
    )


def generation(fields: dict[bytes, bytes]) -> str:
    return fields.get(b"gen", b"").decode()
