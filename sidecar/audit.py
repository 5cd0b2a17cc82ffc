"""`sidecar audit`: an independent check that every workspace's money adds up (DESIGN.md section 6).

It reads Postgres and Redis only (it shares no state with a running sidecar) and reports:

- ledger_vs_account: the ledger's sum of balance impacts differs from the accounts table;
- identity: grants + topups + allowances - refunds - expiries - usage - fees, each term summed from
  its own rows and columns (usage from the cost charged, fees from fee_micro), differs from the
  accounts table (sidecar/movements.py);
- doubled_request / doubled_event: a request or an event with more than one ledger row;
- redis_balance: the Redis balance differs from what Postgres implies for it (the account, plus the
  live load's events not flushed yet, minus the changes Redis is still owed);
- redis_held: Redis's `held` differs from the sum of the live holds;
- hold_past_deadline: a hold past its deadline by more than the grace (the sweeper is not running);
- stream_backlog: ledger events waiting longer than the allowed age (the flusher is stuck);
- dead_letters: events the flusher could not write;
- default_partition: ledger rows in the default partition (a month had no partition);
- owed_to_redis: changes committed in Postgres and still not applied to Redis after the grace;
- rollup_vs_ledger: a daily roll-up (ledger_daily, what summaries and margin reports read) differs from
  the ledger rows it summarises (months archived out of the ledger are not compared).

A Redis finding is confirmed by looking again (a call settling between the Redis and the Postgres
read looks like drift for an instant). Every finding is drift: the exit code is 1 when there is any.
Findings can be exported as Prometheus gauges, to a textfile (node-exporter's textfile collector)
or to a Pushgateway.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

import asyncpg
import orjson
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile
from redis.exceptions import RedisError

from sidecar.balances import sync_token
from sidecar.ledger.migrate import default_partition_rows
from sidecar.money import format_micro
from sidecar.state import keys, servers

STREAM_READ_MAX = 10_000  # stream entries read per workspace; beyond it the Redis balance is not compared
CONFIRM_ATTEMPTS = 3  # a Redis difference must persist this many looks to be reported
CONFIRM_PAUSE_S = 0.2
LIST_MAX = 20  # doubled requests listed per workspace (the count is always exact)
UNREACHABLE = (RedisError, OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Kind(StrEnum):
    LEDGER_VS_ACCOUNT = "ledger_vs_account"
    IDENTITY = "identity"
    DOUBLED_REQUEST = "doubled_request"
    DOUBLED_EVENT = "doubled_event"
    REDIS_BALANCE = "redis_balance"
    REDIS_HELD = "redis_held"
    HOLD_PAST_DEADLINE = "hold_past_deadline"
    STREAM_BACKLOG = "stream_backlog"
    DEAD_LETTERS = "dead_letters"
    DEFAULT_PARTITION = "default_partition"
    OWED_TO_REDIS = "owed_to_redis"
    ROLLUP_VS_LEDGER = "rollup_vs_ledger"


@dataclass(frozen=True, slots=True)
class Finding:
    kind: Kind
    workspace_id: str
    detail: str


@dataclass(frozen=True, slots=True)
class Limits:
    hold_grace_ms: int = 60_000  # the sweeper runs every few seconds: a minute late is a stopped sweeper
    backlog_age_ms_max: int = 300_000
    owed_age_ms_max: int = 300_000


@dataclass
class Report:
    workspaces: int = 0
    findings: list[Finding] = field(default_factory=list)
    backlogs: dict[str, tuple[int, float]] = field(default_factory=dict)  # ws -> (entries, oldest age s)
    default_rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def counts(self) -> Counter[Kind]:
        return Counter(f.kind for f in self.findings)

    def text(self) -> str:
        lines = [
            f"sidecar audit: {self.workspaces} workspace(s), "
            + ("no drift" if self.ok else f"{len(self.findings)} finding(s)")
        ]
        for finding in self.findings:
            lines.append(f"  DRIFT {finding.kind:<20} {finding.workspace_id or '-':<24} {finding.detail}")
        if self.backlogs:
            lines.append("ledger streams waiting for the flusher:")
            for ws, (entries, age_s) in sorted(self.backlogs.items()):
                lines.append(f"  {ws:<24} {entries} event(s), oldest {age_s:.1f} s")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class _RedisView:
    """One workspace's Redis state, read in one MULTI (a consistent instant)."""

    now_ms: int
    balance: int | None
    held: int
    gen: str
    pgv: int
    holds: dict[str, int]
    deadlines: dict[str, float]  # hold id -> deadline ms
    entries: list[tuple[uuid.UUID | None, int, str, int]]  # (event id, impact, gen, at ms)
    stream_length: int
    dead_letters: int
    applied: set[str]


