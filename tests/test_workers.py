"""`sidecar serve --workers N` (config server.workers): N serving processes on one port, one background
process for the flusher and the sweeper, one supervisor. Calls are spread over the workers and billed
once each; a worker that dies is replaced; SIGTERM drains once and the ledger holds every call."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from support.harness import chat_body, start_sidecar, stop_sidecar
from support.processes import SidecarProcess

from sidecar import workers
from sidecar.config import ConfigError, load_config
from sidecar.devtools.mock_provider import prompt_tokens_for

CALLS = 30
INPUT_MICRO, OUTPUT_MICRO = 5, 25  # gpt-4o-mini in the harness's pricing
SETTINGS = {
    "server": {"workers": 2, "drain_timeout_ms": 5_000},
    "ledger": {"workspace_refresh_ms": 200},
}


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
            if int(parent) == pid and state != "Z":  # a zombie is dead, only not reaped yet
                found.add(int(entry))
    return found


async def _wait_children(pid: int, count: int, gone: int = 0, timeout_s: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(found := _children(pid)) == count and gone not in found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{pid} has children {_children(pid)}, not {count}")


async def _calls(url: str, headers: dict, first: int, count: int) -> dict[str, int]:
    """`count` calls, each on a new connection (so the kernel spreads them); request id -> cost."""
    costs = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for i in range(first, first + count):
            body = chat_body(f"workers call {i}")
            async with http.post(url, data=orjson.dumps(body), headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
                costs[resp.headers["x-request-id"]] = INPUT_MICRO * prompt_tokens_for(body) + OUTPUT_MICRO * 8
    return costs


async def _ledger(database_url: str, ws: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT request_id, cost_micro FROM ledger WHERE workspace_id = $1 AND kind = 'usage'", ws
        )
    finally:
        await conn.close()
    return {r["request_id"]: r["cost_micro"] for r in rows}


def _journals_with_calls(spool: Path) -> int:
    """Serving processes that admitted a call: each keeps its own journal of admitted calls."""
    return sum(
        1 for d in (spool / "inflight").iterdir() if any(b"\nA " in b"\n" + p.read_bytes() for p in d.glob("*.log"))
    )


async def test_workers_share_the_port_bill_each_call_once_and_drain_once(
    tmp_path, redis_client, redis_url, migrated_database_url
) -> None:
    sc = await start_sidecar(redis_url, migrated_database_url)
    process = None
    try:
        ws = await sc.workspace(credits_micro=100_000_000, rpm=100_000)
        provider = str(sc.provider.make_url("/v1"))
        process = await SidecarProcess.serve(tmp_path, redis_url, migrated_database_url, provider, **SETTINGS)
        supervisor_pid = process.process.pid
        first = await _wait_children(supervisor_pid, 3)  # the background process and two workers
        url = f"{process.base_url}/chat/completions"
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {ws.key}"}

        expected = await _calls(url, headers, 0, CALLS)
        assert _journals_with_calls(tmp_path / "spool") == 2, "the calls did not spread over both workers"
        # The background process flushes the ledger while the workers serve.
        deadline = time.monotonic() + 15
        while len(await _ledger(migrated_database_url, ws.id)) < CALLS:
            assert time.monotonic() < deadline, "the background process did not flush the ledger" + process.log_tail()
            await asyncio.sleep(0.2)

        # A worker that dies is replaced; calls go on.
        victim = max(first)  # the last forked: a worker
        os.kill(victim, signal.SIGKILL)
        await _wait_children(supervisor_pid, 3, gone=victim)
        async with asyncio.timeout(20):
            while True:  # the replacement is up when the ops port answers from either worker
                try:
                    expected |= await _calls(url, headers, CALLS, CALLS)
                    break
                except (aiohttp.ClientError, AssertionError):
                    await asyncio.sleep(0.2)

        assert await process.stop(timeout_s=30) == 0, process.log_tail()
        assert not _children(supervisor_pid)
        assert await _ledger(migrated_database_url, ws.id) == expected  # each call once, at its cost
        identity = await sc.assert_identity(ws.id)
        assert identity["debits"] == sum(expected.values())
    finally:
        if process is not None:
            process.kill()
        await stop_sidecar(sc)


def test_more_than_one_worker_needs_a_shared_port(tmp_path) -> None:
    config = tmp_path / "sidecar.yaml"
    (tmp_path / "pricing.yaml").write_text(
        "profile: t\ncurrency: USD\nmodels: {gpt-4o-mini: {input: '0.15', output: '0.60'}}\n"
    )
    config.write_text(
        "pricing_file: pricing.yaml\nserver: {workers: 2, reuse_port: false}\n"
        "providers: [{name: p, protocol: openai, base_url: 'http://127.0.0.1:1/v1', api_key_env: X}]\n"
        "models: [{name: gpt-4o-mini, provider: p}]\n"
    )
    with pytest.raises(ConfigError, match="reuse_port"):
        load_config(str(config))


def test_usable_cpus_is_at_least_one() -> None:
    assert 1 <= workers.usable_cpus() <= workers.WORKERS_MAX
