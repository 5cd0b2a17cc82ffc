"""The wallet (sidecar/wallet.py): the usage fee and its waiver, key budgets, post-charge mode,
expiry and the initial allowance, against real Redis and Postgres."""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from math import ceil
from pathlib import Path

import orjson
import pytest_asyncio
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar
from support.scripts import admit

from sidecar import db, expiry, wallet
from sidecar.state import keys
from sidecar.state.store import Admission, ExpireStatus, IdempotencyRecord, KeyBudgetArgs, State, WalletSettings
from sidecar.wallet import BudgetPeriod

LUA = Path(__file__).resolve().parents[1] / "sidecar" / "state" / "lua"


# --- the fee and the waiver: exact to the micro-credit ----------------------------------------------------


@given(cost=st.integers(0, 10**15), ppm=st.integers(0, 10**6))
def test_the_fee_is_the_exact_percent_rounded_up_once(cost: int, ppm: int) -> None:
    assert wallet.fee_micro(cost, ppm) == ceil(Fraction(cost * ppm, 10**6))


@given(percent=st.decimals(min_value=0, max_value=100, places=4, allow_nan=False))
def test_a_percent_is_parts_per_million_exactly(percent) -> None:
    assert wallet.percent_to_ppm(str(percent)) == int(percent * 10_000)


async def _fee_case(redis_url: str, ppm: int, waiver: int, costs: list[int]) -> None:
    """settle.lua, call after call, charges exactly what wallet.fee_charged says, the waiver taking
    the first micro-credits of fees and never more than it has."""
    client = aioredis.Redis.from_url(redis_url)
    state = State(client)
    ws = f"ws_{secrets.token_hex(5)}"
    try:
        await state.load(ws, 10**14, 0, wallet=WalletSettings(version=1, fee_waiver_micro=waiver))
        left, balance = waiver, 10**14
        for cost in costs:
            hold_id = uuid.uuid4().hex
            ceiling = cost + wallet.fee_micro(cost, ppm)
            assert (await admit(state, ws, ceiling=ceiling, hold_id=hold_id)).outcome is Admission.ADMITTED
            result = await state.settle(
                ws, "k1", hold_id, cost, True, b"{}", None, IdempotencyRecord.FORGET, 0, "", b"", 60_000, fee_ppm=ppm
            )
            fee, waived = wallet.fee_charged(cost, ppm, left)
            assert (result.charged_micro, result.fee_micro, result.fee_waived_micro) == (cost, fee, waived)
            left -= waived
            balance -= cost + fee
            assert result.balance_after_micro == balance
        assert await state.fee_waived(ws) == waiver - left
    finally:
        await client.delete(*[k for k in await client.keys(f"{keys.tag(ws)}*")])
        await client.aclose()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ppm=st.integers(0, 10**6),
    waiver=st.integers(0, 2_000_000),
    costs=st.lists(st.integers(0, 50_000_000), min_size=1, max_size=8),
)
def test_settle_charges_the_fee_and_tracks_the_waiver_exactly(redis_url: str, ppm, waiver, costs) -> None:
    asyncio.run(_fee_case(redis_url, ppm, waiver, costs))


# --- key budget periods: the scripts' calendar is Python's ------------------------------------------------


def _lua_period_id() -> str:
    source = (LUA / "settle.lua").read_text()
    function = re.search(r"local function period_id\(kind, now_ms\).*?\nend\n", source, re.S).group(0)
    return function + "return period_id(ARGV[1], tonumber(ARGV[2]))"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(now_ms=st.integers(0, 4_102_444_800_000), period=st.sampled_from(list(BudgetPeriod)))
def test_the_scripts_period_boundaries_are_exact_utc(redis_url: str, now_ms: int, period: BudgetPeriod) -> None:
    async def case() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            script = _lua_period_id()
            start = wallet.period_start_ms(period, now_ms, 0)
            for at in (now_ms, start, max(start - 1, 0)):
                lua = (await client.eval(script, 0, period.value, at)).decode()
                assert lua == wallet.period_id(period, at), (period, at)
        finally:
            await client.aclose()

    asyncio.run(case())
    start = wallet.period_start_ms(period, now_ms, 0)
    assert start <= now_ms and wallet.period_id(period, start) == wallet.period_id(period, now_ms)
    if period is not BudgetPeriod.TOTAL and start > 0:
        assert wallet.period_id(period, start - 1) != wallet.period_id(period, now_ms)


