"""The sidecar as it serves in production (app.Runtime on real ports, over real Redis and Postgres):
what aiohttp refuses is answered in the client's envelope and never logs a header (issue 8.3, 8.17),
and idle, slow or too many connections cannot take the data plane or /healthz down (issue 8.9)."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio
from support import rawhttp
from support.harness import ADMIN_TOKEN, Sidecar, Workspace, chat_body, start_sidecar, stop_sidecar

from sidecar.app import Runtime
from sidecar.observability.logging import JsonFormatter

HEADER_TIMEOUT_MS = 600
BODY_TIMEOUT_MS = 600
KEEPALIVE_TIMEOUT_MS = 1_000
CONNECTIONS_MAX = 12
OPS_CONNECTIONS_MAX = 4


@dataclass
class Served:
    sidecar: Sidecar
    runtime: Runtime
    data_port: int
    control_port: int
    ops_port: int
    log_lines: io.StringIO  # what the JSON log handler wrote, as production writes it
    records: list[logging.LogRecord]

    def logged(self) -> str:
        raw = "\n".join(
            record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
            for record in self.records
        )
        return self.log_lines.getvalue() + "\n" + raw


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest_asyncio.fixture
async def served(redis_client, redis_url, migrated_database_url) -> AsyncIterator[Served]:
    sidecar = await start_sidecar(
        redis_url,
        migrated_database_url,
        server={
            "header_read_timeout_ms": HEADER_TIMEOUT_MS,
            "body_read_timeout_ms": BODY_TIMEOUT_MS,
            "keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
            "connections_max": CONNECTIONS_MAX,
            "ops_connections_max": OPS_CONNECTIONS_MAX,
        },
    )
    lines, records = io.StringIO(), []
    json_handler = logging.StreamHandler(lines)
    json_handler.setFormatter(JsonFormatter())
    keep = _Keep(records)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(json_handler)
    root.addHandler(keep)
    runtime = Runtime(sidecar.svc, data_plane=True, control_plane=True)
    try:
        await runtime.start("127.0.0.1", 0, 0, 0)
        data_port, control_port, ops_port = runtime.ports
        yield Served(sidecar, runtime, data_port, control_port, ops_port, lines, records)
    finally:
        root.removeHandler(json_handler)
        root.removeHandler(keep)
        root.setLevel(old_level)
        await runtime.shutdown()
        await stop_sidecar(sidecar)


# --- 8.3 and 8.17: what aiohttp's parser refuses ------------------------------------------------------

SECRET = "sk-sc-THIS-KEY-MUST-NEVER-BE-LOGGED-0123456789ab"

MALFORMED = [
    pytest.param(b"Authorization", b"Bearer " + SECRET.encode() + b"\x7f", id="DEL-after-bearer"),
    pytest.param(b"Authorization ", b"Bearer " + SECRET.encode(), id="space-before-colon"),
    pytest.param(b"x-api-key", SECRET.encode() + b"\x01", id="control-char-in-x-api-key"),
    pytest.param(b"X-Admin\x00Token", SECRET.encode(), id="NUL-in-name"),
]


def is_openai_error(answer: rawhttp.RawAnswer) -> dict:
    assert answer.headers["content-type"].startswith("application/json"), answer
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def is_anthropic_error(answer: rawhttp.RawAnswer) -> dict:
    assert answer.headers["content-type"].startswith("application/json"), answer
    body = answer.json()
    assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}
    return body["error"]


@pytest.mark.parametrize(("name", "value"), MALFORMED)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_malformed_header_is_refused_in_the_envelope_and_never_logged(served: Served, name, value, path):
    answer = await rawhttp.exchange(served.data_port, rawhttp.request_bytes("POST", path, [(name, value)], b"{}"))
    assert answer.status == 400
    error = is_anthropic_error(answer) if path == "/v1/messages" else is_openai_error(answer)
    assert error["type"] == "invalid_request_error"
    assert SECRET.encode() not in answer.body
    await asyncio.sleep(0.05)
    logged = served.logged()
    assert "refused a malformed request" in logged  # the refusal is logged, as one line
    assert SECRET not in logged and SECRET[10:30] not in logged


async def test_a_malformed_admin_token_header_is_not_logged_either(served: Served):
    head = rawhttp.request_bytes(
        "GET", "/admin/v1/workspaces/x/balance", [(b"Authorization", b"Bearer " + SECRET.encode() + b"\x7f")]
    )
    answer = await rawhttp.exchange(served.control_port, head)
    assert answer.status == 400
    assert answer.json()["error"]["type"] == "admin_error"
    await asyncio.sleep(0.05)
    assert SECRET not in served.logged()


async def test_headers_over_8kb_are_refused_in_the_protocols_envelope(served: Served):
    big = [(b"X-Big", b"a" * 9000)]
    answer = await rawhttp.exchange(served.data_port, rawhttp.request_bytes("POST", "/v1/messages", big, b"{}"))
    assert answer.status == 400
    assert is_anthropic_error(answer)["type"] == "invalid_request_error"
    assert "longer than" in answer.json()["error"]["message"]
    answer = await rawhttp.exchange(served.data_port, rawhttp.request_bytes("POST", "/v1/embeddings", big, b"{}"))
    assert answer.status == 400 and is_openai_error(answer)["code"] == "header_too_large"


async def test_an_unknown_method_is_refused_in_the_envelope(served: Served):
    answer = await rawhttp.exchange(served.data_port, b"FROB /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 400 and is_anthropic_error(answer)
    answer = await rawhttp.exchange(served.data_port, b"FROB /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 400 and is_openai_error(answer)["code"] == "method_not_supported"


async def test_unknown_paths_and_methods_are_answered_in_the_envelope(served: Served):
    answer = await rawhttp.exchange(served.data_port, rawhttp.request_bytes("GET", "/v1/nothing-here"))
    assert answer.status == 404 and is_openai_error(answer)["type"] == "not_found_error"
    answer = await rawhttp.exchange(served.data_port, rawhttp.request_bytes("GET", "/v1/messages"))
    assert answer.status == 405 and is_anthropic_error(answer)
    assert "POST" in answer.headers["allow"]
    answer = await rawhttp.exchange(served.data_port, rawhttp.request_bytes("DELETE", "/v1/chat/completions"))
    assert answer.status == 405 and is_openai_error(answer)["code"] == "method_not_allowed"
    answer = await rawhttp.exchange(served.control_port, rawhttp.request_bytes("GET", "/admin/v1/nothing"))
    assert answer.status in (401, 404) and answer.json()["error"]["type"] == "admin_error"


async def test_an_unsupported_content_encoding_is_refused_in_the_envelope(served: Served):
    head = rawhttp.request_bytes("POST", "/v1/messages", [(b"Content-Encoding", b"br")], b"{}")
    answer = await rawhttp.exchange(served.data_port, head)
    assert answer.status == 400 and is_anthropic_error(answer)


# --- 8.9: idle, slow and too many connections ----------------------------------------------------------


async def _healthz(port: int) -> int:
    answer = await rawhttp.exchange(port, rawhttp.request_bytes("GET", "/healthz"), timeout_s=2)
    return answer.status


async def test_idle_sockets_cannot_take_the_data_port_or_healthz_down(served: Served):
    idle = [await asyncio.open_connection("127.0.0.1", served.data_port) for _ in range(CONNECTIONS_MAX)]
    try:
        await asyncio.sleep(0.05)
        # Past the budget: a clear 503 in the envelope, at once.
        answer = await rawhttp.exchange(served.data_port, rawhttp.request_bytes("GET", "/v1/models"), timeout_s=2)
        assert answer.status == 503 and is_openai_error(answer)["code"] == "too_many_connections"
        assert await _healthz(served.ops_port) == 200  # its own listener and budget
        # The idle sockets never sent a request head: closed at the header timeout.
        closed = await asyncio.gather(
            *(rawhttp.closed_by_peer(reader, HEADER_TIMEOUT_MS / 1000 + 2) for reader, _ in idle)
        )
        assert all(closed)
    finally:
        for _, writer in idle:
            writer.close()
    await asyncio.sleep(0.05)
    ws = await served.sidecar.workspace(credits_micro=1_000_000)
    assert await _chat_status(served, ws) == 200


async def test_the_ops_port_has_a_budget_of_its_own(served: Served):
    idle = [await asyncio.open_connection("127.0.0.1", served.ops_port) for _ in range(OPS_CONNECTIONS_MAX)]
    try:
        await asyncio.sleep(0.05)
        answer = await rawhttp.exchange(served.ops_port, rawhttp.request_bytes("GET", "/healthz"), timeout_s=2)
        assert answer.status == 503
        ws = await served.sidecar.workspace(credits_micro=1_000_000)
        assert await _chat_status(served, ws) == 200  # the data port does not share it
    finally:
        for _, writer in idle:
            writer.close()


async def test_a_head_sent_byte_by_byte_is_cut_off_at_the_header_timeout(served: Served):
    reader, writer = await asyncio.open_connection("127.0.0.1", served.data_port)
    head = rawhttp.request_bytes("GET", "/v1/models", [(b"X-Slow", b"x" * 200)])
    started = asyncio.get_running_loop().time()
    try:
        for byte in head[:-4]:
            writer.write(bytes([byte]))
            await writer.drain()
            if reader.at_eof():
                break
            await asyncio.sleep(0.02)
        assert await rawhttp.closed_by_peer(reader, 2)
    except ConnectionError:
        pass  # closed under our feet: what is expected
    finally:
        writer.close()
    elapsed_s = asyncio.get_running_loop().time() - started
    assert elapsed_s < HEADER_TIMEOUT_MS / 1000 + 1.5, elapsed_s


async def test_an_idle_keep_alive_connection_is_closed(served: Served):
    ws = await served.sidecar.workspace(credits_micro=1_000_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.data_port)
    try:
        writer.write(rawhttp.request_bytes("GET", "/v1/models", [(b"Authorization", f"Bearer {ws.key}".encode())]))
        answer = await rawhttp.read_answer(reader)
        assert answer.status == 200
        assert await rawhttp.closed_by_peer(reader, KEEPALIVE_TIMEOUT_MS / 1000 + 2)
    finally:
        writer.close()


async def test_a_body_that_stops_arriving_gets_408_in_the_envelope(served: Served):
    ws = await served.sidecar.workspace(credits_micro=1_000_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.data_port)
    try:
        writer.write(
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + ws.key.encode() + b"\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model":'
        )
        await writer.drain()
        answer = await rawhttp.read_answer(reader, timeout_s=BODY_TIMEOUT_MS / 1000 + 3)
        assert answer.status == 408
        assert is_anthropic_error(answer)["type"] == "timeout_error"
    finally:
        writer.close()
    assert len(served.sidecar.recorded) == 0


async def _chat_status(served: Served, ws: Workspace) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{served.data_port}/v1/chat/completions",
            json=chat_body(),
            headers={"Authorization": f"Bearer {ws.key}"},
        ) as response,
    ):
        await response.read()
        return response.status


async def test_the_runtime_serves_the_admin_api_and_ops(served: Served):
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"http://127.0.0.1:{served.control_port}/admin/v1/workspaces/none/balance",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response:
            assert response.status == 404
        async with http.get(f"http://127.0.0.1:{served.ops_port}/healthz") as response:
            assert response.status == 200
