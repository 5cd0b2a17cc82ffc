"""Ledger movements: every way money enters or leaves a balance other than a call's usage.

Credits (`grant`, `topup`, `allowance`) and debits (`refund`, `expiry`) are each idempotent by a
movement id (the caller's: a grant id, an order id, `expiry:<instant>`) recorded in the `grants`
table, and each reaches the Redis balance exactly once and the ledger as exactly one row.

Credits: Postgres first, then Redis.
    The credit commits its `grants` row, its ledger row and the account (version v) in one
    transaction, with a `balance_sync` row saying Redis is owed +amount at v. Redis applies it once
    (apply.lua: skipped when the loaded balance is at v or later, or when the token was applied).
    A credit can never do harm early, so Postgres deciding alone is safe.

Debits: Redis decides, then Postgres records.
    A debit takes **at most what remains**: min(requested, max(balance - held, 0)), where balance and
    held are the live Redis figures. Only Redis knows them exactly: it holds the in-flight calls'
    holds and the usage settled but not yet flushed, which Postgres does not have. Deciding in
    Postgres could take credits already promised to a running call and drive `available` below zero
    through holds (DESIGN.md section 6). So:

    1. Postgres: the movement row is written (or found) first, with its ledger event id. A row
       whose result is known answers a replay at once; an event the ledger already has (flushed by
       the flusher after a crash of the caller) answers from that row.
    2. Redis, one script (debit.lua): unless this event id was debited already (the `movements`
       hash, never reset by a load), take min(requested, available), append the ledger event to the
       workspace's stream and remember the result. Atomic with every admission and settlement, so
       no hold can slip between the check and the debit. What could not be taken is `short`.
    3. Postgres, one transaction: the ledger row (deduplicated by event id), the account, the
       balance_sync record (exactly like a flushed batch, so a Redis reloaded meanwhile still gets
       it once) and the movement's result. If this step fails, the stream entry still reaches the
       ledger through the flusher, and a retry of the call answers from Redis or the ledger.

    The part not taken is recorded (`short_micro` on the ledger row and the movement), never debited
    later: credits a customer already spent are not clawed back into a negative balance.

    Expiry asks for everything that remains (no amount) and is run only once the workspace has no
    live hold (admission already refuses calls from the expiry instant, so holds drain within the
    hold TTL): it forfeits the whole balance, exactly once, by one `expiry` row.

    One narrow case is left to the existing stale-Redis defence: a Redis restored from an older
    snapshot between step 1's ledger check and step 2 can forget a debit whose row was flushed in
    that instant; the second stream entry then carries the same event id, the ledger drops it, and
    the flusher's run_id check (Balances.revalidate) reloads the balance from Postgres.

The identity (DESIGN.md section 6), checked by db.ledger_identity, `sidecar audit` and the tests:
    grants + topups + allowances - refunds - expiries - usage - fees == balance
in Postgres (the ledger alone) and in Redis (after a flush).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """A ledger row's kind."""

    USAGE = "usage"
    GRANT = "grant"
    TOPUP = "topup"
    ALLOWANCE = "allowance"
    REFUND = "refund"
    EXPIRY = "expiry"


CREDIT_KINDS = frozenset({Kind.GRANT, Kind.TOPUP, Kind.ALLOWANCE})
DEBIT_KINDS = frozenset({Kind.REFUND, Kind.EXPIRY})


@dataclass(frozen=True, slots=True)
class DebitResult:
    movement_id: str
    event_id: str
    kind: Kind
    requested_micro: int | None  # None: everything that remained (expiry)
    taken_micro: int  # what left the balance
    short_micro: int  # what was asked for and could not be taken (already spent or held)
    created: bool  # False: this movement id was debited before; nothing changed now
