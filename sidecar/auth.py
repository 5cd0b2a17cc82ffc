"""Client API keys: generation, hashing, and authentication with a short in-memory cache.

Keys are 256-bit random secrets, so one SHA-256 is a sound storage hash (no stretching needed: there
is nothing to brute-force). The cache lives at most `cache_ttl_ms` (<= 5 s), which bounds how long a
revoked key keeps working on any replica.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg

from sidecar import db

KEY_PREFIX = "sk-sc-"
_CACHE_MAX_ENTRIES = 50_000


@dataclass(frozen=True, slots=True)
class Caller:
    key_id: str
    workspace_id: str
    office_id: str | None
    rate_limit_rpm: int
    tokens_per_minute: int | None = None


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(raw_key: str) -> bytes:
    return hashlib.sha256(raw_key.encode()).digest()


class Authenticator:
    def __init__(self, pool: asyncpg.Pool, cache_ttl_ms: int) -> None:
        assert cache_ttl_ms <= 5_000
        self.pool = pool
        self.cache_ttl_s = cache_ttl_ms / 1000
        # digest -> (expires_at, caller or None). Misses are cached too, so a flood of bad keys
        # costs one Postgres lookup per key per TTL.
        self._cache: OrderedDict[bytes, tuple[float, Caller | None]] = OrderedDict()

    async def authenticate(self, raw_key: str | None) -> Caller | None:
        if not raw_key or len(raw_key) > 256:
            return None
        digest = hash_key(raw_key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.pool.acquire() as conn:
            record = await db.api_key_by_hash(conn, digest)
        caller = None
        if record is not None and record.revoked_at is None and hmac.compare_digest(record.key_hash, digest):
            caller = Caller(
                record.id, record.workspace_id, record.office_id, record.rate_limit_rpm, record.tokens_per_minute
            )
        self._cache[digest] = (now + self.cache_ttl_s, caller)
        self._cache.move_to_end(digest)
        while len(self._cache) > _CACHE_MAX_ENTRIES:
            self._cache.popitem(last=False)
        return caller

    def forget_all(self) -> None:
        self._cache.clear()