def test_expiry_moves_a_month_past_the_later_date_at_most_three_months_ahead() -> None:
    now = datetime(2026, 1, 31, 12, tzinfo=UTC)
    assert wallet.extended_expiry(now, None, 1, 3) == datetime(2026, 2, 28, 12, tzinfo=UTC)
    assert wallet.extended_expiry(now, now - timedelta(days=9), 1, 3) == datetime(2026, 2, 28, 12, tzinfo=UTC)
    later = datetime(2026, 3, 15, tzinfo=UTC)
    assert wallet.extended_expiry(now, later, 1, 3) == datetime(2026, 4, 15, tzinfo=UTC)
    far = datetime(2026, 4, 20, tzinfo=UTC)
    assert wallet.extended_expiry(now, far, 1, 3) == datetime(2026, 4, 30, 12, tzinfo=UTC)  # capped


# --- end to end -----------------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def fee_sidecar(redis_client, redis_url: str, migrated_database_url: str) -> AsyncIterator[Sidecar]:
    instance = await start_sidecar(
        redis_url,
        migrated_database_url,
        wallet={"usage_fee_percent": "12.5", "fee_waiver_credits": "0.000100", "allowance_credits": "0.5"},
    )
    try:
        yield instance
    finally:
        await stop_sidecar(instance)


async def test_usage_fees_are_charged_on_top_waived_first_and_never_on_free_models(fee_sidecar: Sidecar) -> None:
    sidecar = fee_sidecar
    ws = await sidecar.workspace(credits_micro=1_000_000)
    for _ in range(4):
        assert (await sidecar.chat(ws, chat_body()))[0] == 200
    assert (await sidecar.chat(ws, chat_body(model="mock-free")))[0] == 200
    rows = await sidecar.ledger_eventually(ws.id, 5)
    waiver_left = 100
    for row in rows:
        full = wallet.fee_micro(row["cost_micro"], 125_000)
        waived = min(full, waiver_left)
        waiver_left -= waived
        assert (row["fee_micro"], row["fee_waived_micro"]) == (full - waived, waived), dict(row)
        assert row["balance_impact_micro"] == -(row["cost_micro"] + row["fee_micro"])
        assert row["cost_micro"] + row["fee_micro"] <= row["hold_micro"]
    assert [r["fee_micro"] for r in rows if r["model"] == "mock-free"] == [0]
    assert sum(r["fee_waived_micro"] for r in rows) == 100  # the waiver is used up, exactly
    identity = await sidecar.assert_identity(ws.id)
    assert identity["fees"] == sum(r["fee_micro"] for r in rows) > 0
    assert identity["allowances"] == 500_000  # granted once, at creation
    status, view = await sidecar.admin("GET", f"/workspaces/{ws.id}/wallet")
    assert status == 200 and view["fee_waived_micro"] == 100 and view["fee_waiver_left_micro"] == 0


async def test_fees_waiver_and_refunds_under_concurrency_keep_the_identity(fee_sidecar: Sidecar) -> None:
    """100 calls at once with a usage fee, a waiver smaller than their fees, and refunds racing them:
    the waiver is used exactly once over, and the identity holds in Redis and Postgres."""
    sidecar = fee_sidecar
    ws = await sidecar.workspace(credits_micro=2_000_000)
    calls = [sidecar.chat(ws, chat_body(max_tokens=20)) for _ in range(100)]
    refunds = [sidecar.svc.balances.debit(ws.id, f"r{i}", "refund", 40_000) for i in range(10)]
    results = await asyncio.gather(*calls, *refunds)
    admitted = [r[0] for r in results[:100]].count(200)
    rows = await sidecar.ledger_eventually(ws.id, admitted)
    assert len(rows) == admitted > 0
    assert sum(r["fee_waived_micro"] for r in rows) == 100  # the waiver, exactly, across concurrent calls
    for row in rows:
        assert row["fee_micro"] + row["fee_waived_micro"] == wallet.fee_micro(row["cost_micro"], 125_000)
    identity = await sidecar.assert_identity(ws.id)
    assert identity["refunds"] == sum(r.taken_micro for r in results[100:])
    async with sidecar.svc.pool.acquire() as conn:
        assert await db.fee_waived(conn, ws.id) == 100 == await sidecar.svc.state.fee_waived(ws.id)
    # Redis restarted empty: the waiver used is loaded with the balance, never granted again.
    await sidecar.svc.state.redis.delete(keys.acct(ws.id))
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    rows = await sidecar.ledger_eventually(ws.id, admitted + 1)
    assert sum(r["fee_waived_micro"] for r in rows) == 100
    await sidecar.assert_identity(ws.id)


