"""Price versions (issue 16.5): every price a process may bill at, registered in Postgres, so a ledger
row's `price_version` names the prices that applied and a statement can show them.

A version id is a content hash of the price entry (pricing.price_version): registering is idempotent,
the same on every replica, and a row can never name a price other than the one it was billed at.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import asyncpg
import orjson

from sidecar.db import POSTGRES_ERRORS
from sidecar.pricing import CostProfile, ModelPrice

log = logging.getLogger("sidecar.prices")

REGISTER_RETRY_S = 5.0
REGISTER_ATTEMPTS_MAX = 10_000  # bounds the loop; the stop event ends it first in practice

_INSERT = (
    "INSERT INTO price_versions (version, price, source, effective_at, prices) "
    "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::jsonb[]) "
    "ON CONFLICT (version) DO NOTHING"
)


def every_price(pricing: CostProfile) -> list[ModelPrice]:
    """The prices in force now and every dated change, once each."""
    found = {p.version: p for p in pricing.models.values()}
    for dated in pricing.changes.values():
        found.update((p.version, p) for p in dated)
    return list(found.values())


def effective_at(price: ModelPrice) -> datetime | None:
    return datetime.fromtimestamp(price.effective_ms / 1000, UTC) if price.effective_ms else None


async def register(conn: asyncpg.Connection | asyncpg.Pool, pricing: CostProfile) -> int:
    """Record every price of the profile (idempotent). Returns how many were new."""
    prices = every_price(pricing)
    status = await conn.execute(
        _INSERT,
        [p.version for p in prices],
        [p.model for p in prices],
        [p.source for p in prices],
        [effective_at(p) for p in prices],
        [orjson.dumps({"sell": p.sell.as_json(), "upstream": p.upstream.as_json()}).decode() for p in prices],
    )
    return int(status.rsplit(" ", 1)[-1])


async def keep_registered(pool: asyncpg.Pool, pricing: CostProfile, stop: asyncio.Event) -> None:
    """Register at start; while Postgres cannot take it (down, or not migrated yet), retry. Rows written
    meanwhile keep their version id, which names the same prices once registered."""
    for _ in range(REGISTER_ATTEMPTS_MAX):
        try:
            added = await register(pool, pricing)
            log.info("price versions registered", extra={"added": added})
            return
        except (*POSTGRES_ERRORS, asyncpg.UndefinedTableError) as exc:
            log.warning("could not register price versions; retrying", extra={"error": type(exc).__name__})
        try:
            await asyncio.wait_for(stop.wait(), REGISTER_RETRY_S)
            return
        except TimeoutError:
            pass


async def at_version(conn: asyncpg.Connection | asyncpg.Pool, version: str) -> dict | None:
    """One registered price version, as a statement would show it, or None."""
    row = await conn.fetchrow(
        "SELECT version, price, source, effective_at, prices FROM price_versions WHERE version = $1", version
    )
    if row is None:
        return None
    return {**dict(row), "prices": orjson.loads(row["prices"])}
