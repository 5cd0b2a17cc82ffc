"""Client API keys: generation, hashing, and authentication with a short in-memory cache.

Keys are 256-bit random secrets, so one SHA-256 is a sound storage hash (no stretching needed: there
is nothing to brute-force). The cache lives at most `cache_ttl_ms` (<= 5 s), which bounds how long a
revoked key keeps working on any replica.

A flood of bad keys must not reach Postgres (issue 8.8): a string that is not shaped like a key is
refused without a query; unknown keys are remembered (by their digest, never the key) in a cache of
their own, bounded and apart from the known keys', so the flood cannot evict a legitimate client's
entry; and FailedAuthLimiter refuses a source address that keeps failing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg

from sidecar import db
from sidecar.errors import DomainError
from sidecar.wallet import epoch_ms

KEY_PREFIX = "sk-sc-"
_KEY_SHAPE = re.compile(r"sk-sc-[A-Za-z0-9_-]{43}\Z")  # what new_key makes: the prefix and 32 bytes, base64url
_CACHE_ENTRIES_MAX = 50_000
_MISS_CACHE_ENTRIES_MAX = 20_000


class WorkspaceNotServed(DomainError):
    """A valid key of a workspace this data plane does not serve (config server.workspaces): the
    handler answers 401, so an agent pointed at another workspace's sidecar fails at once and clearly."""


@dataclass(frozen=True, slots=True)
class Caller:
    key_id: str
    workspace_id: str
    office_id: str | None
    rate_limit_rpm: int
    tokens_per_minute: int | None = None
    budget_micro: int | None = None  # the key's budget per budget_period (None: none)
    budget_period: str | None = None
    budget_since_ms: int = 0  # a 'total' budget counts from here


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(raw_key: str) -> bytes:
    return hashlib.sha256(raw_key.encode()).digest()


class Authenticator:
    def __init__(
        self,
        pool: asyncpg.Pool,
        cache_ttl_ms: int,
        max_entries: int = _CACHE_ENTRIES_MAX,
        max_misses: int = _MISS_CACHE_ENTRIES_MAX,
        workspaces: frozenset[str] = frozenset(),
    ) -> None:
        assert cache_ttl_ms <= 5_000
        self.pool = pool
        # The workspaces this data plane serves (config server.workspaces); empty: all of them.
        self.workspaces = workspaces
        self.cache_ttl_s = cache_ttl_ms / 1000
        # digest -> (expires_at, caller): keys that authenticated.
        self._cache: OrderedDict[bytes, tuple[float, Caller]] = OrderedDict()
        # digest -> expires_at: keys that did not, so a repeated bad key costs one lookup per TTL.
        self._misses: OrderedDict[bytes, float] = OrderedDict()
        self.max_entries, self.max_misses = max_entries, max_misses
        self.lookups = 0  # Postgres queries made: what the caches exist to keep low

    async def authenticate(self, raw_key: str | None) -> Caller | None:
        # Shape first: a header with other characters (e.g. Latin-1 bytes from a broken client)
        # cannot be a key, and must not reach the hash as text that will not encode.
        if not raw_key or not _KEY_SHAPE.match(raw_key):
            return None
        digest = hash_key(raw_key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return self._served(cached[1])
        missed_until = self._misses.get(digest)
        if missed_until is not None and missed_until > now:
            return None
        self.lookups += 1
        async with self.pool.acquire() as conn:
            record = await db.api_key_by_hash(conn, digest)
        if record is None or record.revoked_at is not None or not hmac.compare_digest(record.key_hash, digest):
            self._cache.pop(digest, None)
            _remember(self._misses, digest, now + self.cache_ttl_s, self.max_misses)
            return None
        caller = Caller(
            record.id,
            record.workspace_id,
            record.office_id,
            record.rate_limit_rpm,
            record.tokens_per_minute,
            record.budget_micro,
            record.budget_period,
            epoch_ms(record.budget_since) if record.budget_since else 0,
        )
        self._misses.pop(digest, None)
        _remember(self._cache, digest, (now + self.cache_ttl_s, caller), self.max_entries)
        return self._served(caller)

    def _served(self, caller: Caller) -> Caller:
        """The caller, if this data plane serves its workspace; else WorkspaceNotServed."""
        if self.workspaces and caller.workspace_id not in self.workspaces:
            raise WorkspaceNotServed(caller.workspace_id)
        return caller

    def forget_all(self) -> None:
        self._cache.clear()
        self._misses.clear()


def _remember(cache: OrderedDict, key: object, value: object, max_entries: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > max_entries:
        cache.popitem(last=False)


class FailedAuthLimiter:
    """Counts failed authentications per source address in fixed windows; past `max_failures` in a
    window the address is refused (429) until the window ends, without any lookup. Memory is
    bounded: at most `max_sources` addresses are tracked, the least recently failing dropped first.
    Keyed by the peer address: behind a proxy that does not pass the client's own, all its clients
    share one budget (README, security)."""

    def __init__(self, max_failures: int, window_ms: int, max_sources: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window_s = window_ms / 1000
        self.max_sources = max_sources
        self._sources: OrderedDict[str, list[float | int]] = OrderedDict()  # source -> [window_end, failures]

    @property
    def enabled(self) -> bool:
        return self.max_failures > 0

    def retry_after_s(self, source: str) -> float:
        """0 if `source` may try; else how long until it may."""
        entry = self._sources.get(source)
        if entry is None:
            return 0.0
        remaining = entry[0] - time.monotonic()
        if remaining <= 0:
            del self._sources[source]
            return 0.0
        return remaining if entry[1] >= self.max_failures else 0.0

    def failed(self, source: str) -> None:
        now = time.monotonic()
        entry = self._sources.get(source)
        if entry is None or entry[0] <= now:
            entry = [now + self.window_s, 0]
        entry[1] += 1
        _remember(self._sources, source, entry, self.max_sources)
