"""One way to run a helper server as a child process: start it, wait until it answers, stop it.

Used by the embedded Redis/Postgres servers, the benchmark's processes and the tests' `sidecar serve`.
Every child runs in its own session with its output in a log file (never a pipe that can fill), whose
tail is attached to every start failure. Nothing it starts outlives us:
- a child that fails to start is killed before the error is raised;
- stop() sends the child's own stop signal, then SIGKILLs its whole process group after a bounded wait;
- a child started from the main thread gets its stop signal from the kernel if this process dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from sidecar.errors import StartupError

HOST = "127.0.0.1"
LOG_TAIL_LINES = 40
POLL_INTERVAL_S = 0.05
KILL_WAIT_S = 10.0
_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class StartError(StartupError, RuntimeError):
    """A child exited during its start, or did not answer in time; the message ends with its log's tail."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    # What stops it cleanly: SIGTERM for most; Postgres wants SIGINT ("fast" shutdown).
    stop_signal: signal.Signals = signal.SIGTERM
    url: str = ""  # where it serves, once known

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def running(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)

    def kill(self, timeout_s: float = KILL_WAIT_S) -> int | None:
        """SIGKILL the child and everything in its session at once, as a crash would."""
        # Only while the child is not reaped: until then its pid, hence the group id, cannot be reused.
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout_s)
        return self.process.returncode

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """The stop signal, then SIGKILL to the group if it has not exited within timeout_s. Safe to repeat.

        Blocks: from a coroutine whose loop the child depends on (it calls back into it), use stop_async.
        """
        if self.running():
            self.signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.process.wait(timeout=timeout_s)
        return self.kill()

    async def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code, or None if it still runs after timeout_s; the event loop keeps running meanwhile."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (code := self.process.poll()) is not None:
                return code
            await asyncio.sleep(POLL_INTERVAL_S / 2)
        return self.process.poll()

    async def stop_async(self, timeout_s: float = 15.0) -> int | None:
        """stop() without blocking the event loop while the child winds down."""
        if self.running():
            self.signal(self.stop_signal)
            if (code := await self.wait_exit(timeout_s)) is not None:
                return code
        return self.kill()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            tail = [f"(no log: {exc})"]
        return f"last lines of {self.log_path}:\n" + "\n".join(tail)

    def failure(self, what: str) -> StartError:
        return StartError(f"{self.name} {what}; {self.log_tail()}")


def spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    os_user: pwd.struct_passwd | None = None,
    stop_signal: signal.Signals = signal.SIGTERM,
) -> Child:
    """Start argv with stdout and stderr appended to log_path.

    cwd is required on purpose: `python -m` puts the working directory first on sys.path, where a
    checkout's `sidecar/` would shadow the package the environment points at.
    """
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            # Own session: kill() reaches everything the child started (Postgres backends), and a ^C at the
            # terminal reaches only us, who then stop the children in order.
            start_new_session=True,
            preexec_fn=_die_with_parent_preexec(stop_signal),
            **user_kwargs(os_user),
        )
    return Child(name, process, log_path, stop_signal)


def user_kwargs(os_user: pwd.struct_passwd | None) -> dict[str, Any]:
    """Popen/run arguments to run as os_user (None: as ourselves)."""
    if os_user is None:
        return {}
    # extra_groups=[] drops root's supplementary groups too, not just the uid/gid.
    return {"user": os_user.pw_uid, "group": os_user.pw_gid, "extra_groups": []}


def _die_with_parent_preexec(death_signal: signal.Signals) -> Callable[[], None] | None:
    # PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so only the main thread's
    # children can use it safely; a worker thread's children would die with that thread.
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent_pid = os.getpid()

    def preexec() -> None:
        # Runs after the uid switch, which would otherwise clear the death signal.
        prctl(_PR_SET_PDEATHSIG, death_signal)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


# ---------------------------------------------------------------------------------------------------------
# Waiting until it answers


def wait_ready(child: Child, probe: Callable[[], T | None], timeout_s: float) -> T:
    """Poll probe until it returns something truthy, and return that. Kills the child and raises
    StartError if it exits first or timeout_s passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.running():
            raise _dead(child)
        if result := probe():
            return result
        time.sleep(POLL_INTERVAL_S / 2)
    child.kill()
    raise child.failure(f"did not answer within {timeout_s} s")


async def wait_ready_async(child: Child, probe: Callable[[], Awaitable[T | None]], timeout_s: float) -> T:
    """wait_ready for a probe that is a coroutine."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.running():
            raise _dead(child)
        if result := await probe():
            return result
        await asyncio.sleep(POLL_INTERVAL_S)
    child.kill()
    raise child.failure(f"did not answer within {timeout_s} s")


def _dead(child: Child) -> StartError:
    child.kill()  # its session may still hold something it started
    return child.failure(f"exited during start ({child.process.returncode})")


def log_match(child: Child, pattern: str) -> Callable[[], re.Match[str] | None]:
    """A probe: the first match of pattern in the child's log so far."""
    regex = re.compile(pattern)

    def probe() -> re.Match[str] | None:
        try:
            return regex.search(child.log_path.read_text(errors="replace"))
        except OSError:
            return None

    return probe


async def wait_log_match(child: Child, pattern: str, timeout_s: float) -> re.Match[str]:
    """Until the child's log matches pattern (e.g. the line saying where it listens); the match."""
    probe = log_match(child, pattern)

    async def matched() -> re.Match[str] | None:
        return probe()

    return await wait_ready_async(child, matched, timeout_s)


async def wait_http_ok(child: Child, url: str, timeout_s: float, request_timeout_s: float = 1.0) -> None:
    """Until GET url answers 200."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=request_timeout_s)) as http:

        async def probe() -> bool:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with http.get(url) as resp:
                    return resp.status == 200
            return False

        await wait_ready_async(child, probe, timeout_s)


def free_port() -> int:
    # Racy by nature (someone may take it before the child binds): callers retry on "address in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """count distinct free ports."""
    ports: list[int] = []
    for _ in range(count * 10):  # bounded: the kernel hands out distinct ports almost always
        if (port := free_port()) not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise OSError(f"could not find {count} distinct free ports")
