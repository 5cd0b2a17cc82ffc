"""The money-in soak (tests/test_money_soak.py): calls with the provider faults of tests/test_soak.py,
while money moves in and out every way issue 9 allows, on one sidecar with the fake Stripe:

- Stripe checkouts paid, delivered by a "postman" that sends each signed event once, many times at
  once, late (out of order), again later (replays), and forged (bad and stale signatures: 400); some
  paid at a wrong amount (kept for review), some abandoned, some expired, some refunded in Stripe;
- manual orders marked paid by operators racing each other, some refunded by hand;
- auto-reload crossing its threshold again and again with a good card, and with a declined card
  (backs off, then turns itself off);
- an expiry instant passed while calls hold credits, with a purchase paid right then;
- a post-charge workspace with a credit limit, key budgets, a usage fee with a waiver, an allowance;
- Redis emptied halfway, with a budgeted key's calls in flight across the loss.

Then everything is delivered until Stripe would stop retrying, and the books are checked (`check`):
every credit entered exactly once, the identity exact in Redis and Postgres, `sidecar audit` clean, no
call with two rows, key budgets never exceeded, post-charge below zero by at most the calls admitted.
Every loop here is bounded by the soak's deadline or a round count.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson
import redis.asyncio as aioredis

from sidecar import db, expiry, sweeper, wallet
from sidecar.audit import audit
from sidecar.money import format_micro
from sidecar.reload import store as reload_store
from support.harness import Workspace, chat_body
from support.payments import Shop

FEE_PPM = 75_000
WAIVER_MICRO = 2_000
FAILURES_MAX = 3
CREDIT_LIMIT_MICRO = 20_000
SHOP_CONFIG = {
    "wallet": {
        "usage_fee_percent": "7.5",
        "fee_waiver_credits": "0.002",
        "allowance_credits": "0.01",
        "expiry_enabled": True,
        "expiry_check_interval_ms": 100,
    },
    "auto_reload": {
        "retry_backoff_ms_min": 150,
        "retry_backoff_ms_max": 600,
        "failures_max": FAILURES_MAX,
        "poll_interval_ms": 50,
    },
    "balance_watch": {"settings_cache_ms": 0},
    "payments": {"order_amount_min": "0.01"},
}
FAULTS = (
    {},
    {},
    {},
    {"x-mock-status": "503"},
    {"x-mock-cut-after": "2"},
    {"x-mock-error-after": "1"},
    {"x-mock-first-byte-delay-ms": "30"},
    {"x-mock-reset": "1"},
)
MODELS = ("gpt-4o-mini", "gpt-4o-mini", "mock-free", "fallback-503")
ROLES = ("checkout", "reload", "declined", "postpaid", "budget", "expiring", "manual")
FINAL_ROUNDS_MAX = 60
WEBHOOK_COPIES = (1, 1, 1, 2, 3, 8, 20)
BURST_CALLS = 8
BURST_ROUNDS_MAX = 100
SLOW_MS = "4000"  # a call that is still running through what happens next
HOLD_WAIT_ROUNDS = 300


@dataclass
class Truth:
    """What the test side did and saw, to hold the books against."""

    paid: dict[str, int] = field(default_factory=dict)  # order id -> credits it must bring, exactly once
    unpaid: set[str] = field(default_factory=set)  # orders that must never be credited
    refunds: set[str] = field(default_factory=set)  # orders whose refund was asked (Stripe or by hand)
    refundable: list[tuple[str, str]] = field(default_factory=list)  # paid checkouts: (order id, session id)
    calls: Counter = field(default_factory=Counter)  # HTTP status -> count
    webhooks: Counter = field(default_factory=Counter)
    expiry_set_at: datetime | None = None
    burst_budget_micro: int = 0


@dataclass
class Soak:
    shop: Shop
    redis: aioredis.Redis
    duration_s: float
    workers: int
    rng: random.Random
    cast: dict[str, Workspace] = field(default_factory=dict)
    burst: Workspace | None = None  # a second key of the budget workspace, for the calls across the loss
    truth: Truth = field(default_factory=Truth)
    deadline: float = 0.0
    postman: Postman | None = None

    @property
    def sc(self):
        return self.shop.sidecar

    def ids(self) -> list[str]:
        return [ws.id for ws in self.cast.values()]


# --- the postman: Stripe's deliveries, at their worst ---------------------------------------------------


class Postman:
    """Delivers every event the fake Stripe recorded, as Stripe's at-least-once delivery may: once, many
    copies at once, late (after later events), again later; an answer other than 2xx is retried."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.rng = random.Random(soak.rng.random())
        self.read = 0  # events of the fake taken so far
        self.late: list[dict] = []
        self.owed: dict[str, dict] = {}  # event id -> event not yet answered 2xx
        self.sent: list[dict] = []

    async def run(self) -> None:
        while time.monotonic() < self.soak.deadline:
            await self.round()
            await asyncio.sleep(0.02)

    async def round(self, final: bool = False) -> None:
        fake = self.soak.shop.fake
        new, self.read = fake.events[self.read :], len(fake.events)
        batch = []
        for evt in new:
            (self.late if self.rng.random() < 0.25 and not final else batch).append(evt)
        if self.late and (final or self.rng.random() < 0.3):
            batch.extend(reversed(self.late))  # out of order: after the events that came later
            self.late = []
        batch.extend(self.owed.values())
        if self.sent and self.rng.random() < 0.2:
            batch.append(self.rng.choice(self.sent))  # a replay, any time later
        await asyncio.gather(*[self.send(evt, 1 if final else self.rng.choice(WEBHOOK_COPIES)) for evt in batch])

    async def send(self, evt: dict, copies: int) -> None:
        payload = orjson.dumps(evt)
        answers = await asyncio.gather(
            *[self.soak.shop.post_webhook(payload, self.soak.shop.fake.sign(payload)) for _ in range(copies)]
        )
        statuses = {status for status, _ in answers}
        self.soak.truth.webhooks.update(f"{evt['type']} {s}" for s in statuses)
        assert statuses <= {200, 503}, (evt["type"], answers)
        if 200 in statuses:
            self.owed.pop(evt["id"], None)
            self.sent.append(evt)
        else:
            self.owed[evt["id"]] = evt  # deferred (its payment not seen yet, an expiry pending): again later

    async def forge(self, order: dict) -> None:
        """A payment event for an order nobody paid, signed with another secret, or with Stripe's secret
        long ago: 400, and nothing changes."""
        session = {
            "id": order["provider_session_id"],
            "object": "checkout.session",
            "payment_status": "paid",
            "amount_total": order["total_minor"],
            "currency": order["currency"],
            "metadata": {"order_id": order["id"]},
        }
        evt = {"id": f"evt_forged_{secrets.token_hex(6)}", "type": "checkout.session.completed"}
        payload = orjson.dumps({**evt, "data": {"object": session}})
        fake = self.soak.shop.fake
        for signature in (fake.sign(payload, secret="whsec_" + "x" * 24), fake.sign(payload, int(time.time()) - 3600)):
            status, body = await self.soak.shop.post_webhook(payload, signature)
            assert status == 400, body
            self.soak.truth.webhooks["forged 400"] += 1

    def done(self) -> bool:
        return not self.owed and not self.late and self.read == len(self.soak.shop.fake.events)


