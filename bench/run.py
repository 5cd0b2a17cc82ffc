"""The benchmark run: start everything, measure each phase against the three targets, write the report.

Targets, in this order everywhere:
  direct       the mock provider itself (the floor)
  passthrough  bench/passthrough.py in front of the mock (the cost of being a Python proxy)
  sidecar      `sidecar serve` in front of the mock, full metering (auth, rate limit, hold, settle,
               ledger flush)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from bench import procstat, report
from bench.accounts import BenchAccount, LedgerProbe, create_account
from bench.servers import (
    MODEL,
    UPSTREAM_KEY,
    Child,
    Stores,
    sidecar_source,
    start_mock,
    start_passthrough,
    start_sidecar,
)
from bench.stats import summarize

TARGETS = ("direct", "passthrough", "sidecar")
MB = 1_000_000
QUIET_CORES = 0.25  # background load below which the machine counts as quiet
INTERFERENCE_CORES = 0.35  # other load during a run above which the run is done again (once)
RERUNS_MAX = 8  # keeps a run on a busy machine bounded in time
FLUSH_TIMEOUT_S = 30.0  # the longest a flush measurement waits for its backlog to land
CHAT_PATH = "/v1/chat/completions"
PROMPT = "hello there, how are you today?"


@dataclass
class Settings:
    warmup_s: float = 1.0
    duration_s: float = 5.0
    levels: tuple[int, ...] = (16, 64, 256)
    gen_procs: int = 1
    load_fraction: float = 0.5
    stream_concurrency: int = 200
    stream_chunks: int = 64
    stream_delay_ms: float = 20.0
    stream_warmup_s: float = 1.5
    stream_duration_s: float = 4.0
    rounds: int = 2  # latency and streaming: runs per target, the targets taking turns
    hold_streams: int = 1000
    hold_delay_ms: float = 100.0
    hold_ramp_s: float = 1.0
    flush_events: int = 50_000
    sidecar_log_level: str = "INFO"
    sidecar_workers: int = 1  # `sidecar serve --workers N`
    single_duration_s: float = 6.0  # one call at a time: seconds counted per target, over all rounds
    profile: bool = False
    quiet_wait_s: float = 60.0
    profile_s: float = 8.0

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            warmup_s=0.5,
            duration_s=2.0,
            levels=(64,),
            stream_concurrency=50,
            stream_warmup_s=1.5,
            stream_duration_s=2.0,
            rounds=1,
            hold_streams=200,
            hold_delay_ms=50.0,
            flush_events=10_000,
            profile_s=4.0,
            single_duration_s=2.0,
        )


@dataclass
class Target:
    name: str
    host: str
    port: int
    headers: dict[str, str]
    server: str  # the process whose memory is this target's: mock, passthrough or sidecar

    def spec(self, mode: str, body: dict, extra_headers: dict[str, str] | None = None, **fields: Any) -> dict:
        return {
            "mode": mode,
            "host": self.host,
            "port": self.port,
            "path": CHAT_PATH,
            "headers": {**self.headers, **(extra_headers or {})},
            "body": body,
            **fields,
        }


@dataclass
class GenRun:
    """One load-generator run (one or more processes), with the CPU of every process over its window."""

    results: list[dict[str, Any]]
    cpu: dict[str, float]
    machine_busy_cores: float
    window: tuple[float, float]
    measured_s: float = 0.0  # the window's length; for merged runs, the sum of theirs

    @classmethod
    def merge(cls, runs: list[GenRun]) -> GenRun:
        """Several runs of one target as one: results pooled, CPU averaged over the time measured."""
        total = sum(run.window_s for run in runs)
        cpu: dict[str, float] = {}
        for run in runs:
            for name, share in run.cpu.items():
                if not name.startswith("generator") or name == "generator":
                    cpu[name] = cpu.get(name, 0.0) + share * run.window_s / total
        busy = sum(run.machine_busy_cores * run.window_s for run in runs) / total
        results = [result for run in runs for result in run.results]
        return cls(results, cpu, busy, (runs[0].window[0], runs[-1].window[1]), total)

    def merged(self, key: str) -> list[int]:
        out: list[int] = []
        for result in self.results:
            out.extend(result.get(key, []))
        return out

    def total(self, key: str) -> float:
        return sum(result.get(key, 0) for result in self.results)

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for result in self.results:
            for status, count in result["statuses"].items():
                out[status] = out.get(status, 0) + count
        return out

    def errors(self) -> int:
        return sum(count for status, count in self.statuses().items() if status != "200")

    @property
    def window_s(self) -> float:
        return self.measured_s or self.window[1] - self.window[0]


def _machine_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def chat_body(stream: bool) -> dict:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


class Bench:
    def __init__(self, settings: Settings, stores: Stores, work_dir: Path) -> None:
        self.s = settings
        self.stores = stores
        self.work_dir = work_dir
        self.children: dict[str, Child] = {}
        self.watched: list[procstat.Watched] = []
        self.targets: dict[str, Target] = {}
        self.account: BenchAccount | None = None
        self.probe: LedgerProbe | None = None
        self.results: dict[str, Any] = {"phases": {}, "notes": list(stores.notes), "reruns": []}
        self.reruns = 0
        self.started = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        stores, log_dir = self.stores, self.work_dir
        self.account = await create_account(stores.redis_url, stores.database_url)
        mock = await start_mock(log_dir)
        self.children["mock"] = mock
        passthrough = await start_passthrough(log_dir, mock.url)
        self.children["passthrough"] = passthrough
        sidecar, self.sidecar_ops_url = await start_sidecar(
            log_dir, mock.url, stores.redis_url, stores.database_url, self.s.sidecar_log_level, self.s.sidecar_workers
        )
        self.children["sidecar"] = sidecar
        for name in ("mock", "passthrough", "sidecar"):
            # The sidecar with its children: its serving workers and its flusher/sweeper process.
            self.watched.append(procstat.Watched(name, self.children[name].pid, with_children=name == "sidecar"))
        self.watched.append(procstat.Watched("bench", os.getpid()))  # this orchestrator (and its pollers)
        if stores.redis is not None:
            self.watched.append(procstat.Watched("redis", stores.redis.process.pid))
        if stores.postgres is not None:
            self.watched.append(procstat.Watched("postgres", stores.postgres.process.pid, with_children=True))
        self.targets = {
            "direct": self._target("direct", mock.url, {"Authorization": f"Bearer {UPSTREAM_KEY}"}, "mock"),
            "passthrough": self._target("passthrough", passthrough.url, {}, "passthrough"),
            "sidecar": self._target("sidecar", sidecar.url, {"Authorization": f"Bearer {self.account.key}"}, "sidecar"),
        }
        account = self.account
        self.probe = LedgerProbe(
            stores.redis_url, stores.database_url, [account.workspace_id, *account.extra_workspaces]
        )
        await self.probe.open()
        await self.sanity_check()

    @staticmethod
    def _target(name: str, url: str, headers: dict[str, str], server: str) -> Target:
        parts = urlsplit(url)
        return Target(name, parts.hostname or "127.0.0.1", parts.port or 80, headers, server)

    async def stop(self) -> None:
        if self.probe is not None:
            with contextlib.suppress(Exception):
                await self.probe.close()
        for name in ("sidecar", "passthrough", "mock"):
            child = self.children.get(name)
            if child is not None:
                await asyncio.to_thread(child.stop)

    async def sanity_check(self) -> None:
        """One plain and one streamed call through each target: a broken setup fails here, not as a 0 rps."""
        stream_headers = {"x-mock-chunks": "4", "x-mock-delay-ms": "0"}
        async with aiohttp.ClientSession() as http:
            for target in self.targets.values():
                url = f"http://{target.host}:{target.port}{CHAT_PATH}"
                async with http.post(url, json=chat_body(False), headers=target.headers) as resp:
                    body = await resp.read()
                    if resp.status != 200 or b"chat.completion" not in body:
                        raise RuntimeError(self._failure(target, f"plain call answered {resp.status}: {body[:300]!r}"))
                    if target.name == "sidecar" and "x-sidecar-cost-micro" not in resp.headers:
                        raise RuntimeError(self._failure(target, "the sidecar's answer has no cost header"))
                headers = {**target.headers, **stream_headers}
                async with http.post(url, json=chat_body(True), headers=headers) as resp:
                    body = await resp.read()
                    if resp.status != 200 or body.count(b"\n\n") < 7 or b"[DONE]" not in body:
                        raise RuntimeError(self._failure(target, f"stream answered {resp.status}: {body[:300]!r}"))

    def _failure(self, target: Target, what: str) -> str:
        child = self.children.get(target.server)
        return f"sanity check failed on {target.name}: {what}\n{child.log_tail() if child else ''}"

    # -- the load generator ---------------------------------------------------------------------------

    async def load(self, spec: dict[str, Any], procs: int = 1, on_event: Any = None) -> GenRun:
        """Run the generator (split over `procs` processes) and account every process's CPU over its window."""
        specs = _split(spec, procs)
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        gens = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.loadgen",
                orjson.dumps(s).decode(),
                stdout=asyncio.subprocess.PIPE,
                cwd=self.work_dir,
                env=env,
                limit=1 << 28,
                start_new_session=True,
            )
            for s in specs
        ]
        watched = self.watched + [procstat.Watched(f"generator{i}", g.pid) for i, g in enumerate(gens)]
        marks: dict[str, Any] = {}
        results: list[dict[str, Any] | None] = [None] * len(gens)

        async def read(index: int, gen: asyncio.subprocess.Process) -> None:
            assert gen.stdout is not None
            async for line in gen.stdout:
                message = orjson.loads(line)
                event = message.pop("event")
                if event == "result":
                    results[index] = message
                    continue
                if index == 0 and event in ("window_start", "window_end") and event not in marks:
                    marks[event] = (time.monotonic(), procstat.snapshot(watched), _machine_ticks())
                if index == 0 and on_event is not None:
                    await on_event(event, message)

        timeout = spec.get("warmup_s", 0) + spec.get("duration_s", 0) + spec.get("timeout_s", 0) + 60
        readers = [asyncio.create_task(read(i, g)) for i, g in enumerate(gens)]
        try:
            await asyncio.wait_for(asyncio.gather(*readers, *(g.wait() for g in gens)), timeout)
        finally:
            for gen in gens:
                if gen.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        gen.kill()
                    await gen.wait()
        if any(r is None for r in results) or "window_end" not in marks:
            raise RuntimeError(f"the load generator failed (exit codes {[g.returncode for g in gens]})")
        (t0, cpu0, ticks0), (t1, cpu1, ticks1) = marks["window_start"], marks["window_end"]
        shares = procstat.cpu_share(cpu0, cpu1, t1 - t0)
        shares["generator"] = sum(v for k, v in shares.items() if k.startswith("generator"))
        busy = (ticks1[0] - ticks0[0]) / max(ticks1[1] - ticks0[1], 1) * (os.cpu_count() or 1)
        accounted = sum(v for k, v in shares.items() if k != "generator")
        # Whatever else ran: kernel threads (loopback networking), other users of the machine.
        shares["unaccounted"] = max(0.0, busy - accounted)
        return GenRun([r for r in results if r is not None], shares, busy, (t0, t1))

    def _interfered(self, run: GenRun) -> bool:
        return run.cpu.get("unaccounted", 0.0) > INTERFERENCE_CORES

    async def _retry_allowed(self, what: str, unaccounted: float) -> bool:
        """Once per run, within a global budget: wait for the other load to pass, then run it again."""
        if self.reruns >= RERUNS_MAX:
            return False
        self.reruns += 1
        self.results["reruns"].append(f"{what}: {unaccounted:.2f} cores of other load")
        _progress(f"{unaccounted:.2f} cores of other load during {what}; running it again")
        await wait_for_quiet(15)
        return True

    async def load_clean(self, spec: dict[str, Any], what: str, procs: int = 1) -> GenRun:
        """`load`, run again once if other processes took a core's worth of CPU meanwhile; the cleaner run counts."""
        run = await self.load(spec, procs=procs)
        if self._interfered(run) and await self._retry_allowed(what, run.cpu["unaccounted"]):
            await self._settle_backlog()
            again = await self.load(spec, procs=procs)
            run = min(run, again, key=lambda r: r.cpu.get("unaccounted", 0.0))
        return run

    # -- phases -----------------------------------------------------------------------------------------

    async def _settle_backlog(self) -> None:
        """Let the sidecar's flusher finish the last run's ledger rows, so it does not spend CPU in the next run."""
        await self.probe.wait_drained(30)

    async def phase_throughput(self) -> None:
        """Closed loop at each concurrency level; the targets take turns at each level, so a burst of
        background load on the machine hits all three rather than one."""
        s = self.s
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in TARGETS}
        for level in s.levels:
            for name in TARGETS:
                await self._settle_backlog()
                sampler = LedgerSampler(self.probe) if name == "sidecar" else None
                if sampler:
                    sampler.start()
                spec = self.targets[name].spec(
                    "closed", chat_body(False), concurrency=level, warmup_s=s.warmup_s, duration_s=s.duration_s
                )
                try:
                    run = await self.load_clean(spec, f"throughput {name} N={level}", procs=s.gen_procs)
                finally:
                    if sampler:
                        await sampler.stop()
                entry = {
                    "concurrency": level,
                    "rps": run.total("completed") / run.window_s,
                    "errors": run.errors(),
                    "latency": summarize(run.merged("latency_us")),
                    "cpu": run.cpu,
                    "machine_busy_cores": run.machine_busy_cores,
                }
                if sampler:
                    entry["ledger"] = sampler.rate_over(*run.window)
                    entry["cpu_us_per_call"] = run.cpu.get("sidecar", 0.0) / max(entry["rps"], 1e-9) * 1e6
                runs[name].append(entry)
                _progress(f"throughput {name:<11} c={level:<4} {entry['rps']:9.0f} rps  errors={entry['errors']}")
        self.results["phases"]["throughput"] = {
            name: {"runs": runs[name], "best": max(runs[name], key=lambda r: r["rps"])} for name in TARGETS
        }

    async def phase_single(self) -> None:
        """One call at a time (closed loop, one connection): the latency a lone agent sees, and each
        process's CPU per call when nothing is batched."""
        s = self.s

        def spec(target: Target) -> dict[str, Any]:
            return target.spec(
                "closed",
                chat_body(False),
                concurrency=1,
                warmup_s=s.warmup_s,
                duration_s=s.single_duration_s / s.rounds,
            )

        out: dict[str, Any] = {}
        for name, run in (await self._rounds(spec, s.rounds)).items():
            calls = max(run.total("completed"), 1)
            out[name] = {
                "rps": run.total("completed") / run.window_s,
                "errors": run.errors(),
                "latency": summarize(run.merged("latency_us")),
                "cpu": run.cpu,
                "cpu_us_per_call": {k: v * run.window_s / calls * 1e6 for k, v in run.cpu.items()},
                "machine_busy_cores": run.machine_busy_cores,
            }
            lat = out[name]["latency"]
            _progress(f"single     {name:<11} p50 {lat['p50']:.0f} us  p99 {lat['p99']:.0f} us")
        self.results["phases"]["single"] = out

    async def _rounds(self, make_spec: Any, rounds: int) -> dict[str, GenRun]:
        """`rounds` runs per target, the targets taking turns; each target's runs merged into one."""
        per_target: dict[str, list[GenRun]] = {name: [] for name in TARGETS}
        for round_ in range(rounds):
            for name in TARGETS:
                await self._settle_backlog()
                spec = make_spec(self.targets[name])
                per_target[name].append(await self.load_clean(spec, f"{spec['mode']} {name} round {round_ + 1}"))
        return {name: GenRun.merge(runs) for name, runs in per_target.items()}

    async def phase_latency(self) -> None:
        s = self.s
        sidecar_max = self.results["phases"]["throughput"]["sidecar"]["best"]["rps"]
        rate = max(10, round(sidecar_max * s.load_fraction))
        out: dict[str, Any] = {"rate": rate, "rounds": s.rounds}

        def spec(target: Target) -> dict[str, Any]:
            return target.spec(
                "open",
                chat_body(False),
                rate=rate,
                warmup_s=s.warmup_s,
                duration_s=s.duration_s / s.rounds,
                max_conns=1024,
                initial_conns=32,
            )

        for name, run in (await self._rounds(spec, s.rounds)).items():
            out[name] = {
                "sent": run.total("sent_in_window"),
                "completed": run.total("completed"),
                "achieved_rps": run.total("completed") / run.window_s,
                "errors": run.errors(),
                "conns": max(r["conns"] for r in run.results),
                "queued": run.total("queued_total"),
                "latency": summarize(run.merged("latency_us")),
                "latency_intended": summarize(run.merged("latency_intended_us")),
                "cpu": run.cpu,
                "machine_busy_cores": run.machine_busy_cores,
            }
            if name == "sidecar":
                out[name]["cpu_us_per_call"] = run.cpu.get("sidecar", 0.0) / max(rate, 1e-9) * 1e6
            lat = out[name]["latency"]
            _progress(f"latency    {name:<11} @{rate}/s  p50 {lat['p50']:.0f} us  p99 {lat['p99']:.0f} us")
        self.results["phases"]["latency"] = out

    def _stream_headers(self, delay_ms: float) -> dict[str, str]:
        return {"x-mock-chunks": str(self.s.stream_chunks), "x-mock-delay-ms": f"{delay_ms:g}"}

    async def phase_streaming(self) -> None:
        s = self.s
        out: dict[str, Any] = {
            "concurrency": s.stream_concurrency,
            "chunks": s.stream_chunks,
            "delay_ms": s.stream_delay_ms,
            "rounds": s.rounds,
        }

        def spec(target: Target) -> dict[str, Any]:
            return target.spec(
                "stream",
                chat_body(True),
                self._stream_headers(s.stream_delay_ms),
                concurrency=s.stream_concurrency,
                warmup_s=s.stream_warmup_s,
                duration_s=s.stream_duration_s / s.rounds,
                gap_events=s.stream_chunks,
                stagger_s=s.stream_chunks * s.stream_delay_ms / 1000,
            )

        for name, run in (await self._rounds(spec, s.rounds)).items():
            out[name] = {
                "streams": run.total("streams"),
                "errors": run.errors(),
                "ttfb": summarize(run.merged("ttfb_us")),
                "head": summarize(run.merged("head_us")),
                "gap": summarize(run.merged("gap_us")),
                "total": summarize(run.merged("total_us")),
                "cpu": run.cpu,
                "machine_busy_cores": run.machine_busy_cores,
            }
            o = out[name]
            _progress(
                f"streaming  {name:<11} {o['streams']} streams  ttfb p50 {o['ttfb']['p50']:.0f} us  "
                f"gap p99 {o['gap']['p99']:.0f} us"
            )
        self.results["phases"]["streaming"] = out

    async def phase_hold(self) -> None:
        s = self.s
        out: dict[str, Any] = {
            "streams": s.hold_streams,
            "chunks": s.stream_chunks,
            "delay_ms": s.hold_delay_ms,
            "ramp_s": s.hold_ramp_s,
        }
        for name in TARGETS:
            entry = await self._hold_once(name)
            if entry["cpu"].get("unaccounted", 0.0) > INTERFERENCE_CORES and await self._retry_allowed(
                f"hold {name}", entry["cpu"]["unaccounted"]
            ):
                again = await self._hold_once(name)
                entry = min(entry, again, key=lambda e: e["cpu"].get("unaccounted", 0.0))
            out[name] = entry
            _progress(
                f"hold       {name:<11} {entry['max_active']}/{s.hold_streams} open at once  RSS "
                f"{entry['rss_baseline'] / MB:.0f} -> peak {entry['rss_peak'] / MB:.0f} MB  errors={entry['errors']}"
            )
        self.results["phases"]["hold"] = out

    async def _hold_once(self, name: str) -> dict[str, Any]:
        s = self.s
        target = self.targets[name]
        watched = next(w for w in self.watched if w.name == target.server)
        await self._settle_backlog()
        await asyncio.sleep(0.5)
        baseline = watched.rss()
        rss = RssSampler(watched)
        rss.start()
        spec = target.spec(
            "hold",
            chat_body(True),
            self._stream_headers(s.hold_delay_ms),
            streams=s.hold_streams,
            ramp_s=s.hold_ramp_s,
            timeout_s=60,
            gap_events=s.stream_chunks,
        )
        try:
            run = await self.load(spec, on_event=rss.on_event)
        finally:
            await rss.stop()
        await asyncio.sleep(0.5)
        result = run.results[0]
        return {
            "max_active": result["max_active"],
            "all_open_s": result["all_open_s"],
            "completed": result["streams"],
            "errors": run.errors(),
            "rss_baseline": baseline,
            "rss_peak": rss.peak,
            "rss_all_open": rss.at_all_open,
            "rss_after": watched.rss(),
            "ttfb": summarize(result["ttfb_us"]),
            "gap": summarize(result["gap_us"]),
            "total": summarize(result.get("total_us", [])),
            "cpu": run.cpu,
            "machine_busy_cores": run.machine_busy_cores,
        }

    async def phase_flush(self) -> None:
        """The flusher's capacity: a backlog appended straight to the Redis streams, drained into Postgres.
        Twice: all in the calls' workspace, and spread over four workspaces."""
        account, count = self.account, self.s.flush_events
        cases = {
            "one workspace": ([account.workspace_id], max(count // 10, 1000)),
            f"{1 + len(account.extra_workspaces)} workspaces": (
                [account.workspace_id, *account.extra_workspaces],
                count,
            ),
        }
        out: dict[str, Any] = {}
        for label, (workspaces, events) in cases.items():
            result = await self._flush_once(workspaces, events)
            if result["cpu"]["unaccounted"] > INTERFERENCE_CORES and await self._retry_allowed(
                f"flush {label}", result["cpu"]["unaccounted"]
            ):
                again = await self._flush_once(workspaces, events)
                result = min(result, again, key=lambda r: r["cpu"]["unaccounted"])
            out[label] = result
            _progress(
                f"flush      {label}: {result['landed']}/{result['events']} rows in {result['seconds']:.2f} s  "
                f"{result['rows_per_s']:.0f} rows/s (steady {result['steady_rows_per_s']:.0f})"
            )
        self.results["phases"]["flush"] = out

    async def _flush_once(self, workspaces: list[str], count: int) -> dict[str, Any]:
        probe = self.probe
        await probe.wait_drained(60)
        watched = [w for w in self.watched if w.name in ("sidecar", "redis", "postgres", "bench")]
        before_rows = await probe.rows()
        cpu0, ticks0, started = procstat.snapshot(watched), _machine_ticks(), time.monotonic()
        await probe.inject(count, workspaces)
        injected_s = time.monotonic() - started
        samples = [(started, before_rows)]
        deadline = started + FLUSH_TIMEOUT_S
        while time.monotonic() < deadline:
            rows = await probe.rows()
            samples.append((time.monotonic(), rows))
            if rows - before_rows >= count:
                break
            await asyncio.sleep(0.05)
        finished = samples[-1][0]
        ticks1 = _machine_ticks()
        landed = samples[-1][1] - before_rows
        cpu = procstat.cpu_share(cpu0, procstat.snapshot(watched), finished - started)
        busy = (ticks1[0] - ticks0[0]) / max(ticks1[1] - ticks0[1], 1) * (os.cpu_count() or 1)
        cpu["unaccounted"] = max(0.0, busy - sum(cpu.values()))
        # The steady rate, between 10% and 90% of the backlog landing (injection overlaps the start).
        steady = _rate_between(samples, before_rows + count * 0.1, before_rows + count * 0.9)
        await probe.wait_drained(60)  # a slow flusher still finishes before the next phase
        return {
            "workspaces": len(workspaces),
            "events": count,
            "landed": landed,
            "seconds": finished - started,
            "inject_s": injected_s,
            "rows_per_s": landed / (finished - started) if finished > started else 0.0,
            "steady_rows_per_s": steady,
            "cpu": cpu,
            "machine_busy_cores": busy,
        }

    async def phase_profile(self) -> None:
        from bench import profile

        if not profile.available():
            self.results["notes"].append("profile: py-spy not found (pip install py-spy), skipped")
            _progress("profile    py-spy not found, skipped")
            return
        sidecar = self.children["sidecar"]
        target = self.targets["sidecar"]
        out: dict[str, Any] = {}
        level = self.results["phases"]["throughput"]["sidecar"]["best"]["concurrency"]
        workloads = {
            "non-stream (closed loop, max rate)": target.spec(
                "closed", chat_body(False), concurrency=level, warmup_s=0.5, duration_s=self.s.profile_s
            ),
            "stream (closed loop)": target.spec(
                "stream",
                chat_body(True),
                self._stream_headers(self.s.stream_delay_ms),
                concurrency=self.s.stream_concurrency,
                warmup_s=1.5,
                duration_s=self.s.profile_s,
                gap_events=self.s.stream_chunks,
                stagger_s=self.s.stream_chunks * self.s.stream_delay_ms / 1000,
            ),
        }
        for label, spec in workloads.items():
            await self.probe.wait_drained(30)
            raw_path = self.work_dir / f"profile-{len(out)}.txt"
            recorder = await profile.start(sidecar.pid, raw_path, self.s.profile_s)
            await self.load(spec)
            out[label] = await profile.finish(recorder, raw_path)
            _progress(f"profile    {label}: {out[label]['samples']} samples")
        self.results["phases"]["profile"] = out


class RssSampler:
    """Samples a process's RSS every 50 ms while a load runs; notes it when every stream is open."""

    def __init__(self, watched: procstat.Watched) -> None:
        self.watched = watched
        self.samples: list[int] = []
        self.at_all_open = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.watched.rss())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.05)

    async def on_event(self, event: str, _message: dict) -> None:
        if event == "all_open":
            self.at_all_open = self.watched.rss()

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            await self._task

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


