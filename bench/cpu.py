"""CPU per call, a measure that holds on a busy machine: `python -m bench.cpu`.

Throughput and latency move with whatever else the cores run; the CPU time a process spends per call
(from /proc) moves far less. This runs the pass-through and the sidecar in turns, closed loop at one
call at a time and at 64, and prints for each: the calls completed, the CPU per call of every process
(the proxy, the mock, Redis, Postgres) and, at one call at a time, p50/p99 latency. Used to judge each
change of docs/performance.md while other work shares the machine; `make bench` is the full picture.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import tempfile
from pathlib import Path

import aiohttp

from bench.run import Bench, Settings, Stores, chat_body
from bench.stats import summarize

SERVERS = ("passthrough", "sidecar", "mock", "redis", "postgres")
# The sidecar's own histograms split a call's time: before forwarding (auth, parsing, admission), the
# upstream's answer; the rest of the end-to-end latency is settlement and the response.
PHASES = ("overhead", "upstream_latency")
_HISTOGRAM = re.compile(r"^sidecar_(overhead|upstream_latency)_seconds_(sum|count)(?:\{[^}]*\})? (\S+)$", re.M)


async def _histograms(ops_url: str) -> dict[tuple[str, str], float]:
    async with aiohttp.ClientSession() as http, http.get(ops_url + "/metrics") as resp:
        text = await resp.text()
    out: dict[tuple[str, str], float] = {}
    for phase, kind, value in _HISTOGRAM.findall(text):
        out[(phase, kind)] = out.get((phase, kind), 0.0) + float(value)
    return out


async def measure(bench: Bench, name: str, concurrency: int, duration_s: float) -> dict:
    await bench._settle_backlog()
    target = bench.targets[name]
    spec = target.spec("closed", chat_body(False), concurrency=concurrency, warmup_s=1.0, duration_s=duration_s)
    before = await _histograms(bench.sidecar_ops_url) if name == "sidecar" else {}
    run = await bench.load(spec)
    after = await _histograms(bench.sidecar_ops_url) if name == "sidecar" else {}
    calls = run.total("completed")
    per_call = {k: run.cpu.get(k, 0.0) * run.window_s / max(calls, 1) * 1e6 for k in SERVERS}
    lat = summarize(run.merged("latency_us"))
    phases = {}
    for phase in PHASES if after else ():
        count = after.get((phase, "count"), 0) - before.get((phase, "count"), 0)
        phases[phase] = (after.get((phase, "sum"), 0) - before.get((phase, "sum"), 0)) / max(count, 1) * 1000
    return {
        "calls": calls,
        "rps": calls / run.window_s,
        "cpu_us": per_call,
        "lat": lat,
        "busy": run.machine_busy_cores,
        "phases_ms": phases,
    }


async def main_async(args: argparse.Namespace, stores: Stores, work_dir: Path) -> None:
    settings = Settings()
    settings.sidecar_workers = args.workers
    bench = Bench(settings, stores, work_dir)
    await bench.start()
    try:
        for concurrency in args.levels:
            for round_ in range(args.rounds):
                for name in ("passthrough", "sidecar"):
                    r = await measure(bench, name, concurrency, args.duration)
                    cpu = "  ".join(f"{k} {v:6.0f}" for k, v in r["cpu_us"].items() if v >= 1)
                    lat = r["lat"]
                    phases = " ".join(f"{k} {v:.3f} ms" for k, v in r["phases_ms"].items())
                    ms = {k: lat[k] / 1000 for k in ("p50", "mean", "p99")}
                    print(
                        f"c={concurrency:<3} {name:<11} round {round_ + 1}: {r['rps']:7.0f} calls/s "
                        f"p50 {ms['p50']:6.2f} ms mean {ms['mean']:6.2f} ms p99 {ms['p99']:6.2f} ms"
                        f" | CPU us/call: {cpu} | machine {r['busy']:.2f} cores",
                        flush=True,
                    )
                    if phases:
                        print(f"      sidecar phases, mean: {phases}", flush=True)
    finally:
        await bench.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,64", help="closed-loop concurrency levels")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="the sidecar's --workers")
    args = parser.parse_args()
    args.levels = [int(v) for v in args.levels.split(",")]
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
