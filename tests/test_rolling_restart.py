"""Rolling restarts lose nothing (issue 12.6): two `sidecar serve` processes share one data port
(SO_REUSEPORT, server.reuse_port). While many streams run through both, one gets SIGTERM: no stream is
cut, every call made during the switch is answered, every call made once the stopping process is
draining is served by the other one, and the ledger has exactly one row per call, billed to the token.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import asyncpg
import orjson
from support.harness import chat_body, start_sidecar, stop_sidecar
from support.processes import SidecarProcess

from sidecar.devtools import supervisor
from sidecar.devtools.mock_provider import prompt_tokens_for

STREAMS = 100  # what this 2-core box carries beside the two sidecars and the mock provider
CHUNKS, CHUNK_DELAY_MS = 25, 120  # each stream lasts about 3 s
INPUT_MICRO, OUTPUT_MICRO = 5, 25  # gpt-4o-mini in the harness's pricing
CREDITS = 100_000_000
DRAIN_MS = 15_000
AFTER_CALLS = 20
TIMING = {
    "server": {"drain_timeout_ms": DRAIN_MS},
    "upstream": {"total_timeout_ms": 15_000},  # holds.ttl_ms (40 s) must outlive the call
    "limits": {"concurrent_calls_per_key": 0, "concurrent_calls_per_workspace": 0},
    "ledger": {"workspace_refresh_ms": 200},
}


def _body(i: int, stream: bool) -> dict:
    body = chat_body(f"rolling restart, call {i}")
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def _cost(body: dict, completion_tokens: int) -> int:
    return INPUT_MICRO * prompt_tokens_for(body) + OUTPUT_MICRO * completion_tokens


async def _open_stream(http: aiohttp.ClientSession, url: str, headers: dict, i: int):
    body = _body(i, stream=True)
    resp = await http.post(url, data=orjson.dumps(body), headers=headers)
    assert resp.status == 200, await resp.text()
    seen = b""
    async with asyncio.timeout(20):
        while b"tok" not in seen:  # the first token arrived: the stream is in flight
            chunk = await resp.content.readany()
            assert chunk, f"stream {i} ended before its first token: {seen!r}"
            seen += chunk
    return resp, body, seen


async def _finish_stream(resp: aiohttp.ClientResponse, seen: bytes) -> bytes:
    try:
        async with asyncio.timeout(DRAIN_MS / 1000):
            while not seen.rstrip().endswith(b"[DONE]"):
                chunk = await resp.content.readany()
                assert chunk, f"stream {resp.headers['x-request-id']} was cut: {seen[-200:]!r}"
                seen += chunk
    finally:
        resp.close()
    return seen


def _usage(raw: bytes) -> dict:
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {") and (usage := orjson.loads(line[6:]).get("usage")):
            return usage
    raise AssertionError(f"no usage in {raw[-300:]!r}")


async def _call(url: str, headers: dict, i: int) -> tuple[str, dict]:
    """One non-streamed call on a connection of its own, as a new client would make it."""
    body = _body(i, stream=False)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.post(url, data=orjson.dumps(body), headers=headers) as resp:
            text = await resp.read()
            assert resp.status == 200, f"call {i} during the restart: {resp.status} {text[:300]!r}"
            return resp.headers["x-request-id"], body


async def _draining(process: SidecarProcess) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        try:
            async with http.get(process.ops_url + "/readyz") as resp:
                return resp.status == 503 and (await resp.json())["checks"].get("draining") == "yes"
        except (aiohttp.ClientError, TimeoutError):
            return False


def _settled_ids(process: SidecarProcess) -> set[str]:
    """Request ids of the calls this process settled (its DEBUG log's "call settled" lines)."""
    ids = set()
    for line in process.log_path.read_text().splitlines():
        if '"call settled"' in line:
            ids.add(orjson.loads(line)["request_id"])
    return ids


async def test_sigterm_to_one_of_two_replicas_on_a_shared_port_loses_nothing(
    tmp_path, redis_client, redis_url, migrated_database_url
) -> None:
    sc = await start_sidecar(redis_url, migrated_database_url)
    processes: list[SidecarProcess] = []
    try:
        ws = await sc.workspace(credits_micro=CREDITS, rpm=100_000)
        (port,) = supervisor.free_ports(1)
        provider = str(sc.provider.make_url("/v1"))
        stopping, staying = await asyncio.gather(
            *(
                SidecarProcess.serve(
                    tmp_path / name, redis_url, migrated_database_url, provider, port=port, log_level="DEBUG", **TIMING
                )
                for name in ("stopping", "staying")
            )
        )
        processes += [stopping, staying]
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {ws.key}"}
        stream_headers = {**headers, "x-mock-chunks": str(CHUNKS), "x-mock-delay-ms": str(CHUNK_DELAY_MS)}

        connector = aiohttp.TCPConnector(limit=0, force_close=True)  # one connection per stream
        async with aiohttp.ClientSession(connector=connector) as http:
            streams = await asyncio.gather(*(_open_stream(http, url, stream_headers, i) for i in range(STREAMS)))

            stopping.signal(signal.SIGTERM)
            terminated_at = time.monotonic()
            # Calls made while the process switches: every one is answered, by either process.
            racing: list[asyncio.Task] = []
            while not await _draining(stopping):
                assert time.monotonic() - terminated_at < 5, "never reported draining" + stopping.log_tail()
                racing.append(asyncio.create_task(_call(url, headers, STREAMS + len(racing))))
                await asyncio.sleep(0.01)
            racing_done = await asyncio.gather(*racing)
            # Once it drains, the other process takes every new call.
            after = await asyncio.gather(*(_call(url, headers, STREAMS + len(racing) + i) for i in range(AFTER_CALLS)))
            assert time.monotonic() - terminated_at < CHUNKS * CHUNK_DELAY_MS / 1000, "the streams ended first"
            finished = await asyncio.gather(*(_finish_stream(resp, seen) for resp, _, seen in streams))

        code = await stopping.wait_exit(DRAIN_MS / 1000 + 10)
        assert code == 0, f"exit code {code}" + stopping.log_tail()
        assert await staying.stop() == 0, staying.log_tail()

        stream_ids = {resp.headers["x-request-id"] for resp, _, _ in streams}
        by_stopping, by_staying = _settled_ids(stopping), _settled_ids(staying)
        assert by_stopping & stream_ids, "no stream ran through the stopped process: nothing was tested"
        assert by_staying & stream_ids, "no stream ran through the other process"
        after_ids = {request_id for request_id, _ in after}
        assert after_ids <= by_staying and not after_ids & by_stopping, "a call went to the draining process"

        expected: dict[str, int] = {}
        for (resp, body, _), raw in zip(streams, finished, strict=True):
            usage = _usage(raw)
            assert usage["completion_tokens"] == CHUNKS
            expected[resp.headers["x-request-id"]] = _cost(body, CHUNKS)
        for request_id, body in [*racing_done, *after]:
            expected[request_id] = _cost(body, 8)  # the mock's default completion: 8 tokens
        assert len(expected) == STREAMS + len(racing_done) + AFTER_CALLS

        # Both processes flushed their ledger at shutdown: read Postgres directly.
        conn = await asyncpg.connect(migrated_database_url)
        try:
            rows = await conn.fetch(
                "SELECT request_id, status, cost_micro FROM ledger WHERE workspace_id = $1 AND kind = 'usage'", ws.id
            )
        finally:
            await conn.close()
        assert len(rows) == len(expected), f"{len(rows)} rows for {len(expected)} calls"
        assert {r["request_id"]: r["cost_micro"] for r in rows} == expected
        assert {r["status"] for r in rows} == {"completed"}
        identity = await sc.assert_identity(ws.id)
        assert identity["debits"] == sum(expected.values())
    finally:
        for process in processes:
            process.kill()
        await stop_sidecar(sc)