async def test_a_workspace_fee_waiver_overrides_the_default(fee_sidecar: Sidecar) -> None:
    sidecar = fee_sidecar
    ws = await sidecar.workspace(credits_micro=1_000_000)
    status, view = await sidecar.admin("POST", f"/workspaces/{ws.id}/wallet", {"fee_waiver": "0"})
    assert status == 200 and view["fee_waiver_micro"] == 0
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    [row] = await sidecar.ledger_eventually(ws.id)
    assert row["fee_waived_micro"] == 0 and row["fee_micro"] == wallet.fee_micro(row["cost_micro"], 125_000) > 0
    status, view = await sidecar.admin("POST", f"/workspaces/{ws.id}/wallet", {"fee_waiver": None})
    assert view["fee_waiver_micro"] == 100  # back to the deployment's default
    status, body = await sidecar.admin("POST", f"/workspaces/{ws.id}/wallet", {"fee_waiver": "-1"})
    assert status == 400 and body["error"]["code"] == "invalid_amount"
    status, body = await sidecar.admin("POST", f"/workspaces/{ws.id}/wallet", {"expires_at": "tomorrow"})
    assert status == 400 and body["error"]["code"] == "invalid_expiry"
    status, body = await sidecar.admin("POST", f"/workspaces/{ws.id}/wallet", {})
    assert status == 400
    await sidecar.assert_identity(ws.id)


async def test_the_initial_allowance_is_granted_once(fee_sidecar: Sidecar) -> None:
    sidecar = fee_sidecar
    ws = f"ws_{secrets.token_hex(4)}"
    results = await asyncio.gather(*[sidecar.admin("POST", "/workspaces", {"id": ws}) for _ in range(5)])
    assert sorted(status for status, _ in results) == [200, 200, 200, 200, 201]
    assert len(await sidecar.ledger(ws, "allowance")) == 1
    assert (await sidecar.assert_identity(ws))["allowances"] == 500_000


async def test_allowance_on_first_use(redis_client, redis_url: str, migrated_database_url: str) -> None:
    sidecar = await start_sidecar(
        redis_url, migrated_database_url, wallet={"allowance_credits": "0.25", "allowance_on": "first_use"}
    )
    try:
        ws = await sidecar.workspace()
        assert await sidecar.ledger(ws.id, "allowance") == []
        results = await asyncio.gather(*[sidecar.chat(ws, chat_body()) for _ in range(10)])
        assert {status for status, *_ in results} == {200}
        await sidecar.svc.state.redis.delete(keys.acct(ws.id))  # Redis restarted empty: loaded again
        assert (await sidecar.chat(ws, chat_body()))[0] == 200
        assert len(await sidecar.ledger(ws.id, "allowance")) == 1
        assert (await sidecar.assert_identity(ws.id))["allowances"] == 250_000
    finally:
        await stop_sidecar(sidecar)


async def _set_budget(sidecar: Sidecar, ws: str, key_id: str, budget: str | None, period: str = "monthly") -> dict:
    status, body = await sidecar.admin(
        "POST", f"/workspaces/{ws}/keys/{key_id}/budget", {"budget": budget, "period": period}
    )
    assert status == 200, body
    return body


