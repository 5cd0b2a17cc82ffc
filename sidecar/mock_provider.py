"""A deterministic OpenAI-compatible provider for tests, `sidecar dev` and benchmarks.

Clients use the base URL `http://HOST:PORT/v1`. Routes: `POST /v1/chat/completions` (streamed and not),
`GET /v1/models`, `GET /healthz`; any other `/v1/...` path answers an OpenAI 404 envelope.

Usage is a pure function of the request, so tests can predict it exactly:
- prompt_tokens = (characters of every message's text) // 4 + 1 per message, where a message's text is its
  `content` string, or the `text` of each part when `content` is a list of parts (see `prompt_tokens_for`).
- completion_tokens = the number of content chunks sent; chunk k carries the text `f"tok{k} "`. The count is
  `chunks` (default 8), capped by `max_completion_tokens` / `max_tokens` (the smaller if both are sent).
  `finish_reason` is "length" when the cap cut the answer short, else "stop".
- `prompt_tokens_details.cached_tokens` and `completion_tokens_details.reasoning_tokens` are always 0.

Streaming follows the OpenAI wire format: a role chunk, one chunk per content token, a chunk with the
finish_reason, then (only with `stream_options.include_usage`) a chunk with `"choices": []` and the usage,
then `data: [DONE]`. With include_usage every other chunk carries `"usage": null`.

Like api.openai.com, it answers 400 to a `stream_options` on a non-streamed request and to a top-level `usage`
field (OpenRouter-only), so a proxy that forwards either is caught by tests.

Faults are driven per request by headers (defaults come from MockOptions / the CLI flags):
- `x-mock-status: 503`: answer that status at once with an OpenAI error envelope (`x-mock-error-code`
  overrides its `code`, e.g. `insufficient_quota`).
- `x-mock-chunks: N`: number of content chunks before any cap.
- `x-mock-delay-ms: D`: sleep D ms before each content chunk (non-streamed: before answering, per chunk).
- `x-mock-first-byte-delay-ms: D`: sleep D ms before the response headers.
- `x-mock-cut-after: K`: streamed: after K content chunks, close the connection mid-body (the client sees an
  incomplete chunked body); if K is not below the chunk count, the cut comes after the last content chunk,
  so the stream never completes. Non-streamed: close the connection without any response.
- `x-mock-error-after: K`: streamed: after K content chunks send `data: {"error": {...}}` and end the body
  (no usage, no [DONE]); same rule for large K. Non-streamed: a 500 error envelope.
- `x-mock-reset: 1`: reset the connection (TCP RST) without any response.

Auth: `Authorization: Bearer <non-empty>` is required (401 `invalid_api_key` otherwise); when
`MockOptions.accepted_keys` is non-empty only those keys pass. Fault headers are read before auth, the
injected status after it.

The last `max_recorded_requests` requests to `/v1/...` (including rejected ones) are kept in `app[RECORDED]`,
newest last, so tests can assert what a proxy forwarded.

Deterministic on purpose: ids come from a per-app counter and `created` is a fixed timestamp.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import struct
import sys
from collections import deque
from collections.abc import Set
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "DEFAULT_PORT",
    "RECORDED",
    "MockOptions",
    "RecordedRequest",
    "build_app",
    "main",
    "prompt_tokens_for",
    "run",
]

DEFAULT_PORT = 8900
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "mock-model")
# Bounds on what a header or flag may ask for, so one request cannot pin the server.
MAX_CHUNKS = 100_000
MAX_DELAY_MS = 600_000
MAX_REQUEST_BYTES = 32 * 1024 * 1024
# A fixed `created` keeps whole responses byte-for-byte reproducible.
CREATED_AT = 1_700_000_000
SYSTEM_FINGERPRINT = "fp_mock"


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
    models: tuple[str, ...] = DEFAULT_MODELS
    max_recorded_requests: int = 1000


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: CIMultiDict[str]
    """Case-insensitive: `headers["authorization"]` and `headers["Authorization"]` both work."""
    query: dict[str, str]
    json_body: Any
    """The parsed JSON body; None when there was none or it was not JSON."""


RECORDED = web.AppKey("mock_recorded_requests", deque)
"""`app[RECORDED]`: a deque[RecordedRequest] bounded by MockOptions.max_recorded_requests."""


def prompt_tokens_for(payload: Any) -> int:
    """Prompt tokens the mock bills for a chat request: text characters // 4 + 1 per message."""
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list):
        return 0
    text_chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            text_chars += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    text_chars += len(text)
    return text_chars // 4 + len(messages)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _error_response(
    status: int, message: str, error_type: str, code: str | None = None, param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _bad_request(error: _BadRequest) -> web.Response:
    return _error_response(400, error.message, "invalid_request_error", param=error.param)


