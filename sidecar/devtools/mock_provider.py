"""A deterministic OpenAI-, Anthropic- and OpenRouter-compatible provider for tests, `sidecar dev` and benchmarks.

OpenAI clients use the base URL `http://HOST:PORT/v1`, Anthropic clients `http://HOST:PORT` (the SDK adds
`/v1/messages`). Routes:
- `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/responses` (streamed and not),
  `POST /v1/embeddings`: OpenAI wire formats.
- `POST /v1/messages` (streamed and not): Anthropic Messages.
- `GET /v1/models`: an Anthropic-shaped list (`{"data": [{"type": "model", ...}], "has_more": false,
  "first_id", "last_id"}`) when the request carries `anthropic-version` or `x-api-key`, else OpenAI's.
- `GET /healthz`. Any other `/v1/...` path answers a 404 (Anthropic envelope for Anthropic-looking requests).
With `MockOptions.flavor == "openrouter"` (`--flavor openrouter`) the same routes also live under `/api/v1/...`
(plus `GET /api/v1/key`), see "OpenRouter flavour" below.

Usage is a pure function of the request, so tests can predict it exactly ("chars" = characters of text):
- Chat: prompt_tokens = chars of every message's text // 4 + 1 per message, where a message's text is its
  `content` string, or the `text` of each part when `content` is a list of parts (`prompt_tokens_for`).
- Completions: prompt_tokens = chars of the string prompts // 4 + 1 per string prompt + the length of each
  token-array prompt (`completion_prompt_tokens_for`). A list of N prompts gets N choices (index 0..N-1), each
  with the full answer, so completion_tokens = N x the content chunks. `n`, `echo`, `suffix` are ignored.
- Embeddings: prompt_tokens = total_tokens = the same rule over `input` (`embedding_tokens_for`). Each input
  gets `dimensions` (default 8) floats in [-1, 1) derived from a hash of the input (`embedding_for`); they are
  exact float32 values, so `encoding_format: "base64"` (little-endian float32, what the openai SDK asks for by
  default) decodes to the same list as `"float"`.
- Responses: input_tokens = chars of `instructions` (when a string) and of `input` // 4 + 1 per input item; a
  string `input` is one item, a list item's text is its `content` string or the `text` of each content part
  (`responses_input_tokens_for`). `output_tokens_details.reasoning_tokens` is always 0.
- Anthropic Messages: input_tokens = chars of `system` (a string or text blocks) and of every message (a string
  or blocks' `text`) // 4 + 1 per message (`anthropic_input_tokens_for`).
- Output: the number of content chunks sent; chunk k carries the text `f"tok{k} "`. The count is `chunks`
  (default 8), capped by the route's output cap: chat `max_completion_tokens` / `max_tokens` (the smaller if
  both are sent), completions and Anthropic `max_tokens`, Responses `max_output_tokens`. When the cap cut the
  answer short: chat/completions `finish_reason` "length" (else "stop"), Anthropic `stop_reason` "max_tokens"
  (else "end_turn"), Responses `status` "incomplete" with `incomplete_details.reason` "max_output_tokens" and
  an "incomplete" message item (else "completed").
- Cache, set explicitly per request by headers (default 0):
  - `x-mock-cache-read: M`: OpenAI-style routes (chat, completions, responses) report M cached tokens INSIDE
    the prompt: prompt/input tokens = the formula + M, `cached_tokens` = M. Anthropic reports them OUTSIDE:
    input_tokens = the formula, `cache_read_input_tokens` = M.
  - `x-mock-cache-write-5m: W5`, `x-mock-cache-write-1h: W1` (Anthropic only): `cache_creation_input_tokens`
    = W5 + W1 and `cache_creation` = {ephemeral_5m_input_tokens: W5, ephemeral_1h_input_tokens: W1}.
  Anthropic honours the three only when the request has a `cache_control` marker (top level, on a `system`
  block, a message content block or a tool); without one its cache fields are all 0, as Anthropic's would be.
- `x-mock-web-searches: S` (Anthropic only): the call ran S web searches, at most the sum of its
  `web_search*` tools' `max_uses` (as Anthropic stops there): `usage.server_tool_use.web_search_requests`.

Streaming follows each wire format:
- Chat: data-only SSE: a role chunk, one chunk per content token, a chunk with the finish_reason, then (only
  with `stream_options.include_usage`) a chunk with `"choices": []` and the usage, then `data: [DONE]`. With
  include_usage every other chunk carries `"usage": null`.
- Completions: the same, without the role chunk: chunks with `choices[i].text`, then one chunk per choice with
  text "" and the finish_reason, the usage chunk (include_usage) and `data: [DONE]`.
- Responses: named events `event: <type>` + `data: {"type": <type>, ..., "sequence_number": n}` (n from 0):
  response.created, response.in_progress, response.output_item.added, response.content_part.added,
  response.output_text.delta (one per chunk), response.output_text.done, response.content_part.done,
  response.output_item.done, then response.completed or response.incomplete carrying the whole response with
  its usage. No [DONE].
- Anthropic: message_start (usage: input and cache counts, output_tokens 1), content_block_start, ping,
  content_block_delta (text_delta) per chunk, content_block_stop, message_delta (stop_reason and CUMULATIVE
  output_tokens), message_stop. No [DONE]. `x-mock-progress-deltas: 1` adds a message_delta (stop_reason null,
  cumulative output_tokens) after every content chunk; `x-mock-full-delta-usage: 1` makes every message_delta
  also carry input_tokens, cache_creation_input_tokens and cache_read_input_tokens (equal to message_start's,
  as newer API versions send them: a client must not add them twice).

Like api.openai.com, the OpenAI routes answer 400 to a `stream_options` on a non-streamed chat or completions
request and to a top-level `usage` field (OpenRouter-only), so a proxy that forwards either is caught by tests.
Anthropic requests need `model`, `messages` and `max_tokens` (400 `invalid_request_error` otherwise);
`anthropic-version` is not required.

Faults are driven per request by headers (defaults come from MockOptions / the CLI flags), on every route:
- `x-mock-status: 503`: answer that status at once with the protocol's error envelope. OpenAI: `x-mock-error-code`
  overrides `error.code` (e.g. `insufficient_quota`). Anthropic: the type follows the status (400
  invalid_request_error, 401 authentication_error, 402 billing_error, 403 permission_error, 404
  not_found_error, 413 request_too_large, 429 rate_limit_error, 500 api_error, 504 timeout_error, 529
  overloaded_error; other 4xx invalid_request_error, 5xx api_error) and `x-mock-error-code` overrides it.
  OpenRouter: `{"error": {"code": <status>, "message", "metadata": {"provider_name", "raw": <error code>}}}`.
- `x-mock-chunks: N`: number of content chunks before any cap.
- `x-mock-delay-ms: D`: sleep D ms before each content chunk (non-streamed: before answering, per chunk;
  embeddings: once).
- `x-mock-first-byte-delay-ms: D`: sleep D ms before the response headers.
- `x-mock-cut-after: K`: streamed: after K content chunks, close the connection mid-body (the client sees an
  incomplete chunked body); if K is not below the chunk count, the cut comes after the last content chunk,
  so the stream never completes. Non-streamed: close the connection without any response.
- `x-mock-error-after: K`: streamed: after K content chunks send the protocol's mid-stream error and end the
  body cleanly (no usage, no [DONE], no terminal event); same rule for large K. Chat/completions:
  `data: {"error": {...}}`; Responses: `event: error` + `{"type": "error", "code": "server_error", "message",
  "param": null, "sequence_number"}`; Anthropic: `event: error` + `{"type": "error", "error": {"type":
  "overloaded_error", "message": "Overloaded"}}`. Non-streamed: a 500 error envelope.
- `x-mock-reset: 1`: reset the connection (TCP RST) without any response.
- `x-mock-served-model: X`: the response's `model` is X instead of the requested one (a provider fallback).
- `x-mock-usage-lie: KIND` (chat and completions): the usage's prompt/completion/total token counts lie
  (`USAGE_LIES`): `inflated` (x1000 + 1,000,000, far past the output cap), `negative` (-n - 1), `float`
  (n + 0.5), `string` ("n"), `absurd` (2^64 - 1), `missing` (the three counts left out). The content is unchanged.

OpenRouter flavour (`flavor="openrouter"`): the OpenAI-compatible routes, `/messages` and `/models` are served
under `/api/v1/...` as well as `/v1/...`; OpenAI-compatible routes then: accept a top-level `usage` field;
always include usage in chat/completions streams (as if include_usage were set); add `"cost"` (credits:
`openrouter_cost`, 1 per million prompt tokens + 2 per million completion tokens), `"is_byok": false` and
`"cost_details": {"upstream_inference_cost": null}` to every usage; begin every stream with the comment line
`: OPENROUTER PROCESSING`; answer errors in OpenRouter's envelope; send a chat/completions mid-stream error as a
chunk with a top-level `error` (`{"code": "server_error", "message"}`) and `finish_reason: "error"`.
`GET /api/v1/key` answers 200 `{"data": {"label", "usage": 0, "limit": null, ...}}` for a valid key, else 401.

Auth: OpenAI-compatible routes need `Authorization: Bearer <non-empty>` (401 otherwise: OpenAI `invalid_api_key`
or OpenRouter envelope); `/v1/messages` and Anthropic-looking `/v1/models` take `x-api-key` or a bearer token
(401 `authentication_error`). When `MockOptions.accepted_keys` is non-empty only those keys pass (for Anthropic,
any presented key that is accepted). Fault headers are read before auth, the injected status after it; a bad
fault header is a 400.

The last `max_recorded_requests` requests to `/v1/...` and `/api/v1/...` (including rejected ones) are kept in
`app[RECORDED]`, newest last, so tests can assert what a proxy forwarded (headers hold the key used).

Deterministic on purpose: ids come from a per-app counter and `created` / `created_at` are a fixed timestamp.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from sidecar.errors import ControlFlow

__all__ = [
    "FAULT_HEADERS",
    "FLAVORS",
    "PORT_DEFAULT",
    "RECORDED",
    "REJECTED_KEYS",
    "USAGE_LIES",
    "MockOptions",
    "RecordedRequest",
    "anthropic_input_tokens_for",
    "build_app",
    "completion_prompt_tokens_for",
    "embedding_for",
    "embedding_tokens_for",
    "main",
    "openrouter_cost",
    "prompt_tokens_for",
    "responses_input_tokens_for",
    "run",
]

PORT_DEFAULT = 8900
MODELS_DEFAULT = ("gpt-4o-mini", "gpt-4o", "mock-model")
FLAVORS = ("openai", "openrouter")
# Bounds on what a header or flag may ask for, so one request cannot pin the server.
CHUNKS_MAX = 100_000
DELAY_MS_MAX = 600_000
CACHE_TOKENS_MAX = 100_000_000
EMBEDDING_DIMENSIONS_MAX = 4096
REQUEST_BYTES_MAX = 32 * 1024 * 1024
EMBEDDING_DIMENSIONS_DEFAULT = 8
# A fixed `created` keeps whole responses byte-for-byte reproducible.
CREATED_AT = 1_700_000_000
CREATED_AT_ISO = "2023-11-14T22:13:20Z"  # CREATED_AT as RFC 3339, for Anthropic's model list
SYSTEM_FINGERPRINT = "fp_mock"

# The protocol a route speaks, which picks its error envelope and how it reads the key.
_OPENAI = "openai"
_OPENROUTER = "openrouter"
_ANTHROPIC = "anthropic"


@dataclass(frozen=True, slots=True)
class MockOptions:
    chunks: int = 8
    chunk_delay_ms: float = 0.0
    first_byte_delay_ms: float = 0.0
    status: int | None = None
    error_code: str | None = None
    cut_after: int | None = None
    error_after: int | None = None
    reset: bool = False
    accepted_keys: Set[str] = frozenset()
    models: tuple[str, ...] = MODELS_DEFAULT
    max_recorded_requests: int = 1000
    flavor: str = "openai"
    """"openai" or "openrouter" (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: CIMultiDict[str]
    """Case-insensitive: `headers["authorization"]` and `headers["Authorization"]` both work."""
    query: dict[str, str]
    json_body: Any
    """The parsed JSON body; None when there was none or it was not JSON."""


# Every per-request knob, for a proxy in front of the mock to forward (its `forward_headers`).
FAULT_HEADERS = (
    "x-mock-status",
    "x-mock-error-code",
    "x-mock-chunks",
    "x-mock-delay-ms",
    "x-mock-first-byte-delay-ms",
    "x-mock-cut-after",
    "x-mock-error-after",
    "x-mock-reset",
    "x-mock-cache-read",
    "x-mock-cache-write-5m",
    "x-mock-cache-write-1h",
    "x-mock-progress-deltas",
    "x-mock-full-delta-usage",
    "x-mock-served-model",
    "x-mock-usage-lie",
    "x-mock-web-searches",
)

# How `x-mock-usage-lie` falsifies an OpenAI chat/completions usage object (a provider that lies).
USAGE_LIES = ("inflated", "negative", "float", "string", "absurd", "missing")
_ABSURD_TOKENS = 2**64 - 1  # beyond int64 and 2**53 (the most orjson writes)

RECORDED = web.AppKey("mock_recorded_requests", deque)
REJECTED_KEYS = web.AppKey("mock_rejected_keys", set)
"""`app[REJECTED_KEYS]`: a mutable set of keys answered with 401 from now on (a customer's key that
was valid when stored and is revoked later, say)."""
"""`app[RECORDED]`: a deque[RecordedRequest] bounded by MockOptions.max_recorded_requests."""


# ---- token rules --------------------------------------------------------------------------------------------


def _text_chars(content: Any) -> int:
    """Characters of a content string, or of the `text` of each part when content is a list of parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"]) for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _messages_chars(messages: list[Any]) -> int:
    return sum(_text_chars(message.get("content")) for message in messages if isinstance(message, dict))


def prompt_tokens_for(payload: Any) -> int:
    """Prompt tokens the mock bills for a chat request: text characters // 4 + 1 per message."""
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list):
        return 0
    return _messages_chars(messages) // 4 + len(messages)


