"""Optional: sample the sidecar with py-spy (not a project dependency: `pip install py-spy`) while a load
runs, and summarize where its CPU goes: self time (the function on top of the stack) and total time
(anywhere on the stack), by function."""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
import sys
from pathlib import Path
from typing import Any

SAMPLE_RATE = 250
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def executable() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return executable() is not None


async def start(pid: int, out: Path, seconds: float) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        executable() or "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds + 1)),
        "--rate",
        str(SAMPLE_RATE),
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def finish(recorder: asyncio.subprocess.Process, raw_path: Path, top: int = 20) -> dict[str, Any]:
    try:
        await asyncio.wait_for(recorder.wait(), 30)
    except TimeoutError:
        recorder.kill()
        await recorder.wait()
    return await asyncio.to_thread(summarize_file, raw_path, top)


def summarize_file(raw_path: Path, top: int = 20) -> dict[str, Any]:
    if not raw_path.exists():
        return {"samples": 0, "self": [], "total": []}
    return summarize(raw_path.read_text(errors="replace"), top)


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/sidecar/", "/lib/python3"):
        at = path.rfind(marker)
        if at >= 0:
            path = path[at + len(marker) :] if marker != "/sidecar/" else "sidecar/" + path[at + len(marker) :]
            break
    return f"{match.group('func')} ({path})"


def summarize(raw: str, top: int = 20) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks: `frame;frame;...;leaf count` per line."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return {
        "samples": samples,
        "self": [(name, count / samples) for name, count in own.most_common(top)] if samples else [],
        "total": [(name, count / samples) for name, count in total.most_common(top + 15)] if samples else [],
    }


if __name__ == "__main__":  # python -m bench.profile RAW_FILE: print a summary of a py-spy raw file
    result = summarize(Path(sys.argv[1]).read_text(errors="replace"), int(sys.argv[2]) if len(sys.argv) > 2 else 25)
    print(f"{result['samples']} samples\n-- self --")
    for name, share in result["self"]:
        print(f"{share * 100:6.1f}%  {name}")
    print("-- total --")
    for name, share in result["total"]:
        print(f"{share * 100:6.1f}%  {name}")
