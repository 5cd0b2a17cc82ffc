"""Anthropic Messages (`POST /v1/messages`), as PROVIDERS.md describes it.

Unlike OpenAI, `input_tokens` EXCLUDES cached tokens: total input = input + cache creation + cache
read. In a stream, input and cache counts come from `message_start`; a `message_delta` may repeat them
(cumulative), or send 0 or nothing: each count is the largest seen. Output is the CUMULATIVE count of the
last `message_delta`. A count that is not a JSON integer means the usage is missing (estimated), never 0.
"""

from __future__ import annotations

from dataclasses import replace

import orjson

from sidecar.pricing import Usage
from sidecar.protocols.base import (
    BodyFacts,
    PerToolBound,
    Protocol,
    RequestFacts,
    StreamReader,
    bearer_token,
    count,
    error_text,
    estimate_tokens,
    loads_object,
    optional_count,
    optional_object,
    positive_int,
    request_facts,
    require_model,
    require_stream_flag,
    text_bytes,
)
from sidecar.protocols.errors import SidecarError
from sidecar.sse import SSEEvent

# The sidecar's error kinds -> Anthropic's error types (PROVIDERS.md, "Error envelopes").
ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "payment_required": "billing_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "conflict": "invalid_request_error",
    "too_large": "request_too_large",
    "rate_limited": "rate_limit_error",
    "client_closed": "api_error",  # the client hung up; rendered though nobody reads it
    "internal": "api_error",
    "upstream": "api_error",
    "unavailable": "overloaded_error",
    "timeout": "timeout_error",
}
_INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# Server-side input: a code-execution container, remote MCP servers.
SERVER_CONTEXT_FIELDS = ("container", "mcp_servers")
# The 1M-token context beta: input above 200K tokens is billed at the model's long-context tier, which
# the catalog prices (a target without tiers cannot serve such a call: handler).
LONG_CONTEXT_BETAS = ("context-1m",)
LONG_CONTEXT_TOKENS = 1_000_000


def usage_from_fields(fields: object) -> Usage | None:
    """Anthropic usage -> disjoint classes, or None when it is missing or does not parse. Cache
    writes split by TTL when the provider says so; otherwise they are priced as 5-minute writes."""
    counts = _counts(fields, required=("input_tokens", "output_tokens"))
    return None if counts is None else _usage(counts)


def _counts(fields: object, required: tuple[str, ...]) -> dict[str, int] | None:
    """Every count of a usage object (absent optional ones as 0, `ephemeral_1h` for the 1-hour cache
    writes), or None when a required count is missing or any count is not one."""
    if not isinstance(fields, dict):
        return None
    counts = {}
    for key in (*_INPUT_FIELDS, "output_tokens"):
        value = count(fields.get(key)) if key in required else optional_count(fields.get(key))
        if value is None:
            return None
        counts[key] = value
    split = optional_object(fields.get("cache_creation"))
    write_1h = None if split is None else optional_count(split.get("ephemeral_1h_input_tokens"))
    tools = optional_object(fields.get("server_tool_use"))
    searches = None if tools is None else optional_count(tools.get("web_search_requests"))
    if write_1h is None or searches is None:
        return None
    counts["ephemeral_1h"] = write_1h
    counts["web_searches"] = searches
    return counts


def _usage(counts: dict[str, int]) -> Usage:
    cache_write = counts["cache_creation_input_tokens"]
    write_1h = min(counts["ephemeral_1h"], cache_write)
    return Usage(
        input_tokens=counts["input_tokens"],
        output_tokens=counts["output_tokens"],
        cache_read_tokens=counts["cache_read_input_tokens"],
        cache_write_5m_tokens=cache_write - write_1h,
        cache_write_1h_tokens=write_1h,
        web_searches=counts.get("web_searches", 0),
    )


