"""Relaying the provider's answer to the client. Never settles: each relay returns an `Ending` (how
the call ended, and what the client gets once the lifecycle has settled it).

Streams are relayed event by event as they arrive (never buffered whole); usage is read on the side.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import aiohttp
from aiohttp import web

from sidecar.errors import ControlFlow
from sidecar.money import format_micro
from sidecar.pricing import Usage
from sidecar.protocols.base import RequestFacts, StreamReader, estimate_tokens
from sidecar.protocols.errors import SidecarError
from sidecar.proxy.budget import BudgetExceeded, Reservation
from sidecar.proxy.call import Call, now_ms
from sidecar.proxy.outcome import CallStatus, Ending, Outcome, Replay, refusal
from sidecar.services import Services
from sidecar.sse import SSEError, SSEFramer
from sidecar.state.store import SettleResult

log = logging.getLogger("sidecar.proxy")

UPSTREAM_BODY_BYTES_MAX = 64 * 1024 * 1024
UPSTREAM_ERROR_BYTES_MAX = 64 * 1024
# The provider's retry advice is passed on, but only in its well-formed shapes: a header value is
# the provider's text, and may quote the key it was sent.
PASSED_ERROR_HEADERS = {
    "retry-after": re.compile(r"\d{1,10}|[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT"),
    "retry-after-ms": re.compile(r"\d{1,12}(\.\d{1,6})?"),
    "x-should-retry": re.compile(r"true|false"),
}


@dataclass(frozen=True, slots=True)
class UpstreamErrorAnswer:
    """A provider's error answer, its body already read (bounded). A value, not an exception."""

    status: int
    headers: Mapping[str, str]
    body: bytes | None  # None: it could not be read


async def read_error_answer(upstream: aiohttp.ClientResponse) -> UpstreamErrorAnswer:
    """A provider's error answer, its body read within bounds; an unreadable body becomes None."""
    try:
        body: bytes | None = await upstream.content.read(UPSTREAM_ERROR_BYTES_MAX)
    except (aiohttp.ClientError, OSError, TimeoutError):
        body = None
    return UpstreamErrorAnswer(upstream.status, upstream.headers, body)


class StreamEnd(Enum):
    """Why a relayed stream stopped."""

    UPSTREAM_DONE = "the provider ended the stream"
    UPSTREAM_BROKE = "the provider's stream broke off"
    CLIENT_GONE = "client disconnected"
    CLIENT_SLOW = "client too slow to read the stream"
    TOTAL_TIMEOUT = "cut off by the sidecar: total timeout"
    IDLE_TIMEOUT = "cut off by the sidecar: the provider went idle"
    SIDECAR_FAULT = "cut off by an internal error in the sidecar"


# The client stopped the stream: the provider may still send its usage if we keep reading.
_CLIENT_ENDS = (StreamEnd.CLIENT_GONE, StreamEnd.CLIENT_SLOW)
# The sidecar stopped the stream: tokens were relayed, so what was observed is billed (never 0).
_SIDECAR_ENDS = (StreamEnd.TOTAL_TIMEOUT, StreamEnd.IDLE_TIMEOUT, StreamEnd.SIDECAR_FAULT)


class _ClientGone(ControlFlow):
    def __init__(self, end: StreamEnd) -> None:
        self.end = end


def base_headers(call: Call) -> dict[str, str]:
    return {**call.rate_headers, "x-request-id": call.request_id}


def first_byte(call: Call) -> None:
    call.first_byte_ms = now_ms()


# --- an error answer before any byte reached the client ---------------------------------------------


def relay_upstream_error(call: Call, upstream: UpstreamErrorAnswer) -> Ending:
    """Costs nothing, and the client sees the provider's answer."""
    outcome = Outcome.failed(f"upstream answered {upstream.status}")
    if upstream.status in (401, 403):
        # The platform's own credentials were refused. The provider's message may quote part of the
        # key, and the client's key is fine: say so in our words.
        error = SidecarError(
            "upstream",
            "the provider refused the platform credentials; nothing was charged",
            code="upstream_auth_failed",
        )
        return Ending(outcome, refusal(error))
    if upstream.body is None:  # unreadable (a lying Content-Encoding, a cut): the status alone is not an answer
        error = SidecarError(
            "upstream",
            f"the provider answered {upstream.status} with an unreadable body; nothing was charged",
            code="upstream_error",
        )
        return Ending(outcome, refusal(error))
    headers = base_headers(call)
    for name, shape in PASSED_ERROR_HEADERS.items():
        value = upstream.headers.get(name)
        if value is not None and shape.fullmatch(value):
            headers[name] = value
    body = call.scrubber.bytes(upstream.body)

    async def reply(_: SettleResult | None) -> web.StreamResponse:
        return web.Response(status=upstream.status, body=body, content_type="application/json", headers=headers)

    return Ending(outcome, reply)


