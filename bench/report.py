"""The results as Markdown (bench/RESULTS.md) and as a short summary for the terminal."""

from __future__ import annotations

from typing import Any

TARGETS = ("direct", "passthrough", "sidecar")
LABELS = {"direct": "(1) direct to the mock", "passthrough": "(2) bare aiohttp pass-through", "sidecar": "(3) sidecar"}
CPU_COLUMNS = ("mock", "passthrough", "sidecar", "redis", "postgres", "generator", "bench", "unaccounted")
MB = 1_000_000
# Issue 14's targets, for 2 cores: ratios and differences against the bare pass-through of the same run.
THROUGHPUT_RATIO_MIN = 0.60
CPU_RATIO_MAX = 1.7  # the sidecar's process(es) + Redis + Postgres, per call, against the pass-through's
SINGLE_ADDED_P50_US_MAX = 500
SINGLE_ADDED_P99_US_MAX = 1_500
ADDED_P50_US_MAX = 1_000
ADDED_P99_US_MAX = 5_000
STREAM_TOTAL_P99_RATIO_MAX = 1.05
FLUSH_ROWS_PER_S_MIN = 20_000
HOLD_STREAMS = 1_000
HOLD_RSS_BYTES_MAX = 200 * MB
HOLD_P99_RATIO_MAX = 1.1


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _signed_ms(us: float) -> str:
    return f"{us / 1000:+.2f}"


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def _pct(share: float) -> str:
    return f"{share * 100:.0f}%"


def _cpu_row(cpu: dict[str, float]) -> str:
    return " | ".join(_pct(cpu.get(name, 0.0)) if name in cpu else "-" for name in CPU_COLUMNS)


def _cpu_header() -> list[str]:
    return [
        "| run | " + " | ".join(CPU_COLUMNS) + " | machine busy |",
        "|---|" + "---:|" * (len(CPU_COLUMNS) + 1),
    ]


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "|" + "---|" + "---:|" * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", align, *("| " + " | ".join(row) + " |" for row in rows)]


