"""Money-path faults found by the money-in soak (tests/test_money_soak.py), each pinned by a test that
failed before its fix:

- a call whose hold Redis lost (restarted empty) while it ran: a post-charge call is still debited its
  actual cost (it was admitted to be, below zero if need be), never recorded at zero; and a budgeted
  key's call takes at most what the key's budget has left, and counts as spent, so calls admitted since
  the loss cannot together pass the budget;
- a top-up of a workspace whose credits expired while calls still held part of them: the purchase
  must not move the expiry past a forfeiture that has not happened (that revived the expired credits);
  it waits (webhook 503, admin 409) until the holds settled and the balance was forfeited.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar
from support.payments import Shop, start_shop, stop_shop

from sidecar import db, expiry, wallet
from sidecar.state import keys
from sidecar.state.store import Admission, IdempotencyRecord, KeyBudgetArgs, State, WalletSettings

FEE_PPM = 100_000  # 10 %


async def _lose_everything(client: aioredis.Redis, ws: str) -> None:
    """Redis restarted empty, for this workspace."""
    found = await client.keys(f"{keys.tag(ws)}*")
    if found:
        await client.delete(*found)


async def _admit(state: State, ws: str, ceiling: int, key_budget: KeyBudgetArgs | None = None):
    hold_id = uuid.uuid4().hex
    result = await state.admit(
        ws, "k1", hold_id, ceiling, 1000, 60_000, 60_000, None, "", 60_000, b"{}", 1000, key_budget=key_budget
    )
    return hold_id, result


async def _settle(state: State, ws: str, hold_id: str, cost: int, postpaid: bool = False, budget: int | None = None):
    return await state.settle(
        ws,
        "k1",
        hold_id,
        cost,
        True,
        b"{}",
        None,
        IdempotencyRecord.FORGET,
        0,
        "",
        b"",
        60_000,
        fee_ppm=FEE_PPM,
        postpaid=postpaid,
        key_budget_period="total" if budget is not None else "",
        key_budget_micro=budget,
    )


async def test_a_postpaid_call_whose_hold_redis_lost_is_still_charged_its_actual_cost(redis_client) -> None:
    state = State(redis_client)
    ws = f"ws_{secrets.token_hex(5)}"
    postpaid = WalletSettings(version=1, postpaid=True, credit_limit_micro=1_000)
    await state.load(ws, 0, 0, wallet=postpaid)
    hold_id, admitted = await _admit(state, ws, ceiling=5_000)
    assert admitted.outcome is Admission.ADMITTED and admitted.postpaid
    await _lose_everything(redis_client, ws)
    await state.load(ws, 0, 0, wallet=postpaid)  # what the next use loads from Postgres
    settled = await _settle(state, ws, hold_id, 3_000, postpaid=True)
    assert settled.hold_lost
    fee = wallet.fee_micro(3_000, FEE_PPM)
    # Before the fix: charged 0 (only "what the balance has free", and a post-charge balance has none).
    assert (settled.charged_micro, settled.fee_micro) == (3_000, fee)
    assert settled.balance_after_micro == -(3_000 + fee)


async def test_a_budgeted_keys_lost_hold_takes_at_most_what_its_budget_has_left(redis_client) -> None:
    state = State(redis_client)
    ws = f"ws_{secrets.token_hex(5)}"
    budget = KeyBudgetArgs(100, "total", 60)

    async def fresh_budget() -> None:
        await state.load(ws, 1_000_000, 0)
        assert await state.load_key_budget(ws, "k1", "total", "t", 0, "", 0)

    await fresh_budget()
    first, admitted = await _admit(state, ws, 60, budget)
    assert admitted.outcome is Admission.ADMITTED
    await _lose_everything(redis_client, ws)
    await fresh_budget()  # rebuilt from Postgres: the first call is neither spent nor held there
    second, admitted = await _admit(state, ws, 60, budget)
    assert admitted.outcome is Admission.ADMITTED
    lost = await _settle(state, ws, first, 60, budget=100)
    assert lost.hold_lost
    kept = await _settle(state, ws, second, 50, budget=100)
    debited = [r.charged_micro + r.fee_micro for r in (lost, kept)]
    # Before the fix: the lost call took its 60 + fee and was never counted: 60 + 6 + 50 + 5 > 100.
    assert sum(debited) <= 100, debited
    record = await state.key_budget(ws, "k1")
    assert record.spent_micro == sum(debited) and record.held_micro == 0
    _, refused = await _admit(state, ws, 60, budget)
    assert refused.outcome is Admission.OVER_KEY_BUDGET


async def test_a_lost_hold_of_a_key_without_a_record_is_counted_by_the_rebuild(redis_client) -> None:
    """No record after the loss (no budgeted call admitted since): the call takes what the balance has
    free, and the next rebuild reads it from the stream."""
    state = State(redis_client)
    ws = f"ws_{secrets.token_hex(5)}"
    await state.load(ws, 1_000_000, 0)
    assert await state.load_key_budget(ws, "k1", "total", "t", 0, "", 0)
    first, _ = await _admit(state, ws, 60, KeyBudgetArgs(100, "total", 60))
    await _lose_everything(redis_client, ws)
    await state.load(ws, 1_000_000, 0)
    lost = await _settle(state, ws, first, 60, budget=100)
    assert lost.hold_lost and lost.charged_micro == 60
    assert await state.key_budget(ws, "k1") is None


# --- a top-up while the expired balance is still held -------------------------------------------------


@pytest_asyncio.fixture
async def expiring(redis_client, redis_url: str, migrated_database_url: str) -> AsyncIterator[Sidecar]:
    instance = await start_sidecar(redis_url, migrated_database_url, wallet={"expiry_enabled": True})
    try:
        yield instance
    finally:
        await stop_sidecar(instance)


async def _expire_while_a_call_holds(sc: Sidecar, ws) -> asyncio.Task:
    """A slow call admitted before the expiry, still holding credits after it."""
    slow = asyncio.ensure_future(sc.chat(ws, chat_body(), headers={"x-mock-first-byte-delay-ms": "1500"}))
    for _ in range(100):
        if await sc.svc.state.active_holds(ws.id):
            break
        await asyncio.sleep(0.02)
    soon = datetime.now(UTC) + timedelta(milliseconds=150)
    status, _ = await sc.admin("POST", f"/workspaces/{ws.id}/wallet", {"expires_at": soon.isoformat()})
    assert status == 200
    await asyncio.sleep(0.3)
    assert await sc.svc.state.active_holds(ws.id) == 1, "the slow call still holds credits past the expiry"
    return slow


async def test_a_top_up_while_expired_credits_are_held_waits_and_never_revives_them(expiring: Sidecar) -> None:
    sc = expiring
    ws = await sc.workspace()
    await sc.svc.balances.credit(ws.id, "order-1", "topup", 2_000_000)
    slow = await _expire_while_a_call_holds(sc, ws)
    with pytest.raises(db.ExpiryPending):  # before the fix: credited, the expiry moved, nothing forfeited
        await sc.svc.balances.credit(ws.id, "order-2", "topup", 1_000_000)
    status, body = await sc.admin(
        "POST", f"/workspaces/{ws.id}/grants", {"grant_id": "order-2", "kind": "topup", "amount_micro": 1_000_000}
    )
    assert status == 409 and body["error"]["code"] == "expiry_pending", body
    assert (await slow)[0] == 200
    assert await expiry.forfeit_due(sc.svc.balances, 100) == 1
    await sc.svc.balances.credit(ws.id, "order-2", "topup", 1_000_000)
    [forfeit] = await sc.ledger(ws.id, "expiry")
    identity = await sc.assert_identity(ws.id)
    assert -forfeit["balance_impact_micro"] == 2_000_000 - identity["debits"] > 0
    assert identity["account_balance"] == 1_000_000, "only the purchase after the expiry remains"
    status, view = await sc.admin("GET", f"/workspaces/{ws.id}/wallet")
    assert datetime.fromisoformat(view["expires_at"]) > datetime.now(UTC) + timedelta(days=27)


@pytest_asyncio.fixture
async def expiring_shop(redis_client, redis_url: str, migrated_database_url: str) -> AsyncIterator[Shop]:
    instance = await start_shop(redis_url, migrated_database_url, wallet={"expiry_enabled": True})
    try:
        yield instance
    finally:
        await stop_shop(instance)


async def test_a_paid_checkout_while_expired_credits_are_held_is_redelivered_then_credited(
    expiring_shop: Shop,
) -> None:
    shop = expiring_shop
    sc = shop.sidecar
    ws = await sc.workspace()
    await sc.svc.balances.credit(ws.id, "order-1", "topup", 2_000_000)
    order = await shop.order(ws.id, "10.00")
    events = shop.fake.complete_session(order["provider_session_id"])
    slow = await _expire_while_a_call_holds(sc, ws)
    shop.fake.delivery_attempts_max = 1
    assert [(await shop.fake.deliver(e)).status for e in events] == [503, 503]  # Stripe delivers it again
    assert (await shop.read(ws.id, order["id"]))["status"] == "pending"
    assert (await slow)[0] == 200
    await expiry.forfeit_due(sc.svc.balances, 100)
    assert [(await shop.fake.deliver(e)).status for e in events] == [200, 200]
    assert (await shop.read(ws.id, order["id"]))["status"] == "credited"
    identity = await sc.assert_identity(ws.id)
    assert len(await sc.ledger(ws.id, "expiry")) == 1 and identity["expiries"] > 0
    assert identity["account_balance"] == 10_000_000
    # A manual order of an expired, still-held workspace: the operator is told to retry.
    order = await shop.order(ws.id, "5.00", provider="manual")
    slow = await _expire_while_a_call_holds(sc, ws)
    status, body = await sc.admin("POST", f"/workspaces/{ws.id}/orders/{order['id']}/mark-paid", {"reference": "r1"})
    assert status == 409 and body["error"]["code"] == "expiry_pending", body
    assert (await slow)[0] == 200
    status, body = await sc.admin("POST", f"/workspaces/{ws.id}/orders/{order['id']}/mark-paid", {"reference": "r1"})
    assert status == 200, body
    assert len(await sc.ledger(ws.id, "expiry")) == 2
    assert (await sc.assert_identity(ws.id))["account_balance"] == 5_000_000


async def test_admission_refuses_from_the_expiry_millisecond_exactly(redis_client) -> None:
    """Admissions in a tight loop across the expiry instant (several per millisecond on an idle
    machine, so one lands in the expiry's own millisecond: `>` for `>=` in admit.lua shows): every one
    admitted ran before it (Redis time), and the refusals start there."""
    state = State(redis_client)
    ws = f"ws_{secrets.token_hex(5)}"
    expires_ms = await state.time_ms() + 40
    await state.load(ws, 10**12, 0, wallet=WalletSettings(version=1, expires_at_ms=expires_ms))
    admitted_ms: list[int] = []
    for _ in range(20_000):
        _, result = await _admit(state, ws, ceiling=1)
        if result.outcome is Admission.EXPIRED:
            assert result.expires_at_ms == expires_ms
            break
        assert result.outcome is Admission.ADMITTED
        admitted_ms.append(result.now_us // 1000)
    else:
        raise AssertionError("admission never refused past the expiry")
    assert admitted_ms and max(admitted_ms) < expires_ms, (max(admitted_ms), expires_ms)
    assert (await state.time_ms()) >= expires_ms
