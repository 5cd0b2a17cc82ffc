"""Bench of the read side (issue 10): the CSV statement's export rate and peak RSS for a million rows,
and the usage summary's latency with ten million ledger rows in one workspace.

    .venv/bin/python -m bench.statements                    # 1M rows for the CSV, 10M for the summary
    .venv/bin/python -m bench.statements --csv-rows 200000 --summary-rows 1000000   # a quicker run

It needs nothing running: a private Postgres is started in a temporary directory (BENCH_DATABASE_URL uses
another; the bench writes millions of rows into an append-only ledger, never point it at data you keep).

- CSV: the rows are written with generate_series through the ledger's own triggers (dedup, roll-ups), in
  batches as the flusher writes them. The export runs in a child process serving exactly the route's code
  path (statements/csv_export.py behind an aiohttp StreamResponse); the bench downloads it and discards
  it. Reported: rows/s, MB/s, and the child's peak RSS (VmHWM) before and after, at two sizes, which is
  what "constant memory" means here.
- Summary: ten million rows are written as the workspace's owner with the triggers off (a bench shortcut
  for speed: generate_series straight into the partitions), and their roll-ups built by the same GROUP BY
  the migration's backfill uses. Then the summary is computed N times against them; p50/p99 reported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
from aiohttp import web

from sidecar.ledger.migrate import migrate
from sidecar.statements import csv_export
from sidecar.statements.filters import Period, parse_filters
from sidecar.statements.summary import usage_summary

CSV_WS = "ws_bench_csv"
SUMMARY_WS = "ws_bench_summary"
MONTHS = 13  # a year back, partitions included
BATCH_ROWS = 100_000
CSV_SPREAD_ROWS = 1_000_000  # the CSV's rows are spread over a year as if there were this many
_USAGE_SELECT = """
SELECT gen_random_uuid(), $2::timestamptz - make_interval(secs => (g * {span}::float8 / $5) + random()), 'usage',
       (ARRAY['completed','completed','completed','failed','cancelled'])[1 + g % 5], $1,
       'office_' || (g % 7), 'key_' || (g % 11), md5(g::text), NULL, 'session_' || (g % 1000),
       (ARRAY['openai','anthropic'])[1 + g % 2], (ARRAY['gpt-4o-mini','claude-sonnet','gpt-4.1'])[1 + g % 3],
       'upstream-model', 1000 + g % 5000, 100 + g % 900, g % 300, 0, 0, g % 50,
       CASE WHEN g % 10 = 0 THEN 0 ELSE 1000 + g % 9000 END, 800 + g % 7000, 0,
       CASE WHEN g % 10 = 0 THEN 0 ELSE -(1000 + g % 9000) END, 1000000000 - g, g % 10 = 0, false, false, NULL
