"""The journal of admitted calls (sidecar/proxy/inflight.py): what a dead process left open is found,
across segments, and a segment goes once every call it admitted is settled."""

from __future__ import annotations

import os

from sidecar.proxy import inflight
from sidecar.proxy.inflight import Inflight


def test_a_dead_journal_gives_back_exactly_its_open_calls_across_segments(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(inflight, "SEGMENT_BYTES_MAX", 200)  # a few calls per segment
    dead = Inflight(tmp_path)
    dead.open()
    holds = [f"{i:032x}" for i in range(20)]
    for hold in holds:
        dead.admitted(hold, "ws1", b'{"status": "expired"}')
    for hold in holds[:15]:
        dead.settled(hold)
    segments = sorted(p.name for p in dead.directory.glob("*.log"))
    assert len(segments) < 20 // 2, f"segments whose calls all settled are deleted: {segments}"
    living = Inflight(tmp_path)
    living.open()
    assert living.orphans() == [], "its owner lives: nothing is an orphan"
    os.close(dead._lock_fd)  # the owner dies; the kernel drops its lock
    orphans = living.orphans()
    assert sorted(o.hold_id for o in orphans) == holds[15:]
    assert {o.ws for o in orphans} == {"ws1"} and orphans[0].template == b'{"status": "expired"}'
    for orphan in orphans:
        Inflight.resolved(orphan)
    assert living.orphans() == [] and not dead.directory.exists(), "a dead journal with nothing open goes"


def test_a_clean_stop_removes_an_empty_journal_and_keeps_one_with_calls_open(tmp_path) -> None:
    done = Inflight(tmp_path)
    done.open()
    done.admitted("a" * 32, "ws1", b"{}")
    done.settled("a" * 32)
    done.close()
    assert not done.directory.exists()
    left = Inflight(tmp_path)
    left.open()
    left.admitted("b" * 32, "ws1", b"{}")
    left.close()  # a settlement still running at the end of the drain
    other = Inflight(tmp_path)
    other.open()
    assert [o.hold_id for o in other.orphans()] == ["b" * 32]
