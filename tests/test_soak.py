"""Soak and chaos (`make soak`): thousands of calls over every protocol and fault the mock can
produce, grants racing them, the flusher running in the background as in production, and Redis
losing everything once in the middle. At the end every workspace's money must add up exactly."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from support.harness import Sidecar, chat_body

from sidecar.audit import audit

pytestmark = pytest.mark.slow

DURATION_S = 45.0
WORKERS = 24
WORKSPACES = 6
FAULTS = (
    {},
    {},
    {},
    {"x-mock-status": "503"},
    {"x-mock-cut-after": "2"},
    {"x-mock-error-after": "1"},
    {"x-mock-first-byte-delay-ms": "30"},
    {"x-mock-reset": "1"},
)
MODELS = ("gpt-4o-mini", "mock-free", "fallback-503", "fallback-dead")


async def test_soak_money_adds_up_under_chaos(sidecar: Sidecar, redis_client) -> None:
    rng = random.Random(20261125)
    workspaces = [
        await sidecar.workspace(credits_micro=rng.randint(50_000, 400_000), rpm=100_000) for _ in range(WORKSPACES)
    ]
    stop = asyncio.Event()
    flusher = asyncio.create_task(sidecar.svc.flusher.run(stop))
    outcomes: dict[int, int] = {}
    deadline = time.monotonic() + DURATION_S

    async def worker(n: int) -> None:
        local = random.Random(n)
        while time.monotonic() < deadline:
            ws = local.choice(workspaces)
            body = chat_body(
                f"soak {n} " * local.randint(1, 30),
                model=local.choice(MODELS),
                stream=local.random() < 0.5,
                max_tokens=local.randint(1, 100),
            )
            headers = {**local.choice(FAULTS), "x-mock-chunks": str(local.randint(1, 12))}
            if local.random() < 0.1:
                headers["Idempotency-Key"] = f"soak-{local.randint(0, 50)}"
            code, _, answer = await sidecar.chat(ws, body, headers=headers)
            outcomes[code] = outcomes.get(code, 0) + 1
            assert b"the sidecar failed" not in answer, answer  # never the sidecar's own internal error

    async def granter() -> None:
        i = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            await sidecar.grant(rng.choice(workspaces).id, rng.randint(1_000, 50_000), grant_id=f"soak-grant-{i}")
            i += 1

    findings = []

    async def auditor() -> None:  # the independent auditor, run while money moves: it must see no drift
        ids = [ws.id for ws in workspaces]
        while time.monotonic() < deadline:
            await asyncio.sleep(2)
            report = await audit(sidecar.svc.state.redis, sidecar.svc.pool, workspaces=ids)
            findings.extend(report.findings)

    async def redis_loses_everything_once() -> None:
        await asyncio.sleep(DURATION_S / 2)
        await sidecar.flush()
        await redis_client.flushdb()

    try:
        await asyncio.gather(*[worker(n) for n in range(WORKERS)], granter(), redis_loses_everything_once(), auditor())
    finally:
        stop.set()
        await flusher
    await asyncio.sleep(0.5)  # settlements of the last calls
    assert sum(outcomes.values()) > 1_000, outcomes
    # 500 and 503 are also what the mock answers to injected faults (passed through, unbilled).
    assert set(outcomes) <= {200, 402, 409, 429, 500, 502, 503, 504}, outcomes
    assert findings == [], findings
    for ws in workspaces:
        identity = await sidecar.assert_identity(ws.id)
        assert set((await sidecar.rows_per_request(ws.id)).values()) <= {1}, "no call recorded twice"
        assert identity["account_balance"] >= 0
    report = await audit(sidecar.svc.state.redis, sidecar.svc.pool, workspaces=[ws.id for ws in workspaces])
    assert report.ok, report.text()
