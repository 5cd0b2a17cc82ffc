"""`sidecar audit`: a clean state passes; each kind of drift introduced by hand is found."""

from __future__ import annotations

import asyncio
import sys

import pytest
from support.harness import Sidecar, Workspace, chat_body

from sidecar.audit import Kind, Limits, audit, export_metrics
from sidecar.state import keys


async def _with_calls(sidecar: Sidecar, calls: int = 3) -> Workspace:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    for _ in range(calls):
        assert (await sidecar.chat(ws, chat_body()))[0] == 200
    return ws


async def _kinds(sidecar: Sidecar, ws: str, limits: Limits | None = None) -> list[Kind]:
    report = await audit(sidecar.svc.state.redis, sidecar.svc.pool, limits or Limits(), [ws])
    return sorted(f.kind for f in report.findings)


@pytest.mark.both_redis  # the audit reads each workspace in one transaction: on a cluster, on its shard
async def test_a_clean_state_passes_flushed_or_not(sidecar: Sidecar) -> None:
    ws = await _with_calls(sidecar)
    await sidecar.grant(ws.id, 5)
    report = await audit(sidecar.svc.state.redis, sidecar.svc.pool, Limits(), [ws.id])
    assert report.ok, report.text()  # three calls settled in Redis, not yet in Postgres: no drift
    assert report.backlogs[ws.id][0] == 3 and "no drift" in report.text()
    await sidecar.flush()
    report = await audit(sidecar.svc.state.redis, sidecar.svc.pool, Limits(), [ws.id])
    assert report.ok and report.backlogs == {}, report.text()


async def test_a_doctored_accounts_row_is_found(sidecar: Sidecar) -> None:
    ws = await _with_calls(sidecar)
    await sidecar.flush()
    async with sidecar.svc.pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET balance_micro = balance_micro + 1000 WHERE workspace_id = $1", ws.id)
    kinds = await _kinds(sidecar, ws.id)
    # Postgres no longer agrees with its own ledger (summed whole, and term by term), nor with Redis.
    assert kinds == [Kind.IDENTITY, Kind.LEDGER_VS_ACCOUNT, Kind.REDIS_BALANCE]


async def test_a_doubled_row_written_around_the_triggers_is_found(sidecar: Sidecar) -> None:
    ws = await _with_calls(sidecar)
    await sidecar.flush()
    async with sidecar.svc.pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")  # the owner, skipping every trigger
        await conn.execute(  # the same call again, a minute later: the stale-Redis replay of issue 15.7
            "CREATE TEMP TABLE doubled ON COMMIT DROP AS SELECT * FROM ledger WHERE workspace_id = $1 "
            "AND kind = 'usage' ORDER BY created_at LIMIT 1",
            ws.id,
        )
        await conn.execute("UPDATE doubled SET created_at = created_at + interval '1 minute'")
        await conn.execute("INSERT INTO ledger SELECT * FROM doubled")
    report = await audit(sidecar.svc.state.redis, sidecar.svc.pool, Limits(), [ws.id])
    kinds = sorted(f.kind for f in report.findings)
    # Around the triggers the roll-up trigger was skipped too: the daily roll-up no longer matches.
    assert kinds == [Kind.DOUBLED_REQUEST, Kind.IDENTITY, Kind.LEDGER_VS_ACCOUNT, Kind.ROLLUP_VS_LEDGER], report.text()
    assert "has 2 rows" in report.text()


@pytest.mark.both_redis
async def test_stale_holds_and_a_wrong_held_are_found(sidecar: Sidecar, redis_client) -> None:
    ws = await _with_calls(sidecar)
    await sidecar.flush()
    # A hold whose sidecar died an hour ago, with no sweeper to void it.
    await redis_client.hset(keys.holds(ws.id), "deadbeef", 500)
    await redis_client.zadd(keys.hold_deadlines(ws.id), {"deadbeef": 1})
    await redis_client.hincrby(keys.acct(ws.id), "held", 500)
    assert await _kinds(sidecar, ws.id) == [Kind.HOLD_PAST_DEADLINE]
    await redis_client.hincrby(keys.acct(ws.id), "held", 7)  # and `held` no longer matches the holds
    assert await _kinds(sidecar, ws.id) == [Kind.HOLD_PAST_DEADLINE, Kind.REDIS_HELD]


async def test_a_redis_balance_drift_a_stuck_flusher_and_dead_letters_are_found(sidecar: Sidecar, redis_client):
    ws = await _with_calls(sidecar)
    await redis_client.hincrby(keys.acct(ws.id), "balance", 42)
    await asyncio.sleep(0.05)
    limits = Limits(backlog_age_ms_max=10)
    assert await _kinds(sidecar, ws.id, limits) == [Kind.REDIS_BALANCE, Kind.STREAM_BACKLOG]
    await redis_client.xadd(keys.dead_letters(ws.id), {b"e": b"{}"})
    assert Kind.DEAD_LETTERS in await _kinds(sidecar, ws.id, limits)


async def test_the_cli_exits_non_zero_on_drift_and_exports_metrics(
    sidecar: Sidecar, redis_url: str, migrated_database_url: str, tmp_path
) -> None:
    clean, drifted = await _with_calls(sidecar), await _with_calls(sidecar)
    await sidecar.flush()
    async with sidecar.svc.pool.acquire() as conn:
        await conn.execute("UPDATE accounts SET balance_micro = balance_micro - 1 WHERE workspace_id = $1", drifted.id)

    async def cli(*workspaces: str) -> tuple[int, str, str]:
        textfile = tmp_path / f"audit-{len(workspaces)}.prom"
        argv = ["-m", "sidecar.cli", "audit", "--redis-url", redis_url, "--database-url", migrated_database_url]
        argv += ["--textfile", str(textfile)] + [arg for ws in workspaces for arg in ("--workspace", ws)]
        process = await asyncio.create_subprocess_exec(
            sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, out.decode(), textfile.read_text()

    code, out, metrics = await cli(clean.id)
    assert code == 0, out
    assert "no drift" in out and "sidecar_audit_ok 1.0" in metrics
    code, out, metrics = await cli(clean.id, drifted.id)
    assert code == 1, out
    assert f"DRIFT ledger_vs_account    {drifted.id}" in out
    assert 'sidecar_audit_findings{kind="ledger_vs_account"} 1.0' in metrics and "sidecar_audit_ok 0.0" in metrics
    assert 'sidecar_audit_findings{kind="doubled_request"} 0.0' in metrics


def test_metrics_name_every_kind() -> None:
    from sidecar.audit import Report

    text = export_metrics(Report(workspaces=2))
    names = {s.labels.get("kind") for m in text.collect() for s in m.samples if s.name == "sidecar_audit_findings"}
    assert names == {k.value for k in Kind}


async def test_the_cli_says_when_it_could_not_audit(migrated_database_url: str) -> None:
    argv = ["-m", "sidecar.cli", "audit", "--redis-url", "redis://127.0.0.1:1/0", "--database-url"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, migrated_database_url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2, err  # not 1: nothing was audited, no drift was found
    assert b"could not read Redis or Postgres" in err
