"""Which Redis the sidecar talks to: one server, or a Redis Cluster. The one place that knows.

A `redis+cluster://host:port[,host:port...]` (or `rediss+cluster://`) URL selects redis-py's cluster
client; any other URL, a single server. Every key of a workspace carries its hash tag (state/keys.py),
so every script and keyed command runs on the one shard that owns the workspace, and the rest of the
code sends them the same way either way. What is per server, not per key, is here:

* `run_ids`: each primary's run_id, which the balance loads record to notice a restart or a failover
  that kept (possibly stale) data. In a cluster it is per shard: a workspace is checked against the
  primary that now owns its slot (`server_of`).
* `on_each_primary`: a keyless command on every primary (the eviction policy and AOF checks must hold
  on each shard).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisError, ResponseError

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SINGLE = ""  # the name of the one server of a single-node client, in the maps below
TOPOLOGY_REFRESHES_MAX = 2  # a map asked again after a failover: bounded, the next flush tries again

Client = aioredis.Redis | RedisCluster
T = TypeVar("T")


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_startup_nodes(url: str) -> tuple[str, list[ClusterNode]]:
    """The plain URL (for credentials and TLS) and the seed nodes of a cluster URL; several seeds may
    be listed comma-separated (`redis+cluster://a:6379,b:6379`)."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES[parts.scheme]
    credentials, _, hosts = parts.netloc.rpartition("@")
    nodes = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"redis cluster URL: expected host:port, got {address!r}")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    first = f"{credentials}@{hosts.split(',')[0]}" if credentials else hosts.split(",")[0]
    return urlunsplit((scheme, first, "", parts.query, "")), nodes


def _unquoted(value: str | None) -> str | None:
    return unquote(value) if value is not None else None


def open_client(url: str, *, connections_max: int, pool_wait_s: float, **options: Any) -> Client:
    """A client for url: redis-py's cluster client for a cluster URL, else a blocking-pool client.
    `options` are connection options both take (timeouts, retry)."""
    if is_cluster_url(url):
        plain, nodes = cluster_startup_nodes(url)
        parts = urlsplit(plain)
        return RedisCluster(
            startup_nodes=nodes,
            username=_unquoted(parts.username),
            password=_unquoted(parts.password),
            ssl=parts.scheme == "rediss",
            max_connections=connections_max,
            **options,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=connections_max, timeout=pool_wait_s, **options
    )
    return aioredis.Redis(connection_pool=pool)


def from_url(url: str) -> Client:
    """A client with redis-py's defaults, for tools (audit) and tests."""
    if is_cluster_url(url):
        plain, nodes = cluster_startup_nodes(url)
        parts = urlsplit(plain)
        return RedisCluster(
            startup_nodes=nodes,
            username=_unquoted(parts.username),
            password=_unquoted(parts.password),
            ssl=parts.scheme == "rediss",
        )
    return aioredis.Redis.from_url(url)


async def ready(client: Client) -> None:
    """Read a cluster's layout before the client is shared: redis-py's cluster client reads it on first
    use, and commands sent concurrently while it does so can fail on a half-made connection."""
    if isinstance(client, RedisCluster):
        await client.initialize()


async def time_of(client: Client, key: str) -> tuple[int, int]:
    """TIME (seconds, microseconds) of the server that owns key: in a cluster, that shard's clock."""
    if isinstance(client, RedisCluster):
        return await client.time(target_nodes=client.get_node_from_key(key))
    return await client.time()


def is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


def server_of(client: Client, key: str) -> str:
    """The name of the server that owns key ('' for a single server), as the client last learnt the
    cluster's layout."""
    if isinstance(client, RedisCluster):
        return client.get_node_from_key(key).name
    return SINGLE


async def info_each(client: Client, section: str) -> dict[str, dict]:
    """INFO <section> from every primary, by server name (one section: Redis before 7 takes no more)."""
    if not isinstance(client, RedisCluster):
        return {SINGLE: await client.info(section)}
    await client.initialize()  # the layout is read on first use; a no-op after that
    primaries = client.get_primaries()
    replies = await asyncio.gather(*(client.info(section, target_nodes=node) for node in primaries))
    return {node.name: reply for node, reply in zip(primaries, replies, strict=True)}


async def on_each_primary(client: Client, ask: Callable[..., Awaitable[T]]) -> list[T]:
    """ask(client, **routing) once per primary: routing sends a keyless command to that one server."""
    if not isinstance(client, RedisCluster):
        return [await ask(client)]
    await client.initialize()
    return list(await asyncio.gather(*(ask(client, target_nodes=node) for node in client.get_primaries())))


async def run_ids(client: Client) -> dict[str, str]:
    """Each primary's run_id, by server name; {} where INFO is refused (then a stale restart goes
    unnoticed by the data plane, and only `sidecar audit` reports its drift).

    In a cluster the client's map of primaries may predate a failover (it learns of one only when a
    command is redirected): a "primary" that answers as a replica, or not at all, makes it read the
    cluster's layout again first."""
    try:
        if not isinstance(client, RedisCluster):
            return {SINGLE: str((await client.info("server")).get("run_id", ""))}
        for _ in range(TOPOLOGY_REFRESHES_MAX):
            try:
                by_server = info_each(client, "server")
                infos, roles = await asyncio.gather(by_server, info_each(client, "replication"))
            except ResponseError:
                raise
            except RedisError:  # a primary is gone: its replica may have taken over
                await _refresh_layout(client)
                continue
            if infos.keys() == roles.keys() and all(str(r.get("role", "")) == "master" for r in roles.values()):
                return {name: str(info.get("run_id", "")) for name, info in infos.items()}
            await _refresh_layout(client)
        raise RedisError("redis cluster: its layout kept changing while the primaries were asked for their run_id")
    except ResponseError:
        return {}


async def _refresh_layout(client: RedisCluster) -> None:
    await client.nodes_manager.initialize()