class LedgerSampler:
    """Polls the ledger row count and the stream backlog while a load runs."""

    def __init__(self, probe: LedgerProbe, interval_s: float = 0.25) -> None:
        self.probe = probe
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            rows, backlog = await self.probe.rows(), await self.probe.backlog()
            self.samples.append((time.monotonic(), rows, backlog))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval_s)

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            await self._task

    def rate_over(self, start: float, end: float) -> dict[str, float]:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {"rows_per_s": 0.0, "max_backlog": 0}
        (t0, r0, _), (t1, r1, _) = inside[0], inside[-1]
        return {"rows_per_s": (r1 - r0) / (t1 - t0), "max_backlog": max(s[2] for s in inside)}


def _rate_between(samples: list[tuple[float, int]], low: float, high: float) -> float:
    first = next((s for s in samples if s[1] >= low), None)
    last = next((s for s in samples if s[1] >= high), None)
    if first is None or last is None or last[0] <= first[0]:
        return 0.0
    return (last[1] - first[1]) / (last[0] - first[0])


def _split(spec: dict[str, Any], procs: int) -> list[dict[str, Any]]:
    if procs <= 1:
        return [spec]
    out = []
    for i in range(procs):
        part = dict(spec)
        if "concurrency" in spec:
            part["concurrency"] = spec["concurrency"] // procs + (1 if i < spec["concurrency"] % procs else 0)
        if "rate" in spec:
            part["rate"] = spec["rate"] / procs
        out.append(part)
    return out


