"""The Redis layer on its own: the Lua scripts' guarantees, checked against a real Redis."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.scripts import admit, settle

from sidecar.state import keys, servers
from sidecar.state.store import Admission, Applied, State

# The money path runs against a single Redis and against a Redis Cluster (conftest.py).
pytestmark = pytest.mark.both_redis

WINDOW_MS = 150


def new_ws() -> str:
    return f"ws_{secrets.token_hex(5)}"


# --- the rate limiter: never more than N admitted in any window ------------------------------------------


async def _rate_case(redis_url: str, limit: int, gaps_ms: list[int]) -> None:
    client = servers.from_url(redis_url)
    await servers.ready(client)
    state = State(client)
    ws = new_ws()
    admitted_us: list[int] = []
    try:
        for gap_ms in gaps_ms:
            if gap_ms:
                await asyncio.sleep(gap_ms / 1000)
            burst = await asyncio.gather(*[admit(state, ws, limit=limit, window_ms=WINDOW_MS) for _ in range(3)])
            admitted_us += [r.now_us for r in burst if r.outcome is Admission.ADMITTED]
            refused = [r for r in burst if r.outcome is Admission.RATE_LIMITED]
            assert all(0 < r.retry_after_ms <= WINDOW_MS for r in refused)
    finally:
        await client.delete(keys.rate(ws, "k1"))
        await client.aclose()
    admitted_us.sort()
    for i, t in enumerate(admitted_us):  # every window (t - W, t] ending at an admission
        in_window = sum(1 for u in admitted_us[: i + 1] if u > t - WINDOW_MS * 1000)
        assert in_window <= limit, (limit, in_window)
    assert admitted_us, "the first burst is always admitted"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(1, 5), gaps_ms=st.lists(st.sampled_from([0, 0, 10, 40, 80, 160]), min_size=3, max_size=10))
def test_rate_limiter_never_admits_more_than_n_in_any_window(redis_url: str, limit: int, gaps_ms: list[int]) -> None:
    asyncio.run(_rate_case(redis_url, limit, gaps_ms))


# --- holds: all-or-nothing, never beyond the balance -----------------------------------------------------


async def test_refusals_leave_no_trace(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    assert (await admit(state, ws, ceiling=10)).outcome is Admission.NEED_LOAD
    assert await state.load(ws, 100, 0)
    assert (await admit(state, ws, ceiling=101)).outcome is Admission.INSUFFICIENT
    assert await redis_client.zcard(keys.rate(ws, "k1")) == 0
    assert (await state.account(ws)).held_micro == 0
    assert await state.active_holds(ws) == 0
    assert await redis_client.xlen(keys.stream(ws)) == 0
    ok = await admit(state, ws, ceiling=100, limit=1)
    assert ok.outcome is Admission.ADMITTED and ok.remaining == 0
    limited = await admit(state, ws, ceiling=0, limit=1)
    assert limited.outcome is Admission.RATE_LIMITED
    assert (await state.account(ws)).held_micro == 100 and await state.active_holds(ws) == 1


async def test_concurrent_holds_never_exceed_the_balance(redis_url, redis_client) -> None:
    state = State(servers.open_client(redis_url, connections_max=64, pool_wait_s=5))
    await servers.ready(state.redis)
    ws = new_ws()
    await state.load(ws, 1_000_000, 0)
    ceilings = [secrets.randbelow(20_000) + 1 for _ in range(400)]
    results = await asyncio.gather(*[admit(state, ws, ceiling=c) for c in ceilings])
    held = sum(c for c, r in zip(ceilings, results, strict=True) if r.outcome is Admission.ADMITTED)
    refused = [c for c, r in zip(ceilings, results, strict=True) if r.outcome is Admission.INSUFFICIENT]
    assert held <= 1_000_000 and refused
    assert all(c > 1_000_000 - held for c in refused) or held > 0  # each refusal saw too little available
    account = await state.account(ws)
    assert account.held_micro == held and account.balance_micro == 1_000_000
    await state.redis.aclose()


async def test_settle_caps_at_the_hold_and_resolves_once(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    await state.load(ws, 1_000, 0)
    hold_id = secrets.token_hex(16)
    assert (await admit(state, ws, ceiling=300, hold_id=hold_id)).outcome is Admission.ADMITTED
    results = await asyncio.gather(*[settle(state, ws, hold_id, 500) for _ in range(20)])
    assert sum(r.resolved_now for r in results) == 1
    [done] = [r for r in results if r.resolved_now]
    assert done.charged_micro == 300 and done.balance_after_micro == 700
    account = await state.account(ws)
    assert (account.balance_micro, account.held_micro) == (700, 0)
    assert await redis_client.xlen(keys.stream(ws)) == 1


async def test_idempotency_outcomes(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    await state.load(ws, 1_000, 0)
    first = await admit(state, ws, ceiling=10, idem="abc", fingerprint="f1")
    assert first.outcome is Admission.ADMITTED
    assert (await admit(state, ws, ceiling=10, idem="abc", fingerprint="f1")).outcome is Admission.IN_PROGRESS
    assert (await admit(state, ws, ceiling=10, idem="abc", fingerprint="f2")).outcome is Admission.IDEMPOTENCY_CONFLICT
    assert (await state.account(ws)).held_micro == 10


async def test_load_wins_once_and_apply_is_exactly_once(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    loads = await asyncio.gather(*[state.load(ws, 500 + i, 3) for i in range(20)])
    assert sum(loads) == 1
    balance = (await state.account(ws)).balance_micro
    assert 500 <= balance < 520
    # version 3 is in the loaded balance already
    assert await state.apply(ws, 3, 100, "grant:a") is Applied.ALREADY_INCLUDED
    assert await state.apply(ws, 4, 100, "grant:b") is Applied.APPLIED
    assert await state.apply(ws, 4, 100, "grant:b") is Applied.ALREADY_INCLUDED  # the same change again: no effect
    assert (await state.account(ws)).balance_micro == balance + 100
    assert await state.apply(new_ws(), 1, 5, "x") is Applied.NOT_LOADED


async def test_admit_twice_for_one_call_holds_once(redis_client) -> None:
    """A retried admission (its reply lost on a broken connection) must not hold a second time."""
    state = State(redis_client)
    ws = new_ws()
    await state.load(ws, 1_000, 0)
    hold_id = secrets.token_hex(16)
    first = await admit(state, ws, ceiling=300, hold_id=hold_id, limit=5, idem="i", fingerprint="f")
    again = await admit(state, ws, ceiling=300, hold_id=hold_id, limit=5, idem="i", fingerprint="f")
    assert first.outcome is again.outcome is Admission.ADMITTED
    assert first.remaining == again.remaining == 4
    assert (await state.account(ws)).held_micro == 300
    assert await redis_client.zcard(keys.rate(ws, "k1")) == 1
    await settle(state, ws, hold_id, 100)
    assert (await admit(state, ws, ceiling=300, hold_id=hold_id)).outcome is Admission.ALREADY_RESOLVED
    assert (await state.account(ws)).held_micro == 0


async def test_token_limit_counts_ceilings_then_actual_usage(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()

    async def admit_tokens(tokens: int, hold_id: str | None = None):
        return await admit(state, ws, limit=100, hold_id=hold_id, ceiling_tokens=tokens, token_limit=1_000)

    assert (await admit_tokens(1_001)).outcome is Admission.OVER_TOKEN_LIMIT  # can never fit
    first_id = secrets.token_hex(16)
    first = await admit_tokens(600, first_id)
    assert first.outcome is Admission.ADMITTED and first.tokens_remaining == 400
    refused = await admit_tokens(500)
    assert refused.outcome is Admission.RATE_LIMITED and refused.limited_by == "tokens"
    assert 0 < refused.retry_after_ms <= 60_000
    # The first call used only 100 tokens: settling corrects the window, and 500 now fits.
    settled = await settle(state, ws, first_id, 0, tokens_used=100)
    assert settled.resolved_now
    again = await admit_tokens(500)
    assert again.outcome is Admission.ADMITTED and again.tokens_remaining == 400
    assert await redis_client.zcard(keys.rate(ws, "k1")) == 2  # the refusals left no trace


async def test_pipelined_scripts_survive_a_script_flush_and_keep_errors_apart(redis_client) -> None:
    """Concurrent admits are sent together in one pipeline (state/batching.py)."""
    state = State(redis_client)
    ws, broken = new_ws(), new_ws()
    await state.load(ws, 10_000, 0)
    await redis_client.set(keys.acct(broken), "not a hash")  # this workspace's script call fails alone
    await redis_client.script_flush()  # as after a Redis restart: every EVALSHA answers NOSCRIPT
    results = await asyncio.gather(
        *[admit(state, ws, ceiling=10) for _ in range(50)], admit(state, broken, ceiling=10), return_exceptions=True
    )
    assert all(r.outcome is Admission.ADMITTED for r in results[:50])
    assert isinstance(results[50], Exception) and "WRONGTYPE" in str(results[50])
    assert (await state.account(ws)).held_micro == 500
