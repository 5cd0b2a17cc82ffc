"""Payment orders in Postgres: a thin typed layer (the schema is migrations/008_payment_orders.sql).

The database enforces what must hold whoever writes: an order starts `created`, moves forward only
(created -> pending -> paid -> credited; created|pending -> expired|failed|canceled; paid|credited ->
refunded), keeps its amounts and tax snapshot, and every status it takes is an append-only event.
This module only says what it wants; a refused change raises asyncpg's error, never silently passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg
import orjson

from sidecar.billing.tax import Profile, Quote
from sidecar.errors import DomainError


class OrderStatus(StrEnum):
    CREATED = "created"
    PENDING = "pending"
    PAID = "paid"
    CREDITED = "credited"
    EXPIRED = "expired"
    FAILED = "failed"
    CANCELED = "canceled"
    REFUNDED = "refunded"


OPEN = frozenset({OrderStatus.CREATED, OrderStatus.PENDING})  # not paid yet: may still be paid or close
CLOSED_UNPAID = frozenset({OrderStatus.EXPIRED, OrderStatus.FAILED, OrderStatus.CANCELED})
PAID_OR_AFTER = frozenset({OrderStatus.PAID, OrderStatus.CREDITED, OrderStatus.REFUNDED})


class Provider(StrEnum):
    STRIPE = "stripe"
    MANUAL = "manual"


class Purpose(StrEnum):
    CHECKOUT = "checkout"  # a customer pays on Stripe's Checkout page
    RELOAD = "reload"  # an off-session PaymentIntent on a saved payment method (auto-reload)
    MANUAL = "manual"  # paid outside the sidecar; an operator marks it paid with a reference


class EventOutcome(StrEnum):
    """What a verified provider event did (payment_events.outcome)."""

    APPLIED = "applied"
    IGNORED = "ignored"
    REVIEW = "review"
    DEFERRED = "deferred"


class OrderConflict(DomainError):
    """A client order id reused with other figures (amount, provider, purpose) -> admin 409 order_conflict."""


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    workspace_id: str
    client_order_id: str
    provider: Provider
    purpose: Purpose
    status: OrderStatus
    amount_micro: int
    fee_micro: int
    tax_micro: int
    total_micro: int
    currency: str
    total_minor: int
    tax_snapshot: dict
    customer_ref: str | None
    payment_method_ref: str | None
    provider_session_id: str | None
    provider_payment_id: str | None
    checkout_url: str | None
    payment_reference: str | None
    refunded_micro: int | None
    refund_spent_micro: int | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class OrderEvent:
    from_status: str | None
    to_status: str
    detail: dict
    created_at: datetime


_COLUMNS = (
    "id, workspace_id, client_order_id, provider, purpose, status, amount_micro, fee_micro, tax_micro, "
    "total_micro, currency, total_minor, tax_snapshot, customer_ref, payment_method_ref, provider_session_id, "
    "provider_payment_id, checkout_url, payment_reference, refunded_micro, refund_spent_micro, created_at, updated_at"
)


def _order(row: asyncpg.Record | None) -> Order | None:
    if row is None:
        return None
    values = dict(row)
    values["provider"] = Provider(values["provider"])
    values["purpose"] = Purpose(values["purpose"])
    values["status"] = OrderStatus(values["status"])
    values["tax_snapshot"] = orjson.loads(values["tax_snapshot"])
    return Order(**values)


@dataclass(frozen=True, slots=True)
class NewOrder:
    id: str
    workspace_id: str
    client_order_id: str
    provider: Provider
    purpose: Purpose
    quote: Quote
    tax_snapshot: dict
    customer_ref: str | None = None
    payment_method_ref: str | None = None


async def insert_order(conn: asyncpg.Connection, new: NewOrder) -> tuple[Order, bool]:
    """The order, and whether this call created it. The same client order id again returns the first
    order if its figures match (a retry), else OrderConflict."""
    q = new.quote
    row = await conn.fetchrow(
        "INSERT INTO payment_orders (id, workspace_id, client_order_id, provider, purpose, status, amount_micro, "
        "fee_micro, tax_micro, total_micro, currency, total_minor, tax_snapshot, customer_ref, payment_method_ref, "
        "transition_detail) VALUES ($1, $2, $3, $4, $5, 'created', $6, $7, $8, $9, $10, $11, $12::jsonb, $13, $14, "
        "$15::jsonb) ON CONFLICT (workspace_id, client_order_id) DO NOTHING RETURNING " + _COLUMNS,
        new.id,
        new.workspace_id,
        new.client_order_id,
        new.provider.value,
        new.purpose.value,
        q.amount_micro,
        q.fee_micro,
        q.tax_micro,
        q.total_micro,
        q.currency,
        q.total_minor,
        orjson.dumps(new.tax_snapshot).decode(),
        new.customer_ref,
        new.payment_method_ref,
        orjson.dumps({"by": "api"}).decode(),
    )
    if row is not None:
        return _order(row), True
    prior = await order_by_client_id(conn, new.workspace_id, new.client_order_id)
    assert prior is not None  # the conflict was on this key, and orders are never deleted
    if (prior.amount_micro, prior.provider, prior.purpose) != (q.amount_micro, new.provider, new.purpose):
        raise OrderConflict(new.client_order_id)
    return prior, False


async def order_by_client_id(conn: asyncpg.Connection, ws: str, client_order_id: str) -> Order | None:
    return _order(
        await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM payment_orders WHERE workspace_id = $1 AND client_order_id = $2",
            ws,
            client_order_id,
        )
    )


async def order_by_id(conn: asyncpg.Connection, order_id: str, lock: bool = False) -> Order | None:
    """lock=True: FOR UPDATE, so concurrent deliveries of one payment take their turn on the order."""
    query = f"SELECT {_COLUMNS} FROM payment_orders WHERE id = $1" + (" FOR UPDATE" if lock else "")
    return _order(await conn.fetchrow(query, order_id))


async def order_by_payment(conn: asyncpg.Connection, payment_id: str, lock: bool = False) -> Order | None:
    query = f"SELECT {_COLUMNS} FROM payment_orders WHERE provider_payment_id = $1" + (" FOR UPDATE" if lock else "")
    return _order(await conn.fetchrow(query, payment_id))


async def list_orders(
    conn: asyncpg.Connection, ws: str, status: OrderStatus | None, limit: int, after: tuple[datetime, str] | None
) -> list[Order]:
    """Oldest first, keyset-paginated by (created_at, id)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM payment_orders WHERE workspace_id = $1 AND ($2::text IS NULL OR status = $2) "
        "AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4)) ORDER BY created_at, id LIMIT $5",
        ws,
        status.value if status else None,
        after[0] if after else None,
        after[1] if after else "",
        limit,
    )
    return [_order(r) for r in rows]