def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    existing = os.environ.get("PYTHONPATH", "")
    return f"{existing}{os.pathsep}{root}" if existing else root


def _progress(line: str) -> None:
    print(f"  {line}", flush=True)


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    root = Path(__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "--short", "HEAD")
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    source = sidecar_source(Path(tempfile.gettempdir()))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": model or platform.processor() or "unknown",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "commit": commit + (" (+ uncommitted changes)" if dirty else ""),
        "sidecar_source": source,
        "sidecar_in_repo": source == str(root / "sidecar"),
    }


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


async def background_busy(seconds: float = 1.0) -> float:
    """Cores busy with other processes before the run starts."""
    before = _machine_ticks()
    await asyncio.sleep(seconds)
    after = _machine_ticks()
    return (after[0] - before[0]) / max(after[1] - before[1], 1) * (os.cpu_count() or 1)


async def wait_for_quiet(max_wait_s: float, threshold: float = QUIET_CORES) -> float:
    """Other work on the machine skews every number: wait (bounded) until it is idle enough."""
    busy = await background_busy()
    deadline = time.monotonic() + max_wait_s
    if busy > threshold and max_wait_s > 0:
        _progress(f"{busy:.2f} cores busy with other processes; waiting up to {max_wait_s:.0f} s for a quieter machine")
    while busy > threshold and time.monotonic() < deadline:
        busy = await background_busy()
    if busy > threshold:
        _progress(f"warning: {busy:.2f} cores busy with other processes; results will be noisier")
    return busy


