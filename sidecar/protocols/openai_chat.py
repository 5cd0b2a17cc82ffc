"""OpenAI Chat Completions (`POST /v1/chat/completions`), as PROVIDERS.md describes it.

Pure: JSON payloads and SSE events in, facts out. The request handler does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from sidecar.pricing import Usage
from sidecar.protocols.errors import KINDS, SidecarError
from sidecar.sse import SSEEvent

DONE_DATA = b"[DONE]"


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    stream: bool
    client_wants_usage: bool  # the client itself asked for stream_options.include_usage
    max_output_tokens: int | None  # the client's own cap, if it sent one
    choices: int  # `n`: the output cap applies to each choice


def parse_json(body: bytes) -> dict:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SidecarError("invalid_request", f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise SidecarError("invalid_request", "request body must be a JSON object")
    return payload


def _positive_int(payload: dict, name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SidecarError("invalid_request", f"'{name}' must be a positive integer", param=name)
    return value


def read_request(payload: dict) -> ChatRequest:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise SidecarError("invalid_request", "you must provide a model parameter", param="model")
    if not isinstance(payload.get("messages"), list):
        raise SidecarError("invalid_request", "'messages' must be a list", param="messages")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise SidecarError("invalid_request", "'stream' must be a boolean", param="stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise SidecarError("invalid_request", "'stream_options' must be an object", param="stream_options")
    caps = [c for c in (_positive_int(payload, "max_completion_tokens"), _positive_int(payload, "max_tokens")) if c]
    return ChatRequest(
        model=model,
        stream=stream,
        client_wants_usage=bool(stream and options and options.get("include_usage") is True),
        max_output_tokens=min(caps) if caps else None,
        choices=_positive_int(payload, "n") or 1,
    )


def rewrite_request(payload: dict, request: ChatRequest, upstream_model: str, output_cap: int) -> bytes:
    """The body sent upstream: the provider's model id, a real output cap, and usage on streams."""
    payload = dict(payload)
    payload["model"] = upstream_model
    if request.max_output_tokens is None:
        payload["max_completion_tokens"] = output_cap
    if request.stream:
        options = dict(payload.get("stream_options") or {})
        options["include_usage"] = True
        payload["stream_options"] = options
    return orjson.dumps(payload)


def usage_from_object(usage: object) -> Usage | None:
    """OpenAI usage -> disjoint token classes. cached and cache-write tokens are part of prompt_tokens."""
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    cached = min(_count(prompt_details.get("cached_tokens")), prompt)
    cache_write = min(_count(prompt_details.get("cache_write_tokens")), prompt - cached)
    return Usage(
        input_tokens=prompt - cached - cache_write,
        output_tokens=completion,
        cache_read_tokens=cached,
        cache_write_5m_tokens=cache_write,
        reasoning_tokens=min(_count(completion_details.get("reasoning_tokens")), completion),
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def usage_from_body(body: bytes) -> Usage | None:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return usage_from_object(payload.get("usage")) if isinstance(payload, dict) else None


class StreamState:
    """Reads a chat completion stream on the side while it is relayed.

    `observe` returns False for the one event the client must not see: the usage chunk the sidecar
    asked for on the client's behalf.
    """

    __slots__ = ("client_wants_usage", "content_chars", "done", "error", "usage")

    def __init__(self, client_wants_usage: bool) -> None:
        self.client_wants_usage = client_wants_usage
        self.usage: Usage | None = None
        self.error: str | None = None
        self.done = False
        self.content_chars = 0

    def observe(self, event: SSEEvent) -> bool:
        data = event.data
        if event.is_comment_only or not data:
            return True
        if data == DONE_DATA:
            self.done = True
            return True
        # Parse only what can carry usage or an error: most chunks are plain deltas with "usage":null.
        if b'"usage":{' in data or b'"usage": {' in data or b'"error"' in data:
            return self._observe_json(data)
        self.content_chars += _content_chars(data)
        return True

    def _observe_json(self, data: bytes) -> bool:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(chunk, dict):
            return True
        if chunk.get("error"):
            error = chunk["error"]
            self.error = str(error.get("message") if isinstance(error, dict) else error)[:500]
            return True
        usage = usage_from_object(chunk.get("usage"))
        if usage is not None:
            self.usage = usage
            if chunk.get("choices") == [] and not self.client_wants_usage:
                return False
        return True


def _content_chars(data: bytes) -> int:
    # Cheap bound on streamed text for estimates when the stream breaks before usage: the length of
    # the JSON-escaped content values. Precise enough to estimate tokens, never parsed twice.
    start = data.find(b'"content":"')
    if start < 0:
        return 0
    end = data.find(b'"', start + 11)
    while end > 0 and data[end - 1] == 0x5C:  # escaped quote
        end = data.find(b'"', end + 1)
    return max(end - start - 11, 0) if end > 0 else 0


def error_body(error: SidecarError) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": error.message,
                "type": KINDS[error.kind][1],
                "param": error.param,
                "code": error.code,
            }
        }
    )


def estimate_tokens(chars: int) -> int:
    """~4 characters per token: the usual rule of thumb for English text with BPE tokenizers."""
    return -(-chars // 4)