async def _key_spent(sidecar: Sidecar, ws: str, key_id: str) -> int:
    async with sidecar.svc.pool.acquire() as conn:
        return await conn.fetchval(
            "SELECT coalesce(-sum(balance_impact_micro), 0) FROM ledger WHERE workspace_id = $1 AND key_id = $2",
            ws,
            key_id,
        )


async def _wait_budget_cache(sidecar: Sidecar) -> None:
    sidecar.svc.auth.forget_all()  # the auth cache holds a key's record briefly (auth.cache_ttl_ms)


async def test_200_concurrent_calls_never_exceed_a_key_budget(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=100_000_000)
    other = await sidecar.admin("POST", f"/workspaces/{ws.id}/keys", {"name": "other"})
    budget_micro = 50_000  # a call holds about 1,000: a quarter of the calls fit
    view = await _set_budget(sidecar, ws.id, ws.key_id, "0.050000", "daily")
    assert (view["budget_micro"], view["remaining_micro"], view["spent_micro"]) == (budget_micro, budget_micro, 0)
    await _wait_budget_cache(sidecar)
    results = await asyncio.gather(*[sidecar.chat(ws, chat_body(max_tokens=20)) for _ in range(200)])
    statuses = [status for status, *_ in results]
    assert set(statuses) == {200, 402} and statuses.count(200) > 0
    refused = orjson.loads(next(body for status, _, body in results if status == 402))
    assert refused["error"]["code"] == "PAYMENT_REQUIRED" and "daily budget" in refused["error"]["message"]
    await sidecar.flush()
    spent = await _key_spent(sidecar, ws.id, ws.key_id)
    assert 0 < spent <= budget_micro
    _, listed = await sidecar.admin("GET", f"/workspaces/{ws.id}/keys")
    mine = next(k for k in listed["data"] if k["id"] == ws.key_id)
    assert (mine["spent_micro"], mine["remaining_micro"]) == (spent, budget_micro - spent)
    assert next(k for k in listed["data"] if k["id"] == other[1]["id"])["budget"] is None
    # Redis restarted empty: the budget is rebuilt from Postgres, and still holds.
    await sidecar.svc.state.redis.delete(keys.key_budgets(ws.id), keys.acct(ws.id))
    again = await asyncio.gather(*[sidecar.chat(ws, chat_body(max_tokens=20)) for _ in range(20)])
    await sidecar.flush()
    assert await _key_spent(sidecar, ws.id, ws.key_id) <= budget_micro
    assert [s for s, *_ in again].count(200) <= statuses.count(200)
    state = await sidecar.svc.state.key_budget(ws.id, ws.key_id)
    assert state.spent_micro == await _key_spent(sidecar, ws.id, ws.key_id) and state.held_micro == 0
    await sidecar.assert_identity(ws.id)


async def test_a_key_budget_rebuild_counts_unflushed_usage(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=10_000_000)
    for _ in range(3):
        assert (await sidecar.chat(ws, chat_body()))[0] == 200
    await sidecar.flush()
    for _ in range(2):  # settled in Redis, not flushed yet
        assert (await sidecar.chat(ws, chat_body()))[0] == 200
    await _set_budget(sidecar, ws.id, ws.key_id, "5", "monthly")
    await _wait_budget_cache(sidecar)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    await sidecar.flush()
    state = await sidecar.svc.state.key_budget(ws.id, ws.key_id)
    assert state.spent_micro == await _key_spent(sidecar, ws.id, ws.key_id)  # all six calls, once each
    assert state.period_id == wallet.period_id(BudgetPeriod.MONTHLY, await sidecar.svc.state.time_ms())
    # A 'total' budget counts from when it was set.
    await _set_budget(sidecar, ws.id, ws.key_id, "5", "total")
    await _wait_budget_cache(sidecar)
    status, listed = await sidecar.admin("GET", f"/workspaces/{ws.id}/keys")
    assert listed["data"][0]["spent_micro"] == 0
    status, body = await sidecar.admin("POST", f"/workspaces/{ws.id}/keys/{ws.key_id}/budget", {"budget": "x"})
    assert status == 400 and body["error"]["code"] == "invalid_amount"
    status, body = await sidecar.admin(
        "POST", f"/workspaces/{ws.id}/keys/{ws.key_id}/budget", {"budget": "1", "period": "weekly"}
    )
    assert status == 400 and body["error"]["code"] == "invalid_period"
    status, _ = await sidecar.admin("POST", f"/workspaces/{ws.id}/keys/nope/budget", {"budget": "1", "period": "daily"})
    assert status == 404


