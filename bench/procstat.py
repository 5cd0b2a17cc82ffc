"""CPU time and resident memory of processes, read from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, with_children: bool = False) -> float:
    """utime + stime of the process (all its threads); with reaped children's times if asked."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) pgrp(2) session(3) ... utime(11) stime(12) cutime(13) cstime(14)
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def child_pids(parent: int) -> list[int]:
    """The live children of a process (a Postgres postmaster's backends: each calls setsid(), so a
    session or process group does not find them)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None and int(fields[1]) == parent:
            pids.append(int(entry))
    return pids


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Watched:
    """A server whose CPU we account: one process, or a process and its children (Postgres: the
    postmaster and its backends)."""

    name: str
    pid: int
    with_children: bool = False

    def cpu(self) -> float:
        if not self.with_children:
            return cpu_seconds(self.pid)
        # Live children's own time, plus what exited ones left in the parent's children counters.
        return cpu_seconds(self.pid, with_children=True) + sum(cpu_seconds(pid) for pid in child_pids(self.pid))

    def rss(self) -> int:
        own = rss_bytes(self.pid)
        if not self.with_children:
            return own
        return own + sum(rss_bytes(pid) for pid in child_pids(self.pid))


def snapshot(watched: list[Watched]) -> dict[str, float]:
    return {w.name: w.cpu() for w in watched}


def cpu_share(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """Per process: the fraction of one core used between two snapshots."""
    if wall_s <= 0:
        return {}
    return {name: (after.get(name, 0.0) - before[name]) / wall_s for name in before}
