"""`sidecar serve --workers N`: N serving processes on one port, one supervisor, one background process.

One Python process uses one core. To use more, N worker processes each bind the data port with
SO_REUSEPORT (the kernel spreads new connections over them) and serve calls, nothing else. The ledger
flusher, the hold sweeper and the spool replayer (with the recovery of a dead process's journal) run
once per host, in a background process of their own, so no serving loop pays for them and their
work is not repeated N times.

The supervisor (the process started) forks the background process and the workers before any event
loop exists, then only waits: a child that dies is started again (at most RESTARTS_MAX within
RESTART_WINDOW_S, else the whole server stops, exit 1). On SIGTERM or SIGINT, one drain: the workers
get SIGTERM and drain as a single process does (stop accepting, finish and settle their calls); once
they are gone, the background process gets SIGTERM and drains the ledger into Postgres one last time.
A child left past its time is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger("sidecar.workers")

WORKERS_MAX = 256
RESTARTS_MAX = 5
RESTART_WINDOW_S = 60.0
BACKGROUND_STOP_S = 30.0  # the background process's last ledger drain, and its margin
SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGCHLD})
_PR_SET_PDEATHSIG = 1


def usable_cpus() -> int:
    """The CPUs this process may use: its cgroup's CPU quota (a container's limit), else its affinity."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, min(cpus, WORKERS_MAX))


class Role(StrEnum):
    WORKER = "worker"  # serves the data port (and the ops port, shared)
    BACKGROUND = "background"  # flusher, sweeper, spool replay


@dataclass
class _Child:
    role: Role
    index: int
    pid: int


# A child's body: runs its event loop until its stop, returns the exit code.
Body = Callable[[Role, int], int]


def supervise(workers: int, body: Body, stop_timeout_s: float) -> int:
    """Start the background process and `workers` workers, keep them running, drain on SIGTERM/SIGINT.
    `stop_timeout_s`: how long a worker may take to drain (the config's drain and settle time)."""
    assert 1 <= workers <= WORKERS_MAX
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    children: dict[int, _Child] = {}
    restarts: list[float] = []
    try:
        for role, index in [(Role.BACKGROUND, 0)] + [(Role.WORKER, i) for i in range(workers)]:
            child = _spawn(role, index, body)
            children[child.pid] = child
        log.info("serving", extra={"workers": workers})
        while True:
            info = signal.sigtimedwait(SIGNALS, 1.0)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                break
            for child, status in _reap(children):
                restarts = [t for t in restarts if time.monotonic() - t < RESTART_WINDOW_S] + [time.monotonic()]
                log.error(
                    "a child process ended; starting it again",
                    extra={"role": child.role.value, "worker": child.index, "exit_status": status},
                )
                if len(restarts) > RESTARTS_MAX:
                    log.critical("child processes keep ending; stopping", extra={"restarts": len(restarts)})
                    _stop_all(children, stop_timeout_s)
                    return 1
                again = _spawn(child.role, child.index, body)
                children[again.pid] = again
        _stop_all(children, stop_timeout_s)
        return 0
    finally:
        for child in children.values():  # only if something above raised: nothing is left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)


def _spawn(role: Role, index: int, body: Body) -> _Child:
    pid = os.fork()
    if pid:
        return _Child(role, index, pid)
    code = 1
    try:
        # Its own process group: a terminal's Ctrl-C reaches the supervisor alone, which stops the
        # children in order (workers, then the background process), as it does on SIGTERM.
        os.setpgid(0, 0)
        _die_with_parent()
        for signo in SIGNALS:
            signal.signal(signo, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        code = body(role, index)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("a child process failed", extra={"role": role.value, "worker": index})
    finally:
        logging.shutdown()
        os._exit(code)


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM should the supervisor be killed outright (no orphan keeps the port)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _reap(children: dict[int, _Child]) -> list[tuple[_Child, int]]:
    ended = []
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        child = children.pop(pid, None)
        if child is not None:
            ended.append((child, os.waitstatus_to_exitcode(status)))
    return ended


def _stop_all(children: dict[int, _Child], stop_timeout_s: float) -> None:
    """Workers first (they drain and settle), then the background process (the ledger's last drain)."""
    for role, timeout_s in ((Role.WORKER, stop_timeout_s), (Role.BACKGROUND, BACKGROUND_STOP_S)):
        group = {pid: c for pid, c in children.items() if c.role is role}
        for pid in group:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while group and time.monotonic() < deadline:
            signal.sigtimedwait(SIGNALS, 0.2)
            for child, _ in _reap(children):
                group.pop(child.pid, None)
        for pid in group:
            log.error("a child process did not stop in time; killed", extra={"role": role.value})
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            children.pop(pid, None)