async def order_events(conn: asyncpg.Connection, order_id: str) -> list[OrderEvent]:
    rows = await conn.fetch(
        "SELECT from_status, to_status, detail, created_at FROM payment_order_events WHERE order_id = $1 ORDER BY id",
        order_id,
    )
    return [OrderEvent(r["from_status"], r["to_status"], orjson.loads(r["detail"]), r["created_at"]) for r in rows]


_SETTABLE = frozenset(
    {
        "provider_session_id",
        "provider_payment_id",
        "checkout_url",
        "payment_reference",
        "refunded_micro",
        "refund_spent_micro",
        "customer_ref",
        "payment_method_ref",
    }
)


async def transition(
    conn: asyncpg.Connection, order_id: str, to_status: OrderStatus, detail: dict, **fields: object
) -> Order:
    """Move the order to `to_status` (the trigger refuses a backward move and writes the event, with
    `detail`), setting the provider's fields given. A same-status call only sets the fields."""
    unknown = set(fields) - _SETTABLE
    if unknown:
        raise ValueError(f"not settable on an order: {sorted(unknown)}")
    names = sorted(fields)
    sets = "".join(f", {name} = coalesce(${i + 4}, {name})" for i, name in enumerate(names))
    row = await conn.fetchrow(
        f"UPDATE payment_orders SET status = $2, transition_detail = $3::jsonb{sets} "
        f"WHERE id = $1 RETURNING {_COLUMNS}",
        order_id,
        to_status.value,
        orjson.dumps(detail).decode(),
        *(fields[n] for n in names),
    )
    if row is None:
        raise LookupError(order_id)
    return _order(row)