def _injected_error(status: int, code: str | None) -> web.Response:
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
    return _error_response(status, f"mock provider injected status {status}", error_type, code)


@dataclass(frozen=True, slots=True)
class _Faults:
    """The fault knobs in force for one request: MockOptions overridden by x-mock-* headers."""

    status: int | None
    error_code: str | None
    chunks: int
    chunk_delay_ms: float
    first_byte_delay_ms: float
    cut_after: int | None
    error_after: int | None
    reset: bool


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
    if not 0 <= delay_ms <= MAX_DELAY_MS:  # also rejects NaN
        raise _BadRequest(f"header {name} must be between 0 and {MAX_DELAY_MS}", name)
    return delay_ms


def _faults_for(request: web.Request, options: MockOptions) -> _Faults:
    reset_header = request.headers.get("x-mock-reset")
    reset = options.reset if reset_header is None else reset_header.strip().lower() in ("1", "true", "yes")
    return _Faults(
        status=_int_header(request, "x-mock-status", options.status, 400, 599),
        error_code=request.headers.get("x-mock-error-code", options.error_code),
        chunks=_int_header(request, "x-mock-chunks", options.chunks, 0, MAX_CHUNKS) or 0,
        chunk_delay_ms=_delay_header(request, "x-mock-delay-ms", options.chunk_delay_ms),
        first_byte_delay_ms=_delay_header(request, "x-mock-first-byte-delay-ms", options.first_byte_delay_ms),
        cut_after=_int_header(request, "x-mock-cut-after", options.cut_after, 0, MAX_CHUNKS),
        error_after=_int_header(request, "x-mock-error-after", options.error_after, 0, MAX_CHUNKS),
        reset=reset,
    )


def _output_cap(payload: dict[str, Any]) -> int | None:
    caps = []
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _BadRequest(f"Invalid '{name}': expected an integer of at least 1.", name)
        caps.append(value)
    return min(caps) if caps else None