def anthropic_input_tokens_for(payload: Any) -> int:
    """Input tokens (uncached) for an Anthropic Messages request: chars of system and messages // 4 + 1 per
    message."""
    if not isinstance(payload, dict):
        return 0
    messages = payload.get("messages")
    if not isinstance(messages, list):
        messages = []
    return (_text_chars(payload.get("system")) + _messages_chars(messages)) // 4 + len(messages)


def responses_input_tokens_for(payload: Any) -> int:
    """Input tokens (uncached) for a Responses request: chars of instructions and input // 4 + 1 per item."""
    if not isinstance(payload, dict):
        return 0
    instructions = payload.get("instructions")
    chars = len(instructions) if isinstance(instructions, str) else 0
    items = payload.get("input")
    if isinstance(items, str):
        return (chars + len(items)) // 4 + 1
    if not isinstance(items, list):
        return chars // 4
    chars += sum(_text_chars(item.get("content")) for item in items if isinstance(item, dict))
    return chars // 4 + len(items)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text_inputs(value: Any, name: str) -> list[str | list[int]]:
    """A completions `prompt` or embeddings `input` as a list of inputs: strings and token arrays."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(_is_int(token) for token in value):
            return [value]
        if all(isinstance(v, str) or (isinstance(v, list) and all(_is_int(t) for t in v)) for v in value):
            return list(value)
    raise _BadRequest(
        f"'{name}' must be a string, an array of strings, an array of tokens or an array of token arrays.", name
    )


def _text_inputs_tokens(inputs: list[str | list[int]]) -> int:
    strings = [text for text in inputs if isinstance(text, str)]
    token_arrays = sum(len(tokens) for tokens in inputs if isinstance(tokens, list))
    return sum(map(len, strings)) // 4 + len(strings) + token_arrays


def completion_prompt_tokens_for(payload: Any) -> int:
    """Prompt tokens for a completions request: chars of the string prompts // 4 + 1 per string prompt + the
    length of each token-array prompt (0 for an invalid prompt)."""
    try:
        return _text_inputs_tokens(_text_inputs(payload.get("prompt") if isinstance(payload, dict) else None, "prompt"))
    except _BadRequest:
        return 0


def embedding_tokens_for(payload: Any) -> int:
    """Prompt tokens for an embeddings request: the completions rule applied to `input`."""
    try:
        return _text_inputs_tokens(_text_inputs(payload.get("input") if isinstance(payload, dict) else None, "input"))
    except _BadRequest:
        return 0


def embedding_for(value: str | list[int], dimensions: int = EMBEDDING_DIMENSIONS_DEFAULT) -> list[float]:
    """The mock's embedding of one input: floats in [-1, 1), each exactly representable as a float32."""
    data = value.encode() if isinstance(value, str) else orjson.dumps(value)
    digest = hashlib.shake_256(data).digest(2 * dimensions)
    return [number / 32768 - 1 for number in struct.unpack(f"<{dimensions}H", digest)]


