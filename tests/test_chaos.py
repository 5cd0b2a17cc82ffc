"""Chaos (`make chaos`, marker `chaos`, not in `make test`): at least 100 random faults under mixed load,
then an audit of every micro-credit against what the clients saw.

Real processes throughout: two `sidecar serve` replicas, a private Redis primary with a replica (behind a
TCP proxy, so a failover is one switch), a private Postgres, and the mock provider as its own process.
Faults, one at a time at random: SIGKILL + restart of Redis on its AOF, Redis restarted without its AOF
(empty, or from a stale snapshot), a planned failover to the replica, SIGKILL + restart of Postgres and of
a sidecar replica, and spells when the provider stalls, cuts, errors or lies about usage (on top of a
background rate of such requests, and clients that hang up). Grants race the calls.

At the end, once nothing moves: no drift between the ledger, the accounts table and Redis; every call a
client saw a 200 for has exactly one row; no request has two rows; every cost the client was told is the
cost recorded; no row costs more than its hold. Figures are printed (run with -s) for docs/chaos.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson
import pytest
from support import chaos, services
from support.harness import PLATFORM_KEY, Workspace, start_sidecar, stop_sidecar
from support.processes import SIDECAR_BIN, SidecarProcess

from sidecar.devtools import supervisor
from sidecar.devtools.embedded import start_redis
from sidecar.devtools.mock_provider import USAGE_LIES
from sidecar.ledger.migrate import migrate_url

pytestmark = pytest.mark.chaos

SEED = int(os.environ.get("CHAOS_SEED", "20261201"))
FAULTS_TARGET = int(os.environ.get("CHAOS_FAULTS", "110"))
MIN_FAULTS = min(100, FAULTS_TARGET)  # `make chaos` needs 100; a shorter run (CHAOS_FAULTS) for development
MAX_FAULT_PHASE_S = float(os.environ.get("CHAOS_MAX_S", "780"))  # stop faulting after 13 min whatever the count
GAP_S = (0.3, 1.2)  # load between two faults
REPLICAS = 2
WORKERS = 14
WORKSPACES = 6
CALL_TIMEOUT_S = 20.0
SETTLE_WAIT_S = 60.0  # after the load: holds of killed replicas expire (ttl 15 s) and streams drain
PROVIDER_SPELL_S = (2.0, 4.0)
INPUT_MICRO = {"gpt-4o-mini": 5, "mock-free": 0}  # per token (tests/support/harness.py PRICING)
OUTPUT_MICRO = {"gpt-4o-mini": 25, "mock-free": 0}

# Short timeouts so stalls and expiries happen within the run; holds.ttl_ms must exceed their sum.
SIDECAR_OVERRIDES = {
    "upstream": {
        "connect_timeout_ms": 500,
        "first_byte_timeout_ms": 1500,
        "idle_timeout_ms": 1500,
        "total_timeout_ms": 6000,
        "usage_wait_after_hangup_ms": 500,
    },
    # A short grace (production: 60 s) so the sweepers still get to work between Redis faults a few
    # seconds apart; the spools (one pass a second) still replay before anything is voided.
    "holds": {
        "ttl_ms": int(chaos.HOLD_TTL_S * 1000),
        "sweep_interval_ms": 200,
        "settle_budget_ms": 4000,
        "sweep_grace_ms": int(chaos.SWEEP_GRACE_S * 1000),
    },
    "server": {"drain_timeout_ms": 1000},
    "auth": {"cache_ttl_ms": 5000},  # cached keys keep working through a Postgres restart
}

FAULT_WEIGHTS = {
    "sidecar_kill": 22,
    "redis_kill_aof": 20,
    "redis_failover": 12,
    "redis_restart_empty": 6,
    "redis_restart_stale": 6,
    "postgres_kill": 12,
    "provider_stall": 6,
    "provider_cut": 6,
    "provider_error": 5,
    "provider_lie": 5,
}


def provider_fault(rng: random.Random, kind: str, stream: bool, openai_chat: bool) -> tuple[str, dict[str, str]]:
    """The x-mock-* headers of one provider misbehaviour of the given family."""
    if kind == "stall":
        if stream and rng.random() < 0.5:
            return "stall_mid_stream", {"x-mock-chunks": "4", "x-mock-delay-ms": "2000"}
        return "stall_first_byte", {"x-mock-first-byte-delay-ms": "2500"}
    if kind == "cut":
        if rng.random() < 0.2:
            return "reset", {"x-mock-reset": "1"}
        return "cut", {"x-mock-cut-after": str(rng.randint(0, 6))}
    if kind == "error":
        if stream and rng.random() < 0.5:
            return "error_mid_stream", {"x-mock-error-after": str(rng.randint(0, 6))}
        return "error_status", {"x-mock-status": rng.choice(["500", "503", "429"])}
    if kind == "lie" and openai_chat:
        lie = rng.choice(USAGE_LIES)
        return f"lie_{lie}", {"x-mock-usage-lie": lie}
    return "", {}


class Replicas:
    """The `sidecar serve` processes, by slot; a killed slot is restarted as a new incarnation."""

    def __init__(self, base: Path, redis_url: str, database_url: str, provider_url: str, truth: chaos.Truth) -> None:
        self.base, self.redis_url, self.database_url, self.provider_url = base, redis_url, database_url, provider_url
        self.truth = truth
        self.slots: list[tuple[str, SidecarProcess] | None] = [None] * REPLICAS
        self.incarnations = [0] * REPLICAS

    async def start(self, slot: int) -> None:
        self.incarnations[slot] += 1
        name = f"sidecar{slot}#{self.incarnations[slot]}"
        process = await SidecarProcess.serve(
            self.base / f"sidecar{slot}", self.redis_url, self.database_url, self.provider_url, **SIDECAR_OVERRIDES
        )
        self.slots[slot] = (name, process)

    def live(self) -> list[tuple[str, SidecarProcess]]:
        return [entry for entry in self.slots if entry is not None]

    async def kill_and_restart(self, slot: int) -> None:
        entry = self.slots[slot]
        self.slots[slot] = None
        if entry is not None:
            name, process = entry
            process.kill()
            self.truth.killed_at[name] = time.monotonic()
        await self.start(slot)

    def stop(self) -> None:
        for entry in self.live():
            entry[1].kill()


async def test_chaos_money_adds_up(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    truth = chaos.Truth()
    started = time.monotonic()
    faults: Counter = Counter()
    fault_seconds: Counter = Counter()
    skipped: Counter = Counter()
    calls_by_fault: Counter = Counter()

    with services.private_postgres_server() as postgres:
        primary = start_redis(tmp_path / "redis-a", persistent=True)
        replica = start_redis(tmp_path / "redis-b", persistent=True)
        proxy = chaos.TcpProxy(primary.port)
        proxy.start()
        pair = chaos.RedisPair(primary, replica, proxy)
        mock = None
        sc = None
        replicas = None
        try:
            await asyncio.to_thread(pair.attach_replica)
            await migrate_url(postgres.url)
            mock_port = supervisor.free_port()
            mock = supervisor.spawn(
                "mock-provider",
                [str(SIDECAR_BIN), "mock-provider", "--port", str(mock_port)],
                tmp_path / "mock.log",
                cwd=tmp_path,
                env={**os.environ, "MOCK_PLATFORM_KEY": PLATFORM_KEY},
            )
            await supervisor.wait_http_ok(mock, f"http://127.0.0.1:{mock_port}/healthz", 20)
            provider_url = f"http://127.0.0.1:{mock_port}/v1"
            # The in-process harness only serves the admin API (workspaces, grants) here: the replicas serve calls.
            sc = await start_sidecar(proxy.url, postgres.url)
            workspaces: list[Workspace] = []
            for n in range(WORKSPACES):
                credits = 300_000 if n == 0 else rng.randint(3_000_000, 8_000_000)  # one poor workspace: 402s
                ws = await sc.workspace(credits_micro=credits, rpm=1_000_000)
                truth.granted_micro[ws.id] += credits
                workspaces.append(ws)
            ws_ids = [ws.id for ws in workspaces]
            replicas = Replicas(tmp_path, proxy.url, postgres.url, provider_url, truth)
            for slot in range(REPLICAS):
                await replicas.start(slot)

            admitting = asyncio.Event()
            admitting.set()
            stopping = asyncio.Event()
            provider_mode = {"kind": ""}

            async def one_call(http: aiohttp.ClientSession, local: random.Random, idempotency_key: str) -> None:
                """One call, and with an Idempotency-Key sometimes the same request again (to any replica), as
                a client retries: the retry must replay or redo, never bill twice."""
                ws = local.choice(workspaces)
                model = "mock-free" if local.random() < 0.1 else "gpt-4o-mini"
                route = "messages" if local.random() < 0.15 else "chat"
                stream = local.random() < 0.55
                family = provider_mode["kind"] if provider_mode["kind"] and local.random() < 0.7 else ""
                if not family and local.random() < 0.12:
                    family = local.choice(["stall", "cut", "error", "lie", "lie"])
                fault, headers = provider_fault(local, family, stream, route == "chat")
                abandon = stream and not fault and not idempotency_key and local.random() < 0.05
                headers |= {"Authorization": f"Bearer {ws.key}", "Content-Type": "application/json"}
                headers.setdefault("x-mock-chunks", str(local.randint(1, 12)))
                if idempotency_key:
                    headers["Idempotency-Key"] = idempotency_key
                text = "chaos " * local.randint(1, 40)
                if route == "chat":
                    path = "/chat/completions"
                    body = {"model": model, "messages": [{"role": "user", "content": text}]}
                    if stream:
                        body |= {"stream": True, "stream_options": {"include_usage": True}}
                    if local.random() < 0.5:
                        body["max_tokens"] = local.randint(1, 60)
                else:
                    path = "/messages"
                    body = {
                        "model": "claude-test",
                        "max_tokens": local.randint(1, 60),
                        "messages": [{"role": "user", "content": text}],
                        "stream": stream,
                    }
                attempts = 1 + (idempotency_key != "" and local.random() < 0.6)
                for _ in range(attempts):
                    name, process = local.choice(replicas.live())
                    record = chaos.CallRecord(ws.id, name, fault + ("abandon" if abandon else ""), 0)
                    record.idempotency_key = idempotency_key
                    record.started_s = time.monotonic()
                    calls_by_fault[record.fault or "honest"] += 1
                    try:
                        async with http.post(process.base_url + path, data=orjson.dumps(body), headers=headers) as resp:
                            record.status = resp.status
                            record.request_id = resp.headers.get("x-request-id", "")
                            record.replayed = resp.headers.get("Idempotent-Replayed") == "true"
                            if abandon:
                                await resp.content.readany()
                                resp.close()  # the client hangs up mid-stream
                            else:
                                raw = await resp.read()
                                record.complete = True
                                if resp.status == 200 and not record.replayed:
                                    record.cost_micro = client_cost(resp.headers, raw, body, route, stream, fault)
                    except (aiohttp.ClientError, TimeoutError):
                        pass  # a killed replica or Redis mid-call: the status (if any) is what the client saw
                    record.ended_s = time.monotonic()
                    truth.calls.append(record)

            async def worker(n: int) -> None:
                local = random.Random(SEED * 1000 + n)
                timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    for i in itertools.count():
                        if stopping.is_set():
                            return
                        try:
                            await asyncio.wait_for(admitting.wait(), 10)
                        except TimeoutError:
                            continue
                        await one_call(http, local, f"chaos-{SEED}-{n}-{i}" if local.random() < 0.08 else "")

            pending_grants: dict[str, tuple[str, int]] = {}

            async def try_grant(grant_id: str, ws_id: str, amount: int) -> bool:
                try:
                    status, _ = await sc.admin(
                        "POST", f"/workspaces/{ws_id}/grants", {"grant_id": grant_id, "amount_micro": amount}
                    )
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    return False
                if status in (200, 201):
                    truth.granted_micro[ws_id] += amount
                    pending_grants.pop(grant_id, None)
                    return True
                return False

            async def granter() -> None:
                i = 0
                while not stopping.is_set():
                    await asyncio.sleep(1.0)
                    for grant_id, (ws_id, amount) in list(pending_grants.items()):
                        await try_grant(grant_id, ws_id, amount)
                    grant_id, ws_id, amount = f"chaos-{SEED}-{i}", rng.choice(ws_ids), rng.randint(1_000, 200_000)
                    pending_grants[grant_id] = (ws_id, amount)
                    await try_grant(grant_id, ws_id, amount)
                    i += 1

            async def restart_without_aof(keep_snapshot: bool) -> bool:
                """Redis comes back without its AOF. What was settled must be in Postgres by then (a Redis
                without persistence loses what it alone held: that is what the README's AOF is for), so new
                calls wait and writes pause until every stream entry is in Postgres; calls in flight go on."""
                if keep_snapshot:
                    await asyncio.to_thread(pair.snapshot)
                    await asyncio.sleep(rng.uniform(1.0, 3.0))  # money moves on after the snapshot
                admitting.clear()
                try:
                    await asyncio.sleep(0.3)
                    for _ in range(20):
                        paused_at = await asyncio.to_thread(pair.pause_writes)
                        unflushed = await chaos.unflushed_event_ids(proxy.url, postgres.url, ws_ids)
                        if unflushed == 0 and time.monotonic() - paused_at < chaos.WRITE_PAUSE_USABLE_S:
                            await asyncio.to_thread(pair.kill_and_restart_without_aof, keep_snapshot)
                            return True
                        await asyncio.to_thread(pair.unpause_writes)
                        await asyncio.sleep(0.25)
                    return False
                finally:
                    admitting.set()

            async def provider_spell(kind: str) -> bool:
                provider_mode["kind"] = kind
                await asyncio.sleep(rng.uniform(*PROVIDER_SPELL_S))
                provider_mode["kind"] = ""
                return True

            async def inject(kind: str) -> bool:
                if kind == "sidecar_kill":
                    await replicas.kill_and_restart(rng.randrange(REPLICAS))
                elif kind == "redis_kill_aof":
                    await asyncio.to_thread(pair.kill_and_restart)
                elif kind == "redis_failover":
                    await asyncio.to_thread(pair.failover)
                elif kind == "redis_restart_empty":
                    return await restart_without_aof(keep_snapshot=False)
                elif kind == "redis_restart_stale":
                    return await restart_without_aof(keep_snapshot=True)
                elif kind == "postgres_kill":
                    await asyncio.to_thread(chaos.kill_and_restart_postgres, postgres)
                else:
                    return await provider_spell(kind.removeprefix("provider_"))
                return True

            async def fault_loop() -> None:
                deadline = time.monotonic() + MAX_FAULT_PHASE_S
                only = [kind for kind in os.environ.get("CHAOS_KINDS", "").split(",") if kind]  # for development
                chosen = {kind: weight for kind, weight in FAULT_WEIGHTS.items() if not only or kind in only}
                kinds, weights = list(chosen), list(chosen.values())
                while sum(faults.values()) < FAULTS_TARGET and time.monotonic() < deadline:
                    await asyncio.sleep(rng.uniform(*GAP_S))
                    kind = rng.choices(kinds, weights)[0]
                    began = time.monotonic()
                    if await inject(kind):
                        faults[kind] += 1
                    else:
                        skipped[kind] += 1
                    fault_seconds[kind] += time.monotonic() - began
                    truth.faults.append((began, time.monotonic(), kind))
                    print(f"[chaos {time.monotonic() - started:6.1f}s] {kind} #{faults[kind]} calls={len(truth.calls)}")

            workers = [asyncio.ensure_future(worker(n)) for n in range(WORKERS)]
            grants = asyncio.ensure_future(granter())
            watching_done = asyncio.Event()
            watcher = asyncio.ensure_future(chaos.watch_holds(proxy.url, ws_ids, truth, watching_done))
            try:
                await fault_loop()
            finally:
                fault_phase_s = time.monotonic() - started
                stopping.set()
                admitting.set()
                await asyncio.wait([*workers, grants], timeout=CALL_TIMEOUT_S + 15)
            for task in [*workers, grants]:
                assert task.done(), "a load task did not stop"
                task.result()

            # Quiet: the grants still unconfirmed are retried (same id: applied once), holds of killed
            # replicas reach their deadline and are voided, and the replicas' flushers drain the streams.
            for _ in range(30):
                if not pending_grants:
                    break
                for grant_id, (ws_id, amount) in list(pending_grants.items()):
                    await try_grant(grant_id, ws_id, amount)
                await asyncio.sleep(0.5)
            assert not pending_grants, f"grants never confirmed: {pending_grants}"
            quiet_deadline = time.monotonic() + SETTLE_WAIT_S
            while not await chaos.settled_everywhere(proxy.url, ws_ids):
                if time.monotonic() > quiet_deadline:
                    break  # the audit reports what is left
                await asyncio.sleep(0.5)

            watching_done.set()
            await asyncio.wait_for(watcher, 10)
            found = await chaos.audit(proxy.url, postgres.url, truth, ws_ids)
            external = await external_audit(proxy.url, postgres.url, tmp_path)
            statuses = Counter(call.status for call in truth.calls)
            figures = {
                "seed": SEED,
                "faults": dict(faults),
                "faults_total": sum(faults.values()),
                "faults_skipped": dict(skipped),
                "fault_seconds": {kind: round(s, 1) for kind, s in fault_seconds.items()},
                "fault_phase_s": round(fault_phase_s, 1),
                "total_s": round(time.monotonic() - started, 1),
                "calls": len(truth.calls),
                "calls_by_status": dict(sorted(statuses.items())),
                "calls_by_provider_fault": dict(calls_by_fault),
                "paid_calls": found.paid_calls,
                "usage_rows": found.rows,
                "rows_by_status": dict(found.statuses),
                "expired_after_sidecar_kill": found.expired_by_kill,
                "idempotent_replays": found.replays,
                "lost_with_redis_double_fault": len(found.lost_with_redis),
                "grants_confirmed_micro": sum(truth.granted_micro.values()),
                "problems": {name: len(items) for name, items in found.problems.items()},
                "sidecar_audit": external,
            }
            print("\nCHAOS FIGURES " + json.dumps(figures, indent=1))
            for line in chaos.summary_lines(found):
                print(line)
            if path := os.environ.get("CHAOS_TRUTH"):  # every call as its client saw it, one JSON per line
                lines = b"".join(orjson.dumps(dataclasses.asdict(call)) + b"\n" for call in truth.calls)
                await asyncio.to_thread(Path(path).write_bytes, lines)
            if path := os.environ.get("CHAOS_FIGURES"):
                await asyncio.to_thread(Path(path).write_text, json.dumps(figures, indent=1) + "\n")
            assert sum(faults.values()) >= MIN_FAULTS, figures
            assert not found.problems, chaos.summary_lines(found)
            assert external in (None, 0), f"sidecar audit exited {external}"
        finally:
            if replicas is not None:
                replicas.stop()
            if sc is not None:
                await stop_sidecar(sc)
            if mock is not None:
                mock.kill()
            pair.stop()
            proxy.stop()


def client_cost(headers, raw: bytes, body: dict, route: str, stream: bool, fault: str) -> int | None:
    """What the client can know of its charge: the cost header of an answer, or (an honest, complete OpenAI
    stream) its usage chunk at list price. None when the client cannot know it."""
    if header := headers.get("x-sidecar-cost-micro"):
        return int(header)
    if not stream or route != "chat" or fault:
        return None
    usage = None
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            chunk = orjson.loads(line[6:])
            usage = chunk.get("usage") or usage
    if usage is None or not raw.rstrip().endswith(b"data: [DONE]"):
        return None
    model = body["model"]
    return INPUT_MICRO[model] * usage["prompt_tokens"] + OUTPUT_MICRO[model] * usage["completion_tokens"]


async def external_audit(redis_url: str, database_url: str, tmp_path: Path) -> int | None:
    """`sidecar audit`'s exit code, once the auditor exists in this tree (None before)."""
    if importlib.util.find_spec("sidecar.audit") is None:
        return None
    log = tmp_path / "audit.log"
    argv = [str(SIDECAR_BIN), "audit", "--redis-url", redis_url, "--database-url", database_url]
    child = supervisor.spawn("sidecar-audit", argv, log, cwd=tmp_path, env=dict(os.environ))
    code = await child.wait_exit(120)
    if code is None:
        child.kill()
    print("sidecar audit:", code, log.read_text()[-3000:])
    return code
