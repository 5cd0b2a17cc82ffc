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


def idempotency(ws: str, key_id: str, idempotency_key: str) -> str:
    return f"{tag(ws)}:idem:{key_id}:{idempotency_key}"