async def audit(
    redis: servers.Client, pool: asyncpg.Pool, limits: Limits | None = None, workspaces: list[str] | None = None
) -> Report:
    limits = limits or Limits()
    report = Report()
    async with pool.acquire() as conn:
        if workspaces is None:
            workspaces = [r["id"] for r in await conn.fetch("SELECT id FROM workspaces ORDER BY id")]
        report.workspaces = len(workspaces)
        report.findings += await _postgres_findings(conn, workspaces)
        default_rows = await default_partition_rows(conn)
    report.default_rows = sum(default_rows.values())
    for month, count in default_rows.items():
        report.findings.append(Finding(Kind.DEFAULT_PARTITION, "", f"{count} row(s) of {month} in ledger_default"))
    for ws in workspaces:
        report.findings += await _redis_findings(redis, pool, ws, limits, report)
    return report


async def _postgres_findings(conn: asyncpg.Connection, workspaces: list[str]) -> list[Finding]:
    found = []
    sums = await conn.fetch(
        "SELECT w.id, coalesce(a.balance_micro, 0) AS account, "
        "((SELECT coalesce(sum(balance_impact_micro), 0) FROM ledger l WHERE l.workspace_id = w.id) "
        # plus the months archived out of the ledger (`sidecar ledger archive`), by their recorded totals
        "+ (SELECT coalesce(sum(balance_impact_micro), 0) FROM ledger_archive_totals t WHERE t.workspace_id = w.id)"
        ")::bigint AS ledger "
        "FROM workspaces w LEFT JOIN accounts a ON a.workspace_id = w.id WHERE w.id = ANY($1::text[])",
        workspaces,
    )
    for row in sums:
        if row["account"] != row["ledger"]:
            found.append(
                Finding(
                    Kind.LEDGER_VS_ACCOUNT,
                    row["id"],
                    f"the ledger sums to {format_micro(row['ledger'])}, the accounts table says "
                    f"{format_micro(row['account'])} (difference {format_micro(row['account'] - row['ledger'])})",
                )
            )
    found += await _identity_findings(conn, workspaces)
    doubled = await conn.fetch(
        "SELECT workspace_id, request_id, count(*) AS n FROM ledger "
        "WHERE workspace_id = ANY($1::text[]) AND request_id IS NOT NULL "
        "GROUP BY workspace_id, request_id HAVING count(*) > 1 ORDER BY workspace_id, request_id",
        workspaces,
    )
    listed: Counter[str] = Counter()
    for row in doubled:
        listed[row["workspace_id"]] += 1
        if listed[row["workspace_id"]] <= LIST_MAX:
            found.append(
                Finding(Kind.DOUBLED_REQUEST, row["workspace_id"], f"request {row['request_id']} has {row['n']} rows")
            )
    events = await conn.fetch(
        "SELECT workspace_id, event_id, count(*) AS n FROM ledger WHERE workspace_id = ANY($1::text[]) "
        "AND request_id IS NULL GROUP BY workspace_id, event_id HAVING count(*) > 1",
        workspaces,
    )
    for row in events[:LIST_MAX]:
        found.append(Finding(Kind.DOUBLED_EVENT, row["workspace_id"], f"event {row['event_id']} has {row['n']} rows"))
    return found + await _rollup_findings(conn, workspaces)


