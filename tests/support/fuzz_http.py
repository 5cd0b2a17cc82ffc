"""The HTTP fuzz targets: a whole sidecar (real Redis and Postgres, the in-tree mock provider, and a
hostile provider) driven over raw sockets on every route, its admin API included.

The hostile provider answers each call as the case tells it (forwarded header `x-fuzz-case`): any
status, headers and body, JSON or SSE whatever was asked, delivered whole, in pieces, cut off or late,
and quoting back the credential it was sent (raw or JSON-escaped, in the body, an event or a header).

Properties, per call:
- a status below 500, unless it is the provider's own 5xx relayed (the provider answered that status
  to this very call) or the sidecar's 502/504 naming the provider (`upstream_*` codes) after the
  provider failed: never a 500 of the sidecar's own;
- every answer the sidecar wrote itself is in the route's protocol envelope (the admin API's on the
  control port);
- no secret (platform key, client keys, admin tokens, the BYOK key, the KEK) in any status line,
  header or body, in any log line written meanwhile, nor any client credential reaching a provider;
and at the end: every call answered other than 200 was charged nothing (its ledger rows have
balance_impact 0), no request has two rows, no secret in any Postgres row or Redis value, and the
money identity holds for every workspace (Sidecar.assert_identity).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import logging
import random
import re
import secrets
import threading
import zlib
from dataclasses import dataclass, field

import asyncpg
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import strategies as st

from sidecar import db
from sidecar.app import Runtime
from sidecar.observability.logging import JsonFormatter
from sidecar.protocols import ALL as PROTOCOLS
from support.fuzz_inputs import (
    EDGE_INTS,
    FIELD_NAMES,
    VALID_REQUESTS,
    anthropic_usage,
    chat_usage,
    dumps,
    json_values,
    mutate_bytes,
    request_payloads,
    response_bodies,
    responses_usage,
    short_text,
    sse_streams,
)
from support.fuzz_pure import assert_envelope
from support.harness import (
    ADMIN_TOKEN,
    KEYS_ADMIN_TOKEN,
    PLATFORM_KEY,
    TENANT_ADMIN_TOKEN,
    TEST_KEK,
    Sidecar,
    start_sidecar,
    stop_sidecar,
)

KEY_MARK = b"@@KEY@@"  # where the hostile provider writes the credential it received
CASE_HEADER = "x-fuzz-case"
CALL_TIMEOUT_S = 30
UPSTREAM_CODES = frozenset({"upstream_error", "upstream_unavailable", "upstream_auth_failed"})
ROUTES = tuple(sorted(VALID_REQUESTS))
BYOK_KEY = "sk-byok-fuzz-" + secrets.token_hex(12)
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\(.)")


# --- the sidecar under fuzz ----------------------------------------------------------------------------


def _providers(hostile_url: str) -> list[dict]:
    common = {"api_key_env": "MOCK_PLATFORM_KEY", "forward_headers": [CASE_HEADER], "base_url": hostile_url}
    return [
        {"name": "hostile", "protocol": "openai", **common},
        {"name": "hostile-anthropic", "protocol": "anthropic", **common},
        {"name": "hostile-router", "protocol": "openai", "openrouter": True, **common},
    ]


def _models() -> list[dict]:
    window = {"context_window_tokens": 128000, "default_max_output_tokens": 100}
    models = [
        {"name": "h-chat", "targets": [{"provider": "hostile", "upstream_model": "h-up", "price": "gpt-4o-mini"}]},
        {
            "name": "h-claude",
            "targets": [{"provider": "hostile-anthropic", "upstream_model": "h-up", "price": "claude-test"}],
        },
        {"name": "h-embed", "targets": [{"provider": "hostile", "upstream_model": "h-up", "price": "embed-small"}]},
        {
            "name": "h-fallback",
            "targets": [
                {"provider": "hostile", "upstream_model": "h-up", "price": "fallback-first"},
                {"provider": "mock", "upstream_model": "gpt-4o-mini", "price": "fallback-second"},
            ],
        },
        {
            "name": "h-router",
            "targets": [
                {"provider": "hostile-router", "upstream_model": "router/requested", "price": "router-requested"}
            ],
            "allow_routing_fields": ["provider", "route", "models"],
        },
    ]
    return [{**model, **window} for model in models]


@dataclass
class Plan:
    """How the hostile provider answers one call."""

    status: int
    headers: list[tuple[str, bytes]]
    json_body: bytes
    sse_body: bytes
    answer_sse: str  # "asked" (when the request streams), "always", "never"
    delivery: str  # "whole", "pieces", "cut", "late", "gzip-lie"
    spelling: str  # how KEY_MARK is spelled: "raw", "escaped", "half-escaped"
    pieces: tuple[int, ...] = (7,)


@dataclass
class Hostile:
    plans: dict[str, Plan] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)  # case -> the status it answered
    client_secrets: tuple[str, ...] = ()
    leaks: list[str] = field(default_factory=list)  # client credentials that reached the provider
    echo_keys: bool = True  # False: KEY_MARK is written as a harmless word instead of the key
    late_s: float = 0.7  # how late a "late" answer comes: past the sidecar's first-byte timeout

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.answer)
        return app

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        sent = "\n".join(f"{k}: {v}" for k, v in request.headers.items()) + body.decode("utf-8", "replace")
        self.leaks += [s for s in self.client_secrets if s in sent]
        key = request.headers.get("x-api-key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
        key = key if self.echo_keys else "no-key-quoted"
        plan = self.plans.get(request.headers.get(CASE_HEADER, ""))
        if plan is None:  # key validation (BYOK) and anything else: a plain yes
            return web.json_response({"object": "list", "data": []})
        self.seen[request.headers[CASE_HEADER]] = plan.status
        mark = _spell(key, plan.spelling)
        asked = b'"stream": true' in body or b'"stream":true' in body
        sse = plan.answer_sse == "always" or (plan.answer_sse == "asked" and asked)
        payload = (plan.sse_body if sse else plan.json_body).replace(KEY_MARK, mark)
        headers = {name: value.replace(KEY_MARK, key.encode()).decode("latin-1") for name, value in plan.headers}
        headers["Content-Type"] = "text/event-stream" if sse else "application/json"
        if plan.delivery == "gzip-lie":
            headers["Content-Encoding"] = "gzip"
        if plan.delivery == "late":
            await asyncio.sleep(self.late_s)
        response = web.StreamResponse(status=plan.status, headers=headers)
        if plan.status in (204, 304):
            await response.prepare(request)
            return response
        await response.prepare(request)
        if plan.delivery in ("pieces", "cut"):
            at = 0
            for size in plan.pieces:
                await response.write(payload[at : at + size])
                at += size
                await asyncio.sleep(0)
            if plan.delivery == "cut":
                request.transport.close()
                return response
            await response.write(payload[at:])
        else:
            await response.write(payload)
        await response.write_eof()
        return response


def _spell(key: str, spelling: str) -> bytes:
    if spelling == "escaped":
        return "".join(f"\\u{ord(c):04x}" for c in key).encode()
    if spelling == "half-escaped":
        return "".join(f"\\u{ord(c):04X}" if i % 2 else c for i, c in enumerate(key)).encode()
    return key.encode()


class LogLines(logging.Handler):
    """Every log line the process writes, formatted as production formats it (scrubbed JSON)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self.total = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.total += 1


