"""The request lifecycle for OpenAI Chat Completions, as DESIGN.md section 5 tells it:

    authenticate -> admit (rate limit, idempotency, hold) -> forward -> relay -> settle

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
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import orjson
from aiohttp import web
from redis.exceptions import RedisError

from sidecar.auth import Caller, bearer_token
from sidecar.config import ModelConfig
from sidecar.money import format_micro
from sidecar.observability.logging import request_id_var
from sidecar.pricing import ModelPrice, Usage
from sidecar.protocols import openai_chat as chat
from sidecar.protocols.errors import SidecarError, payment_required
from sidecar.services import Services
from sidecar.sse import SSEError, SSEFramer
from sidecar.state.store import Admission, AdmitResult, NeedLoad, SettleResult

log = logging.getLogger("sidecar.proxy")

SERVICES = web.AppKey("services", Services)
# A Postgres that is down, starting, stopping or cut off mid-query.
POSTGRES_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
ROUTE_CHAT = "/v1/chat/completions"
MAX_UPSTREAM_BODY_BYTES = 64 * 1024 * 1024
MAX_UPSTREAM_ERROR_BYTES = 64 * 1024
MAX_LEDGER_BACKLOG = 1_000_000  # per workspace stream: past this, Postgres is too far behind to admit more
ADMIT_ATTEMPTS = 3
SETTLE_ATTEMPTS = 5


@dataclass(slots=True)
class Call:
    """Everything one call learns on its way through the sidecar."""

    request_id: str
    started_ms: int
    started_perf: float = field(default_factory=time.perf_counter)
    caller: Caller | None = None
    model: ModelConfig | None = None
    price: ModelPrice | None = None
    hold_micro: int = 0
    request_bytes: int = 0
    idempotency_key: str | None = None
    session_id: str | None = None
    first_byte_ms: int | None = None
    relayed: list[bytes] | None = None  # kept only when an idempotency key asks for a replayable outcome
    relayed_bytes: int = 0
    relay_keep_max_bytes: int = 0
    rate_headers: dict[str, str] = field(default_factory=dict)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the handler: the lifecycle, step by step ------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    call = Call(request_id=uuid.uuid4().hex, started_ms=_now_ms())
    token = request_id_var.set(call.request_id)
    status = 500
    try:
        response = await _serve(request, svc, call)
        status = response.status
        return response
    except SidecarError as error:
        status = error.status
        return _error_response(error, call)
    finally:
        model = call.model.name if call.model else "unknown"
        svc.metrics.requests.labels(ROUTE_CHAT, model, str(status)).inc()
        request_id_var.reset(token)


async def _serve(request: web.Request, svc: Services, call: Call) -> web.StreamResponse:
    if svc.draining:
        raise SidecarError("unavailable", "the sidecar is shutting down; retry on another replica")
    call.caller = await _authenticate(request, svc)
    body = await _read_body(request)
    call.request_bytes = len(body)
    payload = chat.parse_json(body)
    parsed = chat.read_request(payload)
    call.model = _resolve_model(svc, parsed.model)
    call.price = svc.config.pricing.price_of(call.model.name)
    if not svc.upstreams.has_credentials(call.model.provider):
        raise SidecarError("unavailable", f"provider {call.model.provider!r} has no platform key configured")
    call.session_id = _header_value(request, "x-session-id", 128)
    call.idempotency_key = _header_value(request, "idempotency-key", 255)

    output_cap = parsed.max_output_tokens or call.model.default_max_output_tokens
    max_input_tokens = _max_input_tokens(body, call.model)
    call.hold_micro = svc.config.pricing.ceiling_micro(call.price, max_input_tokens, output_cap * parsed.choices)
    upstream_body = chat.rewrite_request(payload, parsed, call.model.upstream_model, output_cap)

    fingerprint = hashlib.sha256(body).hexdigest() if call.idempotency_key else ""
    admitted = await _admit(svc, call, fingerprint)
    if admitted.outcome is Admission.DUPLICATE:
        return _replay(admitted, call)
    svc.metrics.holds_active.inc()
    try:
        return await _forward(request, svc, call, parsed, upstream_body)
    except asyncio.CancelledError:
        # Cancelled (shutdown past its drain time) before a relay step settled: settle now. If the
        # relay already settled, this second settle changes nothing.
        await _settle(svc, call, "cancelled", None, error="cancelled before the call finished")
        raise
    finally:
        svc.metrics.holds_active.dec()


async def _authenticate(request: web.Request, svc: Services) -> Caller:
    raw_key = bearer_token(request.headers.get("Authorization"))
    try:
        caller = await svc.auth.authenticate(raw_key)
    except POSTGRES_ERRORS:
        svc.metrics.dependency_errors.labels("postgres").inc()
        raise SidecarError("unavailable", "the key store is unavailable; retry shortly") from None
    if caller is None:
        raise SidecarError("authentication", "invalid or revoked API key", code="invalid_api_key")
    return caller


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SERVICES].config.server.max_body_bytes
        raise SidecarError("too_large", f"request body exceeds the limit of {limit} bytes") from None


def _resolve_model(svc: Services, name: str) -> ModelConfig:
    model = svc.config.model(name)
    if model is None:
        raise SidecarError("not_found", f"the model {name!r} does not exist", code="model_not_found", param="model")
    return model


def _max_input_tokens(body: bytes, model: ModelConfig) -> int:
    # Every token covers at least one byte of the request body (byte-level BPE), and the body also
    # holds JSON syntax, so its length bounds the input tokens. The context window bounds it too.
    if model.context_window_tokens is None:
        return len(body)
    return min(len(body), model.context_window_tokens)


def _header_value(request: web.Request, name: str, max_length: int) -> str | None:
    value = request.headers.get(name)
    if value is None:
        return None
    if not value or len(value) > max_length or not value.isprintable():
        raise SidecarError("invalid_request", f"header {name} must be 1 to {max_length} printable characters")
    return value


# --- admission --------------------------------------------------------------------------------------


async def _admit(svc: Services, call: Call, fingerprint: str) -> AdmitResult:
    caller, config = call.caller, svc.config
    meta = orjson.dumps(_event(call, "expired", Usage(), 0, estimated=False, error=None))
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
                max_unflushed=MAX_LEDGER_BACKLOG,
            )
            if result.outcome is not Admission.NEED_LOAD:
                return _check_admission(svc, call, result)
            await svc.balances.ensure_loaded(caller.workspace_id)
        except (RedisError, *POSTGRES_ERRORS) as exc:
            svc.metrics.dependency_errors.labels("redis" if isinstance(exc, RedisError) else "postgres").inc()
            log.warning("admission unavailable", extra={"error": type(exc).__name__})
            raise SidecarError("unavailable", "metering is unavailable; nothing was charged, retry shortly") from None
    raise SidecarError("unavailable", "could not load the workspace balance; retry shortly")


def _check_admission(svc: Services, call: Call, result: AdmitResult) -> AdmitResult:
    limit = call.caller.rate_limit_rpm
    outcome = result.outcome
    if outcome is Admission.ADMITTED:
        call.rate_headers = _rate_headers(limit, result.remaining, result.reset_ms)
        return result
    if outcome is Admission.RATE_LIMITED:
        svc.metrics.rate_limited.labels(ROUTE_CHAT).inc()
        headers = _rate_headers(limit, 0, result.reset_ms)
        headers["Retry-After"] = str(-(-result.retry_after_ms // 1000))
        headers["retry-after-ms"] = str(result.retry_after_ms)
        raise SidecarError(
            "rate_limited",
            f"rate limit of {limit} requests per minute reached",
            code="rate_limit_exceeded",
            headers=headers,
        )
    if outcome is Admission.INSUFFICIENT:
        svc.metrics.payment_required.labels(ROUTE_CHAT).inc()
        error = payment_required()
        error.headers = {**_rate_headers(limit, result.remaining, result.reset_ms), "x-should-retry": "false"}
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
    assert outcome is Admission.BACKLOG, outcome
    raise SidecarError("unavailable", "the ledger is behind; retry shortly", code="ledger_backlog")


def _rate_headers(limit: int, remaining: int, reset_ms: int) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(limit),
        "X-RateLimit-Remaining": str(max(remaining, 0)),
        "X-RateLimit-Reset": str(-(-reset_ms // 1000)),
    }


def _replay(result: AdmitResult, call: Call) -> web.Response:
    if result.replay_status == 0:
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


# --- forward and relay ------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed its connection while the response was relayed."""