def _validate_chat(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise _BadRequest("We could not parse the JSON body of your request.")
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise _BadRequest("you must provide a model parameter", "model")
    if not isinstance(payload.get("messages"), list):
        raise _BadRequest("'messages' is a required property", "messages")
    if "usage" in payload:
        raise _BadRequest("Unrecognized request argument supplied: usage", "usage")
    if payload.get("stream_options") is not None and payload.get("stream") is not True:
        raise _BadRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options")
    return payload


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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


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


@dataclass(slots=True)
class _Answer:
    """What one chat request will produce."""

    completion_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    include_usage: bool


class _MockProvider:
    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self.recorded: deque[RecordedRequest] = deque(maxlen=max(1, options.max_recorded_requests))
        self._next_id = itertools.count(1)

    async def _receive(self, request: web.Request) -> tuple[Any, _Faults | web.Response]:
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
            return payload, _bad_request(error)
        if faults.reset:
            _close_connection(request, reset=True)
            return payload, web.Response()  # never sent: the connection is gone
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        accepted = self.options.accepted_keys
        if scheme.lower() != "bearer" or not key or (accepted and key not in accepted):
            return payload, _error_response(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        if faults.status is not None:
            return payload, _injected_error(faults.status, faults.error_code)
        return payload, faults

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        payload, faults = await self._receive(request)
        if isinstance(faults, web.StreamResponse):
            return faults
        try:
            chat = _validate_chat(payload)
            cap = _output_cap(chat)
        except _BadRequest as error:
            return _bad_request(error)
        stream = chat.get("stream") is True
        stream_options = chat.get("stream_options")
        completion_tokens = faults.chunks if cap is None else min(faults.chunks, cap)
        answer = _Answer(
            completion_id=f"chatcmpl-mock{next(self._next_id):08d}",
            model=chat["model"],
            prompt_tokens=prompt_tokens_for(chat),
            completion_tokens=completion_tokens,
            finish_reason="length" if completion_tokens < faults.chunks else "stop",
            include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
        )
        await _sleep_ms(faults.first_byte_delay_ms)
        if stream:
            return await self._stream(request, faults, answer)
        return await self._complete(request, faults, answer)

    async def _complete(self, request: web.Request, faults: _Faults, answer: _Answer) -> web.Response:
        await _sleep_ms(faults.chunk_delay_ms * answer.completion_tokens)
        if faults.cut_after is not None:
            _close_connection(request, reset=False)
            return web.Response()  # never sent: the connection is gone
        if faults.error_after is not None:
            return _injected_error(500, faults.error_code)
        text = "".join(f"tok{index} " for index in range(answer.completion_tokens))
        body = {
            "id": answer.completion_id,
            "object": "chat.completion",
            "created": CREATED_AT,
            "model": answer.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": _usage(answer.prompt_tokens, answer.completion_tokens),
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _stream(self, request: web.Request, faults: _Faults, answer: _Answer) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        envelope = {
            "id": answer.completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED_AT,
            "model": answer.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            body = {
                **envelope,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if answer.include_usage:
                body["usage"] = None
            return _sse(body)

        await response.write(chunk({"role": "assistant", "content": "", "refusal": None}, None))
        # One pass more than the content chunks, so a cut or error at or beyond the end still fires.
        for index in range(answer.completion_tokens + 1):
            at_end = index == answer.completion_tokens
            if faults.cut_after is not None and (index == faults.cut_after or at_end):
                _close_connection(request, reset=False)
                return response
            if faults.error_after is not None and (index == faults.error_after or at_end):
                await response.write(_MID_STREAM_ERROR)
                await response.write_eof()
                return response
            if at_end:
                break
            await _sleep_ms(faults.chunk_delay_ms)
            await response.write(chunk({"content": f"tok{index} "}, None))
        await response.write(chunk({}, answer.finish_reason))
        if answer.include_usage:
            usage_chunk = {
                **envelope,
                "choices": [],
                "usage": _usage(answer.prompt_tokens, answer.completion_tokens),
            }
            await response.write(_sse(usage_chunk))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.StreamResponse:
        _, faults = await self._receive(request)
        if isinstance(faults, web.StreamResponse):
            return faults
        data = [
            {"id": model, "object": "model", "created": CREATED_AT, "owned_by": "mock-provider"}
            for model in self.options.models
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    async def unknown_route(self, request: web.Request) -> web.StreamResponse:
        await self._receive(request)
        return _error_response(404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error")


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(options: MockOptions | None = None) -> web.Application:
    provider = _MockProvider(options or MockOptions())
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app[RECORDED] = provider.recorded
    app.router.add_post("/v1/chat/completions", provider.chat_completions)
    app.router.add_get("/v1/models", provider.models)
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/v1/{tail:.*}", provider.unknown_route)
    return app


async def run(host: str = "127.0.0.1", port: int = DEFAULT_PORT, options: MockOptions | None = None) -> None:
    """Serve until cancelled. Prints the base URL (with the real port when port is 0) on stdout."""
    # No access log: it would dominate the cost of a benchmark run.
    runner = web.AppRunner(build_app(options), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        for bound_host, bound_port, *_ in runner.addresses:
            print(f"mock provider listening on http://{bound_host}:{bound_port}/v1", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sidecar mock-provider",
        description="Deterministic OpenAI-compatible provider for tests, dev and benchmarks. "
        "Per-request x-mock-* headers override these defaults.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
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
    if not 0 <= args.chunks <= MAX_CHUNKS:
        parser.error(f"--chunks must be between 0 and {MAX_CHUNKS}")
    for name in ("chunk_delay_ms", "first_byte_delay_ms"):
        if not 0 <= getattr(args, name) <= MAX_DELAY_MS:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and {MAX_DELAY_MS}")
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
        models=tuple(args.model) or DEFAULT_MODELS,
        max_recorded_requests=args.max_recorded_requests,
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