@dataclass
class Call:
    status: int
    headers: dict[str, str]
    head: bytes
    body: bytes


class Fuzzed:
    """The sidecar, its hostile provider and its workspaces, on an event loop of their own thread, so
    synchronous hypothesis tests can drive them call by call."""

    def __init__(
        self, redis_url: str, database_url: str, echo_keys: bool = True, first_byte_timeout_ms: int = 500
    ) -> None:
        """`first_byte_timeout_ms` (also the idle timeout): short, so the late answers cost little; the
        smoke run, which shares the machine with the whole suite, takes a long one and sends none late."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-sidecar", daemon=True)
        self.thread.start()
        self.first_byte_timeout_ms = first_byte_timeout_ms
        late_s = first_byte_timeout_ms / 1000 + 0.2 if first_byte_timeout_ms <= 1000 else 0
        self.hostile = Hostile(echo_keys=echo_keys, late_s=late_s)
        self.logs = LogLines()
        self.calls: list[tuple[str, int, str]] = []  # (request id, status, what was sent) per data-plane call
        self.sc: Sidecar | None = None
        self.findings: dict[str, list] = {}
        self.run(self._start(redis_url, database_url))

    def run(self, coro, timeout_s: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    async def _start(self, redis_url: str, database_url: str) -> None:
        self.provider = TestServer(self.hostile.app())
        await self.provider.start_server()
        self.workspaces_before = await _workspace_ids(database_url)
        self.sc = sc = await start_sidecar(
            redis_url,
            database_url,
            more_providers=_providers(str(self.provider.make_url("/v1"))),
            more_models=_models(),
            auth={"failed_auth_max": 0, "cache_ttl_ms": 2000},
            upstream={
                "connect_timeout_ms": 1000,
                "first_byte_timeout_ms": self.first_byte_timeout_ms,
                "idle_timeout_ms": self.first_byte_timeout_ms,
                "total_timeout_ms": max(3000, 2 * self.first_byte_timeout_ms),
                "usage_wait_after_hangup_ms": 200,
            },
        )
        self.rich = await sc.workspace(credits_micro=10**11, rpm=1_000_000)
        self.poor = await sc.workspace(credits_micro=0, rpm=1_000_000)
        self.byok = await sc.workspace(credits_micro=10**10, rpm=1_000_000)
        self.limited = await sc.workspace(credits_micro=10**9, rpm=3)
        revoked = await sc.workspace(credits_micro=10**6)
        status, _ = await sc.admin("DELETE", f"/workspaces/{revoked.id}/keys/{revoked.key_id}")
        assert status == 200
        self.revoked_key = revoked.key
        status, view = await sc.admin(
            "POST", f"/workspaces/{self.byok.id}/byok-keys", {"provider": "hostile", "key": BYOK_KEY}
        )
        assert status == 201, view
        self.workspaces = [self.rich.id, self.poor.id, self.byok.id, self.limited.id, revoked.id]
        self.client_keys = [self.rich.key, self.poor.key, self.byok.key, self.limited.key, revoked.key]
        self.secrets = {
            PLATFORM_KEY,
            ADMIN_TOKEN,
            TENANT_ADMIN_TOKEN,
            KEYS_ADMIN_TOKEN,
            BYOK_KEY,
            TEST_KEK.split(":", 1)[1],
            *self.client_keys,
        }
        self.hostile.client_secrets = (*self.client_keys, ADMIN_TOKEN, TENANT_ADMIN_TOKEN, KEYS_ADMIN_TOKEN)
        root = logging.getLogger()
        self._level = root.level
        root.setLevel(logging.INFO)
        root.addHandler(self.logs)
        # Served as production serves (serving.py's hardened sockets, the flusher and sweeper running).
        self.runtime = Runtime(sc.svc, data_plane=True, control_plane=True)
        await self.runtime.start("127.0.0.1", 0, 0, 0)
        self.data_port, self.control_port, _ = self.runtime.ports

    def close(self) -> None:
        logging.getLogger().removeHandler(self.logs)
        logging.getLogger().setLevel(self._level)
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def _stop(self) -> None:
        await self.runtime.shutdown()
        await stop_sidecar(self.sc)
        await self.provider.close()

    # --- one call ------------------------------------------------------------------------------------

    async def send(self, port: int, raw: bytes) -> Call:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            async with asyncio.timeout(CALL_TIMEOUT_S):
                return await _read_answer(reader)
        finally:
            writer.close()

    def leaked(self, data: bytes | str) -> list[str]:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        plain = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)) if m.group(1) else m.group(2), text)
        return [s for s in self.secrets if s in text or s in plain]

    def found(self, category: str, case) -> None:
        """Record a broken property and go on: one run reports every kind of fault, with a case each."""
        from support.fuzz_report import target

        self.findings.setdefault(category, []).append(case)
        target("findings").notes[category] += 1

    def raise_findings(self) -> None:
        if self.findings:
            summary = "\n".join(
                f"- {category} ({len(cases)} calls), e.g. {cases[0]!r}"[:3000]
                for category, cases in self.findings.items()
            )
            self.findings = {}
            raise AssertionError(f"properties broken:\n{summary}")

    def new_log_lines(self) -> list[str]:
        lines, self.logs.lines = self.logs.lines, []
        return lines


async def _workspace_ids(database_url: str) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return set(await db.workspace_ids(conn))
    finally:
        await conn.close()


async def _read_answer(reader: asyncio.StreamReader) -> Call:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return Call(int(status_line.split(" ")[1]), headers, head, body)


# --- cases ---------------------------------------------------------------------------------------------

STATUSES = (200,) * 12 + (201, 204, 301, 307, 400, 401, 402, 403, 404, 408, 413, 422, 429, 500, 502, 503, 504, 529)
_ECHO_BODIES = (
    b'{"error": {"message": "Incorrect API key provided: @@KEY@@", "type": "invalid_request_error"}}',
    b'{"type": "error", "error": {"type": "authentication_error", "message": "bad key @@KEY@@"}}',
    b'{"model": "@@KEY@@", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "input_tokens": 3, '
    b'"output_tokens": 2}}',
    b'{"error": "@@KEY@@"}',
    b"@@KEY@@",
)
_ECHO_EVENTS = (
    b'data: {"error": {"message": "key @@KEY@@ was revoked"}}\n\n',
    b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "@@KEY@@"}}\n\n',
    b'data: {"model": "@@KEY@@", "choices": [{"index": 0, "delta": {"content": "@@KEY@@"}}]}\n\n',
    b'event: response.completed\ndata: {"type": "response.completed", "response": {"model": "@@KEY@@"}}\n\n',
    b'event: message_start\ndata: {"type": "message_start", "message": {"model": "@@KEY@@", "usage": '
    b'{"input_tokens": 5}}}\n\n',
)


@st.composite
def good_streams(draw) -> bytes:
    """Well-formed streams of each protocol (so many calls complete and are charged), with counts drawn."""
    kind = draw(st.sampled_from(["chat", "anthropic", "responses"]))
    text = draw(st.lists(short_text, max_size=4))
    if kind == "chat":
        events = [{"model": "h-up", "choices": [{"index": 0, "delta": {"content": t}}]} for t in text]
        events.append({"model": "h-up", "choices": [], "usage": draw(chat_usage)})
        out = b"".join(b"data: " + dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    elif kind == "anthropic":
        events = [
            ("message_start", {"type": "message_start", "message": {"model": "h-up", "usage": draw(anthropic_usage)}})
        ]
        events += [("content_block_delta", {"type": "content_block_delta", "delta": {"text": t}}) for t in text]
        events += [("message_delta", {"type": "message_delta", "usage": draw(anthropic_usage)})]
        events += [("message_stop", {"type": "message_stop"})]
        out = b"".join(b"event: " + n.encode() + b"\ndata: " + dumps(e) + b"\n\n" for n, e in events)
    else:
        events = [("response.output_text.delta", {"type": "response.output_text.delta", "delta": t}) for t in text]
        done = {"type": "response.completed", "response": {"model": "h-up", "usage": draw(responses_usage)}}
        events.append(("response.completed", done))
        out = b"".join(b"event: " + n.encode() + b"\ndata: " + dumps(e) + b"\n\n" for n, e in events)
    return out


good_bodies = st.one_of(
    st.fixed_dictionaries({"model": st.just("h-up"), "usage": chat_usage}),
    st.fixed_dictionaries({"model": st.just("h-up"), "usage": anthropic_usage}),
    st.fixed_dictionaries({"model": st.just("h-up"), "usage": responses_usage}),
).map(dumps)


@st.composite
def plans(draw) -> Plan:
    json_body = draw(st.one_of(good_bodies, good_bodies, response_bodies, st.sampled_from(_ECHO_BODIES)))
    sse_body = draw(st.one_of(good_streams(), good_streams(), sse_streams()))
    if draw(st.integers(0, 3)) == 0:  # quote the key somewhere in the stream
        at = draw(st.integers(0, len(sse_body)))
        cut = sse_body.rfind(b"\n\n", 0, at)
        at = cut + 2 if cut >= 0 else 0
        sse_body = sse_body[:at] + draw(st.sampled_from(_ECHO_EVENTS)) + sse_body[at:]
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(json_body)))
        json_body = json_body[:at] + KEY_MARK + json_body[at:]
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["retry-after", "retry-after-ms", "x-should-retry", "x-request-id", "x-echo", "location"]
                ),
                st.one_of(st.just(KEY_MARK), st.sampled_from([b"1", b"0", b"-1", b"99999999999", b"http://evil/x"])),
            ),
            max_size=2,
        )
    )
    delivery = draw(st.sampled_from(["whole"] * 60 + ["pieces"] * 30 + ["cut"] * 6 + ["gzip-lie"] * 10 + ["late"]))
    return Plan(
        status=draw(st.sampled_from(STATUSES)),
        headers=headers,
        json_body=json_body,
        sse_body=sse_body,
        answer_sse=draw(st.sampled_from(["asked"] * 8 + ["always", "never"])),
        delivery=delivery,
        spelling=draw(st.sampled_from(["raw", "raw", "escaped", "half-escaped"])),
        pieces=tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=5))),
    )


_MODELS_FOR = {
    "/v1/messages": ("h-claude", "h-claude", "h-claude", "claude-test", "gpt-4o-mini"),
    "/v1/embeddings": ("h-embed", "h-embed", "embed-small", "gpt-4o-mini"),
}
_OPENAI_MODELS = ("h-chat", "h-chat", "h-chat", "h-fallback", "h-router", "gpt-4o-mini", "mock-free", "fallback-503")
WHO = ("rich",) * 6 + ("byok",) * 3 + ("poor", "limited", "revoked", "garbage", "none", "non-utf8", "malformed")
MALFORMED_HEADERS = (
    b"Authorization : Bearer %s",
    b"Authorization: Bearer %s\x7f",
    b"Authorization: Bearer %s\r\n continued",
    b"Authori zation: Bearer %s",
    b"Authorization:\tBearer %s\x00",
    b"X-Api-Key %s",
    b"Authorization: Bearer %s\r\nAuthorization: Bearer %s",
    b"Content-Length: 5\r\nContent-Length: 6\r\nX-K: %s",
    b"Transfer-Encoding: chunked\r\nX-K: %s",
    b"X-Long: " + b"a" * 9000 + b"%s",
)


@dataclass
class HttpCase:
    method: str
    path: str
    who: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    plan: Plan
    malformed: bytes | None = None


@st.composite
def http_cases(draw) -> HttpCase:
    path = draw(st.sampled_from(ROUTES * 4 + ("/v1/models", "/v1/nope", "/v1/chat/completions/x", "/", "/%ff")))
    method = (
        "GET" if path == "/v1/models" else draw(st.sampled_from(("POST",) * 12 + ("GET", "PUT", "DELETE", "PATCH")))
    )
    if path in VALID_REQUESTS and draw(st.booleans()):  # half the calls valid but for model and stream
        payload = dict(VALID_REQUESTS[path])
    else:
        payload = draw(request_payloads(path if path in VALID_REQUESTS else None))
    if draw(st.integers(0, 5)):
        payload["model"] = draw(st.sampled_from(_MODELS_FOR.get(path, _OPENAI_MODELS)))
    if draw(st.integers(0, 2)) == 0:
        payload["stream"] = True
    encoding = draw(st.sampled_from(["json"] * 10 + ["bytes", "gzip", "deflate", "gzip-lie", "deflate-lie", "empty"]))
    body = dumps(payload)
    headers: list[tuple[bytes, bytes]] = [(b"Content-Type", b"application/json")]
    if encoding == "bytes":
        body = draw(st.binary(max_size=64))
    elif encoding == "gzip":
        body, headers = gzip.compress(body), [*headers, (b"Content-Encoding", b"gzip")]
    elif encoding == "deflate":
        body, headers = zlib.compress(body), [*headers, (b"Content-Encoding", b"deflate")]
    elif encoding.endswith("-lie"):
        headers.append((b"Content-Encoding", encoding.removesuffix("-lie").encode()))
    elif encoding == "empty":
        body = b""
    extra = {
        b"Idempotency-Key": st.sampled_from([b"idem-1", b"idem-2", b"idem-3", b"", b"caf\xe9", b"x" * 300]),
        b"x-session-id": st.one_of(st.binary(max_size=10), st.just(b"s-1")),
        b"anthropic-beta": st.sampled_from([b"context-1m-2025-08-07", b"tools-2024", b"\xff", b"a,,b"]),
        b"anthropic-version": st.sampled_from([b"2023-06-01", b"\xe9", b""]),
        b"user-agent": st.sampled_from([b"fuzz/1", b"caf\xe9", b"\x80\x81"]),
        b"x-mock-status": st.sampled_from([b"500", b"503", b"429", b"x"]),
        b"x-mock-error-after": st.sampled_from([b"1", b"0"]),
        b"x-mock-cut-after": st.sampled_from([b"1", b"2"]),
        b"Content-Type": st.sampled_from([b"text/plain", b"application/json; charset=latin-1", b"\xff"]),
    }
    for name in draw(st.lists(st.sampled_from(sorted(extra)), max_size=2, unique=True)):
        headers.append((name, draw(extra[name])))
    who = draw(st.sampled_from(WHO))
    malformed = draw(st.sampled_from(MALFORMED_HEADERS)) if who == "malformed" else None
    return HttpCase(method, path, who, headers, body, draw(plans()), malformed)


def request_bytes(fz: Fuzzed, case: HttpCase, case_id: str) -> bytes:
    key = {
        "rich": fz.rich.key,
        "byok": fz.byok.key,
        "poor": fz.poor.key,
        "limited": fz.limited.key,
        "revoked": fz.revoked_key,
        "garbage": "sk-sc-" + "0" * 40,
        "malformed": fz.rich.key,
    }.get(case.who)
    lines = [f"{case.method} {case.path} HTTP/1.1".encode(), b"Host: sidecar", f"{CASE_HEADER}: {case_id}".encode()]
    if key is not None and case.who != "malformed":
        name = b"x-api-key" if case.path == "/v1/messages" and case_id.endswith(("1", "3")) else b"Authorization"
        lines.append(name + b": " + (b"" if name == b"x-api-key" else b"Bearer ") + key.encode())
    elif case.who == "non-utf8":
        lines.append(b"Authorization: Bearer sk-sc-caf\xe9\xff")
    if case.malformed is not None:
        lines.append(case.malformed.replace(b"%s", fz.rich.key.encode()))
    lines += [name + b": " + value for name, value in case.headers]
    lines.append(b"Content-Length: " + str(len(case.body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + case.body


def protocol_of(case: HttpCase, sent: dict[bytes, bytes]):
    """The envelope the sidecar answers `case` in: its route's, and on /v1/models Anthropic's when the
    request looks like Anthropic's SDK (an x-api-key or an anthropic-version header)."""
    if case.path == "/v1/models":
        # The handler answers Anthropic-looking calls in Anthropic's envelope; a refusal by the HTTP
        # parser comes before any header is read, so it can only follow the path (OpenAI's).
        return (PROTOCOLS[-1], PROTOCOLS[0]) if b"anthropic-version" in sent else (PROTOCOLS[0],)
    for protocol in PROTOCOLS:
        if case.path == protocol.route or case.path.startswith(protocol.route + "/"):
            return (protocol,)
    return (PROTOCOLS[0],)