async def _forward(
    request: web.Request, svc: Services, call: Call, parsed: chat.ChatRequest, upstream_body: bytes
) -> web.StreamResponse:
    provider = svc.config.providers[call.model.provider]
    session = svc.upstreams.session(provider.name)
    if call.idempotency_key:
        call.relayed = []
        call.relay_keep_max_bytes = svc.config.billing.idempotency_max_body_bytes
    timeouts = svc.config.upstream
    sent_at = time.perf_counter()
    svc.metrics.overhead.observe(sent_at - call.started_perf)
    try:
        async with asyncio.timeout(timeouts.first_byte_timeout_ms / 1000):
            upstream = await session.post(
                svc.upstreams.url(provider, "/chat/completions"),
                data=upstream_body,
                headers=svc.upstreams.headers(provider.name, request.headers),
            )
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        await _settle(svc, call, "failed", None, error=f"upstream unreachable: {type(exc).__name__}")
        kind = "timeout" if isinstance(exc, TimeoutError) else "upstream"
        raise SidecarError(
            kind, "the provider did not answer; nothing was charged", code="upstream_unavailable"
        ) from None
    svc.metrics.upstream_ttfb.labels(provider.name).observe(time.perf_counter() - sent_at)
    try:
        if upstream.status >= 400:
            return await _relay_upstream_error(svc, call, upstream)
        call.first_byte_ms = _now_ms()
        if parsed.stream:
            return await _relay_stream(request, svc, call, parsed, upstream)
        return await _relay_body(svc, call, upstream)
    finally:
        upstream.release()
        svc.metrics.upstream_latency.labels(provider.name).observe(time.perf_counter() - sent_at)


