"""The calls this process admitted and has not settled yet: a journal on disk, one small file each.

A call's hold lives in Redis. If the process serving the call dies, the sweeper voids the hold at its
deadline and records the call `expired`; but if Redis also restarts without its AOF before then, the
hold is gone and nothing anywhere knows of the call. This journal does: each process writes its calls
under `<spool_dir>/inflight/<its own directory>`, locked (flock) for as long as it lives. A process
that finds another's directory unlocked (that process died) settles what is left there through
expire.lua's `lost` mode: a hold still held is left to the sweeper; a hold gone and never resolved is
recorded `expired` at 0 from the journalled template. Postgres dedups on the event id, so a repeat is
harmless.

No fsync: the journal must survive the process (SIGKILL, OOM), not the machine; the page cache does.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import orjson

LOCK = "lock"
ORPHANS_MAX = 500  # files recovered per pass; the next pass takes the rest


class Inflight:
    def __init__(self, spool_dir: str | os.PathLike) -> None:
        self.root = Path(spool_dir) / "inflight"
        self.directory: Path | None = None
        self._lock_fd: int | None = None

    def open(self) -> None:
        """This process's own directory, locked until the process ends (the kernel drops the lock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.directory = self.root / f"{os.getpid()}-{secrets.token_hex(6)}"
        self.directory.mkdir()
        self._lock_fd = os.open(self.directory / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def close(self) -> None:
        """At a stop: an empty journal goes; one with calls left is unlocked for another process."""
        if self._lock_fd is None:
            return
        if all(p.name == LOCK for p in self.directory.iterdir()):
            shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def admitted(self, hold_id: str, ws: str, template: bytes) -> None:
        if self.directory is None:
            return
        fd = os.open(self.directory / hold_id, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, orjson.dumps({"ws": ws, "template": template.decode()}))
        finally:
            os.close(fd)

    def settled(self, hold_id: str) -> None:
        if self.directory is not None:
            (self.directory / hold_id).unlink(missing_ok=True)

    def orphans(self) -> Iterator[tuple[Path, str, bytes]]:
        """(journal file, workspace, event template) of calls whose process died; an emptied dead
        directory is removed."""
        if not self.root.is_dir():
            return
        found = 0
        for directory in self.root.iterdir():
            if directory == self.directory or not directory.is_dir() or not _dead(directory):
                continue
            files = [p for p in directory.iterdir() if p.name != LOCK]
            if not files:
                shutil.rmtree(directory, ignore_errors=True)
                continue
            for path in files:
                try:
                    entry = orjson.loads(path.read_bytes())
                    yield path, entry["ws"], entry["template"].encode()
                except (OSError, ValueError, KeyError, TypeError):
                    path.unlink(missing_ok=True)  # torn by the death itself: nothing to recover from
                found += 1
                if found >= ORPHANS_MAX:
                    return


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
