"""OpenAI Responses (`POST /v1/responses`): named events; usage in the terminal event's response."""

from __future__ import annotations

from dataclasses import replace

import orjson

from sidecar.pricing import Usage
from sidecar.protocols import openai_common as common
from sidecar.protocols.base import (
    BodyFacts,
    PerCallBound,
    Protocol,
    RequestFacts,
    StreamReader,
    count,
    error_text,
    loads_object,
    optional_object,
    positive_int,
    request_facts,
    require_model,
    require_stream_flag,
    text_bytes,
    unpriced,
)
from sidecar.protocols.errors import SidecarError
from sidecar.sse import SSEEvent

TERMINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def usage_from_object(usage: object, output: object = None) -> Usage | None:
    """Responses usage: input_tokens INCLUDES cached, cache-write, audio and image tokens; output_tokens
    includes reasoning. Search calls are counted from the response's `output` items. None when it is
    missing or does not parse (the caller then estimates)."""
    if not isinstance(usage, dict):
        return None
    total_input = count(usage.get("input_tokens"))
    output_tokens = count(usage.get("output_tokens"))
    input_details = optional_object(usage.get("input_tokens_details"))
    output_details = optional_object(usage.get("output_tokens_details"))
    if total_input is None or output_tokens is None or input_details is None or output_details is None:
        return None
    split = common.split_counts(total_input, output_tokens, input_details, output_details)
    if split is None:
        return None
    return replace(
        split, web_searches=_items(output, "web_search_call"), file_searches=_items(output, "file_search_call")
    )


def _items(output: object, kind: str) -> int:
    """How many items of this type the response's output has (each a billed server-tool call)."""
    if not isinstance(output, list):
        return 0
    return sum(1 for item in output[:TOOL_ITEMS_MAX] if isinstance(item, dict) and item.get("type") == kind)


TOOL_ITEMS_MAX = 10_000  # output items looked at for tool calls: far above any bounded call


# Streamed deltas that are not model output text (audio is base64 bytes, and refused anyway).
_NOT_TEXT_DELTAS = ("response.audio.delta",)
# Server-side input: a previous response, a conversation, a stored prompt.
SERVER_CONTEXT_FIELDS = ("previous_response_id", "conversation", "prompt")


class ResponsesStreamReader(StreamReader):
    """Every event is parsed; its `type` names it (the SDK reads the type, not the SSE event name)."""

    __slots__ = ()

    def observe(self, event: SSEEvent) -> bool:
        data = event.data
        if event.is_comment_only or not data:
            return True
        if data == common.DONE_DATA:  # not part of this protocol, tolerated
            self.done = True
            return True
        payload = loads_object(data)
        if payload is None:
            return True
        kind = payload.get("type")
        if not isinstance(kind, str):
            kind = event.event or ""
        if kind.endswith(".delta") and kind not in _NOT_TEXT_DELTAS:
            self.content_chars += text_bytes(payload.get("delta"))
        elif kind == "error":
            self.error = error_text(payload.get("message") or payload.get("error") or payload.get("code"))
        elif kind in TERMINAL_EVENTS:
            self._observe_terminal(kind, payload.get("response"))
        elif kind.startswith("response.") and self.model is None:
            response = payload.get("response")
            self.model = common.model_of(response) if isinstance(response, dict) else None
        return True

    def _observe_terminal(self, kind: str, response: object) -> None:
        self.done = True
        if not isinstance(response, dict):  # unreadable: the call's usage is missing, estimated
            self.usage = None
            return
        self.usage = usage_from_object(response.get("usage"), response.get("output"))
        self.model = common.model_of(response) or self.model
        if kind == "response.failed":
            self.error = error_text(response.get("error"), "failed")


class Responses(Protocol):
    name = "openai_responses"
    route = "/v1/responses"
    upstream_path = "/responses"
    family = "openai"
    cap_field = "max_output_tokens"
    cap_fields = ("max_output_tokens",)
    search_bound = PerCallBound()

    def read_request(self, payload: dict) -> RequestFacts:
        model = require_model(payload)
        if "input" in payload and not isinstance(payload["input"], str | list):
            raise SidecarError("invalid_request", "'input' must be a string or a list", param="input")
        if payload.get("background") not in (None, False):
            # The answer (and its usage) would be fetched later, past the sidecar: nothing to meter.
            raise unpriced("background mode", "background")
        return request_facts(
            payload,
            model,
            require_stream_flag(payload),
            positive_int(payload, "max_output_tokens"),
            server_context_keys=SERVER_CONTEXT_FIELDS,
            search_bound=self.search_bound,
        )

    def read_body(self, body: bytes) -> BodyFacts:
        payload = loads_object(body) or {}
        usage = usage_from_object(payload.get("usage"), payload.get("output"))
        return BodyFacts(usage, common.model_of(payload), common.error_of(payload))

    def stream_reader(self, facts: RequestFacts) -> StreamReader:
        return ResponsesStreamReader()

    def error_body(self, error: SidecarError) -> bytes:
        return common.error_body(error)

    def stream_error(self, message: str) -> bytes:
        body = {"type": "error", "code": "upstream_error", "message": message, "param": None}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


PROTOCOL = Responses()
