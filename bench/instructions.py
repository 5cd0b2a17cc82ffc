"""Instructions per call, the measure that does not move with other load: `python -m bench.instructions`.

CPU time per call from /proc moves by tens of percent when the machine is busy (caches, frequency,
what the scheduler interleaves). The number of instructions a process executes per call does not:
this runs the bare pass-through and the sidecar, each under valgrind's callgrind, in front of the same
mock (not under valgrind), makes `--warmup` calls, zeroes the counters, makes `--calls` calls at
`--concurrency`, and reads the instructions executed (Ir) in the proxy's process(es) in between.
Redis and Postgres are not counted (the sidecar's share of their work shows in `python -m bench.cpu`).
Needs valgrind. Slow (the proxy runs ~50x slower under callgrind): about a minute per target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from bench import procstat
from bench.accounts import create_account
from bench.run import CHAT_PATH, chat_body
from bench.servers import HOST, PROVIDER_KEY_ENV, UPSTREAM_KEY, Stores, _pythonpath, sidecar_config, spawn, start_mock
from sidecar.devtools import supervisor
from sidecar.devtools.supervisor import wait_http_ok

START_TIMEOUT_S = 300.0


def _callgrind(out_dir: Path, name: str) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--quiet",
        f"--callgrind-out-file={out_dir}/{name}.%p",
    ]


async def _start(name: str, work: Path, mock_url: str, stores: Stores, workers: int) -> tuple[object, str, dict]:
    port, ops_port = supervisor.free_ports(2)
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    if name == "passthrough":
        argv = [sys.executable, "-m", "bench.passthrough", "--port", str(port), "--upstream", mock_url]
        ready = f"http://{HOST}:{port}/v1/models"
        headers = {}
    else:
        config = sidecar_config(work / "sidecar-config", mock_url, port, ops_port)
        argv = [sys.executable, "-m", "sidecar.cli", "serve", "--config", str(config), "--log-level", "WARNING"]
        if workers != 1:
            argv += ["--workers", str(workers)]
        account = await create_account(stores.redis_url, stores.database_url)
        env.update(
            SIDECAR_REDIS_URL=stores.redis_url,
            SIDECAR_DATABASE_URL=stores.database_url,
            SIDECAR_ADMIN_TOKEN="bench-instructions-token",
            **{PROVIDER_KEY_ENV: UPSTREAM_KEY},
        )
        ready = f"http://{HOST}:{ops_port}/readyz"
        headers = {"Authorization": f"Bearer {account.key}"}
    child = spawn(name, _callgrind(work, name) + argv, work, env)
    if name == "passthrough":
        await _wait_port(port)
    else:
        await wait_http_ok(child, ready, START_TIMEOUT_S)
    return child, f"http://{HOST}:{port}{CHAT_PATH}", headers


async def _wait_port(port: int) -> None:
    for _ in range(int(START_TIMEOUT_S * 10)):
        try:
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


async def _calls(url: str, headers: dict, count: int, concurrency: int) -> None:
    body = chat_body(False)
    queue = iter(range(count))
    async with aiohttp.ClientSession() as http:

        async def one_connection() -> None:
            for _ in queue:
                async with http.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"answered {resp.status}")

        await asyncio.gather(*(one_connection() for _ in range(concurrency)))


def _control(action: str, pids: list[str]) -> None:
    for pid in pids:
        subprocess.run(["callgrind_control", action, pid], capture_output=True, check=False)


def _clear(out_dir: Path, name: str) -> None:
    for path in out_dir.glob(f"{name}.*"):
        path.unlink()


def _total_ir(out_dir: Path, name: str) -> int:
    """Ir over every dump of every process of `name` since the zeroing."""
    total = 0
    for path in out_dir.glob(f"{name}.*"):
        text = path.read_text(errors="replace")
        for match in re.finditer(r"^(?:summary|totals):\s+(\d+)", text, re.M):
            total += int(match.group(1))
            break
    return total


async def measure(name: str, args: argparse.Namespace, stores: Stores, mock_url: str) -> float:
    with tempfile.TemporaryDirectory(prefix=f"bench-ir-{name}-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        child, url, headers = await _start(name, work, mock_url, stores, args.workers)
        try:
            await _calls(url, headers, args.warmup, args.concurrency)
            await asyncio.sleep(1.0)  # the warm-up's settlements and flush
            # Only this target's processes (with --workers, the supervisor's children): never another user's.
            pids = [str(p) for p in [child.pid, *procstat.child_pids(child.pid)]]
            await asyncio.to_thread(_control, "--zero", pids)
            await _calls(url, headers, args.calls, args.concurrency)
            await asyncio.sleep(args.tail_s)  # the flusher's share of these calls
            await asyncio.to_thread(_clear, work, name)  # what the start wrote: only the dump below counts
            await asyncio.to_thread(_control, "--dump", pids)
            await asyncio.sleep(1.0)
            return await asyncio.to_thread(_total_ir, work, name) / args.calls
        finally:
            await asyncio.to_thread(child.stop)


async def main_async(args: argparse.Namespace, stores: Stores, work_dir: Path) -> None:
    mock = await start_mock(work_dir)
    try:
        results = {}
        for name in args.targets:
            results[name] = await measure(name, args, stores, mock.url)
            print(f"{name:<11} {results[name] / 1e6:8.3f} M instructions per call", flush=True)
        if "passthrough" in results and "sidecar" in results:
            print(f"sidecar / passthrough: {results['sidecar'] / results['passthrough']:.2f}x", flush=True)
    finally:
        await asyncio.to_thread(mock.stop)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="the sidecar's --workers")
    parser.add_argument("--tail-s", type=float, default=2.0, help="counted after the last call (the ledger flush)")
    parser.add_argument("--targets", default="passthrough,sidecar")
    args = parser.parse_args()
    args.targets = args.targets.split(",")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("python -m bench.instructions needs valgrind (callgrind_control)", file=sys.stderr)
        return 2
    stores = Stores()
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        work_dir = Path(tmp)
        os.chmod(work_dir, 0o755)
        try:
            stores.start(work_dir)
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main_async(args, stores, work_dir))
        finally:
            stores.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
