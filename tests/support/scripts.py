"""Direct calls of the Redis scripts for tests, with the arguments a test does not care about filled in."""

from __future__ import annotations

import secrets

from sidecar.state.store import AdmitResult, IdempotencyRecord, SettleResult, State


async def admit(
    state: State,
    ws: str,
    ceiling: int = 0,
    limit: int = 1000,
    hold_id: str | None = None,
    idem: str | None = None,
    fingerprint: str = "fp",
    window_ms: int = 60_000,
    key_id: str = "k1",
    hold_ttl_ms: int = 60_000,
    meta: bytes = b"{}",
    ceiling_tokens: int = 0,
    token_limit: int = 0,
    route: str = "/v1/chat/completions",
    idempotency_ttl_ms: int = 60_000,
) -> AdmitResult:
    return await state.admit(
        ws=ws,
        key_id=key_id,
        hold_id=hold_id or secrets.token_hex(16),
        ceiling_micro=ceiling,
        rate_limit=limit,
        window_ms=window_ms,
        hold_ttl_ms=hold_ttl_ms,
        idempotency_key=idem,
        fingerprint=fingerprint,
        idempotency_ttl_ms=idempotency_ttl_ms,
        meta=meta,
        unflushed_max=1000,
        ceiling_tokens=ceiling_tokens,
        token_limit=token_limit,
        route=route,
    )


async def settle(
    state: State,
    ws: str,
    hold_id: str,
    cost: int,
    key_id: str = "k1",
    tokens_used: int = 0,
    idem: str | None = None,
    idempotency: IdempotencyRecord = IdempotencyRecord.REPLAY,
    body: bytes = b"",
    route: str = "/v1/chat/completions",
    billed: bool = True,
) -> SettleResult:
    return await state.settle(
        ws=ws,
        key_id=key_id,
        hold_id=hold_id,
        cost_micro=cost,
        billed=billed,
        event=b'{"x":1}',
        idempotency_key=idem,
        idempotency=idempotency,
        status=200,
        content_type="application/json",
        body=body,
        idempotency_ttl_ms=60_000,
        tokens_used=tokens_used,
        route=route,
    )