# --- setting the scene ----------------------------------------------------------------------------------


async def checkout(soak: Soak, ws: str, amount: str, deliver: bool = True) -> dict:
    """A Stripe order paid on its checkout page; its events go to the postman (or now, in the setup)."""
    order = await soak.shop.order(ws, amount)
    events = soak.shop.fake.complete_session(order["provider_session_id"])
    soak.truth.paid[order["id"]] = order["amount_micro"]
    if deliver:
        for evt in events:
            assert (await soak.shop.fake.deliver(evt)).status == 200
        soak.postman.read = len(soak.shop.fake.events)
    return order


async def cast(soak: Soak) -> None:
    sc = soak.sc
    soak.postman = Postman(soak)
    c = soak.cast
    c["checkout"] = await sc.workspace(credits_micro=200_000, rpm=100_000)
    c["reload"] = await sc.workspace(rpm=100_000)
    await checkout(soak, c["reload"].id, "0.02")  # saves the card auto-reload charges
    await _put(soak, c["reload"].id, "auto-reload", {"threshold": "0.03", "amount": "0.03"}, "PUT")
    c["declined"] = await sc.workspace(credits_micro=60_000, rpm=100_000)
    declined = {"threshold": "10", "amount": "10", "payment_method_id": "pm_declined_soak", "customer_id": "cus_x"}
    await _put(soak, c["declined"].id, "auto-reload", declined, "PUT")
    c["postpaid"] = await sc.workspace(credits_micro=20_000, rpm=100_000)
    await _put(soak, c["postpaid"].id, "wallet", {"mode": "postpaid", "credit_limit": format_micro(CREDIT_LIMIT_MICRO)})
    c["budget"] = await sc.workspace(credits_micro=20_000_000, rpm=100_000)
    await _put(soak, c["budget"].id, f"keys/{c['budget'].key_id}/budget", {"budget": "0.15", "period": "total"})
    status, burst = await sc.admin(
        "POST", f"/workspaces/{c['budget'].id}/keys", {"name": "burst", "rate_limit_rpm": 10**5}
    )
    assert status == 201, burst
    soak.burst = Workspace(c["budget"].id, burst["key"], burst["id"])
    await _burst_budget(soak)
    c["expiring"] = await sc.workspace(rpm=100_000)
    await checkout(soak, c["expiring"].id, "0.30")
    c["manual"] = await sc.workspace(credits_micro=100_000, rpm=100_000)
    sc.svc.auth.forget_all()