async def run_all(settings: Settings, stores: Stores, work_dir: Path) -> dict[str, Any]:
    bench = Bench(settings, stores, work_dir)
    busy = await wait_for_quiet(settings.quiet_wait_s)
    bench.results["background_busy_cores"] = busy
    try:
        _progress("starting the mock provider, the pass-through and the sidecar ...")
        await bench.start()
        await bench.phase_throughput()
        await bench.phase_single()
        await bench.phase_latency()
        await bench.phase_streaming()
        await bench.phase_hold()
        await bench.phase_flush()
        if settings.profile:
            await bench.phase_profile()
    finally:
        await bench.stop()
    bench.results["elapsed_s"] = time.monotonic() - bench.started
    return bench.results


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmark the sidecar (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="short phases, for trying the harness out")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    parser.add_argument("--json", default="", help="also write the raw results as JSON here")
    parser.add_argument("--duration", type=float, help="seconds measured per throughput/latency run")
    parser.add_argument("--levels", help="closed-loop concurrency levels, comma-separated (default 16,64,256)")
    parser.add_argument("--gen-procs", type=int, help="load generator processes for the throughput runs")
    parser.add_argument("--streams", type=int, help="concurrent streams for the streaming latency phase")
    parser.add_argument("--hold-streams", type=int, help="concurrent streams for the memory phase")
    parser.add_argument("--flush-events", type=int, help="synthetic backlog drained by the flusher")
    parser.add_argument("--sidecar-log-level", help="the sidecar's log level (default INFO, as in production)")
    parser.add_argument("--profile", action="store_true", help="then profile the sidecar with py-spy, if installed")
    parser.add_argument("--workers", type=int, help="the sidecar's `serve --workers N` (default 1: one process)")
    parser.add_argument(
        "--quiet-wait", type=float, help="seconds to wait for other load on the machine to stop (default 60; 0: no)"
    )
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.duration:
        settings.duration_s = args.duration
    if args.levels:
        settings.levels = tuple(int(v) for v in args.levels.split(","))
    if args.gen_procs:
        settings.gen_procs = args.gen_procs
    if args.streams:
        settings.stream_concurrency = args.streams
    if args.hold_streams:
        settings.hold_streams = args.hold_streams
    if args.flush_events:
        settings.flush_events = args.flush_events
    if args.sidecar_log_level:
        settings.sidecar_log_level = args.sidecar_log_level
    settings.profile = args.profile
    if args.workers:
        settings.sidecar_workers = args.workers
    if args.quiet_wait is not None:
        settings.quiet_wait_s = args.quiet_wait
    return settings, args


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    fd_limit = _raise_fd_limit()
    info = machine_info()
    print(
        f"sidecar bench: {info['cores']} cores ({info['cpu_model']}), Python {info['python']}, commit {info['commit']}",
        flush=True,
    )
    stores = Stores()
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        work_dir = Path(tmp)
        os.chmod(work_dir, 0o755)  # Postgres runs as its own user when we are root
        try:
            _progress("starting Redis and Postgres ...")
            stores.start(work_dir)
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                results = runner.run(run_all(settings, stores, work_dir))
        finally:
            stores.stop()
    results["machine"] = {**info, "fd_limit": fd_limit}
    results["settings"] = settings.__dict__
    markdown = report.render(results)
    Path(args.output).write_text(markdown)
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print()
    print(report.summary(results))
    print(f"\nwritten: {args.output}")
    return 0