# --- a whole JSON answer ----------------------------------------------------------------------------


async def relay_body(svc: Services, call: Call, upstream: aiohttp.ClientResponse) -> Ending:
    timeout_s = svc.config.upstream.total_timeout_ms / 1000
    call.buffered = svc.buffer_budget.reservation()  # released when the handler is done (handler.serve)
    try:
        try:
            body = await _read_bounded(upstream, timeout_s, call.buffered)
        except asyncio.CancelledError:
            if not _client_left(svc):
                raise
            # The client hung up while the provider works: its answer still says what it used.
            return await _abandoned_body(svc, call, upstream, timeout_s)
    except BudgetExceeded:
        svc.metrics.child(svc.metrics.dependency_errors, "memory").inc()
        error = SidecarError(
            "unavailable", "the sidecar is buffering too many large answers; nothing was charged, retry shortly"
        )
        return Ending(Outcome.failed("the sidecar's budget for buffered answers was exceeded"), refusal(error))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        error = SidecarError("upstream", "the provider's answer broke off; nothing was charged", code="upstream_error")
        return Ending(Outcome.failed(f"upstream broke: {type(exc).__name__}"), refusal(error))
    body = call.scrubber.bytes(body)
    facts = call.protocol.read_body(body)
    call.served_model = facts.model or call.served_model
    headers = base_headers(call)
    if facts.error is not None and facts.usage is None:
        # A 200 that carries an error (OpenRouter reports late failures so): nothing was served.
        outcome = Outcome.failed(f"provider error in a 200 body: {facts.error}")
    elif facts.usage is None:  # a provider that sent no usage: estimate, flag, and still cap at the hold
        usage = Usage(input_tokens=estimate_tokens(call.request_bytes), output_tokens=estimate_tokens(len(body)))
        outcome = Outcome(CallStatus.COMPLETED, usage, estimated=True, replay=Replay(200, "application/json", body))
    else:
        outcome = Outcome(CallStatus.COMPLETED, facts.usage, replay=Replay(200, "application/json", body))

    async def reply(settled: SettleResult | None) -> web.StreamResponse:
        # Only a settlement that resolved the hold now knows the charge: one resolved by an earlier try
        # whose reply was lost (or spooled, None) says nothing rather than a wrong 0.
        if settled is not None and settled.resolved_now and outcome.status is CallStatus.COMPLETED:
            headers["x-sidecar-cost-micro"] = str(settled.charged_micro)
            headers["x-sidecar-cost"] = format_micro(settled.charged_micro)
            if settled.balance_after_micro is not None:
                headers["x-sidecar-balance-micro"] = str(settled.balance_after_micro)
        return web.Response(status=200, body=body, content_type="application/json", headers=headers)

    return Ending(outcome, reply)


async def _abandoned_body(svc: Services, call: Call, upstream: aiohttp.ClientResponse, timeout_s: float) -> Ending:
    """The client hung up while the provider works on a whole answer: the answer still says what it
    used, if it comes in time. Either way the call is `cancelled`, billed what is known."""
    gone = refusal(SidecarError("client_closed", "the client closed the connection"))
    wait_s = min(timeout_s, svc.config.upstream.usage_wait_after_hangup_ms / 1000)
    try:
        body = await _read_bounded(upstream, wait_s, call.buffered)
    except (aiohttp.ClientError, TimeoutError, OSError, BudgetExceeded):
        return Ending(Outcome(CallStatus.CANCELLED, None, error=StreamEnd.CLIENT_GONE.value), gone)
    facts = call.protocol.read_body(call.scrubber.bytes(body))
    call.served_model = facts.model or call.served_model
    return Ending(Outcome(CallStatus.CANCELLED, facts.usage, error=StreamEnd.CLIENT_GONE.value), gone)


def _client_left(svc: Services) -> bool:
    """aiohttp cancels a handler whose client hung up (when run with handler_cancellation, as its test
    server is). That is the client leaving, not a reason to stop metering: absorb it and go on to
    bill the call. A cancellation while the sidecar shuts down is not absorbed."""
    if svc.draining:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