class Finding(AssertionError):
    """A property broken by one call: `category` groups the same fault across calls."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(f"{category}: {detail}")
        self.category = category


def _content_type(answer: Call) -> str:
    return answer.headers.get("content-type", "-").split(";")[0]


def check_data_call(fz: Fuzzed, case: HttpCase, case_id: str, answer: Call) -> str:
    """The per-call properties; returns a short label of what happened (for the report)."""
    fz.calls.append((answer.headers.get("x-request-id", ""), answer.status, case_id))
    # The provider's own answer, relayed: the hostile provider answered this status to this call, or the
    # mock provider was told to (its x-mock-status fault header).
    sent = dict(case.headers)
    mock_status = sent.get(b"x-mock-status", b"")
    relayed = answer.status != 200 and (
        fz.hostile.seen.get(case_id) == answer.status
        or mock_status == str(answer.status).encode()
        or (b"x-mock-error-after" in sent and answer.status == 500)  # the mock's non-streamed failure
    )
    mock_fault = any(name.startswith(b"x-mock-") for name, _ in case.headers)
    shown = answer.head + answer.body[:300]
    if answer.status >= 500 and not relayed:
        # Not the provider's own status: only the sidecar's 502/504 naming the provider's failure.
        if answer.status not in (502, 504):
            raise Finding(f"sidecar answered {answer.status}", repr(shown))
        if case_id not in fz.hostile.seen and case.plan.delivery != "late" and not mock_fault:
            raise Finding(f"{answer.status} with no upstream failure", repr(shown))
    if answer.status >= 400 and not relayed:
        inner = None
        for protocol in protocol_of(case, sent):
            try:
                inner = assert_envelope(protocol, answer.body)
                break
            except Exception:
                continue
        if inner is None:
            raise Finding(f"not in the envelope ({answer.status} {_content_type(answer)})", repr(shown))
        if answer.status >= 500 and inner.get("code") not in UPSTREAM_CODES:
            raise Finding(f"{answer.status} with code {inner.get('code')}", repr(shown))
    leaks = fz.leaked(answer.head + answer.body)
    if leaks:
        raise Finding(f"secret in the answer ({answer.status}{' relayed' if relayed else ''})", repr(shown))
    for line in fz.new_log_lines():
        if fz.leaked(line):
            raise Finding("secret in a log line", line[:500])
    if fz.hostile.leaks:
        leaked, fz.hostile.leaks = fz.hostile.leaks, []
        raise Finding("client credential reached the provider", str(len(leaked)))
    return f"{answer.status}{' relayed' if relayed else ''}"


# --- the admin API -------------------------------------------------------------------------------------

ADMIN_ROUTES = (
    ("POST", "/admin/v1/workspaces"),
    ("POST", "/admin/v1/workspaces/{ws}/offices"),
    ("POST", "/admin/v1/workspaces/{ws}/keys"),
    ("GET", "/admin/v1/workspaces/{ws}/keys"),
    ("POST", "/admin/v1/workspaces/{ws}/keys/{id}/revoke"),
    ("DELETE", "/admin/v1/workspaces/{ws}/keys/{id}"),
    ("POST", "/admin/v1/workspaces/{ws}/grants"),
    ("GET", "/admin/v1/workspaces/{ws}/balance"),
    ("POST", "/admin/v1/workspaces/{ws}/byok-keys"),
    ("GET", "/admin/v1/workspaces/{ws}/byok-keys"),
    ("POST", "/admin/v1/workspaces/{ws}/byok-keys/{id}/deactivate"),
    ("POST", "/admin/v1/workspaces/{ws}/offices/{office}/byok-keys"),
    ("PUT", "/admin/v1/workspaces"),
    ("GET", "/admin/v1/nope"),
)
ADMIN_FIELDS = (
    "id",
    "name",
    "rate_limit_rpm",
    "tokens_per_minute",
    "office_id",
    "grant_id",
    "amount",
    "amount_micro",
    "kind",
    "provider",
    "key",
)
_admin_values = st.one_of(
    json_values,
    st.sampled_from(EDGE_INTS),
    st.sampled_from(["fz_ws", "fz_ws\n", "of_1", "hostile", "mock", "grant", "topup", "1.5", "-1", "1e3", "x\x00"]),
    st.text(max_size=70),
)
ADMIN_WS = ("fz_ws", "fz_ws", "fz_other", "nope", "fz%0Aws", "%ff", "a" * 70, "..")


@st.composite
def admin_cases(draw) -> tuple[str, str, bytes, bytes]:
    method, path = draw(st.sampled_from(ADMIN_ROUTES))
    path = path.format(
        ws=draw(st.sampled_from(ADMIN_WS)), id=draw(st.sampled_from(["key_1", "x", "%00"])), office="of_1"
    )
    token = draw(
        st.sampled_from(
            [ADMIN_TOKEN, ADMIN_TOKEN, ADMIN_TOKEN, TENANT_ADMIN_TOKEN, KEYS_ADMIN_TOKEN, "nope", "caf\xe9"]
        )
    )
    payload = draw(st.dictionaries(st.sampled_from(ADMIN_FIELDS + FIELD_NAMES[:3]), _admin_values, max_size=5))
    if draw(st.integers(0, 1)):
        payload.setdefault("grant_id", f"g{draw(st.integers(0, 50))}")
        payload.setdefault("amount_micro", draw(st.sampled_from([1, 10**6, 10**12, 2**63, -5, 0])))
    body = draw(st.one_of(st.just(dumps(payload)), st.binary(max_size=30)))
    return method, path, token.encode("latin-1"), body


def admin_request(method: str, path: str, token: bytes, body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: control", b"Authorization: Bearer " + token]
    lines += [b"Content-Type: application/json", b"Content-Length: " + str(len(body)).encode()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def check_admin_call(fz: Fuzzed, path: str, body: bytes, answer: Call) -> str:
    shown = repr(answer.head + answer.body[:300])
    if answer.status >= 500 and not (answer.status == 502 and b"validation_unavailable" in answer.body):
        raise Finding(f"answered {answer.status}", shown)
    try:
        payload = orjson.loads(answer.body)
        if answer.status >= 400:
            assert payload["error"]["type"] == "admin_error" and isinstance(payload["error"]["message"], str)
    except Exception:
        raise Finding(f"not in the envelope ({answer.status} {_content_type(answer)})", shown) from None
    minted = payload.get("key") if answer.status == 201 and isinstance(payload, dict) else None
    if [s for s in fz.leaked(answer.head + answer.body) if s != minted]:
        raise Finding("secret in an answer", shown)
    for line in fz.new_log_lines():
        if fz.leaked(line):
            raise Finding("secret in a log line", line[:500])
    if isinstance(minted, str):
        fz.secrets.add(minted)  # from now on a secret like any other client key
    try:
        sent = orjson.loads(body)
    except orjson.JSONDecodeError:
        sent = None
    stored_byok = answer.status == 201 and path.endswith("/byok-keys")
    if stored_byok and isinstance(sent, dict) and isinstance(sent.get("key"), str):
        fz.secrets.add(sent["key"].strip())  # a BYOK key stored by the fuzz
    return str(answer.status)


# --- at the end ----------------------------------------------------------------------------------------


async def final_checks(fz: Fuzzed) -> dict[str, int]:
    """No charge on a non-200, one row per request, no secret at rest, and the money identity."""
    sc = fz.sc
    for _ in range(100):
        if not sc.svc.settling:
            break
        await asyncio.sleep(0.1)
    await sc.flush()
    # Only what this run wrote: the database may hold other tests' workspaces (a shared session database).
    ours = set(await sc.workspace_ids()) - fz.workspaces_before
    async with sc.svc.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM ledger WHERE kind = 'usage' AND workspace_id = ANY($1)", list(ours))
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        at_rest = []
        for table in tables:
            name = table["table_name"]
            for row in await conn.fetch(f'SELECT * FROM "{name}" LIMIT 200000'):
                row = dict(row)
                if row.get("workspace_id", row.get("id")) in fz.workspaces_before:
                    continue
                at_rest.append(str(row))
    by_request: dict[str, list] = {}
    for row in rows:
        if row["request_id"] is not None:
            by_request.setdefault(row["request_id"], []).append(row)
    charged_non_200 = [
        (request_id, status, case)
        for request_id, status, case in fz.calls
        if status != 200 and any(r["balance_impact_micro"] != 0 for r in by_request.get(request_id, ()))
    ]
    assert not charged_non_200, f"non-200 calls were charged: {charged_non_200[:10]}"
    doubled = [request_id for request_id, found in by_request.items() if len(found) > 1]
    assert not doubled, f"requests with more than one ledger row: {doubled[:10]}"
    leaked_rows = [(text[:300], fz.leaked(text)) for text in at_rest if fz.leaked(text)]
    assert not leaked_rows, f"secret at rest in Postgres: {leaked_rows[:5]}"
    redis = sc.svc.state.redis
    leaked_redis = []
    async for name in redis.scan_iter(count=1000):
        kind = (await redis.type(name)).decode()
        if kind == "string":
            values = [await redis.get(name)]
        elif kind == "hash":
            values = list((await redis.hgetall(name)).values())
        elif kind == "stream":
            values = [str(entry).encode() for entry in await redis.xrange(name, count=100000)]
        elif kind == "zset":
            values = await redis.zrange(name, 0, -1)
        elif kind == "set":
            values = list(await redis.smembers(name))
        elif kind == "list":
            values = await redis.lrange(name, 0, -1)
        else:
            values = []
        for value in [name, *values]:
            if value is not None and fz.leaked(value if isinstance(value, bytes) else str(value).encode()):
                leaked_redis.append(name)
    assert not leaked_redis, f"secret at rest in Redis: {leaked_redis[:5]}"
    workspaces = sorted(ours)
    for ws in workspaces:
        await sc.assert_identity(ws)
    for line in fz.new_log_lines():
        assert not fz.leaked(line), f"secret in a log line: {line[:500]}"
    return {"workspaces": len(workspaces), "ledger rows": len(rows), "rows at rest scanned": len(at_rest)}


# --- the tests (tests/fuzz/ runs them big, the smoke test small) ------------------------------------------


def http_settings(examples: int):
    from hypothesis import HealthCheck, Phase, settings

    # Generate only: the sidecar keeps state between calls (balances, idempotency records, a BYOK key's
    # cooldown), so a shrunk replay is not the same call; the failing case is printed as generated.
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )


def mutate_case(case: HttpCase, rng: random.Random) -> HttpCase:
    """A cheap variant of a generated call: its body's bytes edited, or sent by another caller."""
    body, who = case.body, case.who
    if rng.random() < 0.3:
        body = mutate_bytes(body, rng)
    if rng.random() < 0.4:
        who = WHO[rng.randrange(len(WHO))]
    malformed = case.malformed or (MALFORMED_HEADERS[0] if who == "malformed" else None)
    return dataclasses.replace(case, body=body, who=who, malformed=malformed)


