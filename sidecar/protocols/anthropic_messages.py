"""Anthropic Messages (`POST /v1/messages`), as PROVIDERS.md describes it.

Unlike OpenAI, `input_tokens` EXCLUDES cached tokens: total input = input + cache creation + cache
read. In a stream, input and cache counts come from `message_start`, overridden by any non-null
value in a `message_delta`; output is the CUMULATIVE count of the last `message_delta`.
"""

from __future__ import annotations

import orjson

from sidecar.pricing import Usage
from sidecar.protocols.base import (
    BodyFacts,
    Protocol,
    RequestFacts,
    StreamReader,
    bearer_token,
    count,
    estimate_tokens,
    json_string_length,
    loads_object,
    positive_int,
    require_model,
    require_stream_flag,
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
    "internal": "api_error",
    "upstream": "api_error",
    "unavailable": "overloaded_error",
    "timeout": "timeout_error",
}
_INPUT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation")


def usage_from_fields(fields: dict) -> Usage:
    """Anthropic usage -> disjoint classes. Cache writes split by TTL when the provider says so;
    otherwise they are priced as 5-minute writes."""
    cache_write = count(fields.get("cache_creation_input_tokens"))
    split = fields.get("cache_creation")
    write_1h = 0
    if isinstance(split, dict):
        write_1h = min(count(split.get("ephemeral_1h_input_tokens")), cache_write)
    return Usage(
        input_tokens=count(fields.get("input_tokens")),
        output_tokens=count(fields.get("output_tokens")),
        cache_read_tokens=count(fields.get("cache_read_input_tokens")),
        cache_write_5m_tokens=cache_write - write_1h,
        cache_write_1h_tokens=write_1h,
    )


class MessagesStreamReader(StreamReader):
    __slots__ = ("_fields", "saw_output_count")

    def __init__(self) -> None:
        super().__init__()
        self._fields: dict = {}
        self.saw_output_count = False  # a message_delta reported output: no estimate needed

    def observe(self, event: SSEEvent) -> bool:
        kind = event.event
        data = event.data
        if event.is_comment_only or not data or kind == "ping":
            return True
        if kind == "content_block_delta":
            self.content_chars += json_string_length(data, b"text") or json_string_length(data, b"partial_json")
            return True
        if kind in ("message_start", "message_delta", "error", "message_stop"):
            self._observe_json(kind, data)
        return True

    def _observe_json(self, kind: str, data: bytes) -> None:
        if kind == "message_stop":
            self.done = True
            return
        payload = loads_object(data)
        if payload is None:
            return
        if kind == "error":
            error = payload.get("error") or {}
            self.error = str(error.get("message") if isinstance(error, dict) else error or "error")[:500]
            return
        if kind == "message_start":
            message = payload.get("message") or {}
            usage = message.get("usage") or {}
            # Never add message_start's output_tokens to the final count: keep only input/cache here.
            self._fields = {k: v for k, v in usage.items() if k in _INPUT_FIELDS}
            model = message.get("model")
            self.model = model if isinstance(model, str) else None
        else:  # message_delta: cumulative output, and non-null input/cache values override
            usage = payload.get("usage") or {}
            for key, value in usage.items():
                if value is not None and (key in _INPUT_FIELDS or key == "output_tokens"):
                    self._fields[key] = value
            self.saw_output_count = self.saw_output_count or "output_tokens" in usage
        self.usage = usage_from_fields(self._fields)

    def observed(self, request_bytes: int) -> tuple[Usage, bool]:
        # Input comes exact from message_start; output is exact only once a message_delta counted it.
        if self.usage is not None and (self.saw_output_count or self.done):
            return self.usage, False
        if self.usage is None:
            return super().observed(request_bytes)
        u = self.usage
        output = max(u.output_tokens, estimate_tokens(self.content_chars))
        return Usage(
            u.input_tokens, output, u.cache_read_tokens, u.cache_write_5m_tokens, u.cache_write_1h_tokens
        ), True


class Messages(Protocol):
    name = "anthropic_messages"
    route = "/v1/messages"
    upstream_path = "/messages"
    family = "anthropic"
    cap_fields = ("max_tokens",)

    def read_request(self, payload: dict) -> RequestFacts:
        model = require_model(payload)
        if not isinstance(payload.get("messages"), list):
            raise SidecarError("invalid_request", "messages: field required", param="messages")
        max_tokens = positive_int(payload, "max_tokens")
        if max_tokens is None:
            raise SidecarError("invalid_request", "max_tokens: field required", param="max_tokens")
        return RequestFacts(model=model, stream=require_stream_flag(payload), max_output_tokens=max_tokens)

    def read_body(self, body: bytes) -> BodyFacts:
        payload = loads_object(body) or {}
        usage = payload.get("usage")
        model = payload.get("model")
        return BodyFacts(
            usage_from_fields(usage) if isinstance(usage, dict) else None, model if isinstance(model, str) else None
        )

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
