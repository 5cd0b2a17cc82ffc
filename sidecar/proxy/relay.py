"""Relaying the provider's answer to the client, and settling however it ends.

Streams are relayed event by event as they arrive (never buffered whole); usage is read on the side.
Every path ends in exactly one settlement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from sidecar.money import format_micro
from sidecar.pricing import Usage
from sidecar.protocols.base import RequestFacts, StreamReader, estimate_tokens
from sidecar.protocols.errors import SidecarError
from sidecar.proxy.call import Call, now_ms
from sidecar.proxy.settlement import settle
from sidecar.services import Services
from sidecar.sse import SSEError, SSEFramer

MAX_UPSTREAM_BODY_BYTES = 64 * 1024 * 1024
MAX_UPSTREAM_ERROR_BYTES = 64 * 1024
PASSED_ERROR_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """A provider's error answer, its body already read (bounded)."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class ClientGone(Exception):
    """The client closed its connection while the response was relayed."""


def base_headers(call: Call) -> dict[str, str]:
    return {**call.rate_headers, "x-request-id": call.request_id}


async def relay_upstream_error(svc: Services, call: Call, upstream: UpstreamError) -> web.Response:
    """A provider error before any byte reached the client: costs nothing, and the client sees it."""
    body = upstream.body
    await settle(svc, call, "failed", None, error=f"upstream answered {upstream.status}")
    if upstream.status in (401, 403):
        # The platform's own credentials were refused. The provider's message may quote part of the
        # key, and the client's key is fine: say so in our words.
        raise SidecarError(
            "upstream",
            "the provider refused the platform credentials; nothing was charged",
            code="upstream_auth_failed",
        )
    headers = base_headers(call)
    for name in PASSED_ERROR_HEADERS:
        if name in upstream.headers:
            headers[name] = upstream.headers[name]
    return web.Response(status=upstream.status, body=body, content_type="application/json", headers=headers)


async def relay_body(svc: Services, call: Call, upstream: aiohttp.ClientResponse) -> web.Response:
    try:
        body = await _read_bounded(upstream, svc.config.upstream.total_timeout_ms / 1000)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        await settle(svc, call, "failed", None, error=f"upstream broke: {type(exc).__name__}")
        raise SidecarError(
            "upstream", "the provider's answer broke off; nothing was charged", code="upstream_error"
        ) from None
    facts = call.protocol.read_body(body)
    call.served_model = facts.model or call.served_model
    if facts.error is not None and facts.usage is None:
        # A 200 that carries an error (OpenRouter reports late failures so): nothing was served.
        await settle(svc, call, "failed", None, error=f"provider error in a 200 body: {facts.error}")
        return web.Response(status=200, body=body, content_type="application/json", headers=base_headers(call))
    usage, estimated = facts.usage, facts.usage is None
    if usage is None:  # a provider that sent no usage: estimate, flag, and still cap at the hold
        usage = Usage(input_tokens=estimate_tokens(call.request_bytes), output_tokens=estimate_tokens(len(body)))
    settled = await settle(svc, call, "completed", usage, estimated=estimated, response=(200, "application/json", body))
    headers = base_headers(call)
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


async def relay_stream(
    request: web.Request, svc: Services, call: Call, facts: RequestFacts, upstream: aiohttp.ClientResponse
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200,
        headers={
            **base_headers(call),
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    reader = call.protocol.stream_reader(facts)
    status, error = "completed", None
    try:
        try:
            await response.prepare(request)
        except (ConnectionError, RuntimeError):
            raise ClientGone() from None
        async with asyncio.timeout(svc.config.upstream.total_timeout_ms / 1000):
            await _pump(upstream, response, reader, call)
        if reader.error is not None:
            status, error = "failed", f"provider error mid-stream: {reader.error}"
        elif not (reader.done or reader.has_final_usage):
            status, error = "failed", "upstream stream ended before completion"
    except ClientGone:
        status, error = "cancelled", "client disconnected"
    except asyncio.CancelledError:
        await _settle_stream(svc, call, reader, "cancelled", "client disconnected")
        raise
    except (aiohttp.ClientError, TimeoutError, OSError, SSEError) as exc:
        if isinstance(exc, TimeoutError) and call.writing:  # the client read too slowly: it left, in effect
            status, error = "cancelled", "client too slow to read the stream"
        elif reader.has_final_usage:  # the provider finished and counted: only the tail was lost
            status, error = "completed", None
        else:
            status, error = "failed", f"upstream broke mid-stream: {type(exc).__name__}"
            await _try(response.write(call.protocol.stream_error("the provider's stream broke off")))
    await _settle_stream(svc, call, reader, status, error)
    if status != "cancelled":
        await _try(response.write_eof())
    return response


async def _pump(
    upstream: aiohttp.ClientResponse, response: web.StreamResponse, reader: StreamReader, call: Call
) -> None:
    framer = SSEFramer()
    async for chunk in upstream.content.iter_any():
        events = framer.feed(chunk)
        if events:
            await _relay_events(events, response, reader, call)
            if reader.error is not None:
                return
    tail = framer.flush()  # a last event without its blank line
    if tail is not None:
        await _relay_events([tail], response, reader, call)


async def _relay_events(events: list, response: web.StreamResponse, reader: StreamReader, call: Call) -> None:
    out = b"".join([event.raw for event in events if reader.observe(event)])
    if not out:
        return
    call.keep_relayed(out)
    call.writing = True
    try:
        await response.write(out)
    except (ConnectionError, RuntimeError):  # RuntimeError: aiohttp's "transport is closing"
        raise ClientGone() from None
    call.writing = False


async def _settle_stream(svc: Services, call: Call, reader: StreamReader, status: str, error: str | None) -> None:
    call.served_model = reader.model or call.served_model
    usage, estimated = reader.usage, False
    billed_as_observed = status in ("completed", "cancelled") or svc.config.billing.bill_observed_on_upstream_failure
    if billed_as_observed and (status != "completed" or usage is None):
        # No final usage (the client left, or a provider that sends none): bill what was observed,
        # estimated and flagged where the provider did not count it.
        usage, estimated = reader.observed(call.request_bytes)
    # Only a complete stream is worth replaying to a retry; a cut one is remembered, not replayed.
    relayed = call.relayed_body() if status == "completed" else None
    await settle(
        svc,
        call,
        status,
        usage,
        estimated=estimated,
        error=error,
        response=(200, "text/event-stream", relayed) if relayed is not None else None,
    )


async def _try(step) -> None:
    try:
        await step
    except (ConnectionError, RuntimeError):
        pass


def first_byte(call: Call) -> None:
    call.first_byte_ms = now_ms()