async def _burst_budget(soak: Soak) -> None:
    """The burst key's budget: exactly BURST_CALLS of its calls fit (a probe call says what one holds)."""
    sc, burst = soak.sc, soak.burst
    assert (await sc.chat(burst, _burst_body()))[0] == 200
    await sc.flush()
    [row] = [r for r in await sc.ledger(burst.id) if r["key_id"] == burst.key_id]
    soak.truth.burst_budget_micro = BURST_CALLS * row["hold_micro"]
    budget = {"budget": format_micro(soak.truth.burst_budget_micro), "period": "total"}
    await _put(soak, burst.id, f"keys/{burst.key_id}/budget", budget)


async def _put(soak: Soak, ws: str, path: str, body: dict, method: str = "POST") -> dict:
    status, answer = await soak.sc.admin(method, f"/workspaces/{ws}/{path}", body)
    assert status == 200, (path, answer)
    return answer


# --- the actors -----------------------------------------------------------------------------------------


async def caller(soak: Soak, n: int) -> None:
    local = random.Random(n * 7919 + 1)
    while time.monotonic() < soak.deadline:
        ws = soak.cast[local.choice(ROLES)]
        body = chat_body(
            f"money soak {n} " * local.randint(1, 30),
            model=local.choice(MODELS),
            stream=local.random() < 0.5,
            max_tokens=local.randint(1, 100),
        )
        headers = {**local.choice(FAULTS), "x-mock-chunks": str(local.randint(1, 12))}
        if local.random() < 0.1:
            headers["Idempotency-Key"] = f"money-soak-{local.randint(0, 50)}"
        code, _, answer = await soak.sc.chat(ws, body, headers=headers)
        soak.truth.calls[code] += 1
        assert b"the sidecar failed" not in answer, answer


async def buyer(soak: Soak) -> None:
    """Checkouts on the checkout workspace: paid, paid at a wrong amount, abandoned (and forged), expired."""
    rng, fake, ws = soak.rng, soak.shop.fake, soak.cast["checkout"].id
    while time.monotonic() < soak.deadline:
        order = await soak.shop.order(ws, f"0.{rng.randint(5, 40):02d}")
        fate = rng.random()
        if fate < 0.65:
            fake.complete_session(order["provider_session_id"])
            soak.truth.paid[order["id"]] = order["amount_micro"]
            soak.truth.refundable.append((order["id"], order["provider_session_id"]))
        elif fate < 0.75:
            fake.complete_session(order["provider_session_id"], amount_total=order["total_minor"] + 1)
            soak.truth.unpaid.add(order["id"])  # kept for review, never credited
        elif fate < 0.9:
            soak.truth.unpaid.add(order["id"])
            await soak.postman.forge(order)
        else:
            fake.expire_session(order["provider_session_id"])
            soak.truth.unpaid.add(order["id"])
        await asyncio.sleep(rng.uniform(0.05, 0.25))