# Each roll-up row against the ledger rows of its group (the GROUP BY of migration 009), days of archived
# months left out: their rows left the ledger, their roll-ups stay.
_ROLLUP_DRIFT = (
    "WITH raw AS (SELECT workspace_id, (created_at AT TIME ZONE 'UTC')::date AS day, kind, status, "
    "coalesce(provider, '') AS provider, coalesce(model, '') AS model, byok, count(*) AS rows, "
    "sum(input_tokens + output_tokens + cache_read_tokens + cache_write_5m_tokens + cache_write_1h_tokens "
    "+ reasoning_tokens) AS tokens, sum(cost_micro) AS cost, sum(upstream_cost_micro) AS upstream, "
    "sum(balance_impact_micro) AS impact FROM ledger WHERE workspace_id = ANY($1::text[]) "
    "GROUP BY 1, 2, 3, 4, 5, 6, 7), "
    "rolled AS (SELECT workspace_id, day, kind, status, provider, model, byok, rows, input_tokens + output_tokens "
    "+ cache_read_tokens + cache_write_5m_tokens + cache_write_1h_tokens + reasoning_tokens AS tokens, "
    "cost_micro AS cost, upstream_cost_micro AS upstream, balance_impact_micro AS impact FROM ledger_daily "
    "WHERE workspace_id = ANY($1::text[]) "
    "AND date_trunc('month', day)::date NOT IN (SELECT month FROM ledger_archives)) "
    "SELECT workspace_id, day, kind, status, provider, model, byok, coalesce(raw.rows, 0) AS ledger_rows, "
    "coalesce(rolled.rows, 0) AS rollup_rows, coalesce(raw.impact, 0)::bigint AS ledger_impact, "
    "coalesce(rolled.impact, 0) AS rollup_impact "
    "FROM raw FULL JOIN rolled USING (workspace_id, day, kind, status, provider, model, byok) "
    "WHERE (raw.rows, raw.tokens, raw.cost, raw.upstream, raw.impact) "
    "IS DISTINCT FROM (rolled.rows, rolled.tokens, rolled.cost, rolled.upstream, rolled.impact) "
    "ORDER BY workspace_id, day, kind, status, provider, model, byok"
)


async def _rollup_findings(conn: asyncpg.Connection, workspaces: list[str]) -> list[Finding]:
    listed: Counter[str] = Counter()
    found = []
    for row in await conn.fetch(_ROLLUP_DRIFT, workspaces):
        listed[row["workspace_id"]] += 1
        if listed[row["workspace_id"]] > LIST_MAX:
            continue
        group = f"{row['day']} {row['kind']}/{row['status']} {row['provider']}/{row['model']} byok={row['byok']}"
        found.append(
            Finding(
                Kind.ROLLUP_VS_LEDGER,
                row["workspace_id"],
                f"{group}: the ledger has {row['ledger_rows']} row(s) for {format_micro(row['ledger_impact'])}, "
                f"the roll-up {row['rollup_rows']} for {format_micro(row['rollup_impact'])}",
            )
        )
    return found


_IDENTITY = (
    "SELECT w.id, coalesce(a.balance_micro, 0) AS account, (("
    "  SELECT coalesce(sum(balance_impact_micro) FILTER (WHERE kind IN ('grant', 'topup', 'allowance')), 0)"
    "       + coalesce(sum(balance_impact_micro) FILTER (WHERE kind IN ('refund', 'expiry')), 0)"
    "       - coalesce(sum(cost_micro + fee_micro) FILTER (WHERE kind = 'usage' AND NOT byok), 0)"
    "  FROM ledger l WHERE l.workspace_id = w.id)"
    # months archived out of the ledger count by their recorded net amount (they passed this check before)
    " + (SELECT coalesce(sum(balance_impact_micro), 0) FROM ledger_archive_totals t WHERE t.workspace_id = w.id)"
    ")::bigint AS identity "
    "FROM workspaces w LEFT JOIN accounts a ON a.workspace_id = w.id WHERE w.id = ANY($1::text[])"
)


async def _identity_findings(conn: asyncpg.Connection, workspaces: list[str]) -> list[Finding]:
    """The identity from each kind's own terms: a usage row whose impact is not -(cost + fee), or a
    movement booked with the wrong sign, shows here even when the impacts add up to the account."""
    found = []
    for row in await conn.fetch(_IDENTITY, workspaces):
        if row["identity"] != row["account"]:
            found.append(
                Finding(
                    Kind.IDENTITY,
                    row["id"],
                    f"grants + topups + allowances - refunds - expiries - usage - fees = "
                    f"{format_micro(row['identity'])}, the accounts table says {format_micro(row['account'])}",
                )
            )
    return found