class MessagesStreamReader(StreamReader):
    """Input and cache counts come from `message_start`; a `message_delta`'s usage is cumulative, and
    its input/cache fields may be absent or 0 (older and newer API versions): each count is the
    largest seen, so a 0 never erases message_start's. Output is the last message_delta's."""

    __slots__ = ("_counts", "_input_counted", "_malformed", "_output_counted")

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, int] = {}
        self._input_counted = False  # message_start (or a message_delta) reported the input
        self._output_counted = False  # a message_delta reported output: no estimate needed
        self._malformed = False  # a usage object did not parse: the call's usage is missing

    def observe(self, event: SSEEvent) -> bool:
        data = event.data
        if event.is_comment_only or not data:
            return True
        payload = loads_object(data)
        if payload is None:
            return True
        kind = event.event  # the SDK dispatches on the SSE event name; the data's type if there is none
        if kind is None:
            kind = payload.get("type") if isinstance(payload.get("type"), str) else ""
        if kind == "content_block_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                self.content_chars += sum(text_bytes(delta.get(k)) for k in ("text", "partial_json", "thinking"))
        elif kind == "message_start":
            message = payload.get("message")
            message = message if isinstance(message, dict) else {}
            self.model = model if isinstance(model := message.get("model"), str) and model else self.model
            # Never add message_start's output_tokens to the final count: only input/cache here.
            self._merge(message.get("usage"), required=("input_tokens",), with_output=False)
        elif kind == "message_delta":
            self._merge(payload.get("usage"), required=("output_tokens",), with_output=True)
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = error_text(payload.get("error"))
        return True

    def _merge(self, fields: object, required: tuple[str, ...], with_output: bool) -> None:
        counts = _counts(fields, required)
        if counts is None:
            self._malformed = True
        else:
            self._input_counted = self._input_counted or "input_tokens" in required or counts["input_tokens"] > 0
            for key, value in counts.items():
                if key != "output_tokens":
                    self._counts[key] = max(self._counts.get(key, 0), value)
            if with_output:
                self._counts["output_tokens"] = counts["output_tokens"]
                self._output_counted = True
        complete = not self._malformed and self._output_counted and self._input_counted
        self.usage = _usage(self._counts) if complete else None

    def observed(self, request_bytes: int) -> tuple[Usage, bool]:
        # Input comes exact from message_start; output is exact once a message_delta counted it.
        if self.usage is not None:
            return self.usage, False
        if self._malformed or not self._input_counted:
            return super().observed(request_bytes)
        exact = _usage({**self._counts, "output_tokens": 0})
        return replace(exact, output_tokens=estimate_tokens(self.content_chars)), True


class Messages(Protocol):
    name = "anthropic_messages"
    route = "/v1/messages"
    upstream_path = "/messages"
    family = "anthropic"
    cap_fields = ("max_tokens",)
    search_bound = PerToolBound()

    def read_request(self, payload: dict) -> RequestFacts:
        model = require_model(payload)
        if not isinstance(payload.get("messages"), list):
            raise SidecarError("invalid_request", "messages: field required", param="messages")
        max_tokens = positive_int(payload, "max_tokens")
        if max_tokens is None:
            raise SidecarError("invalid_request", "max_tokens: field required", param="max_tokens")
        return request_facts(
            payload,
            model,
            require_stream_flag(payload),
            max_tokens,
            server_context_keys=SERVER_CONTEXT_FIELDS,
            search_bound=self.search_bound,
        )

    def long_context(self, headers) -> bool:
        values = headers.getall("anthropic-beta", ()) if hasattr(headers, "getall") else [headers.get("anthropic-beta")]
        return any(beta.strip().startswith(LONG_CONTEXT_BETAS) for beta in ",".join(v for v in values if v).split(","))

    def read_body(self, body: bytes) -> BodyFacts:
        payload = loads_object(body) or {}
        model = payload.get("model")
        return BodyFacts(usage_from_fields(payload.get("usage")), model if isinstance(model, str) and model else None)

    def stream_reader(self, facts: RequestFacts) -> StreamReader:
        return MessagesStreamReader()

    def error_body(self, error: SidecarError) -> bytes:
        inner = {"type": ERROR_TYPES[error.kind], "message": error.message}
        if error.code:
            inner["code"] = error.code  # e.g. PAYMENT_REQUIRED: clients branch on it
        return orjson.dumps({"type": "error", "error": inner})

    def stream_error(self, message: str) -> bytes:
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"

    def client_key(self, headers) -> str | None:
        return headers.get("x-api-key") or bearer_token(headers.get("Authorization"))


PROTOCOL = Messages()
