"""The columns of a history row and of a CSV statement, defined once for both. An amount appears twice:
as a decimal string of credits (`cost`) and as integer micro-credits (`cost_micro`); times are UTC.

Each row names the price version it was billed at (`price_version`: the price_versions table holds
its prices) and why its target was chosen (`route_reason`), so a statement shows the price that applied."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from sidecar.money import format_micro

TEXT = (
    "kind",
    "status",
    "workspace_id",
    "office_id",
    "key_id",
    "request_id",
    "session_id",
    "provider",
    "model",
    "upstream_model",
    "protocol",
    "price_version",
    "route_reason",
)
TOKENS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
    "input_audio_tokens",
    "input_image_tokens",
    "output_audio_tokens",
    "output_image_tokens",
    "web_searches",  # per-call fees are counted like tokens
    "file_searches",
)
# Each from the ledger column <name>_micro. fee_waived: the part of the fee the waiver took; short: the
# part of a debit (refund, expiry) that could not be taken.
AMOUNTS = ("cost", "fee", "fee_waived", "balance_impact", "balance_after", "short")
FLAGS = ("byok", "estimated", "postpaid")
TRAILING_TEXT = ("error",)

# The CSV header, in order: every column named.
CSV_HEADER = (
    "event_id",
    "created_at",
    *TEXT,
    *TOKENS,
    *(f"{name}{suffix}" for name in AMOUNTS for suffix in ("", "_micro")),
    *FLAGS,
    *TRAILING_TEXT,
)


def select_list() -> str:
    """The ledger's columns a history row is made of (with the ordering key, as text)."""
    return ", ".join(
        (
            "insert_xid::text AS xid",
            "event_id",
            "created_at",
            *TEXT,
            *TOKENS,
            *(f"{name}_micro" for name in AMOUNTS),
            *FLAGS,
            *TRAILING_TEXT,
        )
    )


def utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def json_row(row: asyncpg.Record) -> dict:
    out: dict = {"event_id": str(row["event_id"]), "created_at": utc_text(row["created_at"])}
    out.update((name, row[name]) for name in TEXT)
    out.update((name, row[name]) for name in TOKENS)
    for name in AMOUNTS:
        micro = row[f"{name}_micro"]
        out[name] = None if micro is None else format_micro(micro)
        out[f"{name}_micro"] = micro
    out.update((name, row[name]) for name in (*FLAGS, *TRAILING_TEXT))
    return out


def sql_credits(column: str) -> str:
    """Postgres text of an amount in credits, exactly as money.format_micro writes it: a bigint times a
    numeric of scale 6 is exact and keeps 6 decimals (0 -> 0.000000, -1 -> -0.000001)."""
    return f"({column} * 0.{'0' * 5}1)::text"


def csv_select_list() -> str:
    """The CSV's columns as Postgres writes them, named as CSV_HEADER says."""
    parts = [
        "event_id",
        """to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_at""",
        *TEXT,
        *TOKENS,
    ]
    for name in AMOUNTS:
        parts += [f"{sql_credits(f'{name}_micro')} AS {name}", f"{name}_micro"]
    parts += [f"CASE WHEN {flag} THEN 'true' ELSE 'false' END AS {flag}" for flag in FLAGS]
    parts += list(TRAILING_TEXT)
    return ", ".join(parts)
