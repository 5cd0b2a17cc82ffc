"""What every wire protocol module provides, and the pieces they share.

A protocol is pure: request JSON in, facts and a rewritten body out; response bytes or SSE events
in, usage out. The request handler owns all I/O and drives any protocol through this interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from sidecar.pricing import Usage
from sidecar.protocols.errors import SidecarError
from sidecar.sse import SSEEvent

# Request fields only OpenRouter understands; real OpenAI answers 400 to them, so they are removed
# before a call goes to any other provider.
OPENROUTER_ONLY_FIELDS = ("usage", "provider", "models", "route", "transforms", "plugins")


@dataclass(frozen=True, slots=True)
class RequestFacts:
    model: str
    stream: bool
    max_output_tokens: int | None  # the client's own cap, if it sent one
    choices: int = 1  # `n`: the output cap applies to each choice
    client_wants_usage: bool = False  # OpenAI streams: the client itself asked for the usage chunk


@dataclass(frozen=True, slots=True)
class BodyFacts:
    usage: Usage | None
    model: str | None  # the model that actually served the call, when the response names it
    error: str | None = None  # an error inside a 200 body (OpenRouter reports late failures so)


class StreamReader:
    """Reads a stream on the side while it is relayed. `observe` returns False for an event the
    client must not see (the usage chunk the sidecar asked for on the client's behalf)."""

    __slots__ = ("content_chars", "done", "error", "model", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.error: str | None = None
        self.done = False
        self.content_chars = 0
        self.model: str | None = None

    def observe(self, event: SSEEvent) -> bool:
        raise NotImplementedError

    @property
    def has_final_usage(self) -> bool:
        """The provider's own count for the whole call has arrived."""
        return self.usage is not None and self.done

    def observed(self, request_bytes: int) -> tuple[Usage, bool]:
        """What was used so far, and whether it is an estimate: the provider's usage when it sent
        one, else input estimated from the request and output from the text relayed."""
        if self.has_final_usage:
            return self.usage, False
        return Usage(
            input_tokens=estimate_tokens(request_bytes), output_tokens=estimate_tokens(self.content_chars)
        ), True


class Protocol:
    name: str
    route: str  # the sidecar's route
    upstream_path: str  # appended to the provider's base URL
    family: str  # "openai" or "anthropic": which providers can serve it
    has_output = True  # False for embeddings: input-only pricing, no output cap
    cap_field: str | None = None  # injected when the client sent no output cap
    cap_fields: tuple[str, ...] = ()  # every field a provider may read as the output cap

    def read_request(self, payload: dict) -> RequestFacts:
        raise NotImplementedError

    def rewrite_request(
        self, payload: dict, facts: RequestFacts, upstream_model: str, output_cap: int, to_openrouter: bool
    ) -> bytes:
        """The body sent upstream: the provider's model id and a real output cap."""
        return orjson.dumps(self.rewrite_payload(payload, facts, upstream_model, output_cap, to_openrouter))

    def rewrite_payload(
        self, payload: dict, facts: RequestFacts, upstream_model: str, output_cap: int, to_openrouter: bool
    ) -> dict:
        out = dict(payload)
        out["model"] = upstream_model
        # Every cap field the client sent is set to the one cap the hold was priced with: a provider
        # that reads another field than we did must not generate past the ceiling.
        sent = [name for name in self.cap_fields if name in out]
        for name in sent:
            out[name] = output_cap
        if self.cap_field and not sent:
            out[self.cap_field] = output_cap
        if not to_openrouter:
            for name in OPENROUTER_ONLY_FIELDS:
                out.pop(name, None)
        return out

    def read_body(self, body: bytes) -> BodyFacts:
        raise NotImplementedError

    def stream_reader(self, facts: RequestFacts) -> StreamReader:
        raise NotImplementedError

    def error_body(self, error: SidecarError) -> bytes:
        raise NotImplementedError

    def stream_error(self, message: str) -> bytes:
        """An SSE event telling a client, mid-stream, that the provider's stream broke off."""
        raise NotImplementedError

    def client_key(self, headers) -> str | None:
        return bearer_token(headers.get("Authorization"))


# Request parts whose tokens are not bounded by their bytes (an image URL is a few bytes and
# hundreds of tokens): their presence bounds the input by the model's context window instead.
_MEDIA_MARKERS = (
    b'"image_url"',
    b'"input_audio"',
    b'"input_image"',
    b'"input_file"',
    b'"file_id"',
    b'"file_data"',
    b'"type":"image"',
    b'"type": "image"',
    b'"type":"document"',
    b'"type": "document"',
)


def may_carry_media(body: bytes) -> bool:
    return any(marker in body for marker in _MEDIA_MARKERS)


def bearer_token(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


def parse_json(body: bytes) -> dict:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SidecarError("invalid_request", f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise SidecarError("invalid_request", "request body must be a JSON object")
    return payload


def loads_object(data: bytes) -> dict | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def positive_int(payload: dict, name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SidecarError("invalid_request", f"'{name}' must be a positive integer", param=name)
    return value


def require_model(payload: dict) -> str:
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise SidecarError("invalid_request", "you must provide a model parameter", param="model")
    return model


def require_stream_flag(payload: dict) -> bool:
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise SidecarError("invalid_request", "'stream' must be a boolean", param="stream")
    return stream


MAX_TOKEN_COUNT = 10**12  # no call uses more; a larger count from a provider is nonsense, clamped


def count(value: object) -> int:
    """A token count from a provider: anything but a non-negative int counts as 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return min(value, MAX_TOKEN_COUNT)
    return 0


def estimate_tokens(chars: int) -> int:
    """~4 characters per token: the usual rule of thumb for English text with BPE tokenizers."""
    return -(-chars // 4)


def json_string_length(data: bytes, key: bytes) -> int:
    """Length of the JSON string value after `"key":"` in `data` (0 if absent): a cheap measure of
    streamed text for estimates, without parsing the event."""
    marker = b'"' + key + b'":"'
    start = data.find(marker)
    if start < 0:
        return 0
    start += len(marker)
    end = data.find(b'"', start)
    while end > 0 and data[end - 1] == 0x5C:  # an escaped quote
        end = data.find(b'"', end + 1)
    return max(end - start, 0) if end > 0 else 0
