"""The request lifecycle, for any wire protocol, as DESIGN.md section 5 tells it:

    authenticate -> admit (rate limit, idempotency, hold) -> forward (with fallback) -> relay -> settle

Each step is a function below, in that order. Money moves only in `admit` and `settle`, each ONE
Lua call; everything between them is I/O that may fail in any way, and every way ends in exactly
one settlement.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from redis.exceptions import RedisError

from sidecar import scrub, wallet
from sidecar.auth import Caller, WorkspaceNotServed
from sidecar.config import TARGETS_MAX, ModelConfig, ProviderConfig, Target
from sidecar.db import POSTGRES_ERRORS
from sidecar.errors import ControlFlow
from sidecar.money import format_micro
from sidecar.observability import tracing
from sidecar.observability.logging import request_id_var
from sidecar.pricing import Usage, decimal_json
from sidecar.protocols import ALL as PROTOCOLS
from sidecar.protocols.anthropic_messages import LONG_CONTEXT_TOKENS
from sidecar.protocols.base import Protocol, RequestFacts, check_routing, parse_json, routing_prices
from sidecar.protocols.errors import SidecarError, payment_required
from sidecar.proxy import credentials, routing
from sidecar.proxy.call import Call, now_ms
from sidecar.proxy.outcome import Ending, failed
from sidecar.proxy.relay import (
    cancelled_outcome,
    first_byte,
    read_error_answer,
    relay_body,
    relay_stream,
    relay_upstream_error,
)
from sidecar.proxy.settlement import event, settle
from sidecar.services import Services
from sidecar.state.store import Admission, AdmitResult, ExpireStatus, GrowHold, KeyBudgetArgs

log = logging.getLogger("sidecar.proxy")

SERVICES = web.AppKey("services", Services)
LEDGER_BACKLOG_MAX = 1_000_000  # per workspace stream: past this, Postgres is too far behind to admit more
ADMIT_ATTEMPTS = 4  # need load -> need key-budget load -> admitted (one spare for a budget changed between)
# Before the first byte reached the client, these answers send the call to the next target.
FALLBACK_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})


def make_handler(protocol: Protocol):
    async def handle(request: web.Request) -> web.StreamResponse:
        return await serve(request, protocol)

    return handle


async def serve(request: web.Request, protocol: Protocol) -> web.StreamResponse:
    svc = request.app[SERVICES]
    call = Call(protocol=protocol, request_id=uuid.uuid4().hex, started_ms=now_ms())
    token = request_id_var.set(call.request_id)
    traced = tracing.begin_call(request.headers, protocol.route)
    status = 500
    try:
        response = await _lifecycle(request, svc, call)
        status = response.status
        return response
    except SidecarError as error:
        status = error.status
        return _error_response(call, error)
    except asyncpg.PostgresError:
        # Not an outage (those are answered 503 where they happen, see db.POSTGRES_OUTAGE): a SQL bug.
        # Logged, answered 500 in the client's protocol, never "retry shortly".
        log.exception("postgres refused a query of the request lifecycle")
        error = SidecarError("internal", "the sidecar failed to handle the call; nothing was charged")
        status = error.status
        return _error_response(call, error)
    finally:
        if call.buffered is not None:
            call.buffered.release()
        model = call.model.name if call.model else "unknown"
        svc.metrics.child(svc.metrics.requests, protocol.route, model, str(status)).inc()
        tracing.end_call(traced, status, model, call.caller.workspace_id if call.caller else None, call.request_id)
        request_id_var.reset(token)


async def _lifecycle(request: web.Request, svc: Services, call: Call) -> web.StreamResponse:
    if svc.draining:
        raise SidecarError("unavailable", "the sidecar is shutting down; retry on another replica")
    call.caller = await authenticate(svc, call.protocol.client_key(request.headers))
    body = await _read_body(request)
    call.request_bytes = len(body)
    payload = parse_json(body)
    facts = call.protocol.read_request(payload)
    call.protocol.check_headers(request.headers)
    call.model = _resolve_model(svc, facts.model)
    call.session_id = _header_value(request, "x-session-id", 128)
    call.idempotency_key = _header_value(request, "idempotency-key", 255)
    call.output_cap = (
        (facts.max_output_tokens or call.model.max_output_tokens_default) if call.protocol.has_output else 0
    )
    call.implied_web_searches = facts.implied_web_searches
    call.plan = _plan(svc, call, facts, body, call.protocol.long_context(request.headers))
    first = await _choose_first(svc, call)

    fingerprint = hashlib.sha256(body).hexdigest() if call.idempotency_key else ""
    try:
        with tracing.span("sidecar.admission"):
            admitted, first = await _admit_affordable(svc, call, fingerprint, first)
    except asyncio.CancelledError:  # the script may have run: release what it held
        await asyncio.shield(_void_lost_admission(svc, call))
        raise
    if admitted.outcome is Admission.DUPLICATE:
        return _replay(admitted, call)
    # Journalled until settled: should this process die and Redis lose the hold, the call is still recorded.
    svc.inflight.admitted(call.request_id, call.caller.workspace_id, call.expired_template)

    svc.metrics.holds_active.inc()
    outcome = None
    try:
        ending = await _forward(request, svc, call, payload, facts, first)
        outcome = ending.outcome
    except asyncio.CancelledError:  # a shutdown past its drain time: bill what was observed
        outcome = cancelled_outcome(call)
        raise
    except Exception:
        # A bug or an answer nothing foresaw: the call still ends in exactly one settlement.
        log.exception("unexpected error after admission")
        ending = failed(
            "internal error in the sidecar",
            SidecarError("internal", "the sidecar failed to complete the call; nothing was charged"),
        )
        outcome = ending.outcome
    finally:
        svc.metrics.holds_active.dec()
        # THE settlement of the call: every way the call ends passes here, once.
        with tracing.span("sidecar.settlement"):
            settled = await settle(svc, call, outcome)
    return await ending.reply(settled)


# --- before admission: who, what, and the worst case -----------------------------------------------


async def authenticate(svc: Services, raw_key: str | None) -> Caller:
    try:
        caller = await svc.auth.authenticate(raw_key)
    except POSTGRES_ERRORS:
        svc.metrics.child(svc.metrics.dependency_errors, "postgres").inc()
        raise SidecarError("unavailable", "the key store is unavailable; retry shortly") from None
    except WorkspaceNotServed:
        raise SidecarError(
            "authentication", "this API key's workspace is not served here", code="workspace_not_served"
        ) from None
    if caller is None:
        raise SidecarError("authentication", "invalid or revoked API key", code="invalid_api_key")
    return caller


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SERVICES].config.server.body_bytes_max
        raise SidecarError("too_large", f"request body exceeds the limit of {limit} bytes") from None


def _resolve_model(svc: Services, name: str) -> ModelConfig:
    model = svc.config.model(name)
    if model is None:
        raise SidecarError("not_found", f"the model {name!r} does not exist", code="model_not_found", param="model")
    return model


def _eligible_targets(svc: Services, call: Call) -> tuple[Target, ...]:  # before routing
    """The model's targets that speak this route's protocol family."""
    family = call.protocol.family
    speaking = [t for t in call.model.targets if svc.config.providers[t.provider].protocol == family]
    if not speaking:
        raise SidecarError(
            "invalid_request",
            f"the model {call.model.name!r} is not served on {call.protocol.route}",
            code="model_not_supported_on_route",
            param="model",
        )
    return tuple(speaking)


def _plan(svc: Services, call: Call, facts: RequestFacts, body: bytes, long_context: bool) -> routing.Plan:
    """The targets that may serve the call, in the model's routing order, each with the call's ceiling
    there: the worst case over every model that target may end up serving."""
    check_routing(facts, call.model.allow_routing_fields)
    window = max(call.model.context_window_tokens, LONG_CONTEXT_TOKENS if long_context else 0)
    max_input_tokens = window if facts.input_unbounded else min(len(body), window)
    max_output_tokens = call.output_cap * facts.choices
    call.ceiling_tokens = max_input_tokens + max_output_tokens
    pricing, at_ms = svc.config.pricing, call.started_ms
    # OpenRouter's `models` (when the model allows it) may serve the call instead: held at the dearest.
    extra = routing_prices(facts, pricing, at_ms)

    fee_ppm = svc.balances.policy.fee_ppm

    def ceiling_of(price) -> int:  # the worst case on credits: the dearest token cost, and its usage fee
        prices = [price, *extra]
        cost_micro = max(pricing.ceiling_micro(p, max_input_tokens, max_output_tokens, facts.reach) for p in prices)
        return cost_micro + wallet.fee_micro(cost_micro, fee_ppm)

    return routing.plan(
        call.model,
        _eligible_targets(svc, call),
        lambda target: pricing.price_of(target.price, at_ms),
        ceiling_of,
        facts.reach,
        long_context,
    )


async def _choose_first(svc: Services, call: Call) -> credentials.Credential:
    """The first target's credential decides the billing path: the customer's own key takes no hold."""
    call.targets = call.plan.targets
    call.credits_ceiling_micro = call.plan.ceiling_micro
    first = await credentials.choose(svc, call, svc.config.providers[call.targets[0].provider])
    call.hold_micro = 0 if first.stored else call.credits_ceiling_micro
    call.byok = first.stored is not None  # so the expired-row template says which key it was
    return first


def _header_value(request: web.Request, name: str, max_length: int) -> str | None:
    value = request.headers.get(name)
    if value is None:
        return None
    if not value or len(value) > max_length or not value.isprintable():
        raise SidecarError("invalid_request", f"header {name} must be 1 to {max_length} printable characters")
    return value


# --- admission --------------------------------------------------------------------------------------


async def _admit_affordable(
    svc: Services, call: Call, fingerprint: str, first: credentials.Credential
) -> tuple[AdmitResult, credentials.Credential]:
    """Admit the call; when the balance cannot cover its dearest target, skip the targets it cannot
    cover and admit at the worst case of the rest (402 only when no target fits). A refused admission
    leaves nothing behind (admit.lua checks before it writes), so trying again costs nothing."""
    for _ in range(TARGETS_MAX):
        try:
            return await _admit(svc, call, fingerprint), first
        except SidecarError as error:
            cheaper = routing.affordable(call.plan, call.available_micro) if error.status == 402 else None
            if cheaper is None:
                raise
        call.plan = cheaper
        first = await _choose_first(svc, call)
    raise AssertionError("unreachable: each retry drops at least one target")


async def _admit(svc: Services, call: Call, fingerprint: str) -> AdmitResult:
    caller, config = call.caller, svc.config
    meta = call.expired_template = orjson.dumps(event(call, "expired", Usage(), 0, estimated=False, error=None))
    for _ in range(ADMIT_ATTEMPTS):
        try:
            result = await svc.state.admit(
                ws=caller.workspace_id,
                key_id=caller.key_id,
                hold_id=call.request_id,
                ceiling_micro=call.hold_micro,
                rate_limit=caller.rate_limit_rpm,
                window_ms=config.auth.rate_window_ms,
                hold_ttl_ms=config.holds.ttl_ms,
                idempotency_key=call.idempotency_key,
                fingerprint=fingerprint,
                idempotency_ttl_ms=config.billing.idempotency_ttl_ms,
                meta=meta,
                unflushed_max=LEDGER_BACKLOG_MAX,
                ceiling_tokens=call.ceiling_tokens,
                token_limit=caller.tokens_per_minute or 0,
                route=call.protocol.route,
                key_budget=_key_budget(call),
            )
            if result.outcome is Admission.NEED_KEY_LOAD:
                await svc.balances.load_key_budget(
                    caller.workspace_id, caller.key_id, caller.budget_period, caller.budget_since_ms
                )
                continue
            if result.outcome is not Admission.NEED_LOAD:
                call.postpaid = result.postpaid
                return _check_admission(svc, call, result)
            await svc.balances.ensure_loaded(caller.workspace_id)
        except (RedisError, *POSTGRES_ERRORS) as exc:
            svc.metrics.child(
                svc.metrics.dependency_errors, "redis" if isinstance(exc, RedisError) else "postgres"
            ).inc()
            log.warning("admission unavailable", extra={"error": type(exc).__name__})
            await _void_lost_admission(svc, call)
            raise SidecarError("unavailable", "metering is unavailable; nothing was charged, retry shortly") from None
    raise SidecarError("unavailable", "could not load the workspace balance; retry shortly")


def _key_budget(call: Call) -> KeyBudgetArgs | None:
    """The key's budget, held at the call's credits ceiling even when it starts on the customer's own
    key: a fallback to the platform's key must fit it too, and nothing is spent if none happens."""
    caller = call.caller
    if caller.budget_micro is None:
        return None
    return KeyBudgetArgs(caller.budget_micro, caller.budget_period, call.credits_ceiling_micro)