def openrouter_cost(prompt_tokens: int, completion_tokens: int) -> float:
    """The `usage.cost` (credits) of the OpenRouter flavour: 1 per million prompt tokens, 2 per million
    completion tokens."""
    return (prompt_tokens + 2 * completion_tokens) / 1_000_000


# ---- errors ---------------------------------------------------------------------------------------------


class _BadRequest(ControlFlow):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _error_response(
    status: int, message: str, error_type: str, code: str | None = None, param: str | None = None
) -> web.Response:
    return _json({"error": {"message": message, "type": error_type, "param": param, "code": code}}, status)


def _anthropic_error_response(status: int, error_type: str, message: str) -> web.Response:
    return _json({"type": "error", "error": {"type": error_type, "message": message}}, status)


def _openrouter_error_response(status: int, message: str, metadata: dict[str, Any] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message}
    if metadata is not None:
        error["metadata"] = metadata
    return _json({"error": error}, status)


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _bad_request(error: _BadRequest, protocol: str = _OPENAI) -> web.Response:
    if protocol == _ANTHROPIC:
        return _anthropic_error_response(400, "invalid_request_error", error.message)
    if protocol == _OPENROUTER:
        return _openrouter_error_response(400, error.message)
    return _error_response(400, error.message, "invalid_request_error", param=error.param)


