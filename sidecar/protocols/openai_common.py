"""What the OpenAI-family protocols share: the error envelope, the usage object of chat and
completions, and the data-only stream those two send."""

from __future__ import annotations

import orjson

from sidecar.pricing import Usage
from sidecar.protocols.base import RequestFacts, StreamReader, count, json_string_length, loads_object
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
    """Chat/completions usage -> disjoint token classes. Cached and cache-write tokens are part of
    prompt_tokens; reasoning tokens are part of completion_tokens."""
    if not isinstance(usage, dict):
        return None
    prompt = count(usage.get("prompt_tokens"))
    completion = count(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    if not isinstance(prompt_details, dict):
        prompt_details = {}
    if not isinstance(completion_details, dict):
        completion_details = {}
    cached = min(count(prompt_details.get("cached_tokens")), prompt)
    cache_write = min(count(prompt_details.get("cache_write_tokens")), prompt - cached)
    return Usage(
        input_tokens=prompt - cached - cache_write,
        output_tokens=completion,
        cache_read_tokens=cached,
        cache_write_5m_tokens=cache_write,
        reasoning_tokens=min(count(completion_details.get("reasoning_tokens")), completion),
    )


def error_of(payload: dict) -> str | None:
    error = payload.get("error")
    if not error:
        return None
    return str(error.get("message") if isinstance(error, dict) else error)[:500]


def model_of(payload: dict) -> str | None:
    model = payload.get("model")
    return model if isinstance(model, str) and model else None


class DataStreamReader(StreamReader):
    """A chat or completions stream: `data: <json>` chunks, a usage chunk with `"choices": []` just
    before `data: [DONE]` when asked for, comments as keep-alives, errors as `{"error": ...}`."""

    __slots__ = ("client_wants_usage", "text_keys")

    @property
    def has_final_usage(self) -> bool:
        return self.usage is not None  # the usage chunk comes last, after every choice finished

    def __init__(self, facts: RequestFacts, text_keys: tuple[bytes, ...]) -> None:
        super().__init__()
        self.client_wants_usage = facts.client_wants_usage
        self.text_keys = text_keys  # the fields whose streamed text counts towards an output estimate

    def observe(self, event: SSEEvent) -> bool:
        data = event.data
        if event.is_comment_only or not data:
            return True
        if data == DONE_DATA:
            self.done = True
            return True
        if self.model is None:
            self.model = _model_in(data)
        # Parse only what can carry usage or an error: most chunks are deltas with "usage":null.
        if b'"usage":{' in data or b'"usage": {' in data or b'"error"' in data:
            return self._observe_json(data)
        for key in self.text_keys:
            self.content_chars += json_string_length(data, key)
        return True

    def _observe_json(self, data: bytes) -> bool:
        chunk = loads_object(data)
        if chunk is None:
            return True
        error = chunk.get("error")
        if error:
            self.error = str(error.get("message") if isinstance(error, dict) else error)[:500]
            return True
        usage = usage_from_object(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
            if chunk.get("choices") == [] and not self.client_wants_usage:
                return False
        return True


def _model_in(data: bytes) -> str | None:
    start = data.find(b'"model":"')
    if start < 0:
        return None
    start += 9
    end = data.find(b'"', start)
    return data[start:end].decode(errors="replace") if end > start else None
