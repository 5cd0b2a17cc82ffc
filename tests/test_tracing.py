"""Tracing (observability/tracing.py): a call's spans, the W3C traceparent forwarded upstream (continuing
the caller's trace), the trace id in the call's log lines, and nothing allocated per call when off."""

from __future__ import annotations

import logging
import time
import tracemalloc
from collections.abc import Iterator

import orjson
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from support.harness import chat_body, start_sidecar, stop_sidecar

from sidecar.config import ConfigError, TracingConfig
from sidecar.observability import tracing
from sidecar.observability.logging import JsonFormatter
from sidecar.state import keys

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(self.format(record)))


@pytest.fixture
def log_lines() -> Iterator[list[dict]]:
    handler = _Lines()
    logger = logging.getLogger("sidecar")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    tracing.install(tracing.new_provider(SimpleSpanProcessor(spans), "sidecar-test"))
    try:
        yield spans
    finally:
        tracing.shutdown()


async def _call(redis_url: str, database_url: str, headers: dict) -> tuple:
    sc = await start_sidecar(redis_url, database_url)
    try:
        ws = await sc.workspace(credits_micro=1_000_000)
        # Not in Redis yet: the call loads the balance, and says so in a log line of its own.
        await sc.svc.state.redis.delete(keys.acct(ws.id))
        code, resp_headers, _ = await sc.chat(ws, chat_body(stream=True), headers=headers)
        assert code == 200
        await sc.ledger_eventually(ws.id)
        return sc.recorded[-1].headers, resp_headers["x-request-id"], ws.id
    finally:
        await stop_sidecar(sc)


async def test_a_call_is_traced_as_the_callers_child_and_the_provider_sees_its_upstream_span(
    exporter, log_lines, redis_client, redis_url, migrated_database_url
) -> None:
    upstream_headers, request_id, ws = await _call(redis_url, migrated_database_url, {"traceparent": TRACEPARENT})
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {
        "POST /v1/chat/completions",
        "sidecar.admission",
        "chat gpt-4o-mini",
        "sidecar.relay",
        "sidecar.settlement",
    }
    root = spans["POST /v1/chat/completions"]
    assert root.kind is SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == CALLER_TRACE, "the caller's trace continues"
    assert format(root.parent.span_id, "016x") == CALLER_SPAN
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["sidecar.request_id"] == request_id and root.attributes["sidecar.workspace_id"] == ws
    for name in ("sidecar.admission", "chat gpt-4o-mini", "sidecar.relay", "sidecar.settlement"):
        assert spans[name].parent.span_id == root.context.span_id, name
        assert spans[name].context.trace_id == root.context.trace_id
    upstream = spans["chat gpt-4o-mini"]
    assert upstream.kind is SpanKind.CLIENT
    assert upstream.attributes["gen_ai.operation.name"] == "chat"
    assert upstream.attributes["gen_ai.provider.name"] == "mock"
    assert upstream.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    settled = spans["sidecar.settlement"].attributes
    assert settled["gen_ai.usage.output_tokens"] > 0 and settled["sidecar.charged_micro"] > 0
    # The provider's spans hang under the upstream attempt, in the caller's trace.
    assert upstream_headers["traceparent"] == f"00-{CALLER_TRACE}-{format(upstream.context.span_id, '016x')}-01"
    of_the_call = [line for line in log_lines if line.get("request_id") == request_id]
    assert any(line["msg"] == "balance loaded from postgres" for line in of_the_call)
    assert all(line.get("trace_id") == CALLER_TRACE for line in of_the_call)


async def test_tracing_on_without_a_caller_trace_starts_one(exporter, redis_client, redis_url, migrated_database_url):
    upstream_headers, _, _ = await _call(redis_url, migrated_database_url, {})
    [root] = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert root.parent is None
    assert upstream_headers["traceparent"].split("-")[1] == format(root.context.trace_id, "032x")


async def test_off_the_callers_traceparent_is_forwarded_as_sent_and_logged(
    log_lines, redis_client, redis_url, migrated_database_url
) -> None:
    assert not tracing.enabled()
    upstream_headers, request_id, _ = await _call(
        redis_url, migrated_database_url, {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
    )
    assert upstream_headers["traceparent"] == TRACEPARENT and upstream_headers["tracestate"] == "vendor=1"
    of_the_call = [line for line in log_lines if line.get("request_id") == request_id]
    assert any(line["msg"] == "balance loaded from postgres" for line in of_the_call)
    assert all(line.get("trace_id") == CALLER_TRACE for line in of_the_call)


def test_a_malformed_traceparent_gives_no_trace_id() -> None:
    assert tracing.caller_trace_id({"traceparent": TRACEPARENT}) == CALLER_TRACE
    for bad in ("", "00-xyz-00f067aa0ba902b7-01", f"00-{'0' * 32}-{CALLER_SPAN}-01", f"00-{CALLER_TRACE}-01"):
        assert tracing.caller_trace_id({"traceparent": bad}) is None


def test_off_a_call_costs_no_allocation() -> None:
    """The per-call tracing hooks with tracing off: no object is allocated (measured), and they take well
    under a microsecond each."""
    assert not tracing.enabled()
    headers = {"content-type": "application/json", "authorization": "Bearer x"}
    rounds = 20_000

    def hooks() -> None:
        handle = tracing.begin_call(headers, "/v1/chat/completions")
        with tracing.span("sidecar.admission"):
            pass
        with tracing.upstream_span("chat", "mock", "gpt-4o-mini", 1):
            tracing.inject(headers)
        tracing.end_call(handle, 200, "gpt-4o-mini", "ws", "rid")

    hooks()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(rounds):
            hooks()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if "tracing.py" in str(s.traceback))
    # One allocation per call would be rounds * 16 bytes at least; a few bytes once are the interpreter's.
    assert grown < 1024, f"{grown} bytes allocated by tracing while off, over {rounds} calls"
    started = time.perf_counter()
    for _ in range(rounds):
        hooks()
    per_call_us = (time.perf_counter() - started) / rounds * 1e6
    assert per_call_us < 20, f"{per_call_us:.2f} us per call for the hooks while off"


def test_an_endpoint_without_the_exporter_installed_says_what_to_install(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_exporter(name, *args, **kwargs):
        if name.startswith("opentelemetry.exporter"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_exporter)
    with pytest.raises(ConfigError, match=r"\[tracing\]"):
        tracing.configure(TracingConfig(otlp_endpoint="http://collector:4318/v1/traces"))
    assert not tracing.enabled()
    assert tracing.configure(TracingConfig()) is None and not tracing.enabled()