def _unauthorized(protocol: str) -> web.Response:
    if protocol == _ANTHROPIC:
        return _anthropic_error_response(401, "authentication_error", "invalid x-api-key")
    if protocol == _OPENROUTER:
        return _openrouter_error_response(401, "User not found.")
    return _error_response(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")


def _not_found(request: web.Request, protocol: str) -> web.Response:
    message = f"Invalid URL ({request.method} {request.path})"
    if protocol == _ANTHROPIC:
        return _anthropic_error_response(404, "not_found_error", message)
    if protocol == _OPENROUTER:
        return _openrouter_error_response(404, message)
    return _error_response(404, message, "invalid_request_error")


def _injected_error(status: int, code: str | None, protocol: str = _OPENAI) -> web.Response:
    message = f"mock provider injected status {status}"
    if protocol == _ANTHROPIC:
        error_type = code or _ANTHROPIC_ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        return _anthropic_error_response(status, error_type, message)
    if protocol == _OPENROUTER:
        return _openrouter_error_response(status, message, {"provider_name": "mock-provider", "raw": code})
    if status == 401:
        error_type, default_code = "invalid_request_error", "invalid_api_key"
    elif status == 404:
        error_type, default_code = "invalid_request_error", "model_not_found"
    elif status == 429:
        error_type, default_code = "requests", "rate_limit_exceeded"
    elif status >= 500:
        error_type, default_code = "server_error", None
    else:
        error_type, default_code = "invalid_request_error", None
    code = code or default_code
    if code == "insufficient_quota":
        error_type = "insufficient_quota"  # as OpenAI sends it
    return _error_response(status, message, error_type, code)


# ---- per-request knobs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Faults:
    """The knobs in force for one request: MockOptions overridden by x-mock-* headers."""

    status: int | None
    error_code: str | None
    chunks: int
    chunk_delay_ms: float
    first_byte_delay_ms: float
    cut_after: int | None
    error_after: int | None
    reset: bool
    # Answer shaping rather than faults.
    served_model: str | None
    cache_read: int
    cache_write_5m: int
    cache_write_1h: int
    progress_deltas: bool
    full_delta_usage: bool
    usage_lie: str | None = None
    web_searches: int = 0


def _int_header(request: web.Request, name: str, default: int | None, low: int, high: int) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise _BadRequest(f"header {name} must be an integer", name) from None
    if not low <= number <= high:
        raise _BadRequest(f"header {name} must be between {low} and {high}", name)
    return number


def _delay_header(request: web.Request, name: str, default: float) -> float:
    value = request.headers.get(name)
    if value is None:
        return default
    try:
        delay_ms = float(value)
    except ValueError:
        raise _BadRequest(f"header {name} must be a number of milliseconds", name) from None
    if not 0 <= delay_ms <= DELAY_MS_MAX:  # also rejects NaN
        raise _BadRequest(f"header {name} must be between 0 and {DELAY_MS_MAX}", name)
    return delay_ms


def _flag_header(request: web.Request, name: str, default: bool = False) -> bool:
    value = request.headers.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes")


def _faults_for(request: web.Request, options: MockOptions) -> _Faults:
    def tokens(name: str) -> int:
        return _int_header(request, name, 0, 0, CACHE_TOKENS_MAX) or 0

    return _Faults(
        status=_int_header(request, "x-mock-status", options.status, 400, 599),
        error_code=request.headers.get("x-mock-error-code", options.error_code),
        chunks=_int_header(request, "x-mock-chunks", options.chunks, 0, CHUNKS_MAX) or 0,
        chunk_delay_ms=_delay_header(request, "x-mock-delay-ms", options.chunk_delay_ms),
        first_byte_delay_ms=_delay_header(request, "x-mock-first-byte-delay-ms", options.first_byte_delay_ms),
        cut_after=_int_header(request, "x-mock-cut-after", options.cut_after, 0, CHUNKS_MAX),
        error_after=_int_header(request, "x-mock-error-after", options.error_after, 0, CHUNKS_MAX),
        reset=_flag_header(request, "x-mock-reset", options.reset),
        served_model=request.headers.get("x-mock-served-model") or None,
        cache_read=tokens("x-mock-cache-read"),
        cache_write_5m=tokens("x-mock-cache-write-5m"),
        cache_write_1h=tokens("x-mock-cache-write-1h"),
        progress_deltas=_flag_header(request, "x-mock-progress-deltas"),
        full_delta_usage=_flag_header(request, "x-mock-full-delta-usage"),
        usage_lie=_usage_lie_header(request),
        web_searches=tokens("x-mock-web-searches"),
    )


def _web_search_uses_max(body: dict[str, Any]) -> int:
    """The searches an Anthropic request allows: the sum of its web_search tools' `max_uses` (one without
    it: unbounded, as far as the mock goes)."""
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    total = 0
    for tool in tools:
        if isinstance(tool, dict) and str(tool.get("type", "")).startswith("web_search"):
            uses = tool.get("max_uses")
            total += uses if isinstance(uses, int) and uses > 0 else CACHE_TOKENS_MAX
    return total


def _usage_lie_header(request: web.Request) -> str | None:
    value = request.headers.get("x-mock-usage-lie")
    if value is None:
        return None
    if value not in USAGE_LIES:
        raise _BadRequest(f"header x-mock-usage-lie must be one of {', '.join(USAGE_LIES)}", "x-mock-usage-lie")
    return value


def _lie_about(usage: dict[str, Any], lie: str | None) -> dict[str, Any]:
    """The usage a lying provider reports instead of the true one (see `x-mock-usage-lie`)."""
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    if lie is None:
        return usage
    if lie == "missing":
        return {name: value for name, value in usage.items() if name not in counts}
    falsify: dict[str, Callable[[int], Any]] = {
        "inflated": lambda n: n * 1000 + 1_000_000,
        "negative": lambda n: -n - 1,
        "float": lambda n: n + 0.5,
        "string": str,
        "absurd": lambda _n: _ABSURD_TOKENS,
    }
    return {**usage, **{name: falsify[lie](usage[name]) for name in counts}}


# ---- request validation -----------------------------------------------------------------------------------


def _output_cap(payload: dict[str, Any], names: tuple[str, ...]) -> int | None:
    caps = []
    for name in names:
        value = payload.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise _BadRequest(f"Invalid '{name}': expected an integer of at least 1.", name)
        caps.append(value)
    return min(caps) if caps else None


def _validate_openai(payload: Any, allow_usage_field: bool) -> dict[str, Any]:
    """Checks every OpenAI-compatible route shares."""
    if not isinstance(payload, dict):
        raise _BadRequest("We could not parse the JSON body of your request.")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise _BadRequest("you must provide a model parameter", "model")
    if "usage" in payload and not allow_usage_field:
        raise _BadRequest("Unrecognized request argument supplied: usage", "usage")
    return payload


def _check_stream_options(payload: dict[str, Any]) -> None:
    if payload.get("stream_options") is not None and payload.get("stream") is not True:
        raise _BadRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")


def _validate_messages(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise _BadRequest("There was an error parsing the body of your request.")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise _BadRequest("model: Field required")
    if not isinstance(payload.get("messages"), list):
        raise _BadRequest("messages: Field required")
    if payload.get("max_tokens") is None:
        raise _BadRequest("max_tokens: Field required")
    system = payload.get("system")
    if system is not None and not isinstance(system, str | list):
        raise _BadRequest("system: Input should be a valid string or a list of blocks")
    return payload


def _has_cache_control(payload: dict[str, Any]) -> bool:
    """Whether an Anthropic request marks anything for prompt caching."""
    if payload.get("cache_control") is not None:
        return True
    blocks: list[Any] = []
    for name in ("system", "tools"):
        if isinstance(payload.get(name), list):
            blocks.extend(payload[name])
    for message in payload["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            blocks.extend(content)
    return any(isinstance(block, dict) and block.get("cache_control") is not None for block in blocks)


# ---- wire helpers -------------------------------------------------------------------------------------------


def _close_connection(request: web.Request, reset: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes close send a TCP RST instead of a FIN: a "connection reset by peer".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


async def _sleep_ms(delay_ms: float) -> None:
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _named_sse(body: dict[str, Any]) -> bytes:
    """A named event whose name is the body's `type` (Responses and Anthropic streams)."""
    return b"event: " + body["type"].encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"


def _text(tokens: int) -> str:
    return "".join(f"tok{index} " for index in range(tokens))


_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_OPENROUTER_PROCESSING = b": OPENROUTER PROCESSING\n\n"
_MID_STREAM_ERROR = _sse(
    {
        "error": {
            "message": "mock provider injected a mid-stream error",
            "type": "server_error",
            "param": None,
            "code": "mock_stream_error",
        }
    }
)
_ANTHROPIC_MID_STREAM_ERROR = _named_sse(
    {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
)


@dataclass(frozen=True, slots=True)
class _Stream:
    """One streamed answer: the bytes before, per and after the content chunks, and the mid-stream error."""

    head: bytes
    piece: Callable[[int], bytes]
    """The bytes for content chunk k."""
    tail: bytes
    error: Callable[[int], bytes]
    """The mid-stream error sent after k content chunks."""


class _MockProvider:
    def __init__(self, options: MockOptions) -> None:
        if options.flavor not in FLAVORS:
            raise ValueError(f"MockOptions.flavor must be one of {FLAVORS}, not {options.flavor!r}")
        self.options = options
        self.openrouter = options.flavor == _OPENROUTER
        # The protocol of the OpenAI-compatible routes: OpenRouter's differs only in its errors.
        self.openai_protocol = _OPENROUTER if self.openrouter else _OPENAI
        self.recorded: deque[RecordedRequest] = deque(maxlen=max(1, options.max_recorded_requests))
        self.rejected: set[str] = set()
        self._next_id = itertools.count(1)

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._next_id):08d}"

    async def _receive(self, request: web.Request, protocol: str) -> tuple[Any, _Faults | web.StreamResponse]:
        """Read and record the request, resolve its faults, check auth and injected status.

        Returns the parsed body and either the faults to apply or the response to send instead."""
        body = await request.read()
        try:
            payload = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            payload = None
        self.recorded.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers=CIMultiDict(request.headers),
                query=dict(request.query),
                json_body=payload,
            )
        )
        try:
            faults = _faults_for(request, self.options)
        except _BadRequest as error:
            return payload, _bad_request(error, protocol)
        if faults.reset:
            _close_connection(request, reset=True)
            return payload, web.Response()  # never sent: the connection is gone
        keys = _presented_keys(request, protocol)
        accepted = self.options.accepted_keys
        if not keys or (accepted and not any(key in accepted for key in keys)):
            return payload, _unauthorized(protocol)
        if any(key in self.rejected for key in keys):
            return payload, _unauthorized(protocol)
        if faults.status is not None:
            return payload, _injected_error(faults.status, faults.error_code, protocol)
        return payload, faults

    async def _reply(
        self, request: web.Request, faults: _Faults, protocol: str, chunks: int, body: Callable[[], Any]
    ) -> web.StreamResponse:
        """A non-streamed answer, with the faults that apply to one."""
        await _sleep_ms(faults.chunk_delay_ms * chunks)
        if faults.cut_after is not None:
            _close_connection(request, reset=False)
            return web.Response()  # never sent: the connection is gone
        if faults.error_after is not None:
            return _injected_error(500, faults.error_code, protocol)
        return _json(body())

    async def _stream(self, request: web.Request, faults: _Faults, chunks: int, stream: _Stream) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        await response.write(stream.head)
        # One pass more than the content chunks, so a cut or error at or beyond the end still fires.
        for index in range(chunks + 1):
            at_end = index == chunks
            if faults.cut_after is not None and (index == faults.cut_after or at_end):
                _close_connection(request, reset=False)
                return response
            if faults.error_after is not None and (index == faults.error_after or at_end):
                await response.write(stream.error(index))
                await response.write_eof()
                return response
            if at_end:
                break
            await _sleep_ms(faults.chunk_delay_ms)
            await response.write(stream.piece(index))
        await response.write(stream.tail)
        await response.write_eof()
        return response

    # ---- OpenAI-compatible routes -------------------------------------------------------------------------

    def _openai_usage(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int, lie: str | None = None
    ) -> dict[str, Any]:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        return _lie_about(self._with_cost(usage, prompt_tokens, completion_tokens), lie)

    def _with_cost(self, usage: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if self.openrouter:
            usage["cost"] = openrouter_cost(prompt_tokens, completion_tokens)
            usage["is_byok"] = False
            usage["cost_details"] = {"upstream_inference_cost": None}
        return usage

    def _stream_error(self, envelope: dict[str, Any], choices: int) -> bytes:
        """The chat/completions mid-stream error."""
        if not self.openrouter:
            return _MID_STREAM_ERROR
        body = {
            **envelope,
            "error": {"code": "server_error", "message": "mock provider injected a mid-stream error"},
            "choices": [
                {"index": index, "delta": {"content": ""}, "finish_reason": "error"} for index in range(choices)
            ],
        }
        return _sse(body)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        protocol = self.openai_protocol
        payload, faults = await self._receive(request, protocol)
        if isinstance(faults, web.StreamResponse):
            return faults
        try:
            chat = _validate_openai(payload, allow_usage_field=self.openrouter)
            if not isinstance(chat.get("messages"), list):
                raise _BadRequest("'messages' is a required property", "messages")
            _check_stream_options(chat)
            cap = _output_cap(chat, ("max_completion_tokens", "max_tokens"))
        except _BadRequest as error:
            return _bad_request(error, protocol)
        stream_options = chat.get("stream_options")
        include_usage = self.openrouter or (
            isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        )
        completion_id = self._id("chatcmpl-mock")
        model = faults.served_model or chat["model"]
        completion_tokens = faults.chunks if cap is None else min(faults.chunks, cap)
        finish_reason = "length" if completion_tokens < faults.chunks else "stop"
        prompt_tokens = prompt_tokens_for(chat) + faults.cache_read
        await _sleep_ms(faults.first_byte_delay_ms)

        if chat.get("stream") is not True:
            return await self._reply(
                request,
                faults,
                protocol,
                completion_tokens,
                lambda: {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": CREATED_AT,
                    "model": model,
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": _text(completion_tokens), "refusal": None},
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                    "usage": self._openai_usage(prompt_tokens, completion_tokens, faults.cache_read, faults.usage_lie),
                },
            )

        envelope = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED_AT,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

        def chunk(delta: dict[str, Any], reason: str | None) -> bytes:
            body = {**envelope, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        tail = chunk({}, finish_reason)
        if include_usage:
            usage = self._openai_usage(prompt_tokens, completion_tokens, faults.cache_read, faults.usage_lie)
            tail += _sse({**envelope, "choices": [], "usage": usage})
        error = self._stream_error(envelope, 1)
        stream = _Stream(
            head=(_OPENROUTER_PROCESSING if self.openrouter else b"")
            + chunk({"role": "assistant", "content": "", "refusal": None}, None),
            piece=lambda index: chunk({"content": f"tok{index} "}, None),
            tail=tail + b"data: [DONE]\n\n",
            error=lambda _index: error,
        )
        return await self._stream(request, faults, completion_tokens, stream)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        protocol = self.openai_protocol
        payload, faults = await self._receive(request, protocol)
        if isinstance(faults, web.StreamResponse):
            return faults
        try:
            body = _validate_openai(payload, allow_usage_field=self.openrouter)
            prompts = _text_inputs(body.get("prompt"), "prompt")
            _check_stream_options(body)
            cap = _output_cap(body, ("max_tokens",))
        except _BadRequest as error:
            return _bad_request(error, protocol)
        stream_options = body.get("stream_options")
        include_usage = self.openrouter or (
            isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        )
        choices = len(prompts)
        completion_id = self._id("cmpl-mock")
        model = faults.served_model or body["model"]
        tokens_per_choice = faults.chunks if cap is None else min(faults.chunks, cap)
        finish_reason = "length" if tokens_per_choice < faults.chunks else "stop"
        prompt_tokens = _text_inputs_tokens(prompts) + faults.cache_read
        usage = self._openai_usage(prompt_tokens, tokens_per_choice * choices, faults.cache_read, faults.usage_lie)
        envelope = {
            "id": completion_id,
            "object": "text_completion",
            "created": CREATED_AT,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        await _sleep_ms(faults.first_byte_delay_ms)

        if body.get("stream") is not True:
            text = _text(tokens_per_choice)
            return await self._reply(
                request,
                faults,
                protocol,
                tokens_per_choice,
                lambda: {
                    **envelope,
                    "choices": [
                        {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
                        for index in range(choices)
                    ],
                    "usage": usage,
                },
            )

        def chunks(text: str, reason: str | None) -> bytes:
            out = b""
            for index in range(choices):
                body = {
                    **envelope,
                    "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}],
                }
                if include_usage:
                    body["usage"] = None
                out += _sse(body)
            return out

        tail = chunks("", finish_reason)
        if include_usage:
            tail += _sse({**envelope, "choices": [], "usage": usage})
        error = self._stream_error(envelope, choices)
        stream = _Stream(
            head=_OPENROUTER_PROCESSING if self.openrouter else b"",
            piece=lambda index: chunks(f"tok{index} ", None),
            tail=tail + b"data: [DONE]\n\n",
            error=lambda _index: error,
        )
        return await self._stream(request, faults, tokens_per_choice, stream)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        protocol = self.openai_protocol
        payload, faults = await self._receive(request, protocol)
        if isinstance(faults, web.StreamResponse):
            return faults
        try:
            body = _validate_openai(payload, allow_usage_field=self.openrouter)
            inputs = _text_inputs(body.get("input"), "input")
            encoding = body.get("encoding_format")
            if encoding not in (None, "float", "base64"):
                raise _BadRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
            dimensions = body.get("dimensions")
            if dimensions is None:
                dimensions = EMBEDDING_DIMENSIONS_DEFAULT
            elif not _is_int(dimensions) or not 1 <= dimensions <= EMBEDDING_DIMENSIONS_MAX:
                raise _BadRequest(f"'dimensions' must be between 1 and {EMBEDDING_DIMENSIONS_MAX}.", "dimensions")
        except _BadRequest as error:
            return _bad_request(error, protocol)
        prompt_tokens = _text_inputs_tokens(inputs)
        model = faults.served_model or body["model"]

        def embedding(value: str | list[int]) -> list[float] | str:
            vector = embedding_for(value, dimensions)
            if encoding == "base64":
                return base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
            return vector

        await _sleep_ms(faults.first_byte_delay_ms)
        return await self._reply(
            request,
            faults,
            protocol,
            1,
            lambda: {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": index, "embedding": embedding(value)}
                    for index, value in enumerate(inputs)
                ],
                "model": model,
                "usage": self._with_cost(
                    {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}, prompt_tokens, 0
                ),
            },
        )

    async def responses(self, request: web.Request) -> web.StreamResponse:
        protocol = self.openai_protocol
        payload, faults = await self._receive(request, protocol)
        if isinstance(faults, web.StreamResponse):
            return faults
        try:
            body = _validate_openai(payload, allow_usage_field=self.openrouter)
            if body.get("input") is not None and not isinstance(body["input"], str | list):
                raise _BadRequest("Invalid type for 'input': expected a string or an array of input items.", "input")
            cap = _output_cap(body, ("max_output_tokens",))
        except _BadRequest as error:
            return _bad_request(error, protocol)
        response_id = self._id("resp_mock")
        item_id = self._id("msg_mock")
        model = faults.served_model or body["model"]
        output_tokens = faults.chunks if cap is None else min(faults.chunks, cap)
        complete = output_tokens == faults.chunks
        status = "completed" if complete else "incomplete"
        input_tokens = responses_input_tokens_for(body) + faults.cache_read
        text = _text(output_tokens)
        usage = self._with_cost(
            {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": faults.cache_read},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
            input_tokens,
            output_tokens,
        )
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [part]}

        def response_object(state: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
            return {
                "id": response_id,
                "object": "response",
                "created_at": CREATED_AT,
                "status": state,
                "background": False,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if state == "incomplete" else None,
                "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"),
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": body.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None},
                "temperature": 1.0,
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": usage,
                "user": None,
                "metadata": {},
            }

        await _sleep_ms(faults.first_byte_delay_ms)
        if body.get("stream") is not True:
            return await self._reply(
                request, faults, protocol, output_tokens, lambda: response_object(status, [item], usage)
            )

        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        started = response_object("in_progress", [], None)
        head = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "status": "in_progress", "content": []},
            },
            {"type": "response.content_part.added", **where, "part": {**part, "text": ""}},
        ]
        tail = [
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": item},
            {"type": f"response.{status}", "response": response_object(status, [item], usage)},
        ]
        first_delta = len(head)  # the sequence number of the first text delta

        def events(bodies: list[dict[str, Any]], first: int) -> bytes:
            return b"".join(_named_sse({**body, "sequence_number": first + n}) for n, body in enumerate(bodies))

        def delta(index: int) -> bytes:
            body = {"type": "response.output_text.delta", **where, "delta": f"tok{index} ", "logprobs": []}
            return events([body], first_delta + index)

        def error(index: int) -> bytes:
            body = {
                "type": "error",
                "code": "server_error",
                "message": "mock provider injected a mid-stream error",
                "param": None,
            }
            return events([body], first_delta + index)

        stream = _Stream(
            head=(_OPENROUTER_PROCESSING if self.openrouter else b"") + events(head, 0),
            piece=delta,
            tail=events(tail, first_delta + output_tokens),
            error=error,
        )
        return await self._stream(request, faults, output_tokens, stream)

    # ---- Anthropic Messages ----------------------------------------------------------------------------------

    async def messages(self, request: web.Request) -> web.StreamResponse:
        payload, faults = await self._receive(request, _ANTHROPIC)
        if isinstance(faults, web.StreamResponse):
            return faults
        try:
            body = _validate_messages(payload)
            cap = _output_cap(body, ("max_tokens",))
        except _BadRequest as error:
            return _bad_request(error, _ANTHROPIC)
        message_id = self._id("msg_mock")
        model = faults.served_model or body["model"]
        output_tokens = faults.chunks if cap is None else min(faults.chunks, cap)
        stop_reason = "end_turn" if output_tokens == faults.chunks else "max_tokens"
        cached = _has_cache_control(body)
        write_5m, write_1h = (faults.cache_write_5m, faults.cache_write_1h) if cached else (0, 0)
        input_usage = {
            "input_tokens": anthropic_input_tokens_for(body),
            "cache_creation_input_tokens": write_5m + write_1h,
            "cache_read_input_tokens": faults.cache_read if cached else 0,
        }

        searches = min(faults.web_searches, _web_search_uses_max(body))
        tool_use = {"server_tool_use": {"web_search_requests": searches}} if searches else {}

        def usage(output: int) -> dict[str, Any]:
            return {
                **input_usage,
                "cache_creation": {"ephemeral_5m_input_tokens": write_5m, "ephemeral_1h_input_tokens": write_1h},
                "output_tokens": output,
                "service_tier": "standard",
                **tool_use,
            }

        def message(content: list[Any], reason: str | None, output: int) -> dict[str, Any]:
            return {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": reason,
                "stop_sequence": None,
                "usage": usage(output),
            }

        await _sleep_ms(faults.first_byte_delay_ms)
        if body.get("stream") is not True:
            content = [{"type": "text", "text": _text(output_tokens)}]
            return await self._reply(
                request, faults, _ANTHROPIC, output_tokens, lambda: message(content, stop_reason, output_tokens)
            )

        def message_delta(reason: str | None, output: int) -> bytes:
            delta_usage = (
                {**input_usage, "output_tokens": output} if faults.full_delta_usage else {"output_tokens": output}
            )
            return _named_sse(
                {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None}, "usage": delta_usage}
            )

        def piece(index: int) -> bytes:
            text_delta = _named_sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": f"tok{index} "},
                }
            )
            return text_delta + message_delta(None, index + 1) if faults.progress_deltas else text_delta

        stream = _Stream(
            head=_named_sse({"type": "message_start", "message": message([], None, 1)})
            + _named_sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
            + _named_sse({"type": "ping"}),
            piece=piece,
            tail=_named_sse({"type": "content_block_stop", "index": 0})
            + message_delta(stop_reason, output_tokens)
            + _named_sse({"type": "message_stop"}),
            error=lambda _index: _ANTHROPIC_MID_STREAM_ERROR,
        )
        return await self._stream(request, faults, output_tokens, stream)

    # ---- models, keys, the rest ----------------------------------------------------------------------------

    def _protocol_of(self, request: web.Request) -> str:
        """The protocol a request on a shared route speaks, judged by its headers."""
        if "anthropic-version" in request.headers or "x-api-key" in request.headers:
            return _ANTHROPIC
        return self.openai_protocol

    async def models(self, request: web.Request) -> web.StreamResponse:
        protocol = self._protocol_of(request)
        _, faults = await self._receive(request, protocol)
        if isinstance(faults, web.StreamResponse):
            return faults
        models = self.options.models
        if protocol == _ANTHROPIC:
            data = [
                {"type": "model", "id": model, "display_name": model, "created_at": CREATED_AT_ISO} for model in models
            ]
            first_id, last_id = (models[0], models[-1]) if models else (None, None)
            return _json({"data": data, "has_more": False, "first_id": first_id, "last_id": last_id})
        data = [
            {"id": model, "object": "model", "created": CREATED_AT, "owned_by": "mock-provider"} for model in models
        ]
        return _json({"object": "list", "data": data})

    async def openrouter_key(self, request: web.Request) -> web.StreamResponse:
        _, faults = await self._receive(request, _OPENROUTER)
        if isinstance(faults, web.StreamResponse):
            return faults
        key = _presented_keys(request, _OPENROUTER)[0]
        return _json(
            {
                "data": {
                    "label": f"{key[:9]}...{key[-3:]}" if len(key) > 12 else key,
                    "usage": 0,
                    "limit": None,
                    "limit_remaining": None,
                    "is_free_tier": False,
                    "is_provisioning_key": False,
                }
            }
        )

    async def unknown_route(self, request: web.Request) -> web.StreamResponse:
        protocol = _OPENROUTER if request.path.startswith("/api/") else self._protocol_of(request)
        await self._receive(request, protocol)  # recorded; auth and faults do not matter here
        return _not_found(request, protocol)