async def refunder(soak: Soak) -> None:
    """Refunds in Stripe of paid checkouts (the refund event may overtake the payment's)."""
    rng, fake, truth = soak.rng, soak.shop.fake, soak.truth
    while time.monotonic() < soak.deadline:
        await asyncio.sleep(rng.uniform(0.2, 0.6))
        if not truth.refundable:
            continue
        order_id, session_id = truth.refundable.pop(rng.randrange(len(truth.refundable)))
        fake.refund(fake.sessions[session_id]["payment_intent"])
        truth.refunds.add(order_id)


async def clerk(soak: Soak) -> None:
    """Manual orders: operators mark each paid at once, several times; some are refunded, twice at once."""
    rng, sc, ws = soak.rng, soak.sc, soak.cast["manual"].id
    while time.monotonic() < soak.deadline:
        order = await soak.shop.order(ws, f"0.{rng.randint(5, 20):02d}", provider="manual")
        ref = f"bank-{order['id']}"
        path = f"/workspaces/{ws}/orders/{order['id']}"
        answers = await asyncio.gather(
            *[sc.admin("POST", f"{path}/mark-paid", {"reference": ref}) for _ in range(rng.randint(1, 4))]
        )
        assert {s for s, _ in answers} == {200}, answers
        soak.truth.paid[order["id"]] = order["amount_micro"]
        if rng.random() < 0.3:
            answers = await asyncio.gather(*[sc.admin("POST", f"{path}/refund", {}) for _ in range(2)])
            assert {s for s, _ in answers} == {200}, answers
            soak.truth.refunds.add(order["id"])
        await asyncio.sleep(rng.uniform(0.1, 0.3))


async def expire_mid_call(soak: Soak) -> None:
    """The expiring workspace's credits expire while a slow call holds some, and a purchase is paid at
    that very moment: it must wait for the forfeiture (503: Stripe delivers it again), never revive the
    expired credits."""
    await asyncio.sleep(soak.duration_s * 0.3)
    sc, ws = soak.sc, soak.cast["expiring"]
    slow = asyncio.ensure_future(sc.chat(ws, chat_body(), headers={"x-mock-first-byte-delay-ms": SLOW_MS}))
    await _until_held(soak, ws.id, 1)
    expires_at = datetime.now(UTC) + timedelta(milliseconds=300)
    await _put(soak, ws.id, "wallet", {"expires_at": expires_at.isoformat()})
    # Admission knows the expiry once the wallet route pushed it into Redis (a loaded machine may take
    # longer than the 300 ms): calls are refused from the later of the two instants.
    soak.truth.expiry_set_at = max(expires_at, datetime.now(UTC))
    await asyncio.sleep(max((soak.truth.expiry_set_at - datetime.now(UTC)).total_seconds(), 0) + 0.05)
    await checkout(soak, ws.id, "0.20", deliver=False)
    assert not slow.done(), "the purchase must be paid while the expired credits are held"
    for evt in soak.shop.fake.events[-2:]:
        await soak.postman.send(evt, 3)  # the postman owns what was deferred
    soak.truth.calls[(await slow)[0]] += 1


async def _until_held(soak: Soak, ws: str, holds_min: int) -> None:
    for _ in range(HOLD_WAIT_ROUNDS):
        if await soak.sc.svc.state.active_holds(ws) >= holds_min:
            return
        await asyncio.sleep(0.01)


