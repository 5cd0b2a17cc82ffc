"""The calls this process admitted and has not settled yet: an append-only journal on disk.

A call's hold lives in Redis. If the process serving the call dies, the sweeper voids the hold at its
deadline and records the call `expired`; but if Redis also restarts without its AOF before then, the
hold is gone and nothing anywhere knows of the call. This journal does. Each process appends
`A [hold, workspace, event template]` when a call is admitted and `S hold` when it is settled (or
spooled), under `<spool_dir>/inflight/<its own directory>`, locked (flock) for as long as it lives.
A process that finds another's directory unlocked (that process died) settles what the journal left
open through expire.lua's `lost` mode: a hold still held is left to the sweeper; a hold gone and never
resolved is recorded `expired` at 0 from the journalled template. Postgres dedups on the event id, so
a repeat is harmless.

One write() per call on an open file: no file created per call, no fsync (the journal must survive
the process, SIGKILL or OOM, not the machine; the page cache does). Segments roll over at
SEGMENT_BYTES_MAX and an old one is deleted once every call it admitted is settled.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import orjson

LOCK = "lock"
SEGMENT_BYTES_MAX = 4 * 1024 * 1024
ORPHANS_MAX = 500  # calls recovered per pass; the next pass takes the rest


@dataclass(frozen=True, slots=True)
class Orphan:
    directory: Path  # the dead process's journal
    hold_id: str
    ws: str
    template: bytes


class Inflight:
    def __init__(self, spool_dir: str | os.PathLike) -> None:
        self.root = Path(spool_dir) / "inflight"
        self.directory: Path | None = None
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the current segment, opened O_APPEND
        self._segment = 0
        self._segment_bytes = 0
        self._segment_of: dict[str, int] = {}  # open call -> the segment that admitted it
        self._open_in: dict[int, int] = {}  # segment -> calls it admitted still open

    def open(self) -> None:
        """This process's own journal, locked until the process ends (the kernel drops the lock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.directory = self.root / f"{os.getpid()}-{secrets.token_hex(6)}"
        self.directory.mkdir()
        self._lock_fd = os.open(self.directory / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._roll()

    def close(self) -> None:
        """At a stop: a journal with no open call goes; one with calls left is unlocked for another process."""
        if self._lock_fd is None:
            return
        os.close(self._fd)
        if not self._segment_of:
            shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = self._fd = None

    def admitted(self, hold_id: str, ws: str, template: bytes) -> None:
        if self._fd is None:
            return
        line = b"A " + orjson.dumps([hold_id, ws, template.decode()]) + b"\n"
        os.write(self._fd, line)
        self._segment_of[hold_id] = self._segment
        self._open_in[self._segment] = self._open_in.get(self._segment, 0) + 1
        self._segment_bytes += len(line)
        if self._segment_bytes >= SEGMENT_BYTES_MAX:
            self._roll()

    def settled(self, hold_id: str) -> None:
        segment = self._segment_of.pop(hold_id, None)
        if segment is None or self._fd is None:
            return
        os.write(self._fd, b"S " + hold_id.encode() + b"\n")
        self._open_in[segment] -= 1
        if self._open_in[segment] == 0 and segment != self._segment:
            del self._open_in[segment]
            (self.directory / _segment_name(segment)).unlink(missing_ok=True)

    def _roll(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            if self._open_in.get(self._segment) == 0:
                del self._open_in[self._segment]
                (self.directory / _segment_name(self._segment)).unlink(missing_ok=True)
            self._segment += 1
        path = self.directory / _segment_name(self._segment)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segment_bytes = 0

    # --- recovery, by another process ------------------------------------------------------------------

    def orphans(self) -> list[Orphan]:
        """The open calls of processes that died; a dead journal with none left is removed."""
        found: list[Orphan] = []
        if not self.root.is_dir():
            return found
        for directory in self.root.iterdir():
            if directory == self.directory or not directory.is_dir() or not _dead(directory):
                continue
            pending = _open_calls(directory)
            if not pending:
                shutil.rmtree(directory, ignore_errors=True)
                continue
            found.extend(Orphan(directory, hold, ws, template) for hold, (ws, template) in pending.items())
            if len(found) >= ORPHANS_MAX:
                break
        return found[:ORPHANS_MAX]

    @staticmethod
    def resolved(orphan: Orphan) -> None:
        """Mark a dead process's call as dealt with (appended to its journal: small appends are atomic)."""
        fd = os.open(orphan.directory / _segment_name(0, recovered=True), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, b"S " + orphan.hold_id.encode() + b"\n")
        finally:
            os.close(fd)


def _segment_name(segment: int, recovered: bool = False) -> str:
    return "recovered.log" if recovered else f"{segment:08d}.log"


def _open_calls(directory: Path) -> dict[str, tuple[str, bytes]]:
    admitted: dict[str, tuple[str, bytes]] = {}
    settled: set[str] = set()
    for path in sorted(directory.glob("*.log")):
        for line in path.read_bytes().split(b"\n"):
            if line.startswith(b"S "):
                settled.add(line[2:].decode(errors="replace"))
            elif line.startswith(b"A "):
                try:
                    hold, ws, template = orjson.loads(line[2:])
                except (ValueError, TypeError):
                    continue  # a line torn by the death itself
                admitted[hold] = (ws, template.encode())
    return {hold: entry for hold, entry in admitted.items() if hold not in settled}


def _dead(directory: Path) -> bool:
    """True when no process holds the directory's lock (its owner died, or stopped without cleaning)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases a lock taken here
    return True