async def _redis_findings(
    redis: servers.Client, pool: asyncpg.Pool, ws: str, limits: Limits, report: Report
) -> list[Finding]:
    found: list[Finding] = []
    for attempt in range(CONFIRM_ATTEMPTS):
        view = await _read_redis(redis, ws)
        async with pool.acquire() as conn:
            found = await _compare(conn, ws, view, limits)
        if not any(f.kind in (Kind.REDIS_BALANCE, Kind.REDIS_HELD) for f in found):
            break
        if attempt + 1 < CONFIRM_ATTEMPTS:
            await asyncio.sleep(CONFIRM_PAUSE_S)
    if view.stream_length:
        oldest_ms = min((at for *_, at in view.entries), default=view.now_ms)
        report.backlogs[ws] = (view.stream_length, max(view.now_ms - oldest_ms, 0) / 1000)
    return found


_TIME_SCRIPT = "return redis.call('TIME')"


async def _read_redis(redis: servers.Client, ws: str) -> _RedisView:
    # One MULTI: a consistent view. redis-py's cluster pipeline cannot run this one (its transactions
    # hand response callbacks arguments some do not take), so on a cluster the reads are pipelined
    # without MULTI, and _redis_findings confirms a balance or held finding by reading again.
    async with redis.pipeline(transaction=not servers.is_cluster(redis)) as pipe:
        pipe.eval(_TIME_SCRIPT, 1, keys.acct(ws))  # Redis time on the workspace's own server (a cluster's shard)
        pipe.hmget(keys.acct(ws), "balance", "held", "gen", "pgv")
        pipe.hgetall(keys.holds(ws))
        pipe.zrange(keys.hold_deadlines(ws), 0, -1, withscores=True)
        pipe.xrange(keys.stream(ws), count=STREAM_READ_MAX)
        pipe.xlen(keys.stream(ws))
        pipe.xlen(keys.dead_letters(ws))
        pipe.smembers(keys.applied(ws))
        now, acct, holds, deadlines, entries, length, dead, applied = await pipe.execute()
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    balance, held, gen, pgv = acct
    return _RedisView(
        now_ms=now_ms,
        balance=int(balance) if balance is not None else None,
        held=int(held or 0),
        gen=(gen or b"").decode(),
        pgv=int(pgv or 0),
        holds={k.decode(): int(v) for k, v in holds.items()},
        deadlines={h.decode(): deadline for h, deadline in deadlines},
        entries=[_entry(fields) for _, fields in entries],
        stream_length=int(length),
        dead_letters=int(dead),
        applied={a.decode() for a in applied},
    )


def _entry(fields: dict[bytes, bytes]) -> tuple[uuid.UUID | None, int, str, int]:
    try:
        event_id = uuid.UUID(orjson.loads(fields[b"e"])["event_id"])
    except (KeyError, ValueError, TypeError, orjson.JSONDecodeError):
        event_id = None  # unreadable: the flusher dead-letters it, and it never reached the balance row
    return event_id, int(fields.get(b"impact", b"0")), fields.get(b"gen", b"").decode(), int(fields.get(b"at", b"0"))