async def redis_loses_everything(soak: Soak) -> None:
    """Halfway: a budgeted key's slow calls in flight, Redis emptied under them, then the same key called
    until its budget says no. The calls whose holds were lost must not take it past its budget."""
    await asyncio.sleep(soak.duration_s / 2)
    sc, burst = soak.sc, soak.burst
    slow_headers = {"x-mock-first-byte-delay-ms": SLOW_MS}
    await _flush_a_little(soak)
    first = asyncio.gather(*[sc.chat(burst, _burst_body(), headers=slow_headers) for _ in range(BURST_CALLS)])
    began = time.monotonic()
    await _until_held(soak, burst.id, BURST_CALLS)
    await soak.redis.flushdb()
    spent_s = time.monotonic() - began
    assert not first.done(), f"the burst must be in flight when Redis loses everything ({spent_s:.2f} s)"
    for _ in range(BURST_ROUNDS_MAX):
        answers = await asyncio.gather(*[sc.chat(burst, _burst_body()) for _ in range(BURST_CALLS)])
        if first.done() and any(status == 402 for status, *_ in answers):
            break
        await asyncio.sleep(0.05)
    soak.truth.calls.update(status for status, *_ in await first)


async def _flush_a_little(soak: Soak) -> None:
    """Most of what is settled into Postgres before Redis loses it (under load the streams never stay
    empty: what settles after this is lost with Redis, as without an AOF: fewer rows, same identity)."""
    flusher = soak.sc.svc.flusher
    for ws in soak.ids():
        flusher.note_workspace(ws)
    for _ in range(3):
        await flusher.flush_once()


def _burst_body() -> dict:
    return chat_body("burst", max_tokens=8)  # the mock answers 8 tokens: a call costs most of its hold


# --- the run --------------------------------------------------------------------------------------------


async def run(soak: Soak) -> None:
    sc = soak.sc
    svc = sc.svc
    await cast(soak)
    stop = asyncio.Event()
    loops = [
        asyncio.create_task(svc.flusher.run(stop)),
        asyncio.create_task(sweeper.run(svc.state, svc.pool, svc.config.holds, svc.metrics, stop)),
        asyncio.create_task(expiry.run(svc.balances, svc.config.wallet, svc.metrics, stop)),
        asyncio.create_task(svc.watch.run(stop)),
        asyncio.create_task(svc.reloads.run(stop)),
    ]
    soak.deadline = time.monotonic() + soak.duration_s
    try:
        await asyncio.gather(
            *[caller(soak, n) for n in range(soak.workers)],
            soak.postman.run(),
            buyer(soak),
            refunder(soak),
            clerk(soak),
            expire_mid_call(soak),
            redis_loses_everything(soak),
        )
        if svc.settling:
            await asyncio.wait(list(svc.settling), timeout=10)
        await settle_the_rest(soak)
    finally:
        stop.set()
        await asyncio.gather(*loops)


async def settle_the_rest(soak: Soak) -> None:
    """Deliver what is owed (Stripe retries for days), end the reloads in flight, forfeit what expired."""
    svc = soak.sc.svc
    in_flight, declined = 0, None
    for ws in soak.ids():  # a retry after a back-off reads the live balance (Redis was emptied)
        await svc.balances.ensure_loaded(ws)
    for _ in range(FINAL_ROUNDS_MAX):
        await soak.postman.round(final=True)
        while await svc.watch.run_once():
            pass
        await svc.reloads.run_once()
        await expiry.forfeit_due(svc.balances, 100)
        async with svc.pool.acquire() as conn:
            in_flight = await conn.fetchval(
                "SELECT count(*) FROM auto_reloads WHERE state IN ('pending', 'processing') AND workspace_id = ANY($1)",
                soak.ids(),
            )
            # The declined card's back-off and its last failures may outlast a short soak.
            declined = await reload_store.get_settings(conn, soak.cast["declined"].id)
        if soak.postman.done() and not in_flight and not declined.enabled:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"not settled after {FINAL_ROUNDS_MAX} rounds: events owed {list(soak.postman.owed)}, "
        f"reloads in flight {in_flight}, declined card's auto-reload {declined.view() if declined else None}"
    )


# --- the books ------------------------------------------------------------------------------------------