def _presented_keys(request: web.Request, protocol: str) -> list[str]:
    """The API keys a request carries: a bearer token, and for Anthropic also `x-api-key`."""
    keys = []
    if protocol == _ANTHROPIC:
        api_key = request.headers.get("x-api-key", "").strip()
        if api_key:
            keys.append(api_key)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    return keys


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(options: MockOptions | None = None) -> web.Application:
    provider = _MockProvider(options or MockOptions())
    app = web.Application(client_max_size=REQUEST_BYTES_MAX)
    app[RECORDED] = provider.recorded
    app[REJECTED_KEYS] = provider.rejected
    prefixes = ["/v1", "/api/v1"] if provider.openrouter else ["/v1"]
    for prefix in prefixes:
        app.router.add_post(f"{prefix}/chat/completions", provider.chat_completions)
        app.router.add_post(f"{prefix}/completions", provider.completions)
        app.router.add_post(f"{prefix}/responses", provider.responses)
        app.router.add_post(f"{prefix}/embeddings", provider.embeddings)
        app.router.add_post(f"{prefix}/messages", provider.messages)
        app.router.add_get(f"{prefix}/models", provider.models)
    if provider.openrouter:
        app.router.add_get("/api/v1/key", provider.openrouter_key)
    app.router.add_get("/healthz", _healthz)
    for prefix in prefixes:
        app.router.add_route("*", prefix + "/{tail:.*}", provider.unknown_route)
    return app


