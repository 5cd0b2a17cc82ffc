"""OpenAI legacy completions (`POST /v1/completions`): chat's usage and stream, a `prompt` field."""

from __future__ import annotations

from sidecar.protocols import openai_common as common
from sidecar.protocols.base import (
    CHOICES_MAX,
    RequestFacts,
    StreamReader,
    positive_int,
    request_facts,
    require_model,
    require_stream_flag,
)
from sidecar.protocols.errors import SidecarError
from sidecar.protocols.openai_chat import ChatCompletions

PROMPTS_MAX = 32  # with CHOICES_MAX: bounds the worst case a hold is priced at


class Completions(ChatCompletions):
    name = "openai_completions"
    route = "/v1/completions"
    operation = "text_completion"
    upstream_path = "/completions"
    cap_field = "max_tokens"  # completions has no max_completion_tokens
    cap_fields = ("max_tokens",)

    def read_request(self, payload: dict) -> RequestFacts:
        model = require_model(payload)
        prompt = payload.get("prompt")
        if not isinstance(prompt, str | list):
            raise SidecarError("invalid_request", "'prompt' must be a string or a list", param="prompt")
        stream = require_stream_flag(payload)
        options = payload.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise SidecarError("invalid_request", "'stream_options' must be an object", param="stream_options")
        # `best_of` candidates are generated (and billed) server-side even though only `n` return.
        choices = max(positive_int(payload, "n", CHOICES_MAX) or 1, positive_int(payload, "best_of", CHOICES_MAX) or 1)
        prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list) else 1
        if choices * prompts > CHOICES_MAX * PROMPTS_MAX:
            raise SidecarError(
                "invalid_request",
                f"at most {CHOICES_MAX * PROMPTS_MAX} completions per request (prompts x n or best_of)",
                param="prompt",
            )
        return request_facts(
            payload,
            model,
            stream,
            positive_int(payload, "max_tokens"),
            choices=choices * prompts,
            client_wants_usage=bool(stream and options and options.get("include_usage") is True),
        )

    def stream_reader(self, facts: RequestFacts) -> StreamReader:
        return common.DataStreamReader(facts, common.completion_choice_text_bytes)


PROTOCOL = Completions()