async def check(soak: Soak, reloads_min: int = 0) -> dict:
    """Every check of the module docstring; returns figures for the report."""
    sc, truth, ids = soak.sc, soak.truth, soak.ids()
    await sc.flush()
    assert set(truth.calls) <= {200, 402, 409, 429, 500, 502, 503, 504}, truth.calls
    async with sc.svc.pool.acquire() as conn:
        orders = {
            r["id"]: r for r in await conn.fetch("SELECT * FROM payment_orders WHERE workspace_id = ANY($1)", ids)
        }
        movements = await conn.fetch(
            "SELECT g.workspace_id, g.grant_id, g.kind, g.amount_micro, g.taken_micro, "
            "(SELECT count(*) FROM ledger l WHERE l.workspace_id = g.workspace_id AND l.event_id = g.event_id) AS rows "
            "FROM grants g WHERE g.workspace_id = ANY($1)",
            ids,
        )
        other_rows = await conn.fetchval(
            "SELECT count(*) FROM ledger WHERE workspace_id = ANY($1) AND kind <> 'usage'", ids
        )
    _check_movements(movements, other_rows)
    by_id = {(m["workspace_id"], m["grant_id"]): m for m in movements}
    _check_orders(soak, orders, by_id)
    for role, ws in soak.cast.items():
        identity = await sc.assert_identity(ws.id, postpaid=role == "postpaid")
        assert set((await sc.rows_per_request(ws.id)).values()) <= {1}, f"{role}: a call recorded twice"
        assert identity["allowances"] == 10_000, (role, identity)
        credited = sum(o["amount_micro"] for o in orders.values() if o["workspace_id"] == ws.id and _credited(o))
        assert identity["topups"] == credited, (role, identity, credited)
        await _check_fees(sc, ws.id)
    report = await audit(sc.svc.state.redis, sc.svc.pool, workspaces=ids)
    assert report.ok, report.text()
    await _check_key_budgets(soak)
    await _check_postpaid(soak)
    reloads = await _check_reloads(soak, orders, reloads_min)
    await _check_expiry(soak, by_id)
    return {
        "calls": dict(truth.calls),
        "orders credited": sum(1 for o in orders.values() if _credited(o)),
        "refunded": sum(1 for o in orders.values() if o["status"] == "refunded"),
        "reloads succeeded": reloads,
        "webhooks": dict(truth.webhooks),
    }


def _credited(order) -> bool:
    return order["status"] in ("credited", "refunded")


def _check_movements(movements, other_rows: int) -> None:
    """Each movement recorded is one ledger row, and every non-usage row is a movement's."""
    recorded = 0
    for m in movements:
        if m["kind"] in ("refund", "expiry") and m["taken_micro"] is None:
            assert m["rows"] == 0, dict(m)  # a debit that never reached Redis
            continue
        assert m["rows"] == 1, dict(m)
        recorded += 1
    assert recorded == other_rows, (recorded, other_rows)


def _check_orders(soak: Soak, orders: dict, by_id: dict) -> None:
    truth = soak.truth
    for order_id, order in orders.items():
        credit = by_id.get((order["workspace_id"], f"order:{order_id}"))
        if _credited(order):
            assert credit is not None and credit["amount_micro"] == order["amount_micro"], (dict(order), credit)
        else:
            assert credit is None, dict(order)
        if order["status"] == "refunded":
            refund = by_id[(order["workspace_id"], f"refund:{order_id}")]
            assert refund["taken_micro"] == order["refunded_micro"], (dict(order), dict(refund))
    paid_by_hand_or_checkout = {o for o, r in orders.items() if r["purpose"] != "reload" and _credited(r)}
    assert paid_by_hand_or_checkout == set(truth.paid), paid_by_hand_or_checkout ^ set(truth.paid)
    assert all(orders[o]["amount_micro"] == amount for o, amount in truth.paid.items())
    assert not truth.unpaid & paid_by_hand_or_checkout
    refunded = {o for o, r in orders.items() if r["status"] == "refunded"}
    assert refunded == truth.refunds, refunded ^ truth.refunds
    # Reload orders: credited exactly when their PaymentIntent succeeded at Stripe; one intent each.
    intents = Counter(pi["metadata"].get("order_id") for pi in soak.shop.fake.payment_intents.values())
    for order_id, order in orders.items():
        if order["purpose"] == "reload":
            assert intents[order_id] == 1, (order_id, intents[order_id])
            succeeded = any(
                pi["status"] == "succeeded" and pi["metadata"].get("order_id") == order_id
                for pi in soak.shop.fake.payment_intents.values()
            )
            assert _credited(order) == succeeded, dict(order)


