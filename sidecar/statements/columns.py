"""The columns of a history row and of a CSV statement, defined once for both. An amount appears twice:
as a decimal string of credits (`cost`) and as integer micro-credits (`cost_micro`); times are UTC.

The ledger's usage fee (`fee_micro`) comes with the wallet's migration: until the column exists the
fee reads 0 (`fee_expression` looks once per process)."""

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
)
TOKENS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "reasoning_tokens",
)
AMOUNTS = ("cost", "fee", "balance_impact", "balance_after")  # each from the ledger column <name>_micro
FLAGS = ("byok", "estimated")
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

_fee_expression: str | None = None


async def fee_expression(conn: asyncpg.Connection) -> str:
    """`fee_micro` once the ledger has the column, else `0::bigint`."""
    global _fee_expression
    if _fee_expression is None:
        present = await conn.fetchval(
            "SELECT true FROM pg_attribute WHERE attrelid = 'ledger'::regclass AND attname = 'fee_micro' "
            "AND NOT attisdropped"
        )
        _fee_expression = "fee_micro" if present else "0::bigint"
    return _fee_expression


def select_list(fee: str) -> str:
    """The ledger's columns a history row is made of (with the ordering key, as text)."""
    return ", ".join(
        (
            "insert_xid::text AS xid",
            "event_id",
            "created_at",
            *TEXT,
            *TOKENS,
            "cost_micro",
            f"{fee} AS fee_micro",
            "balance_impact_micro",
            "balance_after_micro",
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


def csv_select_list(fee: str) -> str:
    """The CSV's columns as Postgres writes them, named as CSV_HEADER says."""
    amounts = {"cost": "cost_micro", "fee": fee, "balance_impact": "balance_impact_micro"}
    amounts["balance_after"] = "balance_after_micro"
    parts = [
        "event_id",
        """to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS created_at""",
        *TEXT,
        *TOKENS,
    ]
    for name in AMOUNTS:
        parts += [f"{sql_credits(amounts[name])} AS {name}", f"{amounts[name]} AS {name}_micro"]
    parts += [f"CASE WHEN {flag} THEN 'true' ELSE 'false' END AS {flag}" for flag in FLAGS]
    parts += list(TRAILING_TEXT)
    return ", ".join(parts)