def run_data_plane(fz: Fuzzed, examples: int, mutants: int = 3) -> None:
    import time

    from hypothesis import given

    from support.fuzz_report import target

    counter = iter(range(10**9))
    record = target("http_data_plane")

    def call(case: HttpCase) -> None:
        case_id = f"c{next(counter)}"
        fz.hostile.plans[case_id] = case.plan
        try:
            answer = fz.run(fz.send(fz.data_port, request_bytes(fz, case, case_id)), CALL_TIMEOUT_S + 5)
            label = check_data_call(fz, case, case_id, answer)
        except Finding as finding:
            fz.found(finding.category, case)
            label = "finding"
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError) as exc:
            fz.found(f"no complete answer ({type(exc).__name__})", case)
            label = "finding"
        fz.hostile.plans.pop(case_id, None)
        record.inputs += 1
        record.calls += 1
        record.notes[label] += 1

    @http_settings(examples)
    @given(http_cases(), st.integers(0, 2**32 - 1))
    def one(case: HttpCase, seed: int) -> None:
        call(case)
        record.generated += 1
        rng = random.Random(seed)
        for _ in range(mutants):
            call(mutate_case(case, rng))

    started = time.perf_counter()
    try:
        one()
    finally:
        target("http_data_plane").seconds += time.perf_counter() - started
    fz.raise_findings()