async def _check_fees(sc, ws: str) -> None:
    """The waiver takes the first fees, exactly, and never more than it has."""
    rows = await sc.ledger(ws)
    waived = sum(r["fee_waived_micro"] for r in rows)
    assert waived == min(WAIVER_MICRO, sum(r["fee_micro"] + r["fee_waived_micro"] for r in rows)), (ws, waived)
    for r in rows:
        if not r["hold_lost"] and not r["byok"]:
            assert r["fee_micro"] + r["fee_waived_micro"] == wallet.fee_micro(r["cost_micro"], FEE_PPM), dict(r)


async def _check_key_budgets(soak: Soak) -> None:
    budget_ws = soak.cast["budget"]
    async with soak.sc.svc.pool.acquire() as conn:
        for key_id, budget in ((budget_ws.key_id, 150_000), (soak.burst.key_id, soak.truth.burst_budget_micro)):
            since = await conn.fetchval("SELECT budget_since FROM api_keys WHERE id = $1", key_id)
            spent = await db.key_spent_since(conn, budget_ws.id, key_id, since)
            assert 0 < spent <= budget, (key_id, spent, budget)


async def _check_postpaid(soak: Soak) -> None:
    rows = await soak.sc.ledger(soak.cast["postpaid"].id)
    billed = [r for r in rows if r["cost_micro"] > 0]
    assert billed and all(r["postpaid"] for r in billed)
    worst = max(-r["balance_impact_micro"] for r in billed)
    # Admitted only above -limit; below it, only what the calls already running then add.
    lowest = min(r["balance_after_micro"] for r in billed)
    assert lowest >= -CREDIT_LIMIT_MICRO - soak.workers * worst, (lowest, worst)


async def _check_reloads(soak: Soak, orders: dict, reloads_min: int) -> int:
    async with soak.sc.svc.pool.acquire() as conn:
        good = await reload_store.list_reloads(conn, soak.cast["reload"].id, reload_store.LIST_ROWS_MAX)
        bad = await reload_store.list_reloads(conn, soak.cast["declined"].id, reload_store.LIST_ROWS_MAX)
        declined = await reload_store.get_settings(conn, soak.cast["declined"].id)
    good.sort(key=lambda r: r.created_at)
    for before, after in itertools.pairwise(good):  # never two in flight in one workspace
        assert before.finished_at is not None and after.created_at >= before.finished_at, (before, after)
    succeeded = [r for r in good if r.state == "succeeded"]
    assert len(succeeded) >= reloads_min, [r.view() for r in good]
    for r in good:
        assert r.order_id and _credited(orders[r.order_id]) == (r.state == "succeeded"), r.view()
    # The declined card: failures_max failures, backing off between them, then auto-reload off.
    assert [r.state for r in bad] == ["failed"] * FAILURES_MAX, [r.view() for r in bad]
    assert not declined.enabled and declined.disabled_reason and declined.failures == FAILURES_MAX
    return len(succeeded)


async def _check_expiry(soak: Soak, by_id: dict) -> None:
    """One forfeiture, before the purchase paid at the expiry instant was credited; no call needing
    credits admitted between the expiry and that purchase."""
    ws = soak.cast["expiring"].id
    expiries = await soak.sc.ledger(ws, "expiry")
    assert len(expiries) == 1, expiries
    assert len([k for (w, k) in by_id if w == ws and k.startswith("expiry:")]) == 1
    topups = await soak.sc.ledger(ws, "topup")
    assert len(topups) == 2 and topups[1]["created_at"] > expiries[0]["created_at"], (topups, expiries)
    expired_at = soak.truth.expiry_set_at
    for row in await soak.sc.ledger(ws):
        if expired_at <= row["started_at"] < topups[1]["created_at"]:
            assert row["hold_micro"] == 0, dict(row)