FROM generate_series($3::bigint, $4::bigint) AS g
"""
_COLUMNS = (
    "event_id, created_at, kind, status, workspace_id, office_id, key_id, request_id, idempotency_key, session_id, "
    "provider, model, upstream_model, input_tokens, output_tokens, cache_read_tokens, cache_write_5m_tokens, "
    "cache_write_1h_tokens, reasoning_tokens, cost_micro, upstream_cost_micro, hold_micro, balance_impact_micro, "
    "balance_after_micro, byok, estimated, hold_lost, error"
)


def _insert(span_s: int) -> str:
    # In event id order within a batch, as the flusher inserts: the heap then holds a workspace's rows in
    # the history's order (insert_xid, event_id), as it does in production.
    return f"INSERT INTO ledger ({_COLUMNS}) SELECT * FROM ({_USAGE_SELECT.format(span=span_s)}) AS s ORDER BY 1"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _past_partitions(conn: asyncpg.Connection) -> None:
    month = date.today().replace(day=1)
    for _ in range(MONTHS):
        month = (month - timedelta(days=1)).replace(day=1)
        name = f"ledger_{month:%Y_%m}"
        end = (month + timedelta(days=32)).replace(day=1)
        if await conn.fetchval("SELECT to_regclass($1)", name) is None:
            await conn.execute(f"CREATE TABLE {name} PARTITION OF ledger FOR VALUES FROM ('{month}') TO ('{end}')")
            await conn.execute("SELECT ledger_protect($1::regclass)", name)


async def _workspace(conn: asyncpg.Connection, ws: str) -> None:
    await conn.execute("INSERT INTO workspaces (id, name) VALUES ($1, $1) ON CONFLICT DO NOTHING", ws)


async def fill(conn: asyncpg.Connection, ws: str, rows: int, triggers: bool) -> float:
    """`rows` usage rows over the past year; returns seconds taken."""
    started = time.monotonic()
    span = 360 * 86_400
    query = _insert(span)
    now = datetime.now(UTC)
    for first in range(1, rows + 1, BATCH_ROWS):
        async with conn.transaction():
            if not triggers:
                await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(query, ws, now, first, min(first + BATCH_ROWS - 1, rows), rows)
        if (first // BATCH_ROWS) % 10 == 0:
            _log(f"  {ws}: {min(first + BATCH_ROWS - 1, rows):,} rows")
    if not triggers:  # the roll-ups, as migration 009 builds them for rows already in the ledger
        await conn.execute("DELETE FROM ledger_daily WHERE workspace_id = $1", ws)
        await conn.execute(
            "INSERT INTO ledger_daily SELECT workspace_id, (created_at AT TIME ZONE 'UTC')::date, kind, status, "
            "coalesce(provider, ''), coalesce(model, ''), byok, count(*), sum(input_tokens)::bigint, "
            "sum(output_tokens)::bigint, sum(cache_read_tokens)::bigint, sum(cache_write_5m_tokens)::bigint, "
            "sum(cache_write_1h_tokens)::bigint, sum(reasoning_tokens)::bigint, sum(cost_micro)::bigint, "
            "sum(upstream_cost_micro)::bigint, 0, sum(balance_impact_micro)::bigint FROM ledger "
            "WHERE workspace_id = $1 GROUP BY 1, 2, 3, 4, 5, 6, 7",
            ws,
        )
    await conn.execute("ANALYZE ledger_daily")
    await conn.execute("ANALYZE ledger")
    return time.monotonic() - started


# --- the export server (child process) -----------------------------------------------------------------


def serve(database_url: str, port: int) -> None:
    import uvloop

    async def export(request: web.Request) -> web.StreamResponse:
        filters = parse_filters({"order": "asc"})
        response = web.StreamResponse(headers={"Content-Type": "text/csv"})
        response.enable_chunked_encoding()
        async with request.app["pool"].acquire() as conn:
            await response.prepare(request)
            await csv_export.export(conn, request.match_info["ws"], filters, response.write, 3600)
        await response.write_eof()
        return response

    async def start(app: web.Application) -> None:
        app["pool"] = await asyncpg.create_pool(database_url, min_size=1, max_size=2)

    app = web.Application()
    app.on_startup.append(start)
    app.router.add_get("/{ws}.csv", export)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def download(port: int, ws: str) -> tuple[int, int, float]:
    """(data rows, bytes, seconds) of one export, read and discarded."""
    lines, size = 0, 0
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(f"http://127.0.0.1:{port}/{ws}.csv") as resp:
        resp.raise_for_status()
        async for chunk in resp.content.iter_chunked(1 << 16):
            lines += chunk.count(b"\n")
            size += len(chunk)
    return lines - 1, size, time.monotonic() - started


async def bench_csv(database_url: str, pool: asyncpg.Pool, rows_list: list[int]) -> list[str]:
    port = 18_000 + os.getpid() % 1000
    command = (sys.executable, "-m", "bench.statements", "--serve", database_url, str(port))
    child = await asyncio.create_subprocess_exec(*command)
    report = []
    try:
        for _ in range(100):
            try:
                await download(port, "ws_nobody")
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        baseline = _peak_rss_kb(child.pid)
        written = 0
        for rows in rows_list:
            async with pool.acquire() as conn:
                seconds_fill = await fill_to(conn, CSV_WS, written, rows)
            written = rows
            got, size, seconds = await download(port, CSV_WS)
            assert got == rows, (got, rows)
            peak = _peak_rss_kb(child.pid)
            report.append(
                f"| {rows:,} | {rows / seconds:,.0f} | {size / seconds / 1e6:.1f} | {seconds:.1f} | "
                f"{baseline / 1024:.0f} | {peak / 1024:.0f} | {seconds_fill:.0f} |"
            )
            _log(report[-1])
    finally:
        child.terminate()
        await asyncio.wait_for(child.wait(), 10)
    return report


async def fill_to(conn: asyncpg.Connection, ws: str, have: int, want: int) -> float:
    """Add rows to reach `want` (numbered on from `have`), through the triggers as the flusher writes."""
    started = time.monotonic()
    now = datetime.now(UTC)
    query = _insert(360 * 86_400)
    for first in range(have + 1, want + 1, BATCH_ROWS):
        await conn.execute(query, ws, now, first, min(first + BATCH_ROWS - 1, want), CSV_SPREAD_ROWS)
    return time.monotonic() - started


async def bench_summary(pool: asyncpg.Pool, rows: int, runs: int) -> list[str]:
    async with pool.acquire() as conn:
        await _workspace(conn, SUMMARY_WS)
        seconds_fill = await fill(conn, SUMMARY_WS, rows, triggers=False)
        count = await conn.fetchval("SELECT count(*) FROM ledger WHERE workspace_id = $1", SUMMARY_WS)
    today = datetime.now(UTC).date()
    total, series = Period(today - timedelta(days=29), today), Period(today - timedelta(days=6), today)
    year = Period(today - timedelta(days=365), today)
    report = []
    for name, period, window in (("30 days (the data plane's)", total, series), ("a year (operators)", year, year)):
        latencies = []
        async with pool.acquire() as conn:
            for _ in range(runs):
                started = time.perf_counter()
                await usage_summary(conn, SUMMARY_WS, period, window)
                latencies.append((time.perf_counter() - started) * 1000)
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        report.append(
            f"| {name} | {count:,} | {statistics.median(latencies):.2f} | {p99:.2f} | {runs} | {seconds_fill:.0f} |"
        )
        _log(report[-1])
    return report


async def run(args: argparse.Namespace, database_url: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        await _past_partitions(conn)
        await _workspace(conn, CSV_WS)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2, command_timeout=3600)
    try:
        sizes = sorted({max(args.csv_rows // 10, 1), args.csv_rows})
        csv_lines = await bench_csv(database_url, pool, sizes) if args.csv_rows else ["| (skipped) |"]
        summary_lines = await bench_summary(pool, args.summary_rows, args.summary_runs)
    finally:
        await pool.close()
    return "\n".join(
        [
            "### CSV statement export (one workspace, streamed, Postgres COPY -> aiohttp StreamResponse)",
            "",
            "| rows | rows/s | MB/s | seconds | server RSS before (MB) | server peak RSS (MB) | fill seconds |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *csv_lines,
            "",
            "### Usage summary latency (from the daily roll-ups)",
            "",
            "| period | ledger rows in the workspace | p50 ms | p99 ms | runs | fill seconds |",
            "| --- | --- | --- | --- | --- | --- |",
            *summary_lines,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.statements", description=__doc__.splitlines()[0])
    parser.add_argument("--csv-rows", type=int, default=1_000_000, help="0: skip the CSV part")
    parser.add_argument("--summary-rows", type=int, default=10_000_000)
    parser.add_argument("--summary-runs", type=int, default=500)
    parser.add_argument("--serve", nargs=2, metavar=("DATABASE_URL", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    database_url = os.environ.get("BENCH_DATABASE_URL")
    server = None
    with tempfile.TemporaryDirectory(prefix="bench-statements-") as tmp:
        if not database_url:
            from sidecar.devtools.embedded import start_postgres

            server = start_postgres(Path(tmp) / "pg", durable=False)
            database_url = server.url
        try:
            print(asyncio.run(run(args, database_url)))
        finally:
            if server is not None:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
