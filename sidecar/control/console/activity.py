"""The console overview's recent calls: the newest usage rows of one workspace's ledger (Postgres only,
DESIGN.md §12). A bounded read by (workspace_id, created_at), the ledger's own index."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

CALLS_MAX = 100


@dataclass(frozen=True, slots=True)
class Call:
    created_at: datetime
    model: str | None
    status: str
    input_tokens: int
    output_tokens: int
    byok: bool
    cost_micro: int


async def recent_calls(pool: asyncpg.Pool, workspace_id: str, limit: int) -> list[Call]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT created_at, model, status, input_tokens, output_tokens, byok, cost_micro FROM ledger "
            "WHERE workspace_id = $1 AND kind = 'usage' ORDER BY created_at DESC LIMIT $2",
            workspace_id,
            min(limit, CALLS_MAX),
        )
    return [Call(**r) for r in rows]
