"""OpenTelemetry traces of a call: one server span for the call, with child spans for admission, each
upstream attempt (a GenAI client span, `chat <model>`), the relay and the settlement.

Off unless `tracing.otlp_endpoint` is configured; then nothing here allocates per call beyond what a
disabled check costs: `span()` hands back one shared no-op context manager, and no span object exists.
Either way the caller's W3C `traceparent` (and `tracestate`) reaches the provider: with tracing off
it is forwarded as sent (proxy/upstream.py's allow-list), with tracing on the call continues the
caller's trace and the provider sees the upstream span as its parent. The trace id goes into every log
line of the call (logging.py reads `trace_id_var`), the caller's when tracing is off.

Span attributes follow the OpenTelemetry GenAI semantic conventions (gen_ai.*) where one exists.
Never a key, a prompt or an answer: only ids, model names, token counts, statuses.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.config import ConfigError, TracingConfig
from sidecar.observability.logging import trace_id_var

log = logging.getLogger("sidecar.tracing")

TRACE_HEADERS = ("traceparent", "tracestate")
# version-traceid-parentid-flags; an all-zero trace id is invalid (W3C Trace Context).
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_NOOP = contextlib.nullcontext()
_PROPAGATOR = TraceContextTextMapPropagator()

_tracer: trace.Tracer | None = None  # None: tracing off
_provider: TracerProvider | None = None


def enabled() -> bool:
    return _tracer is not None


def configure(config: TracingConfig) -> TracerProvider | None:
    """At start: export spans over OTLP/HTTP when an endpoint is configured; else stay off."""
    if not config.otlp_endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            "tracing.otlp_endpoint is set but the OTLP exporter is not installed: "
            "pip install 'ai-metering-sidecar[tracing]'"
        ) from None
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=config.export_timeout_ms / 1000)
    processor = BatchSpanProcessor(
        exporter, max_queue_size=config.export_queue_spans_max, export_timeout_millis=config.export_timeout_ms
    )
    provider = new_provider(processor, config.service_name, config.sampled_percent)
    install(provider)
    log.info("exporting traces over otlp", extra={"url": config.otlp_endpoint})
    return provider


def new_provider(processor: SpanProcessor, service_name: str, sampled_percent: int = 100) -> TracerProvider:
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(sampled_percent / 100)),
    )
    provider.add_span_processor(processor)
    return provider


def install(provider: TracerProvider | None) -> None:
    """Trace with this provider from now on (None: off). The process's own, not OTel's global one, so
    a library's spans never mix in and tests can swap it."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("sidecar") if provider is not None else None


def shutdown() -> None:
    """At exit: export what is queued (bounded by export_timeout_ms), then stop tracing."""
    provider = _provider
    install(None)
    if provider is not None:
        provider.shutdown()


# --- the call's spans -------------------------------------------------------------------------------


def caller_trace_id(headers: Mapping[str, str]) -> str | None:
    """The trace id of the caller's traceparent, if it sent a valid one."""
    value = headers.get("traceparent")
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None or match.group(1) == "0" * 32:
        return None
    return match.group(1)


class _CallTrace:
    __slots__ = ("context_token", "id_token", "span")

    def __init__(self, span: Span, context_token: object, id_token: contextvars.Token) -> None:
        self.span, self.context_token, self.id_token = span, context_token, id_token


CallHandle = _CallTrace | contextvars.Token | None


def begin_call(headers: Mapping[str, str], route: str) -> CallHandle:
    """Start the call's server span (continuing the caller's trace) and set the trace id its log lines
    carry. Off: only the caller's trace id, if it sent one; None (nothing allocated) if not."""
    if _tracer is None:
        return trace_id_var.set(caller_trace_id(headers)) if "traceparent" in headers else None
    span = _tracer.start_span(
        f"POST {route}",
        context=_PROPAGATOR.extract(headers),
        kind=SpanKind.SERVER,
        attributes={"http.request.method": "POST", "http.route": route},
        record_exception=False,
        set_status_on_exception=False,
    )
    context = span.get_span_context()
    id_token = trace_id_var.set(format(context.trace_id, "032x") if context.is_valid else None)
    return _CallTrace(span, otel_context.attach(trace.set_span_in_context(span)), id_token)


def end_call(handle: CallHandle, status: int, model: str, workspace_id: str | None, request_id: str) -> None:
    if handle is None:
        return
    if isinstance(handle, contextvars.Token):
        trace_id_var.reset(handle)
        return
    span = handle.span
    if span.is_recording():
        span.set_attributes(
            {
                "http.response.status_code": status,
                "gen_ai.request.model": model,
                "sidecar.request_id": request_id,
                **({"sidecar.workspace_id": workspace_id} if workspace_id else {}),
            }
        )
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
    span.end()
    otel_context.detach(handle.context_token)
    trace_id_var.reset(handle.id_token)


def span(name: str, kind: SpanKind = SpanKind.INTERNAL):
    """A child span of the current one (admission, relay, settlement); a shared no-op when off."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, kind=kind, record_exception=False, set_status_on_exception=False)


def upstream_span(operation: str, provider: str, model: str, attempt: int):
    """One upstream attempt, as the GenAI conventions name a client call: `{operation} {model}`."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(
        f"{operation} {model}",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "sidecar.attempt": attempt,
        },
        record_exception=False,
        set_status_on_exception=False,
    )


def inject(headers: dict[str, str]) -> None:
    """Put the current span's traceparent (and tracestate) on the upstream request, replacing the
    caller's: the provider's spans are children of the upstream attempt. A no-op when off."""
    if _tracer is not None:
        for name in TRACE_HEADERS:
            headers.pop(name, None)
        _PROPAGATOR.inject(headers, context=otel_context.get_current())


def annotate(attributes: dict[str, Any]) -> None:
    """Attributes on the current span; callers check enabled() first (the dict is not free)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes({k: v for k, v in attributes.items() if v is not None})


def mark_error(error_type: str) -> None:
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attribute("error.type", error_type)
        current.set_status(Status(StatusCode.ERROR))
