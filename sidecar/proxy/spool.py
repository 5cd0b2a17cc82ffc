"""Settlements Redis could not take within their budget, kept on disk until it can.

A call that relayed tokens must be recorded and charged even when Redis is unreachable as it ends
(DESIGN.md §6). Such a settlement is written here, one file per call named by its hold id, atomically
(temp file, fsync, rename, fsync of the directory): a crash leaves it whole or absent, never torn. The
replayer (`settlement.replay_spool`) settles it through the same Lua script later. The script resolves
a hold at most once, so a replay whose first try did land changes nothing; the file is removed only
after Redis answered.

Limits: at most `max_entries` files; past that `put` refuses and the caller logs the loss loudly (the
hold then expires and the sweeper records the call as expired).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import orjson

DEAD_DIR = "dead"
SUFFIX = ".json"


class Spool:
    def __init__(self, directory: str | os.PathLike, max_entries: int) -> None:
        assert max_entries > 0
        self.directory = Path(directory)
        self.max_entries = max_entries

    def open(self) -> None:
        """Create the directory; raises OSError with the path when it cannot be written."""
        (self.directory / DEAD_DIR).mkdir(parents=True, exist_ok=True)
        # Named per process: replicas sharing the directory start together.
        probe = self.directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()

    def put(self, hold_id: str, record: dict) -> bool:
        """Write one settlement durably. False: the spool is full."""
        assert hold_id.isalnum(), hold_id  # a hold id is a uuid4 hex: safe as a file name
        if self.size() >= self.max_entries:
            return False
        final = self.directory / f"{hold_id}{SUFFIX}"
        temp = self.directory / f".{hold_id}.tmp"
        data = memoryview(orjson.dumps(record))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while data:  # os.write may write less than asked (a full disk): never leave it torn
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        self._sync_directory()
        return True

    def pending(self, limit: int) -> list[Path]:
        """Up to `limit` spooled settlements, oldest first."""
        paths = [p for p in self.directory.iterdir() if p.suffix == SUFFIX and not p.name.startswith(".")]
        paths.sort(key=lambda p: p.stat().st_mtime_ns)
        return paths[:limit]

    def size(self) -> int:
        return sum(1 for p in self.directory.iterdir() if p.suffix == SUFFIX and not p.name.startswith("."))

    @staticmethod
    def read(path: Path) -> dict:
        return orjson.loads(path.read_bytes())

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self._sync_directory()

    def bury(self, path: Path) -> None:
        """Set aside a settlement that can no longer be replayed safely, for the operator and the auditor."""
        os.replace(path, self.directory / DEAD_DIR / path.name)
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
