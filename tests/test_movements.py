"""Ledger movements (sidecar/movements.py): credits and debits, each once per movement id, a debit at
most what remains, and the extended identity in Redis and Postgres, also under concurrency."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from support.harness import Sidecar, chat_body
from support.scripts import admit

from sidecar import db
from sidecar.movements import Kind
from sidecar.state import keys
from sidecar.state.store import Admission, IdempotencyRecord


async def _hold(sidecar: Sidecar, ws: str, ceiling: int) -> str:
    hold_id = uuid.uuid4().hex
    result = await admit(sidecar.svc.state, ws, ceiling=ceiling, hold_id=hold_id)
    assert result.outcome is Admission.ADMITTED, result
    return hold_id


async def _settle(sidecar: Sidecar, ws: str, hold_id: str, cost: int) -> None:
    event = orjson.dumps(
        {"event_id": str(uuid.UUID(hold_id)), "workspace_id": ws, "request_id": hold_id, "status": "completed"}
    )
    await sidecar.svc.state.settle(
        ws, "k1", hold_id, cost, True, event, None, IdempotencyRecord.FORGET, 0, "", b"", 60_000
    )


async def _movement(sidecar: Sidecar, ws: str, movement_id: str):
    async with sidecar.svc.pool.acquire() as conn:
        return await conn.fetchrow("SELECT * FROM grants WHERE workspace_id = $1 AND grant_id = $2", ws, movement_id)


async def test_credits_of_every_kind_enter_once(sidecar: Sidecar) -> None:
    ws = (await sidecar.workspace()).id
    balances = sidecar.svc.balances
    for kind, amount in ((Kind.GRANT, 100), (Kind.TOPUP, 20), (Kind.ALLOWANCE, 3)):
        results = await asyncio.gather(*[balances.credit(ws, f"m-{kind}", kind, amount) for _ in range(10)])
        assert sum(r.created for r in results) == 1
    identity = await sidecar.assert_identity(ws)
    assert (identity["grants"], identity["topups"], identity["allowances"]) == (100, 20, 3)
    assert await sidecar.redis_account(ws) == (123, 0)
    with pytest.raises(ValueError):
        await balances.credit(ws, "bad", Kind.REFUND, 5)


async def test_a_debit_takes_at_most_what_remains_and_records_the_rest(sidecar: Sidecar) -> None:
    ws = (await sidecar.workspace(credits_micro=1_000)).id
    balances = sidecar.svc.balances
    first = await balances.debit(ws, "r1", Kind.REFUND, 300)
    assert (first.taken_micro, first.short_micro, first.created) == (300, 0, True)
    second = await balances.debit(ws, "r2", Kind.REFUND, 2_000)
    assert (second.taken_micro, second.short_micro) == (700, 1_300)
    again = await balances.debit(ws, "r2", Kind.REFUND, 2_000)  # a replay: the same answer, nothing more
    assert (again.taken_micro, again.short_micro, again.created) == (700, 1_300, False)
    nothing = await balances.debit(ws, "r3", Kind.REFUND, 5)
    assert (nothing.taken_micro, nothing.short_micro) == (0, 5)
    identity = await sidecar.assert_identity(ws)
    assert identity["refunds"] == 1_000 and identity["short"] == 1_300 + 5
    assert await sidecar.redis_account(ws) == (0, 0)
    rows = await sidecar.ledger(ws, "refund")
    assert [(-r["balance_impact_micro"], r["short_micro"]) for r in rows] == [(300, 0), (700, 1_300), (0, 5)]
    recorded = await _movement(sidecar, ws, "r2")
    assert (recorded["taken_micro"], recorded["short_micro"], recorded["amount_micro"]) == (700, 1_300, 2_000)
    with pytest.raises(db.GrantConflict):
        await balances.debit(ws, "r2", Kind.REFUND, 2_001)
    with pytest.raises(db.GrantConflict):
        await balances.debit(ws, "r2", Kind.EXPIRY, 2_000)


async def test_a_debit_never_takes_what_running_calls_hold(sidecar: Sidecar) -> None:
    ws = (await sidecar.workspace(credits_micro=1_000)).id
    hold_id = await _hold(sidecar, ws, 600)
    result = await sidecar.svc.balances.debit(ws, "r", Kind.REFUND, 1_000)
    assert (result.taken_micro, result.short_micro) == (400, 600)  # 600 is promised to the running call
    balance, held = await sidecar.redis_account(ws)
    assert (balance, held) == (600, 600) and balance - held == 0
    await _settle(sidecar, ws, hold_id, 250)
    assert await sidecar.redis_account(ws) == (350, 0)
    await sidecar.assert_identity(ws)


async def test_expiry_forfeits_everything_that_remains_once(sidecar: Sidecar) -> None:
    ws = (await sidecar.workspace(credits_micro=777)).id
    results = await asyncio.gather(*[sidecar.svc.balances.debit(ws, "expiry:1", Kind.EXPIRY, None) for _ in range(20)])
    assert sum(r.created for r in results) == 1
    assert {(r.taken_micro, r.short_micro) for r in results} == {(777, 0)}
    identity = await sidecar.assert_identity(ws)
    assert identity["expiries"] == 777 and len(await sidecar.ledger(ws, "expiry")) == 1


async def test_a_debit_whose_caller_died_after_redis_is_recorded_once(sidecar: Sidecar) -> None:
    """Step 3 never ran (the caller died after Redis took the debit): the flusher records the stream
    entry, and the caller's retry answers from the ledger without debiting again."""
    ws = (await sidecar.workspace(credits_micro=1_000)).id
    async with sidecar.svc.pool.acquire() as conn:
        event_id, known = await db.begin_debit(conn, ws, "r", Kind.REFUND, 400)
    assert known is None
    event = orjson.dumps({"event_id": str(event_id), "workspace_id": ws, "status": "completed"})
    await sidecar.svc.state.debit(ws, str(event_id), 400, event, Kind.REFUND)
    await sidecar.flush()
    await sidecar.svc.state.redis.delete(keys.movements(ws))  # even if Redis forgot it meanwhile
    retry = await sidecar.svc.balances.debit(ws, "r", Kind.REFUND, 400)
    assert (retry.taken_micro, retry.created) == (400, False)
    assert (await _movement(sidecar, ws, "r"))["taken_micro"] == 400
    await sidecar.assert_identity(ws)
    assert await sidecar.redis_account(ws) == (600, 0)