async def _relay_upstream_error(svc: Services, call: Call, upstream: aiohttp.ClientResponse) -> web.Response:
    body = await upstream.content.read(MAX_UPSTREAM_ERROR_BYTES)
    await _settle(svc, call, "failed", None, error=f"upstream answered {upstream.status}")
    if upstream.status in (401, 403):
        # The platform's own credentials were refused. The provider's message may quote part of
        # the key, and the client's key is fine: say so in our words.
        raise SidecarError(
            "upstream",
            "the provider refused the platform credentials; nothing was charged",
            code="upstream_auth_failed",
        )
    headers = {**call.rate_headers, "x-request-id": call.request_id}
    for name in ("retry-after", "retry-after-ms"):
        if name in upstream.headers:
            headers[name] = upstream.headers[name]
    return web.Response(status=upstream.status, body=body, content_type="application/json", headers=headers)


async def _relay_body(svc: Services, call: Call, upstream: aiohttp.ClientResponse) -> web.Response:
    try:
        body = await _read_bounded(upstream, svc.config.upstream.total_timeout_ms / 1000)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        await _settle(svc, call, "failed", None, error=f"upstream broke: {type(exc).__name__}")
        raise SidecarError(
            "upstream", "the provider's answer broke off; nothing was charged", code="upstream_error"
        ) from None
    usage = chat.usage_from_body(body)
    estimated = usage is None
    if usage is None:  # a provider that sent no usage: estimate, flag, and still cap at the hold
        usage = _estimate(call, output_chars=len(body))
    settled = await _settle(
        svc, call, "completed", usage, estimated=estimated, response=(200, "application/json", body)
    )
    headers = {**call.rate_headers, "x-request-id": call.request_id}
    if settled is not None:
        headers["x-sidecar-cost-micro"] = str(settled.charged_micro)
        headers["x-sidecar-cost"] = format_micro(settled.charged_micro)
        if settled.balance_after_micro is not None:
            headers["x-sidecar-balance-micro"] = str(settled.balance_after_micro)
    return web.Response(status=200, body=body, content_type="application/json", headers=headers)


async def _read_bounded(upstream: aiohttp.ClientResponse, timeout_s: float) -> bytes:
    parts, size = [], 0
    async with asyncio.timeout(timeout_s):
        async for chunk in upstream.content.iter_any():
            size += len(chunk)
            if size > MAX_UPSTREAM_BODY_BYTES:
                raise aiohttp.ClientPayloadError("upstream body exceeds the sidecar's limit")
            parts.append(chunk)
    return b"".join(parts)