async def _void_lost_admission(svc: Services, call: Call) -> None:
    """The admission script may have run though its reply was lost: release that hold now (best
    effort; otherwise the sweeper does at its deadline), so nothing stays held for a call never sent."""
    try:
        await svc.state.expire(call.caller.workspace_id, call.request_id, ExpireStatus.FAILED)
    except (RedisError, OSError):
        pass


def _check_admission(svc: Services, call: Call, result: AdmitResult) -> AdmitResult:
    limit = call.caller.rate_limit_rpm
    outcome, route = result.outcome, call.protocol.route
    token_limit = call.caller.tokens_per_minute
    if outcome is Admission.ADMITTED:
        call.rate_headers = _rate_headers(limit, result.remaining, result.reset_ms)
        if token_limit:
            call.rate_headers["X-RateLimit-Limit-Tokens"] = str(token_limit)
            call.rate_headers["X-RateLimit-Remaining-Tokens"] = str(max(result.tokens_remaining, 0))
        return result
    if outcome is Admission.RATE_LIMITED:
        svc.metrics.child(svc.metrics.rate_limited, route).inc()
        headers = _rate_headers(limit, 0, result.reset_ms)
        headers["Retry-After"] = str(-(-result.retry_after_ms // 1000))
        headers["retry-after-ms"] = str(result.retry_after_ms)
        what = f"{token_limit} tokens" if result.limited_by == "tokens" else f"{limit} requests"
        raise SidecarError(
            "rate_limited", f"rate limit of {what} per minute reached", code="rate_limit_exceeded", headers=headers
        )
    if outcome is Admission.OVER_TOKEN_LIMIT:
        raise SidecarError(
            "invalid_request",
            f"this request may use up to {call.ceiling_tokens} tokens, more than the key's limit of {token_limit} "
            "tokens per minute; lower its output cap or shorten it",
            code="tokens_per_minute_exceeded",
        )
    if outcome is Admission.INSUFFICIENT:
        call.available_micro = result.available_micro
        if routing.affordable(call.plan, result.available_micro) is None:  # else: retried on fewer targets
            svc.metrics.child(svc.metrics.payment_required, route).inc()
        error = payment_required()  # the workspace's balance (a key budget or an expiry says so)
        error.headers = {**_rate_headers(limit, result.remaining, result.reset_ms), "x-should-retry": "false"}
        raise error
    if outcome is Admission.OVER_KEY_BUDGET:
        svc.metrics.child(svc.metrics.payment_required, route).inc()
        svc.metrics.key_budget_refusals.inc()
        period = call.caller.budget_period
        error = payment_required(
            f"this API key's {period} budget of {format_micro(call.caller.budget_micro)} credits is spent: "
            f"{format_micro(result.available_micro)} left, this request may cost up to "
            f"{format_micro(call.credits_ceiling_micro)}"
        )
        error.headers = {"x-should-retry": "false"}
        raise error
    if outcome is Admission.EXPIRED:
        svc.metrics.child(svc.metrics.payment_required, route).inc()
        expired = datetime.fromtimestamp(result.expires_at_ms / 1000, UTC).isoformat()
        error = payment_required(f"the workspace's credits expired at {expired}; buy credits to continue")
        error.headers = {"x-should-retry": "false"}
        raise error
    if outcome is Admission.DUPLICATE:
        return result
    if outcome is Admission.IN_PROGRESS:
        raise SidecarError(
            "conflict", "a request with this Idempotency-Key is still in progress", code="idempotency_key_in_use"
        )
    if outcome is Admission.ALREADY_RESOLVED:
        raise SidecarError("conflict", "this request was already processed", code="request_already_processed")
    if outcome is Admission.IDEMPOTENCY_CONFLICT:
        raise SidecarError(
            "conflict", "this Idempotency-Key was used with a different request body", code="idempotency_key_reused"
        )
    if outcome is Admission.TOO_MANY_CONCURRENT:
        svc.metrics.child(svc.metrics.rate_limited, route).inc()
        raise SidecarError(
            "rate_limited",
            f"too many concurrent calls for this {result.limited_by}; retry when one of them ends",
            code="concurrency_limit_exceeded",
            headers={"Retry-After": "1"},
        )
    if outcome is Admission.CEILING_TOO_LARGE:
        raise SidecarError(
            "invalid_request",
            "this request's worst-case price is larger than any balance can hold; lower its output cap",
            code="ceiling_too_large",
        )
    assert outcome is Admission.BACKLOG, outcome
    raise SidecarError("unavailable", "the ledger is behind; retry shortly", code="ledger_backlog")


def _rate_headers(limit: int, remaining: int, reset_ms: int) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(max(remaining, 0)),
        "X-RateLimit-Reset": str(-(-reset_ms // 1000)),
    }


def _replay(result: AdmitResult, call: Call) -> web.Response:
    if not result.replayable:
        raise SidecarError(
            "conflict",
            "this Idempotency-Key already completed; its response was too large to replay",
            code="idempotency_key_used",
        )
    headers = {"x-request-id": call.request_id, "Idempotent-Replayed": "true"}
    return web.Response(
        status=result.replay_status,
        body=result.replay_body,
        content_type=result.replay_content_type or "application/json",
        headers=headers,
    )


# --- forward, with fallback between targets ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NextTarget:
    """This target did not take the call before any byte reached the client: try the next one."""

    reason: str


async def _forward(
    request: web.Request,
    svc: Services,
    call: Call,
    payload: dict,
    facts: RequestFacts,
    first: credentials.Credential,
) -> Ending:
    if call.idempotency_key:
        call.relayed = []
        call.relay_keep_max_bytes = svc.config.billing.idempotency_body_bytes_max
    svc.metrics.overhead.observe(time.perf_counter() - call.started_perf)
    for attempt, target in enumerate(call.targets, start=1):
        last = attempt == len(call.targets)
        call.target, call.attempts = target, attempt
        provider = svc.config.providers[target.provider]
        call.price = svc.config.pricing.price_of(target.price, call.started_ms)
        credential = first
        if attempt > 1:
            await _extend_hold(svc, call)
            credential = await _credential(svc, call, provider)
            if isinstance(credential, Ending):
                return credential
        body = call.protocol.rewrite_request(
            payload, facts, target.upstream_model, call.output_cap, provider.openrouter
        )
        step = await _attempt(svc, call, provider, body, request.headers, credential, last)
        if isinstance(step, NextTarget):
            call.fallback_reason = step.reason
            continue
        if isinstance(step, Ending):
            return step
        upstream, sent_at = step
        try:
            with tracing.span("sidecar.relay"):
                return await _relay(request, svc, call, facts, upstream)
        finally:
            upstream.release()
            elapsed_s = time.perf_counter() - sent_at
            svc.metrics.child(svc.metrics.upstream_latency, provider.name).observe(elapsed_s)
            svc.metrics.child(
                svc.metrics.genai_duration, call.protocol.operation, provider.name, target.upstream_model
            ).observe(elapsed_s)
    raise AssertionError("unreachable: the last target always returns an ending")


async def _credential(svc: Services, call: Call, provider: ProviderConfig) -> credentials.Credential | Ending:
    try:
        return await credentials.choose(svc, call, provider)
    except SidecarError as error:
        return failed(error.message, error)


def _next_or_fail(last: bool, reason: str, error: SidecarError) -> NextTarget | Ending:
    """Before any byte reached the client, a target that did not take the call hands it to the next
    one; the last target's failure ends the call, charged nothing."""
    return failed(reason, error) if last else NextTarget(reason)


async def _attempt(
    svc: Services,
    call: Call,
    provider: ProviderConfig,
    body: bytes,
    client_headers,
    credential: credentials.Credential,
    last: bool,
) -> tuple[aiohttp.ClientResponse, float] | NextTarget | Ending:
    """Send the call to one target: with the customer's key, then (if the provider refuses that key
    before any byte reached the client) with the platform's."""
    for _ in range(2):  # at most: the customer's key, then the platform's
        if credential.stored is None:
            ready = await _ready_for_platform_key(svc, call, provider, last)
            if ready is not None:
                return ready
        call.byok = credential.stored is not None
        call.scrubber = svc.upstreams.scrubber(provider.name, credential.key if call.byok else None)
        if call.byok:
            scrub.call_secrets.set((credential.key,))  # and from this call's log lines
        sent_at = time.perf_counter()
        try:
            with tracing.upstream_span(
                call.protocol.operation, provider.name, call.target.upstream_model, call.attempts
            ):
                upstream = await _open(svc, provider, call, body, client_headers, credential.key)
                if tracing.enabled():
                    tracing.annotate({"http.response.status_code": upstream.status, "sidecar.byok": call.byok})
        except _Unreachable as exc:
            svc.metrics.child(
                svc.metrics.upstream_attempts, provider.name, "timeout" if exc.timed_out else "unreachable"
            ).inc()
            error = SidecarError(
                "timeout" if exc.timed_out else "upstream",
                "the provider did not answer; nothing was charged",
                code="upstream_unavailable",
            )
            reason = f"{provider.name}: {exc.reason}" if not last else f"upstream unreachable: {exc.reason}"
            return _next_or_fail(last, reason, error)
        svc.metrics.child(svc.metrics.upstream_attempts, provider.name, str(upstream.status)).inc()
        svc.metrics.child(svc.metrics.upstream_ttfb, provider.name).observe(time.perf_counter() - sent_at)
        if credential.stored is not None and upstream.status in credentials.BYOK_REFUSAL_STATUSES:
            answer = await read_error_answer(upstream)
            reason = credentials.refusal(upstream.status, answer.body or b"")
            upstream.release()
            if reason is None:  # an answer about the call itself: the next target, or relay it as is
                if upstream.status in FALLBACK_STATUSES and not last:
                    return NextTarget(f"{provider.name}: answered {upstream.status}")
                return relay_upstream_error(call, answer)
            await _byok_refused(svc, call, provider, credential, reason)
            await _extend_hold(svc, call)
            credential = credentials.PLATFORM
            continue
        if credential.stored is not None:
            await svc.byok.mark_used(credential.stored)
        if upstream.status in FALLBACK_STATUSES and not last:
            upstream.release()
            return NextTarget(f"{provider.name}: answered {upstream.status}")
        return upstream, sent_at
    raise AssertionError("unreachable: the platform key is the last credential")


async def _byok_refused(
    svc: Services, call: Call, provider: ProviderConfig, credential: credentials.Credential, reason: str
) -> None:
    reason = call.scrubber.text(reason)  # the provider's words may quote the key it refused
    call.byok_fallback_reason = f"customer key …{credential.stored.last4} {reason}"
    svc.metrics.child(svc.metrics.byok_fallbacks, provider.name, reason.split(" (")[0][:60]).inc()
    log.warning(
        "customer key refused; falling back to the platform key",
        extra={
            "workspace_id": call.caller.workspace_id,
            "provider": provider.name,
            "error": reason,
        },
    )
    await svc.byok.mark_failing(credential.stored, reason, svc.config.byok.failure_cooldown_ms / 1000)


async def _ready_for_platform_key(
    svc: Services, call: Call, provider: ProviderConfig, last: bool
) -> NextTarget | Ending | None:
    """Before the platform's key is used: it must exist, and the call must hold its credits ceiling
    (a call that started on the customer's key held nothing). None: ready."""
    if not svc.upstreams.has_credentials(provider.name):
        error = SidecarError("unavailable", f"provider {provider.name!r} has no platform key configured")
        return _next_or_fail(last, f"{provider.name}: no platform key configured", error)
    if call.hold_micro >= call.credits_ceiling_micro or call.postpaid:  # post-charge: nothing is held
        return None
    ws = call.caller.workspace_id
    for _ in range(ADMIT_ATTEMPTS):
        try:
            grown = await svc.state.grow_hold(ws, call.request_id, call.credits_ceiling_micro)
        except RedisError:
            break
        if grown is GrowHold.RAISED:
            call.hold_micro = call.credits_ceiling_micro
            return None
        if grown is GrowHold.NEED_LOAD:
            await svc.balances.ensure_loaded(ws)
            continue
        if grown in (GrowHold.INSUFFICIENT, GrowHold.CEILING_TOO_LARGE):
            svc.metrics.child(svc.metrics.payment_required, call.protocol.route).inc()
            return failed("insufficient credits for the platform key", payment_required())
        break
    error = SidecarError("unavailable", "metering is unavailable; nothing was charged, retry shortly")
    return failed("the hold could not be raised for the platform key", error)


async def _extend_hold(svc: Services, call: Call) -> None:
    """Push the hold's deadline past the longest this call may still take (one more attempt and its
    relay), so the sweeper never voids a call that is still running. Best effort: on a Redis error
    the deadline set at admission stands."""
    timeouts = svc.config.upstream
    ttl_ms = (
        timeouts.first_byte_timeout_ms
        + timeouts.total_timeout_ms
        + timeouts.usage_wait_after_hangup_ms
        + svc.config.server.drain_timeout_ms
        + svc.config.holds.settle_budget_ms
    )
    try:
        await svc.state.extend_hold(call.caller.workspace_id, call.request_id, ttl_ms)
    except RedisError as exc:
        log.warning("could not extend a hold's deadline", extra={"error": type(exc).__name__})


async def _open(
    svc: Services, provider: ProviderConfig, call: Call, body: bytes, client_headers, key: str | None
) -> aiohttp.ClientResponse:
    headers = svc.upstreams.headers(provider, client_headers, key)
    tracing.inject(headers)  # the upstream attempt's traceparent (tracing on); the caller's is forwarded as is
    try:
        async with asyncio.timeout(svc.config.upstream.first_byte_timeout_ms / 1000):
            return await svc.upstreams.session(provider.name).post(
                provider.base_url + call.protocol.upstream_path,
                data=body,
                headers=headers,
                allow_redirects=False,  # a redirect would carry the key and the prompt elsewhere
            )
    except TimeoutError:
        if tracing.enabled():
            tracing.mark_error("timeout")
        raise _Unreachable("timeout", timed_out=True) from None
    except (aiohttp.ClientError, OSError) as exc:
        if tracing.enabled():
            tracing.mark_error(type(exc).__name__)
        raise _Unreachable(type(exc).__name__, timed_out=False) from None


class _Unreachable(ControlFlow):
    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.reason, self.timed_out = reason, timed_out


async def _relay(
    request: web.Request, svc: Services, call: Call, facts: RequestFacts, upstream: aiohttp.ClientResponse
) -> Ending:
    if upstream.status >= 300:  # an error, or a redirect that is never followed
        return relay_upstream_error(call, await read_error_answer(upstream))
    first_byte(call)
    if facts.stream:
        return await relay_stream(request, svc, call, facts, upstream)
    return await relay_body(svc, call, upstream)


def _error_response(call: Call, error: SidecarError) -> web.Response:
    headers = {**call.rate_headers, **error.headers, "x-request-id": call.request_id}
    return web.Response(
        status=error.status, body=call.protocol.error_body(error), content_type="application/json", headers=headers
    )


# --- the catalog -------------------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    anthropic = "x-api-key" in request.headers or "anthropic-version" in request.headers
    protocol = PROTOCOLS[-1] if anthropic else PROTOCOLS[0]
    call = Call(protocol=protocol, request_id=uuid.uuid4().hex, started_ms=now_ms())
    try:
        await authenticate(svc, protocol.client_key(request.headers))
    except SidecarError as error:
        return _error_response(call, error)
    data = []
    for model in svc.config.catalog():
        sell = svc.config.pricing.price_of(model.targets[0].price).sell
        data.append(
            {
                "id": model.name,
                "object": "model",
                "type": "model",
                "display_name": model.name,
                "created": 0,
                "created_at": "1970-01-01T00:00:00Z",
                "owned_by": model.provider,
                "aliases": list(model.aliases),
                "max_output_tokens_default": model.max_output_tokens_default,
                # Exact decimal strings: credits per 1M tokens; fees in credits per call; tiers by input size.
                "pricing": decimal_json(sell),
            }
        )
    body = {"object": "list", "data": data, "has_more": False}
    if data:
        body["first_id"], body["last_id"] = data[0]["id"], data[-1]["id"]
    return web.Response(
        body=orjson.dumps(body), content_type="application/json", headers={"x-request-id": call.request_id}
    )


def add_routes(app: web.Application) -> None:
    for protocol in PROTOCOLS:
        app.router.add_post(protocol.route, make_handler(protocol))
    app.router.add_get("/v1/models", list_models)


__all__ = ["SERVICES", "add_routes", "serve"]
