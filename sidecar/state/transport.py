"""Which transport carries the hot-path scripts (admit, settle): the one place that chooses.

A single Redis server reached over plain TCP or a unix socket: the lean transport (state/lean.py),
one pipelined connection of its own. Anything else (TLS, Redis Cluster, a client made some other
way): redis-py itself, through the auto-pipelining batcher (state/batching.py). Both run a script by
EVALSHA, load it again on NOSCRIPT, and raise redis-py's exception types, so callers cannot tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from sidecar.state.batching import ScriptBatcher
from sidecar.state.lean import Endpoint, LeanScripts


class ScriptRunner(Protocol):
    async def run(self, script: AsyncScript, keys: Sequence, args: Sequence): ...


def endpoint_of(client) -> Endpoint | None:
    """The lean transport's endpoint for a redis-py client, or None when it must stay on redis-py."""
    if not isinstance(client, aioredis.Redis):  # a cluster client, or a stand-in
        return None
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        return None
    kind, kw = pool.connection_class, pool.connection_kwargs
    if issubclass(kind, aioredis.UnixDomainSocketConnection):
        address = {"path": kw.get("path", "")}
    elif kind is aioredis.Connection:  # exactly: SSLConnection is a subclass
        address = {"host": kw.get("host", "127.0.0.1"), "port": int(kw.get("port", 6379))}
    else:
        return None
    if kw.get("protocol") not in (None, 2, "2"):  # RESP3 asked for: keep redis-py
        return None
    return Endpoint(
        **address,
        db=int(kw.get("db", 0) or 0),
        username=kw.get("username"),
        password=kw.get("password"),
        connect_timeout_s=float(kw.get("socket_connect_timeout") or 2.0),
        reply_timeout_s=float(kw.get("socket_timeout") or 5.0),
    )


def hot_path(client, lean: bool = True) -> ScriptRunner:
    endpoint = endpoint_of(client) if lean else None
    return LeanScripts(endpoint) if endpoint is not None else ScriptBatcher(client)


async def close(runner: ScriptRunner) -> None:
    if isinstance(runner, LeanScripts):
        await runner.aclose()