def run_admin(fz: Fuzzed, examples: int) -> None:
    import time

    from hypothesis import given

    from support.fuzz_report import target

    for ws in ("fz_ws", "fz_other"):
        status, _ = fz.run(fz.sc.admin("POST", "/workspaces", {"id": ws}))
        assert status in (200, 201)
    fz.run(fz.sc.admin("POST", "/workspaces/fz_ws/offices", {"id": "of_1"}))

    @http_settings(examples)
    @given(admin_cases())
    def one(case) -> None:
        method, path, token, body = case
        try:
            answer = fz.run(fz.send(fz.control_port, admin_request(method, path, token, body)), CALL_TIMEOUT_S + 5)
            label = check_admin_call(fz, path, body, answer)
        except Finding as finding:
            fz.found("admin: " + finding.category, case)
            label = "finding"
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError) as exc:
            fz.found(f"admin: no complete answer ({type(exc).__name__})", case)
            label = "finding"
        record = target("http_admin")
        record.inputs += 1
        record.generated += 1
        record.calls += 1
        record.notes[label] += 1

    started = time.perf_counter()
    try:
        one()
    finally:
        target("http_admin").seconds += time.perf_counter() - started
    fz.raise_findings()


def run_final_checks(fz: Fuzzed) -> None:
    from support.fuzz_report import target

    for name, value in fz.run(final_checks(fz), 300).items():
        target("http_final_checks").notes[name] = value
    target("http_final_checks").notes["log lines checked"] = fz.logs.total
