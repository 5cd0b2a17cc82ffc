"""Settlement: the call's ledger event and the one Lua call that resolves its hold.

Runs in a task of its own, so a handler cancelled by a disconnecting client cannot stop it half-way;
shutdown waits for these tasks.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import orjson
from redis.exceptions import RedisError

from sidecar.pricing import Usage
from sidecar.proxy.call import Call, now_ms
from sidecar.services import Services
from sidecar.state.store import IdempotencyRecord, SettleOutcome, SettleResult

log = logging.getLogger("sidecar.proxy")

SETTLE_ATTEMPTS = 5
_TOKEN_CLASSES = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
)


def event(call: Call, status: str, usage: Usage, upstream_cost_micro: int, estimated: bool, error: str | None) -> dict:
    caller = call.caller
    return {
        "event_id": str(uuid.UUID(call.request_id)),
        "status": status,
        "workspace_id": caller.workspace_id,
        "office_id": caller.office_id,
        "key_id": caller.key_id,
        "request_id": call.request_id,
        "idempotency_key": call.idempotency_key,
        "session_id": call.session_id,
        "protocol": call.protocol.name,
        "provider": call.provider,
        "model": call.model.name,
        "upstream_model": call.served_model
        or (call.target.upstream_model if call.target else call.model.upstream_model),
        "attempts": max(call.attempts, 1),
        "fallback_reason": call.fallback_reason,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_5m_tokens": usage.cache_write_5m_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "upstream_cost_micro": upstream_cost_micro,
        "hold_micro": call.hold_micro,
        "byok": call.byok,
        "byok_fallback_reason": call.byok_fallback_reason,
        "estimated": estimated,
        "error": error,
        "started_at": call.started_ms,
        "first_byte_at": call.first_byte_ms,
        "ended_at": now_ms(),
    }


async def settle(
    svc: Services,
    call: Call,
    status: str,
    usage: Usage | None,
    estimated: bool = False,
    error: str | None = None,
    response: tuple[int, str, bytes] | None = None,
) -> SettleResult | None:
    task = asyncio.ensure_future(_settle_now(svc, call, status, usage or Usage(), estimated, error, response))
    svc.settling.add(task)
    task.add_done_callback(svc.settling.discard)
    return await asyncio.shield(task)


async def _settle_now(
    svc: Services,
    call: Call,
    status: str,
    usage: Usage,
    estimated: bool,
    error: str | None,
    response: tuple[int, str, bytes] | None,
) -> SettleResult | None:
    config, pricing, caller = svc.config, svc.config.pricing, call.caller
    billable = status in ("completed", "cancelled") or (
        status == "failed" and config.billing.bill_observed_on_upstream_failure
    )
    price = _price(svc, call)
    cost_micro = pricing.cost_micro(price, usage) if billable else 0
    upstream_cost_micro = pricing.upstream_cost_micro(price, usage)
    body_event = orjson.dumps(event(call, status, usage, upstream_cost_micro, estimated, error))
    replay_status, content_type, body = response or (0, "", b"")
    if len(body) > config.billing.idempotency_max_body_bytes:
        replay_status, body = 0, b""  # remembered as done, too large to replay
    tokens_used = usage.total_input_tokens + usage.output_tokens
    result = await _settle_with_retries(
        svc, call, cost_micro, body_event, status, replay_status, content_type, body, tokens_used
    )
    if result is None:
        return None
    svc.flusher.note_workspace(caller.workspace_id)
    _observe(svc, call, status, usage, result)
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "call settled",
            extra={
                "workspace_id": caller.workspace_id,
                "key_id": caller.key_id,
                "model": call.model.name,
                "provider": call.provider,
                "status": status,
                "cost_micro": result.charged_micro,
                "duration_ms": now_ms() - call.started_ms,
            },
        )
    return result


def _price(svc: Services, call: Call):
    """The served target's price; on OpenRouter, the price of the model it says actually served
    (it falls back between models on its own) when the cost profile knows that model."""
    pricing = svc.config.pricing
    target = call.target or call.targets[0]
    if call.served_model and svc.config.providers[target.provider].openrouter:
        served = pricing.price_of(call.served_model)
        if served is not None:
            return served
    return call.price or pricing.price_of(target.price)


async def _settle_with_retries(
    svc: Services,
    call: Call,
    cost_micro: int,
    body_event: bytes,
    status: str,
    replay_status: int,
    content_type: str,
    body: bytes,
    tokens_used: int,
) -> SettleResult | None:
    caller = call.caller
    delay_s = 0.05
    # Bounded in attempts and in time: the hold's TTL is sized to outlive this budget.
    deadline = asyncio.get_running_loop().time() + svc.config.holds.settle_budget_ms / 1000
    for _ in range(SETTLE_ATTEMPTS):
        if asyncio.get_running_loop().time() >= deadline:
            break
        try:
            result = await svc.state.settle(
                ws=caller.workspace_id,
                key_id=caller.key_id,
                hold_id=call.request_id,
                cost_micro=cost_micro,
                billed=not call.byok,  # BYOK: priced and recorded, never charged
                event=body_event,
                idempotency_key=call.idempotency_key,
                # Only a completed call's answer is kept: after a failure or a hang-up the client has
                # no answer, so its retry must run.
                idempotency=IdempotencyRecord.REPLAY if status == "completed" else IdempotencyRecord.FORGET,
                status=replay_status,
                content_type=content_type,
                body=body,
                idempotency_ttl_ms=svc.config.billing.idempotency_ttl_ms,
                tokens_used=tokens_used,
                route=call.protocol.route,
            )
            if result.outcome is not SettleOutcome.NEED_LOAD:
                return result
            await svc.balances.ensure_loaded(caller.workspace_id)
        except (RedisError, OSError) as exc:
            svc.metrics.child(svc.metrics.dependency_errors, "redis").inc()
            log.warning("settle failed, retrying", extra={"error": type(exc).__name__})
            await asyncio.sleep(min(delay_s, max(deadline - asyncio.get_running_loop().time(), 0)))
            delay_s *= 4
    # The hold stays; the sweeper voids it at its deadline and records the call as expired.
    log.error("settlement failed; the hold will expire", extra={"status": status})
    return None


def _observe(svc: Services, call: Call, status: str, usage: Usage, result: SettleResult) -> None:
    svc.metrics.child(svc.metrics.settlements, status).inc()
    if not (result.resolved_now and result.charged_micro) or call.byok:
        return
    model = call.model.name
    svc.metrics.child(svc.metrics.debited, model).inc(result.charged_micro)
    for token_class in _TOKEN_CLASSES:
        tokens = getattr(usage, token_class)
        if tokens:
            svc.metrics.child(svc.metrics.tokens, model, token_class.removesuffix("_tokens")).inc(tokens)