async def _compare(conn: asyncpg.Connection, ws: str, view: _RedisView, limits: Limits) -> list[Finding]:
    found = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        account = await conn.fetchrow("SELECT balance_micro FROM accounts WHERE workspace_id = $1", ws)
        ids = [e for e, *_ in view.entries if e is not None]
        recorded = {
            r["event_id"]
            for r in await conn.fetch("SELECT event_id FROM ledger_event_ids WHERE event_id = ANY($1::uuid[])", ids)
        }
        owed = await conn.fetch(
            "SELECT pg_version, gen, delta_micro, extract(epoch FROM now() - created_at) * 1000 AS age_ms "
            "FROM balance_sync WHERE workspace_id = $1",
            ws,
        )
    for row in owed:
        if row["age_ms"] > limits.owed_age_ms_max:
            found.append(
                Finding(
                    Kind.OWED_TO_REDIS,
                    ws,
                    f"{format_micro(row['delta_micro'])} committed at version {row['pg_version']} still not "
                    f"applied to Redis after {row['age_ms'] / 1000:.0f} s (is a data plane running?)",
                )
            )
    if view.balance is not None and view.stream_length <= STREAM_READ_MAX:
        expected = account["balance_micro"] if account else 0
        # Settled in this Redis load and not in Postgres yet: in the Redis balance only.
        expected += sum(impact for e, impact, gen, _ in view.entries if gen == view.gen and e not in recorded)
        # Committed in Postgres and still owed to this Redis load: in the Postgres balance only.
        for row in owed:
            owed_here = row["gen"].startswith("grant:") or row["gen"] != view.gen
            token = sync_token(row["pg_version"], row["gen"])
            if owed_here and row["pg_version"] > view.pgv and token not in view.applied:
                expected -= row["delta_micro"]
        if view.balance != expected:
            found.append(
                Finding(
                    Kind.REDIS_BALANCE,
                    ws,
                    f"Redis holds {format_micro(view.balance)}, Postgres implies {format_micro(expected)} "
                    f"(difference {format_micro(view.balance - expected)})",
                )
            )
    live_held = sum(view.holds.values())
    if view.balance is not None and view.held != live_held:
        found.append(
            Finding(
                Kind.REDIS_HELD,
                ws,
                f"Redis says {format_micro(view.held)} is held, its {len(view.holds)} live hold(s) add up to "
                f"{format_micro(live_held)}",
            )
        )
    cutoff_ms = view.now_ms - limits.hold_grace_ms
    late = [h for h, deadline in view.deadlines.items() if deadline < cutoff_ms and h in view.holds]
    if late:
        found.append(
            Finding(
                Kind.HOLD_PAST_DEADLINE,
                ws,
                f"{len(late)} hold(s) past their deadline by more than {limits.hold_grace_ms} ms: "
                + ", ".join(sorted(late)[:LIST_MAX]),
            )
        )
    if view.entries:
        oldest_ms = min(at for *_, at in view.entries)
        if view.now_ms - oldest_ms > limits.backlog_age_ms_max:
            found.append(
                Finding(
                    Kind.STREAM_BACKLOG,
                    ws,
                    f"{view.stream_length} event(s) waiting, the oldest for {(view.now_ms - oldest_ms) / 1000:.0f} s "
                    "(is the flusher running?)",
                )
            )
    if view.dead_letters:
        found.append(Finding(Kind.DEAD_LETTERS, ws, f"{view.dead_letters} event(s) in the dead-letter stream"))
    return found


def export_metrics(report: Report, textfile: str | None = None, pushgateway: str | None = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    findings = Gauge("sidecar_audit_findings", "Drift found by the last audit, by kind", ["kind"], registry=registry)
    counts = report.counts()
    for kind in Kind:
        findings.labels(kind.value).set(counts.get(kind, 0))
    Gauge("sidecar_audit_ok", "1 when the last audit found no drift", registry=registry).set(1 if report.ok else 0)
    Gauge("sidecar_audit_workspaces", "Workspaces audited", registry=registry).set(report.workspaces)
    Gauge("sidecar_audit_stream_backlog_events", "Ledger events waiting for the flusher", registry=registry).set(
        sum(entries for entries, _ in report.backlogs.values())
    )
    Gauge("sidecar_audit_ledger_default_rows", "Ledger rows in the default partition", registry=registry).set(
        report.default_rows
    )
    Gauge("sidecar_audit_last_run_timestamp_seconds", "When the last audit ran", registry=registry).set(time.time())
    if textfile:
        write_to_textfile(textfile, registry)
    if pushgateway:
        push_to_gateway(pushgateway, job="sidecar_audit", registry=registry)
    return registry


async def run(redis_url: str, database_url: str, limits: Limits, workspaces: list[str] | None) -> Report:
    redis = servers.from_url(redis_url)
    try:
        await servers.ready(redis)
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            return await audit(redis, pool, limits, workspaces)
        finally:
            await pool.close()
    finally:
        await redis.aclose()
