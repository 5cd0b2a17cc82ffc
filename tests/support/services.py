"""Finding or starting the Redis and Postgres the tests talk to.

Order (DESIGN.md §10): an explicit URL from the environment, then the machine's server on its default
port, then a private embedded one. The probed addresses can be overridden, or set to "off", to force the
embedded path: SIDECAR_TEST_LOCAL_REDIS=127.0.0.1:6379, SIDECAR_TEST_LOCAL_POSTGRES=127.0.0.1:5432.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from sidecar.devtools.embedded import (
    EmbeddedError,
    PostgresServer,
    RedisServer,
    quote_ident,
    redis_ping,
    start_postgres,
    start_redis,
)

REDIS_URL_ENV = "SIDECAR_TEST_REDIS_URL"
DATABASE_URL_ENV = "SIDECAR_TEST_DATABASE_URL"
LOCAL_REDIS_ENV = "SIDECAR_TEST_LOCAL_REDIS"
LOCAL_POSTGRES_ENV = "SIDECAR_TEST_LOCAL_POSTGRES"
# db 15 keeps the tests' FLUSHDB away from whatever else uses the machine's Redis.
LOCAL_REDIS_DB = 15
PROBE_TIMEOUT_S = 2.0

T = TypeVar("T")


def run_sync(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    # Session fixtures are synchronous (a session-scoped event loop would tie every async test to it), so
    # they run their few queries on a private loop in a worker thread.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-services") as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


def _probe_address(env_name: str, default: str) -> tuple[str, int] | None:
    value = os.environ.get(env_name, default).strip()
    if value.lower() in ("", "off", "none"):
        return None
    host, _, port = value.rpartition(":")
    return host, int(port)


def local_redis_url() -> str | None:
    """The machine's Redis (db 15) if it answers PING, else None."""
    address = _probe_address(LOCAL_REDIS_ENV, "127.0.0.1:6379")
    if address is None or not redis_ping(*address, timeout_s=PROBE_TIMEOUT_S):
        return None
    host, port = address
    return f"redis://{host}:{port}/{LOCAL_REDIS_DB}"


def local_postgres_admin_url() -> str | None:
    """The machine's Postgres (as user postgres, database postgres) if it accepts a connection, else None."""
    address = _probe_address(LOCAL_POSTGRES_ENV, "127.0.0.1:5432")
    if address is None:
        return None
    host, port = address
    url = f"postgresql://postgres@{host}:{port}/postgres"

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=PROBE_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        await conn.close()
        return True

    return url if run_sync(probe) else None


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def create_test_database(admin_url: str) -> str:
    """CREATE a fresh, uniquely named database and return its URL."""
    dbname = f"sidecar_test_{secrets.token_hex(4)}"

    async def create() -> None:
        conn = await asyncpg.connect(admin_url, timeout=10)
        try:
            await conn.execute(f"CREATE DATABASE {quote_ident(dbname)}")
        finally:
            await conn.close()

    run_sync(create)
    return with_database(admin_url, dbname)


def drop_test_database(admin_url: str, database_url: str) -> None:
    """Best effort: FORCE ends connections a test leaked; a failure only warns."""
    dbname = urlsplit(database_url).path.lstrip("/")

    async def drop() -> None:
        conn = await asyncpg.connect(admin_url, timeout=10)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(dbname)} WITH (FORCE)")
        finally:
            await conn.close()

    try:
        run_sync(drop)
    except Exception as exc:
        warnings.warn(f"could not drop test database {dbname}: {exc!r}", stacklevel=2)


@contextlib.contextmanager
def postgres_tmp_dir() -> Iterator[Path]:
    """A short directory under /tmp for a private Postgres's data, removed afterwards.

    Not pytest's tmp_path: as root, Postgres runs as the postgres user, who cannot enter pytest's 0700
    base dir, and every pytest run (another engineer's too) resets that dir to 0700 as it starts. A short
    path also leaves room for the unix socket inside the data dir.
    """
    path = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
    try:
        yield path / "data"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def session_redis_url(tmp_dir: Path) -> Iterator[str]:
    if url := os.environ.get(REDIS_URL_ENV):
        yield url
        return
    if url := local_redis_url():
        yield url
        return
    server = start_redis(tmp_dir, persistent=False)
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def session_database_url() -> Iterator[str]:
    """A fresh database on the configured, local or embedded Postgres, dropped afterwards."""
    admin_url = os.environ.get(DATABASE_URL_ENV) or local_postgres_admin_url()
    if admin_url is not None:
        yield from _fresh_database(admin_url)
        return
    with postgres_tmp_dir() as data_dir:
        server = _start_embedded_postgres(data_dir, "postgres", f"; or point {DATABASE_URL_ENV} at a running Postgres")
        try:
            yield from _fresh_database(server.admin_url)
        finally:
            server.stop()


def _start_embedded_postgres(data_dir: Path, dbname: str, hint: str = "") -> PostgresServer:
    try:
        return start_postgres(data_dir, dbname=dbname, durable=False)
    except EmbeddedError as exc:
        reason = str(exc)
    # One line that says what to do, not a traceback through the fixtures (so outside the except block).
    pytest.fail(f"cannot start the embedded Postgres: {reason}{hint}", pytrace=False)


def _fresh_database(admin_url: str) -> Iterator[str]:
    database_url = create_test_database(admin_url)
    try:
        yield database_url
    finally:
        drop_test_database(admin_url, database_url)


@contextlib.contextmanager
def private_redis_server(data_dir: Path) -> Iterator[RedisServer]:
    server = start_redis(data_dir, persistent=True)
    try:
        yield server
    finally:
        server.stop()  # stops whatever process a test's restart() left running


@contextlib.contextmanager
def private_postgres_server() -> Iterator[PostgresServer]:
    with postgres_tmp_dir() as data_dir:
        server = _start_embedded_postgres(data_dir, "sidecar")
        try:
            yield server
        finally:
            server.stop()
