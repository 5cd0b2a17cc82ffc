"""OpenAI Responses (`POST /v1/responses`): named events; usage in the terminal event's response."""

from __future__ import annotations

import orjson

from sidecar.pricing import Usage
from sidecar.protocols import openai_common as common
from sidecar.protocols.base import (
    BodyFacts,
    Protocol,
    RequestFacts,
    StreamReader,
    count,
    json_string_length,
    loads_object,
    positive_int,
    require_model,
    require_stream_flag,
)
from sidecar.protocols.errors import SidecarError
from sidecar.sse import SSEEvent

TERMINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def usage_from_object(usage: object) -> Usage | None:
    """Responses usage: input_tokens INCLUDES cached tokens; output_tokens includes reasoning."""
    if not isinstance(usage, dict):
        return None
    total_input = count(usage.get("input_tokens"))
    output = count(usage.get("output_tokens"))
    input_details = usage.get("input_tokens_details") or {}
    output_details = usage.get("output_tokens_details") or {}
    cached = min(count(input_details.get("cached_tokens")) if isinstance(input_details, dict) else 0, total_input)
    reasoning = count(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0
    return Usage(
        input_tokens=total_input - cached,
        output_tokens=output,
        cache_read_tokens=cached,
        reasoning_tokens=min(reasoning, output),
    )


class ResponsesStreamReader(StreamReader):
    __slots__ = ()

    def observe(self, event: SSEEvent) -> bool:
        data = event.data
        if event.is_comment_only or not data:
            return True
        if data == common.DONE_DATA:  # not part of this protocol, tolerated
            self.done = True
            return True
        kind = event.event or ""
        if kind == "response.output_text.delta":
            self.content_chars += json_string_length(data, b"delta")
            return True
        if kind in TERMINAL_EVENTS or kind == "error" or (not kind and b'"type":"response.' in data):
            self._observe_json(data)
        return True

    def _observe_json(self, data: bytes) -> None:
        payload = loads_object(data)
        if payload is None:
            return
        kind = payload.get("type")
        if kind == "error":
            self.error = str(payload.get("message") or payload.get("code") or "error")[:500]
            return
        if kind in TERMINAL_EVENTS:
            response = payload.get("response") or {}
            self.usage = usage_from_object(response.get("usage")) or self.usage
            self.model = common.model_of(response) or self.model
            self.done = True
            if kind == "response.failed":
                error = response.get("error") or {}
                self.error = str(error.get("message") if isinstance(error, dict) else error or "failed")[:500]


class Responses(Protocol):
    name = "openai_responses"
    route = "/v1/responses"
    upstream_path = "/responses"
    family = "openai"
    cap_field = "max_output_tokens"
    cap_fields = ("max_output_tokens",)

    def read_request(self, payload: dict) -> RequestFacts:
        model = require_model(payload)
        if "input" in payload and not isinstance(payload["input"], str | list):
            raise SidecarError("invalid_request", "'input' must be a string or a list", param="input")
        return RequestFacts(
            model=model,
            stream=require_stream_flag(payload),
            max_output_tokens=positive_int(payload, "max_output_tokens"),
        )

    def read_body(self, body: bytes) -> BodyFacts:
        payload = loads_object(body) or {}
        return BodyFacts(usage_from_object(payload.get("usage")), common.model_of(payload), common.error_of(payload))

    def stream_reader(self, facts: RequestFacts) -> StreamReader:
        return ResponsesStreamReader()

    def error_body(self, error: SidecarError) -> bytes:
        return common.error_body(error)

    def stream_error(self, message: str) -> bytes:
        body = {"type": "error", "code": "upstream_error", "message": message, "param": None}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


PROTOCOL = Responses()