def targets(results: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, met (None: not measured), the measured value)."""
    phases = results["phases"]
    out: list[tuple[str, bool | None, str]] = []
    tput = phases.get("throughput")
    if tput:
        out += _throughput_targets(tput)
    single = phases.get("single")
    if single:
        add50 = single["sidecar"]["latency"]["p50"] - single["passthrough"]["latency"]["p50"]
        add99 = single["sidecar"]["latency"]["p99"] - single["passthrough"]["latency"]["p99"]
        out.append(
            (
                f"added latency at one call at a time: p50 <= {_ms(SINGLE_ADDED_P50_US_MAX)} ms, "
                f"p99 <= {_ms(SINGLE_ADDED_P99_US_MAX)} ms",
                add50 <= SINGLE_ADDED_P50_US_MAX and add99 <= SINGLE_ADDED_P99_US_MAX,
                f"p50 {_signed_ms(add50)} ms, p99 {_signed_ms(add99)} ms",
            )
        )
    lat = phases.get("latency")
    if lat:
        add50 = lat["sidecar"]["latency"]["p50"] - lat["passthrough"]["latency"]["p50"]
        add99 = lat["sidecar"]["latency"]["p99"] - lat["passthrough"]["latency"]["p99"]
        out.append(
            (
                f"added latency at half the sidecar's maximum: p50 <= {_ms(ADDED_P50_US_MAX)} ms, "
                f"p99 <= {_ms(ADDED_P99_US_MAX)} ms",
                add50 <= ADDED_P50_US_MAX and add99 <= ADDED_P99_US_MAX,
                f"p50 {_signed_ms(add50)} ms, p99 {_signed_ms(add99)} ms ({lat['rate']} calls/s)",
            )
        )
    streaming = phases.get("streaming")
    if streaming and "total" in streaming["sidecar"]:
        ratio = streaming["sidecar"]["total"]["p99"] / max(streaming["passthrough"]["total"]["p99"], 1)
        out.append(
            (
                f"{streaming['concurrency']} streams x {streaming['chunks']} chunks: stream total p99 <= "
                f"{STREAM_TOTAL_P99_RATIO_MAX}x the pass-through's",
                ratio <= STREAM_TOTAL_P99_RATIO_MAX,
                f"{ratio:.3f}x ({_ms(streaming['sidecar']['total']['p99'])} vs "
                f"{_ms(streaming['passthrough']['total']['p99'])} ms)",
            )
        )
    flush = phases.get("flush")
    multi = [r for r in (flush or {}).values() if r["workspaces"] > 1]
    if multi:
        rate = multi[0]["rows_per_s"]
        out.append(
            (
                f"ledger flush into Postgres, {multi[0]['workspaces']} workspaces: >= {FLUSH_ROWS_PER_S_MIN:,} rows/s",
                rate >= FLUSH_ROWS_PER_S_MIN,
                f"{rate:,.0f} rows/s",
            )
        )
    hold = phases.get("hold")
    if hold:
        out += _hold_targets(hold)
    return out


def _throughput_targets(tput: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    side, base = tput["sidecar"]["best"], tput["passthrough"]["best"]
    ratio = side["rps"] / max(base["rps"], 1e-9)
    cpu_side = sum(side["cpu"].get(k, 0.0) for k in ("sidecar", "redis", "postgres")) / max(side["rps"], 1e-9)
    cpu_base = sum(base["cpu"].get(k, 0.0) for k in ("passthrough", "redis", "postgres")) / max(base["rps"], 1e-9)
    return [
        (
            f"non-streamed throughput >= {THROUGHPUT_RATIO_MIN}x the pass-through",
            ratio >= THROUGHPUT_RATIO_MIN,
            f"{ratio:.2f}x ({side['rps']:.0f} vs {base['rps']:.0f} calls/s)",
        ),
        (
            f"CPU per call (the sidecar + Redis + Postgres) <= {CPU_RATIO_MAX}x the pass-through's",
            cpu_side <= CPU_RATIO_MAX * cpu_base,
            f"{cpu_side / max(cpu_base, 1e-12):.2f}x ({cpu_side * 1e6:.0f} vs {cpu_base * 1e6:.0f} us, "
            "at each one's maximum)",
        ),
    ]


def _hold_targets(hold: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    sidecar, base = hold["sidecar"], hold.get("passthrough")
    measured = hold["streams"] >= HOLD_STREAMS
    all_open = sidecar["max_active"] >= hold["streams"] and sidecar["errors"] == 0
    met = (all_open and sidecar["rss_peak"] < HOLD_RSS_BYTES_MAX) if measured else None
    value = f"{sidecar['max_active']} open at once, peak RSS {sidecar['rss_peak'] / MB:.0f} MB"
    if not measured:
        value += f" (only {hold['streams']} streams in this run)"
    out = [(f"{HOLD_STREAMS:,} concurrent streams: <= {HOLD_RSS_BYTES_MAX // MB} MB RSS", met, value)]
    if base is not None and "total" in sidecar:
        ttfb = sidecar["ttfb"]["p99"] / max(base["ttfb"]["p99"], 1)
        total = sidecar["total"]["p99"] / max(base["total"]["p99"], 1)
        out.append(
            (
                f"{HOLD_STREAMS:,} streams started at once: time to first byte p99 and stream total p99 <= "
                f"{HOLD_P99_RATIO_MAX}x the pass-through's",
                (ttfb <= HOLD_P99_RATIO_MAX and total <= HOLD_P99_RATIO_MAX) if measured else None,
                f"first byte {ttfb:.2f}x ({_ms(sidecar['ttfb']['p99'])} vs {_ms(base['ttfb']['p99'])} ms), "
                f"total {total:.2f}x ({_ms(sidecar['total']['p99'])} vs {_ms(base['total']['p99'])} ms)",
            )
        )
    return out


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**not met**")


def render(results: dict[str, Any]) -> str:
    m, s, phases = results["machine"], results["settings"], results["phases"]
    lines = [
        "# Sidecar benchmark results",
        "",
        "Written by `make bench` (`python -m bench`); every number below comes from one run on one machine.",
        "",
        f"- **Date:** {m['date']}",
        f"- **Machine:** {m['cores']} cores (`nproc`; {m['affinity']} usable by this process), {m['cpu_model']}, "
        f"Linux {m['kernel']}",
        f"- **Python:** {m['python']}; the sidecar package measured: `{m['sidecar_source']}`"
        + (
            f" (this checkout, commit {m['commit']})"
            if m.get("sidecar_in_repo")
            else f" (not this checkout, which is at commit {m['commit']})"
        ),
        f"- **Background load before the run:** {results.get('background_busy_cores', 0):.2f} cores busy "
        "(other processes on the machine; each run's `unaccounted` CPU column shows it during the run)",
        f"- **Run time:** {results.get('elapsed_s', 0):.0f} s",
        f"- **Sidecar processes:** `sidecar serve --workers {s.get('sidecar_workers', 1)}`"
        + (
            " (one process)"
            if s.get("sidecar_workers", 1) == 1
            else " (plus the supervisor and the background process)"
        ),
    ]
    lines += [f"- {note}" for note in results["notes"]]
    reruns = results.get("reruns") or []
    lines.append(
        f"- **Runs done again because other processes took CPU meanwhile:** {len(reruns)}"
        + (" (" + "; ".join(reruns) + ")" if reruns else "")
    )
    lines += ["", "## Targets (2 cores)", ""]
    if m["cores"] != 2:
        lines += [f"The targets are set for 2 cores; this machine has {m['cores']}.", ""]
    lines += _table(
        ["target", "result", "measured"],
        [[name, _verdict(met), value] for name, met, value in targets(results)],
        "|---|---|---|",
    )
    lines += [
        "",
        "## What is measured, and how",
        "",
        "Three targets, each a process of its own on 127.0.0.1, all in front of the same mock provider "
        "(`sidecar mock-provider`, 8 content chunks per plain call):",
        "",
        "1. **direct**: the mock itself, the floor;",
        "2. **passthrough**: `bench/passthrough.py`, a minimal aiohttp proxy on uvloop (pooled client session, "
        "chunk-by-chunk relay, no auth, no parsing): the cost of being a Python proxy;",
        f"3. **sidecar**: `sidecar serve` with full metering (key auth, rate limit at "
        f"{10_000_000:,} rpm so it never refuses, hold, settle, ledger flush to Postgres), log level "
        f"{s['sidecar_log_level']}, as in production.",
        "",
        "The load generator (`bench/loadgen.py`) is a callback-driven HTTP/1.1 keep-alive client on uvloop, in "
        "its own process(es); its CPU is read from /proc like every server's, over exactly the measured window. "
        "CPU columns are the share of one core each process used (100% = one full core; the machine has "
        f"{m['cores']}). `bench` is the harness itself, `unaccounted` is machine-wide busy time not in any listed "
        "process (kernel threads, other users of the machine).",
        "",
    ]
    lines += _throughput(phases, s)
    lines += _single(phases)
    lines += _latency(phases, s)
    lines += _streaming(phases)
    lines += _hold(phases)
    lines += _flush(phases)
    lines += _generator(phases)
    if "profile" in phases:
        lines += _profile(phases["profile"])
    lines += [
        "## Caveats",
        "",
        "- Everything shares the machine's cores: the generator, the mock, Redis and Postgres compete with the "
        "proxy under test, so absolute numbers are lower than on a machine where the proxy had its cores to "
        "itself. The ratios are the portable part.",
        "- Latency and streaming percentiles pool two runs per target, the targets taking turns; p99 and above "
        "still move by a millisecond or more between runs on a 2-core machine, so an added value near zero can "
        "come out negative. Compare `unaccounted` CPU between runs before comparing their tails.",
        "- The mock answers in microseconds; real providers take hundreds of milliseconds, next to which the "
        "sidecar's added time is small. This bench isolates what the sidecar adds.",
        "- `added` = the target's percentile minus the direct (or pass-through) percentile at the same load: a "
        "difference of distributions, not a per-request difference.",
        "",
    ]
    return "\n".join(lines)


def _single(phases: dict[str, Any]) -> list[str]:
    single = phases.get("single")
    if not single:
        return []
    rows = []
    for name in TARGETS:
        r = single[name]
        lat, per_call = r["latency"], r["cpu_us_per_call"]
        added = {q: lat[q] - single["passthrough"]["latency"][q] for q in ("p50", "p99")}
        servers = " + ".join(
            f"{k} {per_call.get(k, 0):,.0f}"
            for k in ("mock", "passthrough", "sidecar", "redis", "postgres")
            if per_call.get(k, 0) >= 5
        )
        rows.append(
            [
                LABELS[name],
                f"{r['rps']:,.0f}",
                _ms(lat["p50"]),
                _ms(lat["p99"]),
                _signed_ms(added["p50"]),
                _signed_ms(added["p99"]),
                servers,
                str(r["errors"]),
            ]
        )
    return [
        "## 1b. One call at a time",
        "",
        "Closed loop on one connection: each call is sent when the last one answered, so nothing is batched "
        "or overlapped and the latency is the sum of every process's work on the call plus the wake-ups between "
        "them. CPU per call from /proc over the same window.",
        "",
        *_table(
            [
                "target",
                "calls/s",
                "p50 ms",
                "p99 ms",
                "added p50 vs (2)",
                "added p99 vs (2)",
                "CPU us per call",
                "errors",
            ],
            rows,
        ),
        "",
    ]


def _throughput(phases: dict[str, Any], s: dict[str, Any]) -> list[str]:
    tput = phases.get("throughput")
    if not tput:
        return []
    direct, passthrough = tput["direct"]["best"]["rps"], tput["passthrough"]["best"]["rps"]
    rows = []
    for name in TARGETS:
        best = tput[name]["best"]
        rows.append(
            [
                LABELS[name],
                f"{best['rps']:,.0f}",
                str(best["concurrency"]),
                _ratio(best["rps"], direct),
                _ratio(best["rps"], passthrough),
                _ms(best["latency"]["p50"]),
                _ms(best["latency"]["p99"]),
                str(best["errors"]),
            ]
        )
    lines = [
        "## 1. Non-streamed calls: maximum sustained throughput",
        "",
        f"Closed loop: N connections each sending its next call as soon as the last one answered; "
        f"{s['warmup_s']:g} s warm-up, then {s['duration_s']:g} s counted, at N = "
        f"{', '.join(str(v) for v in s['levels'])}; the best N is shown.",
        "",
        *_table(["target", "calls/s", "best N", "vs (1)", "vs (2)", "p50 ms at max", "p99 ms at max", "errors"], rows),
        "",
        "CPU during the best run of each target:",
        "",
        *_cpu_header(),
    ]
    for name in TARGETS:
        best = tput[name]["best"]
        lines.append(f"| {name} | {_cpu_row(best['cpu'])} | {best['machine_busy_cores']:.2f} cores |")
    best, pt_best = tput["sidecar"]["best"], tput["passthrough"]["best"]
    if "cpu_us_per_call" in best:
        pt_us = pt_best["cpu"].get("passthrough", 0) / max(pt_best["rps"], 1e-9) * 1e6
        lines += [
            "",
            f"The sidecar used {best['cpu_us_per_call']:,.0f} us of CPU per call at its maximum; the pass-through "
            f"{pt_us:,.0f} us.",
        ]
    lines += ["", "Every level:", ""]
    level_rows = [
        [
            name,
            str(run["concurrency"]),
            f"{run['rps']:,.0f}",
            _ms(run["latency"]["p50"]),
            _ms(run["latency"]["p99"]),
            _pct(run["cpu"].get("generator", 0)),
        ]
        for name in TARGETS
        for run in tput[name]["runs"]
    ]
    lines += _table(["target", "N", "calls/s", "p50 ms", "p99 ms", "generator CPU"], level_rows)
    return [*lines, ""]


def _latency(phases: dict[str, Any], s: dict[str, Any]) -> list[str]:
    lat = phases.get("latency")
    if not lat:
        return []
    direct, passthrough = lat["direct"]["latency"], lat["passthrough"]["latency"]
    rows = []
    for name in TARGETS:
        r = lat[name]
        q = r["latency"]
        rows.append(
            [
                LABELS[name],
                f"{r['achieved_rps']:,.0f}",
                _ms(q["p50"]),
                _ms(q["p90"]),
                _ms(q["p99"]),
                _ms(q["p999"]),
                _signed_ms(q["p50"] - direct["p50"]),
                _signed_ms(q["p99"] - direct["p99"]),
                _signed_ms(q["p50"] - passthrough["p50"]),
                _signed_ms(q["p99"] - passthrough["p99"]),
                str(r["errors"]),
            ]
        )
    lines = [
        f"## 2. Non-streamed calls: latency at a fixed offered load ({lat['rate']:,} calls/s)",
        "",
        f"Open loop: calls arrive at a constant rate of {lat['rate']:,}/s ({s['load_fraction']:.0%} of the "
        "sidecar's maximum above), whatever the answers do; each call takes a free connection (a new one is "
        f"opened when none is free). Latency runs from the moment the request is written to the last byte of "
        f"the answer. {s.get('rounds', 1)} runs per target, the targets taking turns, each {s['warmup_s']:g} s "
        f"warm-up then {s['duration_s'] / s.get('rounds', 1):g} s counted; the same rate for all three.",
        "",
        *_table(
            [
                "target",
                "calls/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "p99.9 ms",
                "added p50 vs (1)",
                "added p99 vs (1)",
                "added p50 vs (2)",
                "added p99 vs (2)",
                "errors",
            ],
            rows,
        ),
        "",
        *_cpu_header(),
    ]
    for name in TARGETS:
        lines.append(f"| {name} | {_cpu_row(lat[name]['cpu'])} | {lat[name]['machine_busy_cores']:.2f} cores |")
    if "cpu_us_per_call" in lat["sidecar"]:
        pt = lat["passthrough"]["cpu"].get("passthrough", 0) / max(lat["rate"], 1e-9) * 1e6
        lines += [
            "",
            f"CPU per call at this load: sidecar {lat['sidecar']['cpu_us_per_call']:,.0f} us, pass-through "
            f"{pt:,.0f} us (compare with the per-call cost at the maximum above: below saturation nothing is "
            "batched, so each call pays for its own wake-ups and writes).",
        ]
    return [*lines, ""]


def _streaming(phases: dict[str, Any]) -> list[str]:
    st = phases.get("streaming")
    if not st:
        return []
    direct, passthrough = st["direct"], st["passthrough"]
    rows = []
    for name in TARGETS:
        r = st[name]
        rows.append(
            [
                LABELS[name],
                str(r["streams"]),
                _ms(r["ttfb"]["p50"]),
                _ms(r["ttfb"]["p99"]),
                _signed_ms(r["ttfb"]["p50"] - direct["ttfb"]["p50"]),
                _signed_ms(r["ttfb"]["p50"] - passthrough["ttfb"]["p50"]),
                _ms(r["gap"]["p50"]),
                _ms(r["gap"]["p99"]),
                _signed_ms(r["gap"]["p99"] - direct["gap"]["p99"]),
                _signed_ms(r["gap"]["p99"] - passthrough["gap"]["p99"]),
                str(r["errors"]),
            ]
        )
    lines = [
        f"## 3. Streamed calls: time to first byte and inter-chunk delay ({st['concurrency']} concurrent streams)",
        "",
        f"{st['concurrency']} connections each looping streamed calls of {st['chunks']} content chunks "
        f"{st['delay_ms']:g} ms apart (plus the role chunk, the finish chunk, the usage chunk and `[DONE]`), "
        f"started staggered over one stream's length so calls do not arrive in bursts; {st.get('rounds', 1)} runs "
        "per target, the targets taking turns. TTFB is the time from "
        "writing the request to the first SSE event; a gap is the time between two consecutive content events "
        "at the client.",
        "",
        *_table(
            [
                "target",
                "streams",
                "TTFB p50 ms",
                "TTFB p99 ms",
                "added TTFB p50 vs (1)",
                "vs (2)",
                "gap p50 ms",
                "gap p99 ms",
                "added gap p99 vs (1)",
                "vs (2)",
                "errors",
            ],
            rows,
        ),
        "",
        *_cpu_header(),
    ]
    for name in TARGETS:
        lines.append(f"| {name} | {_cpu_row(st[name]['cpu'])} | {st[name]['machine_busy_cores']:.2f} cores |")
    return [*lines, ""]


def _hold(phases: dict[str, Any]) -> list[str]:
    hold = phases.get("hold")
    if not hold:
        return []
    rows = []
    for name in TARGETS:
        r = hold[name]
        grown = r["rss_peak"] - r["rss_baseline"]
        rows.append(
            [
                LABELS[name],
                f"{r['max_active']} / {hold['streams']}",
                f"{r['all_open_s']:.1f}",
                f"{r['rss_baseline'] / MB:.0f}",
                f"{r['rss_peak'] / MB:.0f}",
                f"{r['rss_after'] / MB:.0f}",
                f"{grown / max(hold['streams'], 1) / 1000:.1f}",
                _ratio(r["rss_peak"], hold["passthrough"]["rss_peak"]),
                _ms(r["gap"]["p99"]),
                str(r["errors"]),
            ]
        )
    return [
        f"## 4. Concurrent streams and memory ({hold['streams']:,} streams)",
        "",
        f"{hold['streams']:,} streamed calls opened together (ramped over {hold['ramp_s']:g} s), each "
        f"{hold['chunks']} chunks {hold['delay_ms']:g} ms apart, so all are open at once for several seconds. "
        "RSS (VmRSS) of the target's process is sampled every 50 ms; `peak` is the highest sample.",
        "",
        *_table(
            [
                "target",
                "open at once",
                "all open for s",
                "RSS before MB",
                "RSS peak MB",
                "RSS after MB",
                "KB per stream",
                "peak vs (2)",
                "gap p99 ms",
                "errors",
            ],
            rows,
        ),
        "",
        *_cpu_header(),
        *(
            f"| {name} | {_cpu_row(hold[name]['cpu'])} | {hold[name]['machine_busy_cores']:.2f} cores |"
            for name in TARGETS
        ),
        "",
    ]


def _flush(phases: dict[str, Any]) -> list[str]:
    flush = phases.get("flush")
    tput = phases.get("throughput")
    lines = ["## 5. Ledger flush rate (rows per second into Postgres)", ""]
    if tput and "ledger" in tput["sidecar"]["best"]:
        live = tput["sidecar"]["best"]["ledger"]
        lines += [
            f"- **Under load:** during the sidecar's best throughput run ({tput['sidecar']['best']['rps']:,.0f} "
            f"calls/s) the ledger grew by {live['rows_per_s']:,.0f} rows/s; the Redis stream backlog peaked at "
            f"{live['max_backlog']:,} events (the flusher keeps up when the two rates match and the backlog "
            "stays small).",
        ]
    for label, r in (flush or {}).items():
        cpu = ", ".join(f"{k} {_pct(v)}" for k, v in r["cpu"].items())
        lines.append(
            f"- **Capacity, {label}:** {r['events']:,} ledger events appended straight to the Redis stream"
            f"{'s' if r['workspaces'] > 1 else ''} (as the settle script writes them, in {r['inject_s']:.2f} s) "
            f"and drained by the sidecar's own flusher: {r['landed']:,} rows landed in {r['seconds']:.2f} s, "
            f"**{r['rows_per_s']:,.0f} rows/s** ({r['steady_rows_per_s']:,.0f} rows/s between 10% and 90% of the "
            f"backlog). CPU meanwhile: {cpu}."
        )
    return [*lines, ""]


def _generator(phases: dict[str, Any]) -> list[str]:
    rows = []
    for phase, label in (
        ("throughput", "throughput (best runs)"),
        ("latency", "fixed load"),
        ("streaming", "streaming"),
        ("hold", "concurrent streams"),
    ):
        data = phases.get(phase)
        if not data:
            continue
        cells = []
        for name in TARGETS:
            entry = data[name]["best"] if phase == "throughput" else data[name]
            cells.append(_pct(entry["cpu"].get("generator", 0.0)))
        rows.append([label, *cells])
    if not rows:
        return []
    return [
        "## Load generator CPU",
        "",
        "The generator's own CPU (share of one core, all its processes together) while it drove each target. "
        "Each process is single-threaded, so it is the bottleneck only if one process nears 100%.",
        "",
        *_table(["phase", "direct", "passthrough", "sidecar"], rows),
        "",
    ]


def _profile(profile: dict[str, Any]) -> list[str]:
    lines = [
        "## Profile of the sidecar (py-spy)",
        "",
        "Sampled with `py-spy record --nonblocking` during extra runs after the measured phases. Self time is "
        "where the CPU was (the top frame); `Runner.run` self time is uvloop's C event loop, socket syscalls "
        "included.",
        "",
    ]
    for label, data in profile.items():
        lines += [f"**{label}** ({data['samples']} samples), top self time:", ""]
        lines += _table(["self", "function"], [[_pct(share), f"`{name}`"] for name, share in data["self"][:15]])
        lines.append("")
    return lines


def summary(results: dict[str, Any]) -> str:
    phases = results["phases"]
    out = ["summary"]
    tput = phases.get("throughput")
    if tput:
        d, p, s = (tput[n]["best"]["rps"] for n in TARGETS)
        out.append(
            f"  throughput      direct {d:,.0f}  passthrough {p:,.0f}  sidecar {s:,.0f} calls/s "
            f"(sidecar = {s / d:.0%} of direct, {s / p:.0%} of passthrough)"
        )
    lat = phases.get("latency")
    if lat:
        q = {n: lat[n]["latency"] for n in TARGETS}
        out.append(
            f"  latency @{lat['rate']}/s  p50 {_ms(q['direct']['p50'])} / {_ms(q['passthrough']['p50'])} / "
            f"{_ms(q['sidecar']['p50'])} ms   p99 {_ms(q['direct']['p99'])} / {_ms(q['passthrough']['p99'])} / "
            f"{_ms(q['sidecar']['p99'])} ms (direct / passthrough / sidecar)"
        )
    st = phases.get("streaming")
    if st:
        out.append(
            "  streaming       TTFB p50 "
            + " / ".join(_ms(st[n]["ttfb"]["p50"]) for n in TARGETS)
            + " ms   gap p99 "
            + " / ".join(_ms(st[n]["gap"]["p99"]) for n in TARGETS)
            + " ms"
        )
    hold = phases.get("hold")
    if hold:
        out.append(
            f"  {hold['streams']} streams    open at once "
            + " / ".join(str(hold[n]["max_active"]) for n in TARGETS)
            + "   peak RSS "
            + " / ".join(f"{hold[n]['rss_peak'] / MB:.0f}" for n in TARGETS)
            + " MB"
        )
    for label, r in (phases.get("flush") or {}).items():
        out.append(f"  ledger flush    {label}: {r['rows_per_s']:,.0f} rows/s (steady {r['steady_rows_per_s']:,.0f})")
    for name, met, value in targets(results):
        out.append(f"  [{'met' if met else ('n/a' if met is None else 'NOT MET')}] {name}: {value}")
    return "\n".join(out)


if __name__ == "__main__":  # python -m bench.report RESULTS.json [OUT.md]: render saved results again
    import sys
    from pathlib import Path

    import orjson

    saved = orjson.loads(Path(sys.argv[1]).read_bytes())
    rendered = render(saved)
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(rendered)
    else:
        print(rendered)