async def _relay_stream(
    request: web.Request, svc: Services, call: Call, parsed: chat.ChatRequest, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200,
        headers={
            **call.rate_headers,
            "x-request-id": call.request_id,
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    stream = chat.StreamState(client_wants_usage=parsed.client_wants_usage)
    status, error = "completed", None
    try:
        try:
            await response.prepare(request)
        except (ConnectionError, RuntimeError):
            raise ClientGone() from None
        async with asyncio.timeout(svc.config.upstream.total_timeout_ms / 1000):
            await _pump(upstream, response, stream, call)
        if stream.error is not None:
            status, error = "failed", f"provider error mid-stream: {stream.error}"
        elif not stream.done and stream.usage is None:
            status, error = "failed", "upstream stream ended before completion"
    except ClientGone:
        status, error = "cancelled", "client disconnected"
    except asyncio.CancelledError:
        await _settle_stream(svc, call, stream, "cancelled", "client disconnected", body_of(call))
        raise
    except (aiohttp.ClientError, TimeoutError, OSError, SSEError) as exc:
        status, error = "failed", f"upstream broke mid-stream: {type(exc).__name__}"
        await _try_write(response, _stream_error_event("the provider's stream broke off"))
    await _settle_stream(svc, call, stream, status, error, body_of(call))
    if status != "cancelled":
        await _try_write_eof(response)
    return response


async def _pump(
    upstream: aiohttp.ClientResponse, response: web.StreamResponse, stream: chat.StreamState, call: Call
) -> None:
    framer = SSEFramer()
    async for chunk in upstream.content.iter_any():
        events = framer.feed(chunk)
        if events:
            await _relay_events(events, response, stream, call)
            if stream.error is not None:
                return
    tail = framer.flush()  # a last event without its blank line
    if tail is not None:
        await _relay_events([tail], response, stream, call)


async def _relay_events(events: list, response: web.StreamResponse, stream: chat.StreamState, call: Call) -> None:
    out = b"".join([event.raw for event in events if stream.observe(event)])
    if not out:
        return
    if call.relayed is not None:
        call.relayed.append(out)
        call.relayed_bytes += len(out)
        if call.relayed_bytes > call.relay_keep_max_bytes:
            call.relayed = None  # too large to replay: remembered as done, not kept
    try:
        await response.write(out)
    except (ConnectionError, RuntimeError):  # RuntimeError: aiohttp's "transport is closing"
        raise ClientGone() from None


def body_of(call: Call) -> bytes | None:
    return b"".join(call.relayed) if call.relayed is not None else None


def _stream_error_event(message: str) -> bytes:
    return (
        b"data: "
        + orjson.dumps({"error": {"message": message, "type": "api_error", "param": None, "code": "upstream_error"}})
        + b"\n\n"
    )


async def _try_write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except (ConnectionError, RuntimeError):
        pass


async def _try_write_eof(response: web.StreamResponse) -> None:
    try:
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass


async def _settle_stream(
    svc: Services, call: Call, stream: chat.StreamState, status: str, error: str | None, relayed: bytes | None
) -> None:
    usage, estimated = stream.usage, False
    if usage is None and (status == "cancelled" or svc.config.billing.bill_observed_on_upstream_failure):
        # No usage chunk: estimate what was observed (input from the request, output from the text
        # relayed), and flag the row as estimated.
        usage, estimated = _estimate(call, output_chars=stream.content_chars), True
    await _settle(
        svc,
        call,
        status,
        usage,
        estimated=estimated,
        error=error,
        response=(200, "text/event-stream", relayed) if relayed is not None else None,
    )


def _estimate(call: Call, output_chars: int) -> Usage:
    return Usage(
        input_tokens=chat.estimate_tokens(call.request_bytes), output_tokens=chat.estimate_tokens(output_chars)
    )


# --- settlement -------------------------------------------------------------------------------------


def _event(call: Call, status: str, usage: Usage, upstream_cost_micro: int, estimated: bool, error: str | None) -> dict:
    caller, model = call.caller, call.model
    return {
        "event_id": str(uuid.UUID(call.request_id)),
        "status": status,
        "workspace_id": caller.workspace_id,
        "office_id": caller.office_id,
        "key_id": caller.key_id,
        "request_id": call.request_id,
        "idempotency_key": call.idempotency_key,
        "session_id": call.session_id,
        "provider": model.provider,
        "model": model.name,
        "upstream_model": model.upstream_model,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_5m_tokens": usage.cache_write_5m_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "upstream_cost_micro": upstream_cost_micro,
        "hold_micro": call.hold_micro,
        "byok": False,
        "estimated": estimated,
        "error": error,
        "started_at": call.started_ms,
        "first_byte_at": call.first_byte_ms,
        "ended_at": _now_ms(),
    }


async def _settle(
    svc: Services,
    call: Call,
    status: str,
    usage: Usage | None,
    estimated: bool = False,
    error: str | None = None,
    response: tuple[int, str, bytes] | None = None,
) -> SettleResult | None:
    """Settle in a task of its own: a handler cancelled by a disconnecting client cannot stop it."""
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
    cost_micro = pricing.cost_micro(call.price, usage) if billable else 0
    upstream_cost_micro = pricing.upstream_cost_micro(call.price, usage)
    event = orjson.dumps(_event(call, status, usage, upstream_cost_micro, estimated, error))
    replay_status, content_type, body = response or (0, "", b"")
    if len(body) > config.billing.idempotency_max_body_bytes:
        replay_status, body = 0, b""  # remembered as done, too large to replay
    delay_s = 0.05
    for _ in range(SETTLE_ATTEMPTS):
        try:
            result = await svc.state.settle(
                ws=caller.workspace_id,
                key_id=caller.key_id,
                hold_id=call.request_id,
                cost_micro=cost_micro,
                billed=True,
                event=event,
                idempotency_key=call.idempotency_key,
                keep_outcome=status != "failed",
                status=replay_status,
                content_type=content_type,
                body=body,
                idempotency_ttl_ms=config.billing.idempotency_ttl_ms,
            )
            break
        except NeedLoad:
            await svc.balances.ensure_loaded(caller.workspace_id)
        except (RedisError, OSError) as exc:
            svc.metrics.dependency_errors.labels("redis").inc()
            log.warning("settle failed, retrying", extra={"error": type(exc).__name__})
            await asyncio.sleep(delay_s)
            delay_s *= 4
    else:
        # The hold stays; the sweeper voids it at its deadline and records the call as expired.
        log.error("settlement failed; the hold will expire", extra={"status": status})
        return None
    svc.flusher.note_workspace(caller.workspace_id)
    svc.flusher.wake()
    svc.metrics.settlements.labels(status).inc()
    if result.resolved_now and result.charged_micro:
        model = call.model.name
        svc.metrics.debited.labels(model).inc(result.charged_micro)
        for token_class in (
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_5m_tokens",
            "cache_write_1h_tokens",
        ):
            count = getattr(usage, token_class)
            if count:
                svc.metrics.tokens.labels(model, token_class.removesuffix("_tokens")).inc(count)
    log.info(
        "call settled",
        extra={
            "workspace_id": caller.workspace_id,
            "key_id": caller.key_id,
            "model": call.model.name,
            "status": status,
            "cost_micro": result.charged_micro,
            "duration_ms": _now_ms() - call.started_ms,
        },
    )
    return result


def _error_response(error: SidecarError, call: Call) -> web.Response:
    headers = {**call.rate_headers, **error.headers, "x-request-id": call.request_id}
    return web.Response(
        status=error.status, body=chat.error_body(error), content_type="application/json", headers=headers
    )


async def list_models(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    call = Call(request_id=uuid.uuid4().hex, started_ms=_now_ms())
    try:
        await _authenticate(request, svc)
    except SidecarError as error:
        return _error_response(error, call)
    data = []
    for model in svc.config.catalog():
        sell = svc.config.pricing.price_of(model.name).sell
        data.append(
            {
                "id": model.name,
                "object": "model",
                "created": 0,
                "owned_by": model.provider,
                "aliases": list(model.aliases),
                "max_output_tokens_default": model.default_max_output_tokens,
                "pricing": {  # credits per 1M tokens, exact decimal strings
                    cls: _per_million(getattr(sell, cls))
                    for cls in ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
                },
            }
        )
    return web.json_response(
        {"object": "list", "data": data},
        headers={"x-request-id": call.request_id},
        dumps=lambda v: orjson.dumps(v).decode(),
    )


def _per_million(scaled: int) -> str:
    whole, frac = divmod(scaled, 1_000_000_000)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".") if frac else str(whole)
