"""The Redis key layout. Every key of a workspace carries the hash tag `{ws:<id>}`, so every script
touches one slot and runs unchanged on Redis Cluster."""

from __future__ import annotations

GROUP = "ledger-flusher"  # the consumer group that drains every ledger stream


def tag(workspace_id: str) -> str:
    return f"{{ws:{workspace_id}}}"


def acct(ws: str) -> str:
    return f"{tag(ws)}:acct"


def holds(ws: str) -> str:
    return f"{tag(ws)}:holds"


def hold_deadlines(ws: str) -> str:
    return f"{tag(ws)}:hold_dl"


def hold_meta(ws: str) -> str:
    return f"{tag(ws)}:hold_meta"


def settled(ws: str) -> str:
    return f"{tag(ws)}:settled"


def applied(ws: str) -> str:
    return f"{tag(ws)}:applied"


def stream(ws: str) -> str:
    return f"{tag(ws)}:ledger"


def dead_letters(ws: str) -> str:
    return f"{tag(ws)}:ledger_dead"


def rate(ws: str, key_id: str) -> str:
    return f"{tag(ws)}:rl:{key_id}"


def tokens(ws: str, key_id: str) -> str:
    return f"{tag(ws)}:tpm:{key_id}"


def idempotency(ws: str, key_id: str, route: str, idempotency_key: str) -> str:
    """Scoped by route: the same key sent to another route is another request (the client's key is last,
    since it may hold any printable character; key ids and routes hold no colon)."""
    return f"{tag(ws)}:idem:{key_id}:{route}:{idempotency_key}"


def hold_keys(ws: str) -> str:
    """Hash: live hold id -> the API key id that holds it (what the per-key concurrency count follows)."""
    return f"{tag(ws)}:hold_key"


def hold_idempotency(ws: str) -> str:
    """Hash: live hold id -> the Redis key of its idempotency record (when the call sent one)."""
    return f"{tag(ws)}:hold_idem"


def expired_holds(ws: str) -> str:
    """Zset: hold ids the sweeper voided -> when (ms), kept as long as `settled`: a late settlement
    (replayed from a spool) learns its call was recorded expired, not settled by an earlier try."""
    return f"{tag(ws)}:expired"


def movements(ws: str) -> str:
    """Hash: ledger event id of a debit movement -> its result (debit.lua). Never reset by a load: a
    replayed refund must find it whatever Redis reloaded since."""
    return f"{tag(ws)}:movements"


def key_budgets(ws: str) -> str:
    """Hash: '<key id>:p|t|s|h' -> the key budget's period id, period kind, spent and held (admit.lua)."""
    return f"{tag(ws)}:kbudget"


def hold_key_budget(ws: str) -> str:
    """Hash: live hold id -> what it holds against its key's budget."""
    return f"{tag(ws)}:hold_kb"


def live_per_key(ws: str) -> str:
    """Hash: API key id -> number of its live holds (concurrent calls)."""
    return f"{tag(ws)}:live_keys"


def idempotency_bytes(ws: str) -> str:
    """Hash: time bucket start (ms) -> replay bytes stored in that bucket, for the per-workspace bound."""
    return f"{tag(ws)}:idem_bytes"


IDEMPOTENCY_BYTES_TOTAL = "{sidecar}:idem_bytes"  # the same, over every workspace (its own slot)