async def _read_bounded(upstream: aiohttp.ClientResponse, timeout_s: float, held: Reservation) -> bytes:
    """The whole answer, bounded per call (UPSTREAM_BODY_BYTES_MAX) and over the process (`held`
    reserves each chunk, and the joined copy, before keeping it)."""
    parts, size = [], 0
    async with asyncio.timeout(timeout_s):
        async for chunk in upstream.content.iter_any():
            size += len(chunk)
            if size > UPSTREAM_BODY_BYTES_MAX:
                raise aiohttp.ClientPayloadError("upstream body exceeds the sidecar's limit")
            held.grow(len(chunk))
            parts.append(chunk)
    held.grow(size)  # the joined copy, while the parts still live
    return b"".join(parts)


# --- a stream ----------------------------------------------------------------------------------------


async def relay_stream(
    request: web.Request, svc: Services, call: Call, facts: RequestFacts, upstream: aiohttp.ClientResponse
) -> Ending:
    response = web.StreamResponse(
        status=200,
        headers={
            **base_headers(call),
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    reader = call.reader = call.protocol.stream_reader(facts)
    framer = SSEFramer()  # one per stream: reading on after a hang-up resumes mid-event where the relay stopped
    try:
        end = await _relay_until_end(request, svc, call, upstream, response, framer)
    except asyncio.CancelledError:
        if not _client_left(svc):
            raise
        end = StreamEnd.CLIENT_GONE
    if end in _CLIENT_ENDS and not (reader.done or reader.has_final_usage):
        await _read_on_for_usage(svc, upstream, framer, reader)
    outcome = stream_outcome(svc, call, reader, end)

    async def reply(_: SettleResult | None) -> web.StreamResponse:
        if end in _CLIENT_ENDS:
            return response
        if outcome.status is not CallStatus.COMPLETED and reader.error is None:
            await _try(response.write(call.protocol.stream_error(end.value)))
        await _try(response.write_eof())
        return response

    return Ending(outcome, reply)


async def _relay_until_end(
    request: web.Request,
    svc: Services,
    call: Call,
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    framer: SSEFramer,
) -> StreamEnd:
    timeouts = svc.config.upstream
    try:
        try:
            await response.prepare(request)
        except (ConnectionError, RuntimeError):
            return StreamEnd.CLIENT_GONE
        async with asyncio.timeout(timeouts.total_timeout_ms / 1000):
            await _pump(upstream, framer, response, call, timeouts.write_timeout_ms / 1000)
        return StreamEnd.UPSTREAM_DONE
    except _ClientGone as gone:
        return gone.end
    except aiohttp.ServerTimeoutError:  # aiohttp's read timeout: no byte for upstream.idle_timeout_ms
        return StreamEnd.IDLE_TIMEOUT
    except TimeoutError:
        return StreamEnd.TOTAL_TIMEOUT
    except (aiohttp.ClientError, OSError, SSEError):
        return StreamEnd.UPSTREAM_BROKE
    except Exception:
        # The 200 is already on the wire: no error response can follow it. End the stream with the
        # protocol's error event instead, and settle what was relayed.
        log.exception("unexpected error while relaying a stream")
        return StreamEnd.SIDECAR_FAULT


async def _pump(
    upstream: aiohttp.ClientResponse,
    framer: SSEFramer,
    response: web.StreamResponse,
    call: Call,
    write_timeout_s: float,
) -> None:
    reader = call.reader
    async for chunk in upstream.content.iter_any():
        events = framer.feed(chunk)
        if events:
            await _relay_events(events, response, reader, call, write_timeout_s)
            if reader.error is not None:
                return
    tail = framer.flush()  # a last event without its blank line
    if tail is not None:
        await _relay_events([tail], response, reader, call, write_timeout_s)


async def _relay_events(
    events: list, response: web.StreamResponse, reader: StreamReader, call: Call, write_timeout_s: float
) -> None:
    out = b"".join([event.raw for event in events if reader.observe(event)])
    if not out:
        return
    out = call.scrubber.bytes(out)  # whole events: a key cannot straddle two of them
    call.keep_relayed(out)
    try:
        async with asyncio.timeout(write_timeout_s):
            await response.write(out)
    except TimeoutError:  # the client stopped reading: it left, in effect
        raise _ClientGone(StreamEnd.CLIENT_SLOW) from None
    except (ConnectionError, RuntimeError):  # RuntimeError: aiohttp's "transport is closing"
        raise _ClientGone(StreamEnd.CLIENT_GONE) from None


async def _read_on_for_usage(
    svc: Services, upstream: aiohttp.ClientResponse, framer: SSEFramer, reader: StreamReader
) -> None:
    """The client left before the provider sent its usage. Keep reading the provider's stream, relaying
    nothing, until its usage arrives (bounded in time): the exact count beats an estimate from bytes,
    which misses images, cached prefixes and reasoning tokens."""
    wait_s = svc.config.upstream.usage_wait_after_hangup_ms / 1000
    if wait_s <= 0:
        return
    try:
        async with asyncio.timeout(wait_s):
            async for chunk in upstream.content.iter_any():
                for event in framer.feed(chunk):
                    reader.observe(event)
                if reader.done or reader.has_final_usage or reader.error is not None:
                    return
            tail = framer.flush()  # a last event without its blank line
            if tail is not None:
                reader.observe(tail)
    except (TimeoutError, aiohttp.ClientError, OSError, SSEError):
        return
    except Exception:  # a reader bug must not stop the settlement: bill what was observed
        log.exception("unexpected error while reading on for usage")


def stream_outcome(svc: Services, call: Call, reader: StreamReader, end: StreamEnd) -> Outcome:
    call.served_model = reader.model or call.served_model
    if end is StreamEnd.UPSTREAM_DONE and reader.error is not None:
        return _failed_stream(svc, call, reader, f"provider error mid-stream: {reader.error}")
    if end is StreamEnd.UPSTREAM_DONE and not (reader.done or reader.has_final_usage):
        return _failed_stream(svc, call, reader, "upstream stream ended before completion")
    if end in (StreamEnd.UPSTREAM_DONE, StreamEnd.UPSTREAM_BROKE) and reader.has_final_usage:
        # The provider finished and counted (only a tail may have been lost): complete.
        relayed = call.relayed_body()
        replay = Replay(200, "text/event-stream", relayed) if relayed is not None else None
        return Outcome(CallStatus.COMPLETED, reader.usage, replay=replay)
    if end is StreamEnd.UPSTREAM_DONE:  # done, but the provider sent no usage: estimate and flag
        usage, estimated = reader.observed(call.request_bytes)
        relayed = call.relayed_body()
        replay = Replay(200, "text/event-stream", relayed) if relayed is not None else None
        return Outcome(CallStatus.COMPLETED, usage, estimated, replay=replay)
    if end is StreamEnd.UPSTREAM_BROKE:
        return _failed_stream(svc, call, reader, f"upstream broke mid-stream: {end.value}")
    # The client left or the sidecar cut the stream: bill the provider's count if it came, else what
    # was observed, flagged as estimated.
    assert end in _CLIENT_ENDS or end in _SIDECAR_ENDS, end
    if reader.has_final_usage:
        return Outcome(CallStatus.CANCELLED, reader.usage, error=end.value)
    usage, estimated = reader.observed(call.request_bytes)
    return Outcome(CallStatus.CANCELLED, usage, estimated, error=end.value)


def cancelled_outcome(call: Call) -> Outcome:
    """The handler was cancelled (a shutdown past its drain time) mid-call: bill what was observed."""
    reader = call.reader
    if reader is None:
        return Outcome(CallStatus.CANCELLED, None, error="cancelled before the call finished")
    call.served_model = reader.model or call.served_model
    if reader.has_final_usage:
        return Outcome(CallStatus.CANCELLED, reader.usage, error="cancelled before the call finished")
    usage, estimated = reader.observed(call.request_bytes)
    return Outcome(CallStatus.CANCELLED, usage, estimated, error="cancelled before the call finished")


def _failed_stream(svc: Services, call: Call, reader: StreamReader, error: str) -> Outcome:
    """A provider failure mid-stream: 0 by default; the observed usage when the operator chose to bill it."""
    if not svc.config.billing.bill_observed_on_upstream_failure:
        return Outcome.failed(error)
    if reader.has_final_usage:
        return Outcome.failed(error, reader.usage)
    usage, estimated = reader.observed(call.request_bytes)
    return Outcome.failed(error, usage, estimated)


async def _try(step) -> None:
    try:
        await step
    except (ConnectionError, RuntimeError):
        pass