async def record_event(
    conn: asyncpg.Connection,
    provider: Provider,
    event_id: str,
    event_type: str,
    order_id: str | None,
    outcome: EventOutcome,
    reason: str | None,
) -> None:
    """Keep a verified provider event (each id once, its deliveries counted). An event once applied or
    kept for review stays so; a deferred or ignored one takes the outcome of its latest delivery."""
    await conn.execute(
        "INSERT INTO payment_events AS e (provider, event_id, type, order_id, outcome, reason) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (provider, event_id) DO UPDATE SET "
        "deliveries = e.deliveries + 1, last_seen_at = now(), order_id = coalesce(e.order_id, EXCLUDED.order_id), "
        "outcome = CASE WHEN e.outcome IN ('applied', 'review') THEN e.outcome ELSE EXCLUDED.outcome END, "
        "reason = CASE WHEN e.outcome IN ('applied', 'review') THEN e.reason ELSE EXCLUDED.reason END",
        provider.value,
        event_id,
        event_type,
        order_id,
        outcome.value,
        reason,
    )


async def reviews(conn: asyncpg.Connection, order_id: str) -> list[dict]:
    rows = await conn.fetch(
        "SELECT event_id, type, reason, first_seen_at FROM payment_events WHERE order_id = $1 AND outcome = 'review' "
        "ORDER BY first_seen_at",
        order_id,
    )
    return [
        {"event_id": r["event_id"], "type": r["type"], "reason": r["reason"], "at": r["first_seen_at"].isoformat()}
        for r in rows
    ]


async def payment_event(conn: asyncpg.Connection, provider: Provider, event_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM payment_events WHERE provider = $1 AND event_id = $2", provider.value, event_id
    )


async def saved_payment_method(conn: asyncpg.Connection, ws: str) -> tuple[str, str] | None:
    """(customer_ref, payment_method_ref) of the workspace's latest paid Stripe order that saved one
    (a checkout saves its card for off-session use): what an auto-reload charges."""
    row = await conn.fetchrow(
        "SELECT customer_ref, payment_method_ref FROM payment_orders WHERE workspace_id = $1 AND provider = 'stripe' "
        "AND status IN ('paid', 'credited') AND customer_ref IS NOT NULL AND payment_method_ref IS NOT NULL "
        "ORDER BY updated_at DESC, id DESC LIMIT 1",
        ws,
    )
    return (row["customer_ref"], row["payment_method_ref"]) if row else None


# --- billing profiles -------------------------------------------------------------------------------


async def profile(conn: asyncpg.Connection, ws: str) -> Profile | None:
    row = await conn.fetchrow(
        "SELECT legal_name, address, country, tax_id, email FROM billing_profiles WHERE workspace_id = $1", ws
    )
    return Profile(**dict(row)) if row else None


async def put_profile(conn: asyncpg.Connection, ws: str, p: Profile) -> None:
    """Orders already created keep the copy in their tax snapshot: only new orders see the change."""
    await conn.execute(
        "INSERT INTO billing_profiles (workspace_id, legal_name, address, country, tax_id, email) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (workspace_id) DO UPDATE SET legal_name = EXCLUDED.legal_name, "
        "address = EXCLUDED.address, country = EXCLUDED.country, tax_id = EXCLUDED.tax_id, email = EXCLUDED.email, "
        "updated_at = now()",
        ws,
        p.legal_name,
        p.address,
        p.country,
        p.tax_id,
        p.email,
    )
