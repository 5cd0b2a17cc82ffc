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
    (the caller then estimates). Cached, cache-write, audio and image tokens are part of prompt_tokens;
    reasoning, audio and image tokens are part of completion_tokens."""
    if not isinstance(usage, dict):
        return None
    prompt = count(usage.get("prompt_tokens"))
    completion = count(usage.get("completion_tokens"))
    prompt_details = optional_object(usage.get("prompt_tokens_details"))
    completion_details = optional_object(usage.get("completion_tokens_details"))
    if prompt is None or completion is None or prompt_details is None or completion_details is None:
        return None
    return split_counts(prompt, completion, prompt_details, completion_details)


def split_counts(total_input: int, total_output: int, input_details: dict, output_details: dict) -> Usage | None:
    """Totals and their details (OpenAI's shape, chat or Responses) -> disjoint classes, each detail
    clamped to what is left of its total, in the order genai-prices' leaf arithmetic would refuse an
    overlap: cached, cache writes, audio, image; audio, image, reasoning (part of the text output)."""
    details = {
        name: optional_count(source.get(key))
        for name, source, key in (
            ("cached", input_details, "cached_tokens"),
            ("cache_write", input_details, "cache_write_tokens"),
            ("audio_in", input_details, "audio_tokens"),
            ("image_in", input_details, "image_tokens"),
            ("audio_out", output_details, "audio_tokens"),
            ("image_out", output_details, "image_tokens"),
            ("reasoning", output_details, "reasoning_tokens"),
        )
    }
    if any(value is None for value in details.values()):
        return None
    left_in, taken = total_input, {}
    for name in ("cached", "cache_write", "audio_in", "image_in"):
        taken[name] = min(details[name], left_in)
        left_in -= taken[name]
    left_out = total_output
    for name in ("audio_out", "image_out"):
        taken[name] = min(details[name], left_out)
        left_out -= taken[name]
    return Usage(
        input_tokens=left_in,
        output_tokens=left_out,
        cache_read_tokens=taken["cached"],
        cache_write_5m_tokens=taken["cache_write"],
        reasoning_tokens=min(details["reasoning"], left_out),
        input_audio_tokens=taken["audio_in"],
        input_image_tokens=taken["image_in"],
        output_audio_tokens=taken["audio_out"],
        output_image_tokens=taken["image_out"],
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