async def test_post_charge_goes_below_zero_by_at_most_the_calls_admitted(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000)
    status, view = await sidecar.admin("POST", f"/workspaces/{ws.id}/wallet", {"mode": "postpaid"})
    assert status == 200 and view["mode"] == "postpaid"
    results = await asyncio.gather(*[sidecar.chat(ws, chat_body(max_tokens=20)) for _ in range(30)])
    admitted = [s for s, *_ in results].count(200)
    assert admitted >= 1
    rows = await sidecar.ledger_eventually(ws.id, admitted)
    assert len(rows) == admitted and all(r["postpaid"] and r["hold_micro"] > 0 for r in rows)
    balance, held = await sidecar.redis_account(ws.id)
    assert held == 0
    assert balance >= 1_000 - sum(r["cost_micro"] + r["fee_micro"] for r in rows)
    assert balance >= -sum(r["hold_micro"] for r in rows)  # at most the worst case of the calls admitted
    if balance <= 0:  # nothing more is admitted until credits arrive
        status, _, body = await sidecar.chat(ws, chat_body())
        assert status == 402 and orjson.loads(body)["error"]["code"] == "PAYMENT_REQUIRED"
    await sidecar.assert_identity(ws.id, postpaid=True)
    # A credit limit lets it go further below zero, no further than the limit plus the calls admitted.
    status, _ = await sidecar.admin("POST", f"/workspaces/{ws.id}/wallet", {"credit_limit": "0.01"})
    assert status == 200
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    status, body = await sidecar.admin("POST", f"/workspaces/{ws.id}/wallet", {"mode": "later"})
    assert status == 400 and body["error"]["code"] == "invalid_mode"


async def test_expiry_blocks_admission_at_the_instant(redis_client) -> None:
    state = State(redis_client)
    ws = f"ws_{secrets.token_hex(5)}"
    now_ms = await state.time_ms()
    await state.load(ws, 1_000_000, 0, wallet=WalletSettings(version=1, expires_at_ms=now_ms + 60_000))
    assert (await admit(state, ws, ceiling=10)).outcome is Admission.ADMITTED
    assert (await admit(state, ws, ceiling=0)).outcome is Admission.ADMITTED  # needs no credits
    now_ms = await state.time_ms()
    assert await state.set_wallet(ws, WalletSettings(version=2, expires_at_ms=now_ms))
    refused = await admit(state, ws, ceiling=10)
    assert refused.outcome is Admission.EXPIRED and refused.expires_at_ms == now_ms
    assert (await admit(state, ws, ceiling=0)).outcome is Admission.ADMITTED
    # An older version of the settings never overwrites a newer one.
    assert await state.set_wallet(ws, WalletSettings(version=1)) == 0
    assert (await admit(state, ws, ceiling=10)).outcome is Admission.EXPIRED


@pytest_asyncio.fixture
async def expiry_sidecar(redis_client, redis_url: str, migrated_database_url: str) -> AsyncIterator[Sidecar]:
    instance = await start_sidecar(redis_url, migrated_database_url, wallet={"expiry_enabled": True})
    try:
        yield instance
    finally:
        await stop_sidecar(instance)


