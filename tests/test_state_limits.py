"""The Redis layer's named replies, bounds and hold lifecycle (issues 13.3, 15.2, 15.10, 15.15-15.17,
8.5, 8.6, 8.16), against a real Redis."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from support.scripts import admit, settle

from sidecar.money import AMOUNT_MICRO_MAX
from sidecar.state import keys, store
from sidecar.state.store import (
    Admission,
    ExpireOutcome,
    ExpireStatus,
    GrowHold,
    HoldExtension,
    IdempotencyRecord,
    SettleOutcome,
    State,
    StateLimits,
)
from sidecar.sweeper import sweep_workspace


def new_ws() -> str:
    return f"ws_{secrets.token_hex(5)}"


def hold() -> str:
    return secrets.token_hex(16)


# --- 13.3: every reply is a named outcome ----------------------------------------------------------------


async def test_every_script_reply_is_a_named_outcome(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    first = hold()
    # Redis lost the hold and the balance (restarted empty): settlement says so, it does not raise.
    need_load = await settle(state, ws, first, 10)
    assert need_load.outcome is SettleOutcome.NEED_LOAD and not need_load.resolved_now
    await state.load(ws, 1_000, 0)
    assert (await admit(state, ws, ceiling=0, hold_id=first)).outcome is Admission.ADMITTED
    settled = await settle(state, ws, first, 10)
    assert settled.outcome is SettleOutcome.SETTLED
    assert (await settle(state, ws, first, 10)).outcome is SettleOutcome.ALREADY_RESOLVED
    assert await state.expire(ws, first, ExpireStatus.EXPIRED) is ExpireOutcome.ALREADY_RESOLVED

    second = hold()
    assert (await admit(state, ws, ceiling=100, hold_id=second)).outcome is Admission.ADMITTED
    assert await state.expire(ws, second, ExpireStatus.EXPIRED) is ExpireOutcome.NOT_DUE
    assert await state.grow_hold(ws, second, 500) is GrowHold.RAISED
    assert await state.grow_hold(ws, second, 5_000) is GrowHold.INSUFFICIENT
    assert await state.grow_hold(ws, hold(), 500) is GrowHold.ALREADY_RESOLVED
    assert await state.grow_hold(new_ws(), second, 500) is GrowHold.ALREADY_RESOLVED
    assert await state.expire(ws, second, ExpireStatus.FAILED) is ExpireOutcome.VOIDED
    assert (await state.account(ws)).held_micro == 0


# --- 15.15 / 8.7: the token window is a running sum ---------------------------------------------------------


async def _commands_during(redis_client, tag: str, action) -> list[list[str]]:
    """Every command Redis ran (scripts' own included) that names `tag`, while `action` ran."""
    db = redis_client.connection_pool.connection_kwargs.get("db", 0)
    sentinel = f"done-{tag}"
    seen: list[list[str]] = []
    async with redis_client.monitor() as monitor:
        await action()
        await redis_client.echo(sentinel)
        while True:
            info = await asyncio.wait_for(monitor.next_command(), 10)
            command = info["command"]
            if sentinel in command:
                return seen
            if int(info["db"]) == int(db) and tag in command:
                seen.append(command.split())


async def test_token_admission_does_not_scan_the_window(redis_client) -> None:
    """With 3,000 calls in a key's token window, one admission reads none of their entries."""
    state = State(redis_client)
    ws = new_ws()
    for _ in range(3):
        await asyncio.gather(
            *[admit(state, ws, limit=1_000_000, ceiling_tokens=1, token_limit=1_000_000) for _ in range(1_000)]
        )

    async def one_more() -> None:
        result = await admit(state, ws, limit=1_000_000, ceiling_tokens=1, token_limit=1_000_000)
        assert result.outcome is Admission.ADMITTED and result.tokens_remaining == 1_000_000 - 3_001

    commands = await _commands_during(redis_client, keys.tag(ws), one_more)
    reads = [c for c in commands if c[0].upper() in ("HMGET", "HGETALL", "HVALS", "ZRANGEBYSCORE", "ZRANGE")]
    fields_read = sum(len(c) - 2 for c in reads if c[0].upper() == "HMGET")
    assert fields_read <= 10, commands
    assert all("LIMIT" in " ".join(c).upper() or c[0].upper() == "HMGET" for c in reads), reads


async def test_token_running_sum_matches_the_window_exactly(redis_client) -> None:
    """Admissions, settlement corrections and calls leaving the window: the sum the script keeps is
    what a full scan would find."""
    state = State(redis_client)
    ws = new_ws()
    window_ms, cap = 300, 10_000
    live: dict[str, int] = {}
    for round_ in range(6):
        ids = [hold() for _ in range(8)]
        results = await asyncio.gather(
            *[
                admit(state, ws, limit=10_000, window_ms=window_ms, hold_id=i, ceiling_tokens=100, token_limit=cap)
                for i in ids
            ]
        )
        assert all(r.outcome is Admission.ADMITTED for r in results)
        for i, used in zip(ids[:4], (0, 7, 50, 250), strict=True):  # settled below, above the ceiling too
            await settle(state, ws, i, 0, tokens_used=used)
        live.update({i: 100 for i in ids})
        await asyncio.sleep(0.12 if round_ % 2 else 0)
    tpm = await redis_client.hgetall(keys.tokens(ws, "k1"))
    rl = await redis_client.zrange(keys.rate(ws, "k1"), 0, -1)
    assert set(tpm) - {b"#sum"} == set(rl)  # the hash holds exactly the window's calls (and no more)
    assert int(tpm[b"#sum"]) == sum(int(v) for k, v in tpm.items() if k != b"#sum")


async def test_token_limit_catches_up_when_many_calls_left_the_window(redis_client, monkeypatch) -> None:
    """Dropping leavers is bounded per call; a backlog over-counts (refuses early, never admits past the
    limit), answers "retry at once", and is gone after a few calls."""
    monkeypatch.setattr(store, "EVICT_ENTRIES_MAX_PER_CALL", 10)
    state = State(redis_client)
    ws = new_ws()

    async def tokens(n: int):
        return await admit(state, ws, limit=10_000, window_ms=200, ceiling_tokens=n, token_limit=100)

    assert all([(await tokens(3)).outcome is Admission.ADMITTED for _ in range(30)])  # 90 of 100
    assert (await tokens(20)).outcome is Admission.RATE_LIMITED
    await asyncio.sleep(0.25)  # all 30 left the window; one call drops only 10 of them
    behind = await tokens(50)  # 20 still counted + 50 > 100, but those 20 left: retry at once
    assert behind.outcome is Admission.RATE_LIMITED and behind.retry_after_ms == 1
    assert (await tokens(50)).outcome is Admission.ADMITTED  # 10 leavers' tokens still counted
    assert (await tokens(1)).outcome is Admission.ADMITTED  # drops the last 10 leavers
    assert int(await redis_client.hget(keys.tokens(ws, "k1"), "#sum")) == 51


# --- 15.16: settlement touches only its own idempotency record ---------------------------------------------


async def test_settle_leaves_another_holds_idempotency_record_alone(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    await state.load(ws, 10_000, 0)
    slow = hold()
    assert (await admit(state, ws, ceiling=10, hold_id=slow, idem="K", idempotency_ttl_ms=50)).outcome is (
        Admission.ADMITTED
    )
    await asyncio.sleep(0.1)  # the slow call's record expired; a new call takes the key
    fresh = hold()
    assert (await admit(state, ws, ceiling=10, hold_id=fresh, idem="K")).outcome is Admission.ADMITTED
    # The slow call fails: it must not delete the new call's record...
    await settle(state, ws, slow, 0, idem="K", idempotency=IdempotencyRecord.FORGET)
    assert (await admit(state, ws, ceiling=10, idem="K")).outcome is Admission.IN_PROGRESS
    # ...nor, had it completed, overwrite it with its own answer.
    other = hold()
    assert (await admit(state, ws, ceiling=10, hold_id=other, idem="L", idempotency_ttl_ms=50)).outcome is (
        Admission.ADMITTED
    )
    await asyncio.sleep(0.1)
    assert (await admit(state, ws, ceiling=10, idem="L")).outcome is Admission.ADMITTED
    await settle(state, ws, other, 5, idem="L", body=b'{"stale": true}')
    assert (await admit(state, ws, ceiling=10, idem="L")).outcome is Admission.IN_PROGRESS
    # The new call's own settlement still records its answer.
    await settle(state, ws, fresh, 5, idem="K", body=b'{"fresh": true}')
    replay = await admit(state, ws, ceiling=10, idem="K")
    assert replay.outcome is Admission.DUPLICATE and replay.replay_body == b'{"fresh": true}'


# --- 15.17: a "failed" expire that arrives before its admission -------------------------------------------


async def test_failed_expire_before_a_delayed_admission_refuses_that_admission(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    await state.load(ws, 10_000, 0)
    lost = hold()
    # The sidecar gave up on admission (reply lost) and voided it; the admission itself arrives later.
    assert await state.expire(ws, lost, ExpireStatus.FAILED) is ExpireOutcome.TOMBSTONED
    late = await admit(state, ws, ceiling=500, hold_id=lost, idem="retry-me")
    assert late.outcome is Admission.ALREADY_RESOLVED
    assert (await state.account(ws)).held_micro == 0 and await state.active_holds(ws) == 0
    assert not await redis_client.exists(keys.idempotency(ws, "k1", "/v1/chat/completions", "retry-me"))
    # The client's retry (a new call, the same idempotency key) runs at once.
    assert (await admit(state, ws, ceiling=500, idem="retry-me")).outcome is Admission.ADMITTED
    # The sweeper's "expired" never leaves a tombstone: an unknown hold stays unknown.
    unknown = hold()
    assert await state.expire(ws, unknown, ExpireStatus.EXPIRED) is ExpireOutcome.ALREADY_RESOLVED
    assert (await admit(state, ws, ceiling=0, hold_id=unknown)).outcome is Admission.ADMITTED


# --- 15.18 (store side): the idempotency mode is a named value ----------------------------------------------


async def test_forget_frees_the_idempotency_key_and_replay_keeps_the_answer(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    await state.load(ws, 10_000, 0)
    cancelled = hold()
    assert (await admit(state, ws, ceiling=10, hold_id=cancelled, idem="c")).outcome is Admission.ADMITTED
    await settle(state, ws, cancelled, 5, idem="c", idempotency=IdempotencyRecord.FORGET, body=b"partial")
    completed = hold()
    assert (await admit(state, ws, ceiling=10, hold_id=completed, idem="c")).outcome is Admission.ADMITTED
    done = await settle(state, ws, completed, 5, idem="c", body=b'{"ok": 1}')
    assert done.replay_stored
    replay = await admit(state, ws, ceiling=10, idem="c")
    assert replay.outcome is Admission.DUPLICATE and replay.replay_body == b'{"ok": 1}'
    with pytest.raises(AssertionError):
        await state.settle(ws, "k1", hold(), 1, True, b"{}", "c", "keep", 200, "", b"", 1000)


# --- 15.10: every number a script writes is an exact integer; amounts are bounded ----------------------


async def test_amounts_stay_exact_integers_and_are_bounded(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    await state.load(ws, AMOUNT_MICRO_MAX, 0)  # the largest balance a grant may build
    # A ceiling at or above the bound is refused before Redis: no balance may cover it.
    too_large = await admit(state, ws, ceiling=10**17)
    assert too_large.outcome is Admission.CEILING_TOO_LARGE
    assert (await state.account(ws)).held_micro == 0
    near = hold()
    assert (await admit(state, ws, ceiling=AMOUNT_MICRO_MAX - 1, hold_id=near)).outcome is Admission.ADMITTED
    assert await state.grow_hold(ws, near, AMOUNT_MICRO_MAX) is GrowHold.CEILING_TOO_LARGE
    result = await settle(state, ws, near, AMOUNT_MICRO_MAX - 1)
    assert result.charged_micro == AMOUNT_MICRO_MAX - 1
    # A BYOK call's recorded cost is bounded too, so the event's figures stay integers.
    byok = hold()
    assert (await admit(state, ws, ceiling=0, hold_id=byok)).outcome is Admission.ADMITTED
    await settle(state, ws, byok, 10**18, billed=False)
    entries = await redis_client.xrange(keys.stream(ws))
    for _, fields in entries:
        for name in (b"cost", b"impact", b"after", b"at"):
            assert fields[name].lstrip(b"-").isdigit(), (name, fields[name])
    assert int(entries[0][1][b"after"]) == 1
    assert int(entries[1][1][b"cost"]) == AMOUNT_MICRO_MAX - 1


# --- 15.2: a hold's deadline follows the call ------------------------------------------------------------


async def test_extend_hold_keeps_a_running_call_from_the_sweeper(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    await state.load(ws, 10_000, 0)
    running = hold()
    assert (await admit(state, ws, ceiling=100, hold_id=running, hold_ttl_ms=50)).outcome is Admission.ADMITTED
    await asyncio.sleep(0.08)  # its first deadline passed while it waited for a slow target
    listed = await state.due_holds(ws, 10)
    assert listed == [running]
    seconds, micros = await redis_client.time()
    extended = await state.extend_hold(ws, running, 60_000)
    assert extended.outcome is HoldExtension.EXTENDED
    assert extended.deadline_ms >= seconds * 1000 + micros // 1000 + 60_000
    # The sweeper listed it before the extension: the expire re-checks the deadline, by Redis time.
    assert await state.expire(ws, running, ExpireStatus.EXPIRED) is ExpireOutcome.NOT_DUE
    assert await sweep_workspace(state, ws, 10) == 0
    assert (await state.account(ws)).held_micro == 100
    shorter = await state.extend_hold(ws, running, 1_000)  # never shortens
    assert shorter.outcome is HoldExtension.ALREADY_LATER and shorter.deadline_ms == extended.deadline_ms
    assert (await settle(state, ws, running, 40)).resolved_now
    assert (await state.extend_hold(ws, running, 60_000)).outcome is HoldExtension.NOT_LIVE
    assert (await state.extend_hold(ws, hold(), 60_000)).outcome is HoldExtension.NOT_LIVE
    assert await redis_client.zscore(keys.hold_deadlines(ws), running) is None


# --- 8.5: concurrent calls per key and per workspace ------------------------------------------------------


async def test_concurrency_limits_per_key_and_per_workspace(redis_client) -> None:
    state = State(redis_client, StateLimits(concurrent_calls_per_key=3, concurrent_calls_per_workspace=5))
    ws = new_ws()
    await state.load(ws, 10_000, 0)
    k1 = [hold() for _ in range(3)]
    for i in k1:
        assert (await admit(state, ws, ceiling=1, hold_id=i, key_id="k1")).outcome is Admission.ADMITTED
    over = await admit(state, ws, ceiling=1, key_id="k1")
    assert over.outcome is Admission.TOO_MANY_CONCURRENT and over.limited_by == "key"
    k2 = [hold() for _ in range(2)]
    for i in k2:
        assert (await admit(state, ws, ceiling=1, hold_id=i, key_id="k2")).outcome is Admission.ADMITTED
    full = await admit(state, ws, ceiling=1, key_id="k3")
    assert full.outcome is Admission.TOO_MANY_CONCURRENT and full.limited_by == "workspace"
    assert (await state.account(ws)).held_micro == 5  # the refusals held nothing

    # Each resolution frees one slot, once: a repeated settle or expire frees nothing more.
    await settle(state, ws, k1[0], 1, key_id="k1")
    await settle(state, ws, k1[0], 1, key_id="k1")
    assert await state.expire(ws, k1[0], ExpireStatus.FAILED) is ExpireOutcome.ALREADY_RESOLVED
    assert await redis_client.hget(keys.live_per_key(ws), "k1") == b"2"
    again = hold()
    assert (await admit(state, ws, ceiling=1, hold_id=again, key_id="k1")).outcome is Admission.ADMITTED
    assert (await admit(state, ws, ceiling=1, hold_id=again, key_id="k1")).outcome is Admission.ADMITTED  # retry
    assert await redis_client.hget(keys.live_per_key(ws), "k1") == b"3"

    # The counts lost while holds live (an eviction): rebuilt from the holds themselves.
    await settle(state, ws, k2[0], 1, key_id="k2")
    await redis_client.delete(keys.live_per_key(ws))
    refused = await admit(state, ws, ceiling=1, key_id="k1")
    assert refused.outcome is Admission.TOO_MANY_CONCURRENT and refused.limited_by == "key"
    assert await redis_client.hgetall(keys.live_per_key(ws)) == {b"k1": b"3", b"k2": b"1"}
    for i in [*k1[1:], again, k2[1]]:
        await state.expire(ws, i, ExpireStatus.FAILED)
    assert await redis_client.exists(keys.live_per_key(ws), keys.hold_keys(ws)) == 0


# --- 8.6: replay bytes are bounded per workspace and overall --------------------------------------------


async def _idempotent_call(state: State, ws: str, idem: str, body: bytes):
    hold_id = hold()
    assert (await admit(state, ws, ceiling=10, hold_id=hold_id, idem=idem)).outcome is Admission.ADMITTED
    settled = await settle(state, ws, hold_id, 1, idem=idem, body=body)
    replay = await admit(state, ws, ceiling=10, idem=idem)
    assert replay.outcome is Admission.DUPLICATE  # remembered as done either way: never charged twice
    return settled, replay


async def test_replay_bytes_are_bounded_per_workspace(redis_client) -> None:
    state = State(redis_client, StateLimits(replay_bytes_per_workspace=1_000))
    ws, other = new_ws(), new_ws()
    await state.load(ws, 10_000, 0)
    await state.load(other, 10_000, 0)
    settled, replay = await _idempotent_call(state, ws, "a", b"x" * 600)
    assert settled.replay_stored and replay.replay_body == b"x" * 600
    settled, replay = await _idempotent_call(state, ws, "b", b"y" * 600)
    assert not settled.replay_stored and not replay.replayable  # "too large to replay"
    settled, replay = await _idempotent_call(state, ws, "c", b"z" * 400)  # still fits beside the first
    assert settled.replay_stored and replay.replay_body == b"z" * 400
    settled, _ = await _idempotent_call(state, other, "a", b"w" * 900)  # another workspace's own bound
    assert settled.replay_stored
    # A body counted but not kept (the hold was already resolved) gives its bytes back.
    done = hold()
    assert (await admit(state, other, ceiling=1, hold_id=done, idem="d")).outcome is Admission.ADMITTED
    await settle(state, other, done, 1)
    assert not (await settle(state, other, done, 1, idem="d", body=b"v" * 50)).replay_stored
    buckets = await redis_client.hvals(keys.idempotency_bytes(other))
    assert sum(int(v) for v in buckets) == 900


async def test_replay_bytes_are_bounded_overall(redis_client) -> None:
    await redis_client.delete(keys.IDEMPOTENCY_BYTES_TOTAL)
    state = State(redis_client, StateLimits(replay_bytes_per_workspace=10_000, replay_bytes_total=1_000))
    try:
        first, second = new_ws(), new_ws()
        await state.load(first, 10_000, 0)
        await state.load(second, 10_000, 0)
        settled, _ = await _idempotent_call(state, first, "a", b"x" * 700)
        assert settled.replay_stored
        settled, replay = await _idempotent_call(state, second, "a", b"y" * 700)
        assert not settled.replay_stored and replay.replay_status == 0
        # Refused overall: the workspace's own count was given back.
        assert sum(int(v) for v in await redis_client.hvals(keys.idempotency_bytes(second))) == 0
    finally:
        await redis_client.delete(keys.IDEMPOTENCY_BYTES_TOTAL)


# --- 8.16: idempotency records are scoped by route ------------------------------------------------------


async def test_idempotency_records_are_scoped_by_route(redis_client) -> None:
    state = State(redis_client)
    ws = new_ws()
    await state.load(ws, 10_000, 0)
    chat = hold()
    assert (await admit(state, ws, ceiling=10, hold_id=chat, idem="same", route="/v1/chat/completions")).outcome is (
        Admission.ADMITTED
    )
    await settle(state, ws, chat, 1, idem="same", body=b'{"chat": 1}', route="/v1/chat/completions")
    embeddings = await admit(state, ws, ceiling=10, idem="same", route="/v1/embeddings")
    assert embeddings.outcome is Admission.ADMITTED  # another route: another request, not a replay
    replay = await admit(state, ws, ceiling=10, idem="same", route="/v1/chat/completions")
    assert replay.outcome is Admission.DUPLICATE and replay.replay_body == b'{"chat": 1}'