async def run(host: str = "127.0.0.1", port: int = PORT_DEFAULT, options: MockOptions | None = None) -> None:
    """Serve until cancelled. Prints the base URL (with the real port when port is 0) on stdout."""
    options = options or MockOptions()
    # No access log: it would dominate the cost of a benchmark run.
    runner = web.AppRunner(build_app(options), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        base_path = "/api/v1" if options.flavor == _OPENROUTER else "/v1"
        for bound_host, bound_port, *_ in runner.addresses:
            print(f"mock provider listening on http://{bound_host}:{bound_port}{base_path}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sidecar mock-provider",
        description="Deterministic OpenAI/Anthropic/OpenRouter-compatible provider for tests, dev and benchmarks. "
        "Per-request x-mock-* headers override these defaults.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=PORT_DEFAULT, help="0 picks a free port")
    parser.add_argument("--flavor", choices=FLAVORS, default="openai", help="openrouter adds /api/v1 and its usage")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks (= completion tokens)")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--first-byte-delay-ms", type=float, default=0.0)
    parser.add_argument("--status", type=int, default=None, help="answer every request with this status")
    parser.add_argument("--error-code", default=None, help="error.code of injected errors")
    parser.add_argument("--cut-after", type=int, default=None, help="break streams after K chunks")
    parser.add_argument("--error-after", type=int, default=None, help="mid-stream error after K chunks")
    parser.add_argument("--reset", action="store_true", help="reset every connection")
    parser.add_argument("--accepted-key", action="append", default=[], help="accept only these keys (repeatable)")
    parser.add_argument("--model", action="append", default=[], help="models listed by /v1/models")
    parser.add_argument("--max-recorded-requests", type=int, default=1000)
    args = parser.parse_args(argv)
    if not 0 <= args.chunks <= CHUNKS_MAX:
        parser.error(f"--chunks must be between 0 and {CHUNKS_MAX}")
    for name in ("chunk_delay_ms", "first_byte_delay_ms"):
        if not 0 <= getattr(args, name) <= DELAY_MS_MAX:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and {DELAY_MS_MAX}")
    if args.status is not None and not 400 <= args.status <= 599:
        parser.error("--status must be between 400 and 599")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    options = MockOptions(
        chunks=args.chunks,
        chunk_delay_ms=args.chunk_delay_ms,
        first_byte_delay_ms=args.first_byte_delay_ms,
        status=args.status,
        error_code=args.error_code,
        cut_after=args.cut_after,
        error_after=args.error_after,
        reset=args.reset,
        accepted_keys=frozenset(args.accepted_key),
        models=tuple(args.model) or MODELS_DEFAULT,
        max_recorded_requests=args.max_recorded_requests,
        flavor=args.flavor,
    )
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is a dependency, but the mock must still run without it
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(run(args.host, args.port, options))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
