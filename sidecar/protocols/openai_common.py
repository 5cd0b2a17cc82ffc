"""What the OpenAI-family protocols share: the error envelope, the usage object of chat and
completions, and the data-only stream those two send."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import orjson

from sidecar.pricing import Usage
from sidecar.protocols.base import (
    CHOICES_MAX,
    RequestFacts,
    StreamReader,
    count,
    error_text,
    estimate_tokens,
    loads_object,
    optional_count,
    optional_object,
    text_bytes,
)
from sidecar.protocols.errors import KINDS, SidecarError
from sidecar.sse import SSEEvent

DONE_DATA = b"[DONE]"


def error_body(error: SidecarError) -> bytes:
    return orjson.dumps(
        {"error": {"message": error.message, "type": KINDS[error.kind][1], "param": error.param, "code": error.code}}
    )


def stream_error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "api_error", "param": None, "code": "upstream_error"}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def usage_from_object(usage: object) -> Usage | None:
    """Chat/completions usage -> disjoint token classes, or None when it is missing or does not parse
    (the caller then estimates). Cached and cache-write tokens are part of prompt_tokens; reasoning
    tokens are part of completion_tokens."""
    if not isinstance(usage, dict):
        return None
    prompt = count(usage.get("prompt_tokens"))
    completion = count(usage.get("completion_tokens"))
    prompt_details = optional_object(usage.get("prompt_tokens_details"))
    completion_details = optional_object(usage.get("completion_tokens_details"))
    if prompt is None or completion is None or prompt_details is None or completion_details is None:
        return None
    cached = optional_count(prompt_details.get("cached_tokens"))
    cache_write = optional_count(prompt_details.get("cache_write_tokens"))
    reasoning = optional_count(completion_details.get("reasoning_tokens"))
    if cached is None or cache_write is None or reasoning is None:
        return None
    cached = min(cached, prompt)
    cache_write = min(cache_write, prompt - cached)
    return Usage(
        input_tokens=prompt - cached - cache_write,
        output_tokens=completion,
        cache_read_tokens=cached,
        cache_write_5m_tokens=cache_write,
        reasoning_tokens=min(reasoning, completion),
    )


def error_of(payload: dict) -> str | None:
    error = payload.get("error")
    return error_text(error) if error else None


def model_of(payload: dict) -> str | None:
    model = payload.get("model")
    return model if isinstance(model, str) and model else None


def chat_choice_text_bytes(choice: dict) -> int:
    """Streamed output of a chat choice: text, refusals, reasoning and tool-call arguments."""
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return 0
    size = sum(text_bytes(delta.get(key)) for key in ("content", "refusal", "reasoning_content", "reasoning"))
    calls = delta.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        size += text_bytes(function.get("arguments")) if isinstance(function, dict) else 0
    legacy = delta.get("function_call")
    size += text_bytes(legacy.get("arguments")) if isinstance(legacy, dict) else 0
    return size


def completion_choice_text_bytes(choice: dict) -> int:
    return text_bytes(choice.get("text"))


class DataStreamReader(StreamReader):
    """A chat or completions stream: `data: <json>` chunks, a usage chunk with `"choices": []` just
    before `data: [DONE]` when asked for, comments as keep-alives, errors as `{"error": ...}`.

    Every chunk is parsed: what is counted does not depend on the provider's JSON formatting."""

    __slots__ = ("_choice_text_bytes", "_expected_choices", "_final", "_finished", "client_wants_usage")

    def __init__(self, facts: RequestFacts, choice_text_bytes: Callable[[dict], int]) -> None:
        super().__init__()
        self.client_wants_usage = facts.client_wants_usage
        self._choice_text_bytes = choice_text_bytes
        self._expected_choices = facts.choices
        self._finished: set[int] = set()  # choice indexes that reported a finish_reason
        self._final = False  # the usage seen is the count for the whole call

    @property
    def has_final_usage(self) -> bool:
        # The usage chunk comes last (`"choices": []`), or (OpenRouter, servers that report usage on
        # every chunk) once every choice finished.
        return self.usage is not None and (self._final or self.done)

    def observed(self, request_bytes: int) -> tuple[Usage, bool]:
        if self.usage is None or self.has_final_usage:
            return super().observed(request_bytes)
        # A running count (servers that report usage on every chunk): exact input, and output at
        # least what the text relayed since suggests.
        output = max(self.usage.output_tokens, estimate_tokens(self.content_chars))
        return replace(self.usage, output_tokens=output), True

    def observe(self, event: SSEEvent) -> bool:
        data = event.data
        if event.is_comment_only or not data:
            return True
        if data == DONE_DATA:
            self.done = True
            return True
        chunk = loads_object(data)
        if chunk is None:
            return True
        error = chunk.get("error")
        if error:
            self.error = error_text(error)
            return True
        if self.model is None:
            self.model = model_of(chunk)
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict):
                self._observe_choice(choice)
        if chunk.get("usage") is None:
            return True
        # A usage that does not parse replaces an earlier one: the latest claim is unreadable, so the
        # call's usage is missing (estimated), never a stale or zero count.
        self.usage = usage_from_object(chunk["usage"])
        self._final = self.usage is not None and (choices == [] or len(self._finished) >= self._expected_choices)
        return not (choices == [] and not self.client_wants_usage)

    def _observe_choice(self, choice: dict) -> None:
        self.content_chars += self._choice_text_bytes(choice)
        if choice.get("finish_reason") is not None and len(self._finished) < CHOICES_MAX:
            index = choice.get("index", 0)
            self._finished.add(index if isinstance(index, int) else -1)
