"""The bench's workspace, key and credits, written with the sidecar's own modules (no admin API
process needed), and the ledger/stream probes the flush-rate measurement polls."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass

import asyncpg
import orjson
import redis.asyncio as aioredis

from bench.servers import BENCH_CREDITS_MICRO, BENCH_RPM, MODEL
from sidecar import db
from sidecar.auth import hash_key, new_key
from sidecar.balances import Balances
from sidecar.ledger.migrate import migrate_url
from sidecar.state import keys
from sidecar.state.store import State


@dataclass
class BenchAccount:
    workspace_id: str
    key_id: str
    key: str
    # Workspaces with no calls, only synthetic ledger events: the flush phase spreads a backlog over them.
    extra_workspaces: list[str]


async def create_account(redis_url: str, database_url: str, extra_workspaces: int = 3) -> BenchAccount:
    await migrate_url(database_url)
    ws = f"bench-{secrets.token_hex(4)}"
    extra = [f"{ws}-flush{i}" for i in range(1, extra_workspaces + 1)]
    raw = new_key()
    key_id = f"key_{secrets.token_hex(8)}"
    client = aioredis.from_url(redis_url)
    pool = await db.create_pool(database_url, max_size=2)
    try:
        async with pool.acquire() as conn:
            await db.create_workspace(conn, ws, "sidecar bench")
            for name in extra:
                await db.create_workspace(conn, name, "sidecar bench (flush phase)")
            await db.insert_api_key(
                conn,
                db.ApiKeyRecord(
                    id=key_id,
                    workspace_id=ws,
                    office_id=None,
                    name="bench",
                    key_hash=hash_key(raw),
                    last4=raw[-4:],
                    rate_limit_rpm=BENCH_RPM,
                    created_at=None,
                    revoked_at=None,
                ),
            )
        balances = Balances(State(client), pool)
        await balances.grant(ws, f"bench-{ws}", "grant", BENCH_CREDITS_MICRO)
        await balances.ensure_loaded(ws)
    finally:
        await pool.close()
        await client.aclose()
    return BenchAccount(ws, key_id, raw, extra)


class LedgerProbe:
    """Counts usage rows in Postgres and entries waiting in the Redis streams of the bench's workspaces."""

    def __init__(self, redis_url: str, database_url: str, workspaces: list[str]) -> None:
        self.redis_url, self.database_url, self.workspaces = redis_url, database_url, workspaces
        self.redis: aioredis.Redis | None = None
        self.conn: asyncpg.Connection | None = None

    async def open(self) -> None:
        self.redis = aioredis.from_url(self.redis_url)
        self.conn = await asyncpg.connect(self.database_url)

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        if self.redis is not None:
            await self.redis.aclose()

    async def rows(self) -> int:
        return int(
            await self.conn.fetchval(
                "SELECT count(*) FROM ledger WHERE workspace_id = ANY($1::text[]) AND kind = 'usage'", self.workspaces
            )
        )

    async def backlog(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for ws in self.workspaces:
                pipe.xlen(keys.stream(ws))
            return sum(await pipe.execute())

    async def wait_drained(self, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self.backlog() == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    async def inject(self, count: int, workspaces: list[str], batch: int = 2000) -> None:
        """Append `count` ledger events, in turn to each workspace's stream, shaped as settle.lua writes
        them (zero cost and zero balance impact, so no account changes), for the sidecar's own flusher to
        drain. Marked with key_id and session_id 'bench-synthetic'."""
        gens = {ws: await self.redis.hget(keys.acct(ws), "gen") or b"" for ws in workspaces}
        now_ms = int(time.time() * 1000)
        template = {
            "status": "completed",
            "office_id": None,
            "key_id": "bench-synthetic",
            "idempotency_key": None,
            "session_id": "bench-synthetic",
            "provider": "mock",
            "model": MODEL,
            "upstream_model": MODEL,
            "input_tokens": 10,
            "output_tokens": 8,
            "cache_read_tokens": 0,
            "cache_write_5m_tokens": 0,
            "cache_write_1h_tokens": 0,
            "reasoning_tokens": 0,
            "upstream_cost_micro": 0,
            "hold_micro": 0,
            "byok": False,
            "estimated": False,
            "error": None,
            "started_at": now_ms,
            "first_byte_at": now_ms,
            "ended_at": now_ms,
        }
        sent = 0
        while sent < count:
            async with self.redis.pipeline(transaction=False) as pipe:
                for _ in range(min(batch, count - sent)):
                    ws = workspaces[sent % len(workspaces)]
                    event_id = uuid.uuid4()
                    event = {**template, "workspace_id": ws, "event_id": str(event_id), "request_id": event_id.hex}
                    fields = {"e": orjson.dumps(event), "cost": 0, "impact": 0, "after": "", "at": now_ms}
                    pipe.xadd(keys.stream(ws), {**fields, "gen": gens[ws], "lost": 0, "status": ""})
                    sent += 1
                await pipe.execute()