async def test_expiry_forfeits_once_and_a_purchase_moves_it(expiry_sidecar: Sidecar) -> None:
    sidecar = expiry_sidecar
    ws = await sidecar.workspace()
    await sidecar.svc.balances.credit(ws.id, "order-1", "topup", 2_000_000)
    status, view = await sidecar.admin("GET", f"/workspaces/{ws.id}/wallet")
    expires = datetime.fromisoformat(view["expires_at"])
    assert timedelta(days=27) < expires - datetime.now(UTC) <= timedelta(days=31)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    soon = datetime.now(UTC) + timedelta(milliseconds=400)
    status, _ = await sidecar.admin("POST", f"/workspaces/{ws.id}/wallet", {"expires_at": soon.isoformat()})
    assert status == 200
    await asyncio.sleep(0.5)
    status, _, body = await sidecar.chat(ws, chat_body())
    assert status == 402 and "expired" in orjson.loads(body)["error"]["message"]
    done = await asyncio.gather(*[expiry.forfeit_due(sidecar.svc.balances, 100) for _ in range(10)])
    assert sum(done) == 1
    assert await expiry.forfeit_due(sidecar.svc.balances, 100) == 0
    async with sidecar.svc.pool.acquire() as conn:  # recorded: no longer listed as due
        assert ws.id not in [w for w, _ in await db.expired_wallets(conn, 1000)]
    [row] = await sidecar.ledger(ws.id, "expiry")
    identity = await sidecar.assert_identity(ws.id)
    assert identity["expiries"] == -row["balance_impact_micro"] > 0 and await sidecar.redis_account(ws.id) == (0, 0)
    # A purchase after expiry: the expiry moves a month past now, and calls are admitted again.
    await sidecar.svc.balances.credit(ws.id, "order-2", "topup", 1_000_000)
    assert (await sidecar.chat(ws, chat_body()))[0] == 200
    assert len(await sidecar.ledger(ws.id, "expiry")) == 1
    await sidecar.assert_identity(ws.id)


async def test_key_budget_holds_release_and_reset_at_the_period_boundary(redis_client) -> None:
    """At the script level: a voided hold gives its key budget back, a settled one counts what it
    debited, a new period starts from 0 spent (keeping what is held), and a reload that drops a hold
    already recorded in Postgres releases its key hold too."""
    state = State(redis_client)
    ws = f"ws_{secrets.token_hex(5)}"
    await state.load(ws, 1_000_000, 0)
    now_ms = await state.time_ms()
    start = wallet.period_start_ms(BudgetPeriod.DAILY, now_ms, 0)
    day = wallet.period_id(BudgetPeriod.DAILY, now_ms)
    assert await state.load_key_budget(ws, "k1", "daily", day, 0, "", start)
    budget = KeyBudgetArgs(100, "daily", 60)

    async def admit_budgeted(hold_id: str | None = None):
        return await state.admit(
            ws,
            "k1",
            hold_id or uuid.uuid4().hex,
            60,
            1000,
            60_000,
            60_000,
            None,
            "",
            60_000,
            b"{}",
            1000,
            key_budget=budget,
        )

    first = uuid.uuid4().hex
    assert (await admit_budgeted(first)).outcome is Admission.ADMITTED
    over = await admit_budgeted()
    assert over.outcome is Admission.OVER_KEY_BUDGET and over.available_micro == 40
    await state.expire(ws, first, ExpireStatus.FAILED)
    assert (await state.key_budget(ws, "k1")).held_micro == 0
    second = uuid.uuid4().hex
    assert (await admit_budgeted(second)).outcome is Admission.ADMITTED
    await state.settle(
        ws,
        "k1",
        second,
        50,
        True,
        b"{}",
        None,
        IdempotencyRecord.FORGET,
        0,
        "",
        b"",
        60_000,
        key_budget_period="daily",
    )
    record = await state.key_budget(ws, "k1")
    assert (record.spent_micro, record.held_micro, record.period_id) == (50, 0, day)
    assert (await admit_budgeted()).outcome is Admission.OVER_KEY_BUDGET  # 50 spent + 60 > 100
    await redis_client.hset(keys.key_budgets(ws), "k1:p", "d1")  # as if the day had changed since
    third = uuid.uuid4().hex
    assert (await admit_budgeted(third)).outcome is Admission.ADMITTED
    record = await state.key_budget(ws, "k1")
    assert (record.spent_micro, record.held_micro, record.period_id) == (0, 60, day)
    gen = await state.generation(ws)
    assert await state.load(ws, 1_000_000, 5, replacing_gen=gen, resolved_holds=[third])
    assert (await state.key_budget(ws, "k1")).held_micro == 0
