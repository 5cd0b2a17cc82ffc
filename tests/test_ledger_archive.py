"""Retention (issue 10.6): `sidecar ledger archive` detaches old monthly partitions and writes them to
files, keeps the money identity whole, and refuses months a statement or an invoice points to."""

from __future__ import annotations

import csv
import hashlib
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime

import asyncpg
import pytest
from support.harness import Sidecar

from sidecar.audit import _postgres_findings
from sidecar.statements import archive


async def _old_month(conn: asyncpg.Connection, ws: str, month: date, impacts: list[int]) -> list[uuid.UUID]:
    """A partition for `month`, as `sidecar migrate` made it then, holding rows of `ws`."""
    name = f"ledger_{month:%Y_%m}"
    end = archive.add_months(month, 1)
    await conn.execute(f"CREATE TABLE {name} PARTITION OF ledger FOR VALUES FROM ('{month}') TO ('{end}')")
    await conn.execute("SELECT ledger_protect($1::regclass)", name)
    ids = []
    for day, impact in enumerate(impacts, start=1):
        ids.append(uuid.uuid4())
        kind, cost = ("grant", 0) if impact > 0 else ("usage", -impact)
        await conn.execute(
            "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, provider, model, cost_micro, "
            "balance_impact_micro) VALUES ($1, $2, $3, 'completed', $4, $5, $6, $7, $8)",
            ids[-1],
            datetime(month.year, month.month, day, 12, tzinfo=UTC),
            kind,
            ws,
            None if kind == "grant" else "mock",
            None if kind == "grant" else "gpt-4o-mini",
            cost,
            impact,
        )
    await conn.execute(
        "UPDATE accounts SET balance_micro = balance_micro + $2 WHERE workspace_id = $1", ws, sum(impacts)
    )
    return ids


async def test_archiving_old_months_keeps_the_identity_and_the_files_match(sidecar: Sidecar, tmp_path) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    march, may = date(2001, 3, 1), date(2001, 5, 1)
    today = datetime.now(UTC).date()
    async with sidecar.svc.pool.acquire() as conn:
        march_ids = await _old_month(conn, ws.id, march, [500_000, -120_000, -80_000])
        await _old_month(conn, ws.id, may, [-1_000])
        assert not await _postgres_findings(conn, [ws.id])

        planned = await archive.run(conn, date(2001, 4, 1), tmp_path, today, drop_tables=False, dry_run=True)
        assert [(a.month, a.rows) for a in planned] == [(march, 3)]
        assert "ledger_2001_03" in (await archive.partitions(conn)).values()  # a dry run changes nothing

        [done] = await archive.run(conn, date(2001, 4, 1), tmp_path, today, drop_tables=False, dry_run=False)
        assert done.rows == 3 and done.file == tmp_path / "ledger-2001-03.csv"
        assert march not in await archive.partitions(conn)
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM ledger WHERE workspace_id = $1 AND created_at < '2001-04-01'", ws.id
            )
            == 0
        )
        assert await conn.fetchval("SELECT count(*) FROM archived_ledger_2001_03") == 3
        assert not await _postgres_findings(conn, [ws.id]), "balance = ledger + archived months"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM archived_ledger_2001_03")
        # A replay of an archived event is still refused: its id stays known.
        await conn.execute(
            "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, cost_micro, balance_impact_micro) "
            "VALUES ($1, now(), 'usage', 'completed', $2, 0, -1)",
            march_ids[1],
            ws.id,
        )
        assert await conn.fetchval("SELECT count(*) FROM ledger WHERE event_id = $1", march_ids[1]) == 0
        # The roll-ups of the archived month stay: its summary still answers.
        assert (
            await conn.fetchval(
                "SELECT sum(rows) FROM ledger_daily WHERE workspace_id = $1 AND day < '2001-04-01'", ws.id
            )
            == 3
        )

        [dropped] = await archive.run(conn, date(2001, 6, 1), tmp_path, today, drop_tables=True, dry_run=False)
        assert dropped.month == may and dropped.dropped
        assert await conn.fetchval("SELECT to_regclass('archived_ledger_2001_05')") is None
        assert await conn.fetchval("SELECT dropped_at IS NOT NULL FROM ledger_archives WHERE month = $1", may)
        assert not await _postgres_findings(conn, [ws.id])

    with done.file.open(newline="") as f:
        lines = list(csv.DictReader(f))
    assert sorted(int(line["balance_impact_micro"]) for line in lines) == [-120_000, -80_000, 500_000]
    assert hashlib.sha256(done.file.read_bytes()).hexdigest() == done.sha256


async def test_months_a_statement_or_an_invoice_points_to_are_refused(sidecar: Sidecar, tmp_path) -> None:
    ws = await sidecar.workspace()
    july = date(2001, 7, 1)
    async with sidecar.svc.pool.acquire() as conn:
        ids = await _old_month(conn, ws.id, july, [10_000])
        # Its statement period is open until September starts.
        with pytest.raises(archive.ArchiveRefused, match="statement period is still open"):
            await archive.run(conn, date(2001, 8, 1), tmp_path, date(2001, 8, 31), False, False)
        # Its row is the crediting of a payment order that has an invoice.
        order = f"ord_{uuid.uuid4().hex[:12]}"
        await conn.execute(
            "INSERT INTO payment_orders (id, workspace_id, client_order_id, provider, purpose, status, amount_micro, "
            "fee_micro, tax_micro, total_micro, currency, total_minor, tax_snapshot) "
            "VALUES ($1, $2, $1, 'manual', 'manual', 'created', 10000, 0, 0, 10000, 'usd', 1, '{}')",
            order,
            ws.id,
        )
        await conn.execute(
            "INSERT INTO grants (workspace_id, grant_id, kind, amount_micro, event_id) "
            "VALUES ($1, $2, 'topup', 10000, $3)",
            ws.id,
            f"order:{order}",
            ids[0],
        )
        seq = await conn.fetchval("SELECT coalesce(max(seq), 0) + 1 FROM invoices WHERE issuer = 'archive-test'")
        await conn.execute(
            "INSERT INTO invoices (number, issuer, year, seq, order_id, workspace_id, issuer_snapshot) "
            "VALUES ($1, 'archive-test', 2001, $2, $3, $4, '{}')",
            f"INV-TEST-{order}",
            seq,
            order,
            ws.id,
        )
        with pytest.raises(archive.ArchiveRefused, match="invoiced payment orders"):
            await archive.run(conn, date(2001, 8, 1), tmp_path, datetime.now(UTC).date(), False, False)
        assert july in await archive.partitions(conn), "a refused month stays in the ledger"
        assert not await _postgres_findings(conn, [ws.id])


def test_the_command_says_what_it_would_do(migrated_database_url: str, tmp_path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "ledger",
            "archive",
            "--before",
            "1999-01",
            "--dir",
            str(tmp_path),
            "--dry-run",
            "--database-url",
            migrated_database_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "nothing to archive before 1999-01" in run.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "ledger",
            "archive",
            "--before",
            "1999-13",
            "--dir",
            str(tmp_path),
            "--database-url",
            migrated_database_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1 and "--before must be a month" in bad.stderr
