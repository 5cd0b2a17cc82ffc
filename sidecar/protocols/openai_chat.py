"""OpenAI Chat Completions (`POST /v1/chat/completions`), as PROVIDERS.md describes it."""

from __future__ import annotations

from sidecar.protocols import openai_common as common
from sidecar.protocols.base import (
    CHOICES_MAX,
    BodyFacts,
    Protocol,
    RequestFacts,
    StreamReader,
    loads_object,
    positive_int,
    request_facts,
    require_model,
    require_stream_flag,
)
from sidecar.protocols.errors import SidecarError


class ChatCompletions(Protocol):
    name = "openai_chat"
    route = "/v1/chat/completions"
    upstream_path = "/chat/completions"
    family = "openai"
    cap_field = "max_completion_tokens"
    cap_fields = ("max_completion_tokens", "max_tokens")

    def read_request(self, payload: dict) -> RequestFacts:
        model = require_model(payload)
        if not isinstance(payload.get("messages"), list):
            raise SidecarError("invalid_request", "'messages' must be a list", param="messages")
        stream = require_stream_flag(payload)
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise SidecarError("invalid_request", "'stream_options' must be an object", param="stream_options")
        caps = [c for c in (positive_int(payload, "max_completion_tokens"), positive_int(payload, "max_tokens")) if c]
        return request_facts(
            payload,
            model,
            stream,
            min(caps) if caps else None,
            choices=positive_int(payload, "n", CHOICES_MAX) or 1,
            client_wants_usage=bool(stream and options and options.get("include_usage") is True),
        )

    def rewrite_payload(
        self, payload: dict, facts: RequestFacts, upstream_model: str, output_cap: int, to_openrouter: bool
    ) -> dict:
        out = super().rewrite_payload(payload, facts, upstream_model, output_cap, to_openrouter)
        if facts.stream:  # usage on every stream; the chunk is hidden again if the client did not ask
            out["stream_options"] = {**(out.get("stream_options") or {}), "include_usage": True}
        return out

    def read_body(self, body: bytes) -> BodyFacts:
        payload = loads_object(body) or {}
        return BodyFacts(
            common.usage_from_object(payload.get("usage")), common.model_of(payload), common.error_of(payload)
        )

    def stream_reader(self, facts: RequestFacts) -> StreamReader:
        return common.DataStreamReader(facts, common.chat_choice_text_bytes)

    def error_body(self, error: SidecarError) -> bytes:
        return common.error_body(error)

    def stream_error(self, message: str) -> bytes:
        return common.stream_error(message)


PROTOCOL = ChatCompletions()