async def test_a_debit_when_redis_restarted_empty_loads_the_balance_first(sidecar: Sidecar) -> None:
    ws = (await sidecar.workspace(credits_micro=900)).id
    await sidecar.svc.state.redis.delete(keys.acct(ws))
    result = await sidecar.svc.balances.debit(ws, "r", Kind.REFUND, 100)
    assert result.taken_micro == 100
    await sidecar.assert_identity(ws)
    assert await sidecar.redis_account(ws) == (800, 0)


async def test_movements_and_calls_under_concurrency_keep_the_identity(sidecar: Sidecar) -> None:
    """Calls, credits and debits at once: every debit takes at most what no call holds, `available`
    never goes below zero, and the identity holds in Redis and Postgres afterwards."""
    ws = await sidecar.workspace(credits_micro=2_000_000)
    balances = sidecar.svc.balances
    lowest: list[int] = []

    async def watch() -> None:
        for _ in range(200):
            account = await sidecar.svc.state.account(ws.id)
            lowest.append(account.balance_micro - account.held_micro)
            await asyncio.sleep(0.005)

    calls = [sidecar.chat(ws, chat_body(max_tokens=50)) for _ in range(40)]
    credits = [balances.credit(ws.id, f"g{i}", Kind.TOPUP, 10_000) for i in range(10)]
    debits = [balances.debit(ws.id, f"r{i}", Kind.REFUND, 150_000 + i) for i in range(20)]
    replays = [balances.debit(ws.id, "r0", Kind.REFUND, 150_000) for _ in range(10)]
    results = await asyncio.gather(watch(), *calls, *credits, *debits, *replays)
    taken = {r.movement_id: r.taken_micro for r in results[51:] if hasattr(r, "taken_micro")}
    assert len(taken) == 20
    assert min(lowest) >= 0
    identity = await sidecar.assert_identity(ws.id)
    assert identity["refunds"] == sum(taken.values())
    assert len(await sidecar.ledger(ws.id, "refund")) == 20
    answered = [r[0] for r in results[1:41]]
    assert set(answered) <= {200, 402}  # a call refused once the refunds took the balance
    assert identity["usage_rows"] == answered.count(200)


async def test_the_audit_checks_the_extended_identity(sidecar: Sidecar) -> None:
    from sidecar.audit import Kind as Finding
    from sidecar.audit import audit

    ws = (await sidecar.workspace(credits_micro=1_000)).id
    await sidecar.svc.balances.debit(ws, "r", Kind.REFUND, 100)
    await sidecar.svc.balances.credit(ws, "a", Kind.ALLOWANCE, 50)
    await sidecar.flush()
    report = await audit(sidecar.svc.state.redis, sidecar.svc.pool, workspaces=[ws])
    assert report.ok, report.text()
    # A usage row booked at the wrong impact: the impacts still add up to the account, the identity does not.
    async with sidecar.svc.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, cost_micro, balance_impact_micro) "
            "VALUES ($1, now(), 'usage', 'completed', $2, 10, -7)",
            uuid.uuid4(),
            ws,
        )
        await conn.execute("UPDATE accounts SET balance_micro = balance_micro - 7 WHERE workspace_id = $1", ws)
    report = await audit(sidecar.svc.state.redis, sidecar.svc.pool, workspaces=[ws])
    assert Finding.IDENTITY in report.counts() and Finding.LEDGER_VS_ACCOUNT not in report.counts()
