# ======================================================================================================
# Base service fixtures: real Redis and Postgres (DESIGN.md §10). Helpers live in tests/support/services.py.
#
#   redis_url         session  SIDECAR_TEST_REDIS_URL, else the machine's Redis db 15, else a private one;
#                              in a test marked `both_redis`, also a three-primary Redis Cluster's URL
#                              (the test runs twice: [single] and [cluster])
#   redis_cluster     session  a real Redis Cluster (3 primaries, 3 replicas) started on first use
#   database_url      session  a fresh database on SIDECAR_TEST_DATABASE_URL's server, else the machine's
#                              Postgres, else a private one; dropped at the end of the session
#   redis_client      function a client of redis_url (redis.asyncio.Redis, or RedisCluster for the cluster),
#                              emptied before each test (bytes replies)
#   private_redis     function an embedded RedisServer (AOF on) the test may kill()/restart()
#   private_postgres  function an embedded PostgresServer the test may kill()/restart()
# ======================================================================================================

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio
from support import services
from support.redis_cluster import RedisClusterProcesses, running_cluster

from sidecar.devtools.embedded import PostgresServer, RedisServer
from sidecar.state import servers

REDIS_MODES = ("single", "cluster")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # The money-path tests run against one Redis and against a Redis Cluster (DESIGN.md §10).
    if metafunc.definition.get_closest_marker("both_redis") and "redis_url" in metafunc.fixturenames:
        # The cluster runs are marked `cluster`: `make test-cluster` runs them (.ci/run runs both targets).
        modes = [pytest.param(mode, marks=pytest.mark.cluster) if mode == "cluster" else mode for mode in REDIS_MODES]
        metafunc.parametrize("redis_url", modes, indirect=True, scope="session")


@pytest.fixture(scope="session")
def single_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with services.session_redis_url(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    if getattr(request, "param", "single") == "cluster":
        return request.getfixturevalue("redis_cluster").url
    return request.getfixturevalue("single_redis_url")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with services.session_database_url() as url:
        yield url


@pytest_asyncio.fixture
async def redis_client(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[servers.Client]:
    client = servers.from_url(redis_url)
    await servers.ready(client)
    # Each test starts from an empty db, so no test sees another's keys.
    if servers.is_cluster(client):
        request.getfixturevalue("redis_cluster").flush()
    else:
        await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with services.private_redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    with services.private_postgres_server() as server:
        yield server


# ======================================================================================================
# End of the base service fixtures. Fixtures for other areas go below.
# ======================================================================================================


# --- the sidecar under test -------------------------------------------------------------------------

from support.harness import Sidecar, migrated, run_migrations_once, start_sidecar, stop_sidecar  # noqa: E402


@pytest.fixture(scope="session")
def migrated_database_url(database_url: str) -> str:
    run_migrations_once(database_url)
    return database_url


@pytest_asyncio.fixture
async def sidecar(
    redis_client: redis.asyncio.Redis, redis_url: str, migrated_database_url: str
) -> AsyncIterator[Sidecar]:
    instance = await start_sidecar(redis_url, migrated_database_url)
    try:
        yield instance
    finally:
        await stop_sidecar(instance)


__all__ = ["migrated"]


# --- money in: a sidecar with payments against the fake Stripe ----------------------------------------

from support.payments import Shop, start_shop, stop_shop  # noqa: E402


@pytest_asyncio.fixture
async def shop(redis_client: redis.asyncio.Redis, redis_url: str, migrated_database_url: str) -> AsyncIterator[Shop]:
    instance = await start_shop(redis_url, migrated_database_url)
    try:
        yield instance
    finally:
        await stop_shop(instance)
