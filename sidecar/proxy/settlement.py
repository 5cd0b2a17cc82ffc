"""Settlement: the call's ledger event and the one Lua call that resolves its hold.

A settlement is retried for the whole settle budget; what Redis still cannot take is spooled to disk
(`proxy/spool.py`) and replayed by `run_spool` until it lands, exactly once (the script resolves a
hold at most once).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from dataclasses import replace

import asyncpg
import orjson
from redis.exceptions import RedisError

from sidecar.db import POSTGRES_OUTAGE
from sidecar.observability import tracing
from sidecar.pricing import Usage
from sidecar.proxy.call import Call, now_ms
from sidecar.proxy.outcome import CallStatus, Outcome, Replay
from sidecar.services import Services
from sidecar.state.store import (
    SETTLED_RETENTION_MS,
    ExpireOutcome,
    ExpireStatus,
    IdempotencyRecord,
    SettleOutcome,
    SettleResult,
)

log = logging.getLogger("sidecar.proxy")

SETTLE_RETRY_FIRST_S = 0.05
SETTLE_RETRY_S_MAX = 1.0
SETTLE_ATTEMPTS_MAX = 10_000  # the budget bounds the retries in time; this only bounds the loop
SETTLE_ATTEMPT_S_MIN = 0.05
SPOOL_INTERVAL_S = 1.0
# A spooled settlement is replayed only this long after its first try: well inside the time Redis
# remembers a resolved hold (SETTLED_RETENTION_MS), whatever the clocks' skew.
SPOOL_REPLAY_WINDOW_MS = SETTLED_RETENTION_MS // 2
SPOOL_BATCH_MAX = 500
_TOKEN_CLASSES = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "input_audio_tokens",
    "input_image_tokens",
    "output_audio_tokens",
    "output_image_tokens",
)


def event(call: Call, status: str, usage: Usage, upstream_cost_micro: int, estimated: bool, error: str | None) -> dict:
    caller = call.caller
    scrubber = call.scrubber  # a provider may quote the key it was sent, in its model or its error
    upstream_model = call.served_model or (call.target.upstream_model if call.target else call.model.upstream_model)
    return {
        "event_id": str(uuid.UUID(call.request_id)),
        "status": status,
        "workspace_id": caller.workspace_id,
        "office_id": caller.office_id,
        "key_id": caller.key_id,
        "request_id": call.request_id,
        "idempotency_key": call.idempotency_key,
        "session_id": call.session_id,
        "protocol": call.protocol.name,
        "provider": call.provider,
        "model": call.model.name,
        "upstream_model": scrubber.text(upstream_model),
        "attempts": max(call.attempts, 1),
        "fallback_reason": call.fallback_reason,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_5m_tokens": usage.cache_write_5m_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "input_audio_tokens": usage.input_audio_tokens,
        "input_image_tokens": usage.input_image_tokens,
        "output_audio_tokens": usage.output_audio_tokens,
        "output_image_tokens": usage.output_image_tokens,
        "web_searches": usage.web_searches,
        "file_searches": usage.file_searches,
        "price_version": call.price.version if call.price else None,
        "route_reason": call.route_reason,
        "upstream_cost_micro": upstream_cost_micro,
        "hold_micro": call.hold_micro,
        "byok": call.byok,
        "byok_fallback_reason": call.byok_fallback_reason,
        "estimated": estimated,
        "error": scrubber.text(error) if error else error,
        "started_at": call.started_ms,
        "first_byte_at": call.first_byte_ms,
        "ended_at": now_ms(),
    }


async def settle(svc: Services, call: Call, outcome: Outcome) -> SettleResult | None:
    """Resolve the call's hold from its outcome: the one settlement of a call.

    Runs in a task of its own, so a handler cancelled (a client gone, a shutdown) cannot stop it
    half-way; shutdown waits for these tasks. None: Redis could not take it within the budget, and the
    settlement was spooled to disk for later."""
    task = asyncio.ensure_future(_settle_now(svc, call, outcome))
    svc.settling.add(task)
    task.add_done_callback(svc.settling.discard)
    return await asyncio.shield(task)


def settle_args(svc: Services, call: Call, outcome: Outcome) -> dict:
    """The settle script's arguments for this outcome (also what a spooled settlement stores)."""
    config, pricing, caller = svc.config, svc.config.pricing, call.caller
    usage = _with_implied_searches(call, outcome.usage or Usage())
    billable = outcome.status is not CallStatus.FAILED or config.billing.bill_observed_on_upstream_failure
    price = _price(svc, call)
    cost_micro = pricing.cost_micro(price, usage) if billable else 0
    upstream_cost_micro = pricing.upstream_cost_micro(price, usage)
    recorded = event(call, outcome.status.value, usage, upstream_cost_micro, outcome.estimated, outcome.error)
    recorded["price_version"] = price.version  # the version the call was billed at
    body_event = orjson.dumps(recorded)
    replay = outcome.replay
    if replay is not None and len(replay.body) > config.billing.idempotency_body_bytes_max:
        replay = Replay(0, "", b"")  # remembered as done, too large to replay
    return {
        "ws": caller.workspace_id,
        "key_id": caller.key_id,
        "hold_id": call.request_id,
        "cost_micro": cost_micro,
        "billed": not call.byok,  # BYOK: priced and recorded, never charged
        "event": body_event,
        "idempotency_key": call.idempotency_key,
        # Only a completed answer is kept for a retry to replay; after a failure or a hang-up the
        # client has no answer, so the key is freed and its retry runs.
        "idempotency": IdempotencyRecord.REPLAY if outcome.status is CallStatus.COMPLETED else IdempotencyRecord.FORGET,
        "status": replay.status if replay else 0,
        "content_type": replay.content_type if replay else "",
        "body": replay.body if replay else b"",
        "idempotency_ttl_ms": config.billing.idempotency_ttl_ms,
        "tokens_used": usage.total_input_tokens + usage.total_output_tokens,
        "route": call.protocol.route,
        "fee_ppm": svc.balances.policy.fee_ppm,
        "postpaid": call.postpaid,
        "key_budget_period": caller.budget_period or "" if caller.budget_micro is not None else "",
        "key_budget_micro": caller.budget_micro,
    }


async def _settle_now(svc: Services, call: Call, outcome: Outcome) -> SettleResult | None:
    try:
        return await _settle_or_spool(svc, call, outcome)
    finally:
        svc.inflight.settled(call.request_id)  # settled, or spooled: either way no longer only in Redis


async def _settle_or_spool(svc: Services, call: Call, outcome: Outcome) -> SettleResult | None:
    args = settle_args(svc, call, outcome)
    first_try_ms = now_ms()
    result = await _settle_within_budget(svc, args)
    if result is None:
        await _spool(svc, args, first_try_ms)
        return None
    svc.flusher.note_workspace(call.caller.workspace_id)
    _observe(svc, call, outcome, result)
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "call settled",
            extra={
                "workspace_id": call.caller.workspace_id,
                "key_id": call.caller.key_id,
                "model": call.model.name,
                "provider": call.provider,
                "status": outcome.status.value,
                "cost_micro": result.charged_micro,
                "duration_ms": now_ms() - call.started_ms,
            },
        )
    return result


def _with_implied_searches(call: Call, usage: Usage) -> Usage:
    """Searches the request implies (chat's `web_search_options`) that its usage does not count."""
    if usage.is_empty or usage.web_searches >= call.implied_web_searches:
        return usage
    return replace(usage, web_searches=call.implied_web_searches)


def _price(svc: Services, call: Call):
    """The served target's price; on OpenRouter, the price of the model it says actually served
    (it falls back between models on its own) when the cost profile knows that model. Always the
    version in force when the call arrived (the one its hold was computed at)."""
    pricing = svc.config.pricing
    target = call.target or call.targets[0]
    if call.served_model and svc.config.providers[target.provider].openrouter:
        served = pricing.price_of(call.served_model, call.started_ms)
        if served is not None:
            return served
    return call.price or pricing.price_of(target.price, call.started_ms)


async def _settle_within_budget(svc: Services, args: dict) -> SettleResult | None:
    """Retry the settle script until it answers or `holds.settle_budget_ms` is spent (or, at shutdown,
    the cutoff passed). None: spent, spool it. Each attempt is bounded by what is left, so a Redis that
    swallows packets cannot hold a settlement past its cutoff."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + svc.config.holds.settle_budget_ms / 1000
    delay_s = SETTLE_RETRY_FIRST_S
    # Bounded by the budget in time; the attempt count bound only guards against a zero-time loop.
    for _ in range(SETTLE_ATTEMPTS_MAX):
        try:
            async with asyncio.timeout(max(_settle_left_s(svc, deadline), SETTLE_ATTEMPT_S_MIN)):
                return await _settle_once(svc, args)
        except (RedisError, OSError, TimeoutError, *POSTGRES_OUTAGE) as exc:
            # Redis, or Postgres loading a balance Redis lost: both come back. A reply lost here is
            # harmless: the script resolves a hold once, so the retry (or the spool) changes nothing.
            dependency = "postgres" if isinstance(exc, POSTGRES_OUTAGE) else "redis"
            svc.metrics.child(svc.metrics.dependency_errors, dependency).inc()
            log.warning("settle failed, retrying", extra={"error": type(exc).__name__})
        except Exception:
            log.exception("settle failed on an unexpected error; spooling the settlement")
            return None
        left_s = _settle_left_s(svc, deadline)
        if left_s <= 0:
            break
        await asyncio.sleep(min(delay_s, left_s))
        delay_s = min(delay_s * 2, SETTLE_RETRY_S_MAX)
    return None


def _settle_left_s(svc: Services, deadline: float) -> float:
    """Time left to this settlement: its budget, or less once shutdown set the cutoff."""
    cutoff = deadline if svc.settle_cutoff_s is None else min(deadline, svc.settle_cutoff_s)
    return cutoff - asyncio.get_running_loop().time()


async def _settle_once(svc: Services, args: dict) -> SettleResult:
    result = await svc.state.settle(**args)
    for _ in range(2):  # not loaded -> load -> settle
        if result.outcome is not SettleOutcome.NEED_LOAD:
            _watch(svc, args["ws"], result)
            return result
        await svc.balances.ensure_loaded(args["ws"])
        result = await svc.state.settle(**args)
    raise RedisError("the workspace's balance could not be loaded for settlement")


def _watch(svc: Services, ws: str, result: SettleResult) -> None:
    """Hand the balance the script returned to the threshold watch (watch.py): no I/O, no await, so
    auto-reload and low-balance notifications add nothing to the call's answer."""
    available = result.available_after_micro
    if svc.watch is not None and available is not None and result.resolved_now:
        svc.watch.observe(ws, available, result.at_ms)


# --- the spool: settlements Redis could not take in time --------------------------------------------


async def _spool(svc: Services, args: dict, first_try_ms: int) -> None:
    record = {
        **args,
        "event": args["event"].decode(),
        "body": base64.b64encode(args["body"]).decode(),
        "first_try_ms": first_try_ms,
    }
    try:
        stored = await asyncio.to_thread(svc.spool.put, args["hold_id"], record)
    except OSError as exc:
        stored = False
        log.error("could not write the settlement spool", extra={"error": f"{type(exc).__name__}: {exc.strerror}"})
    if stored:
        svc.metrics.spooled.inc()
        log.error(
            "settlement spooled: Redis did not answer within the settle budget", extra={"hold_id": args["hold_id"]}
        )
    else:
        # The hold stays; the sweeper voids it at its deadline and records the call as expired.
        svc.metrics.settlements_lost.inc()
        log.critical("settlement lost: Redis unreachable and the spool full", extra={"hold_id": args["hold_id"]})


def _decode(record: dict) -> tuple[dict, int]:
    """A spooled record back into the settle script's arguments, and when the settlement first tried."""
    first_try_ms = int(record.pop("first_try_ms"))
    record["event"] = record["event"].encode()
    record["body"] = base64.b64decode(record["body"])
    record["idempotency"] = IdempotencyRecord(record["idempotency"])
    return record, first_try_ms


async def replay_spool(svc: Services, batch_max: int = SPOOL_BATCH_MAX) -> int:
    """Settle what the spool holds, oldest first. Returns how many were settled; stops at the first
    Redis error (it is still down: the next round tries again). A file that cannot be replayed safely
    (unreadable, too old, or its hold already resolved) is set aside in `dead/`, loudly, never
    dropped in silence and never allowed to stop the files behind it."""
    done = 0
    for path in await asyncio.to_thread(svc.spool.pending, batch_max):
        try:
            args, first_try_ms = _decode(await asyncio.to_thread(svc.spool.read, path))
        except (ValueError, KeyError, TypeError) as exc:
            log.critical("unreadable spooled settlement; set aside", extra={"error": f"{path.name}: {exc}"})
            svc.metrics.settlements_lost.inc()
            await asyncio.to_thread(svc.spool.bury, path)
            continue
        if now_ms() - first_try_ms > SPOOL_REPLAY_WINDOW_MS:
            # Redis forgets a resolved hold SETTLED_RETENTION_MS after it resolved: past this window a
            # replay of a settlement that did land (its reply lost) could settle the call twice.
            log.critical("spooled settlement too old to replay; set aside", extra={"hold_id": args["hold_id"]})
            svc.metrics.settlements_lost.inc()
            await asyncio.to_thread(svc.spool.bury, path)
            continue
        try:
            result = await _settle_once(svc, args)
        except (RedisError, OSError, *POSTGRES_OUTAGE):
            break
        if result.outcome is SettleOutcome.ALREADY_EXPIRED:
            # The sweeper voided the hold first: the call is recorded expired at 0. Kept for the operator.
            log.critical(
                "spooled settlement came after its hold was expired: the call is recorded at 0; set aside",
                extra={"hold_id": args["hold_id"], "workspace_id": args["ws"]},
            )
            svc.metrics.settlements_lost.inc()
            await asyncio.to_thread(svc.spool.bury, path)
        else:  # settled now, or by an earlier try whose reply was lost: either way, once
            await asyncio.to_thread(svc.spool.remove, path)
            done += 1
        svc.flusher.note_workspace(args["ws"])
    return done


async def recover_orphans(svc: Services) -> int:
    """Record the calls of processes that died mid-call and whose holds Redis then lost (see
    proxy/inflight.py). Returns how many were recorded."""
    recorded = 0
    for orphan in svc.inflight.orphans():
        if (svc.spool.directory / f"{orphan.hold_id}.json").exists():
            continue  # its settlement waits in the spool: that records it
        outcome = await svc.state.expire(orphan.ws, orphan.hold_id, ExpireStatus.LOST, template=orphan.template)
        if outcome is ExpireOutcome.NOT_DUE:
            continue  # still held: the sweeper records it at its deadline
        if outcome is ExpireOutcome.LOST_RECORDED:
            recorded += 1
            svc.flusher.note_workspace(orphan.ws)
            log.warning(
                "a dead process's call whose hold Redis lost is recorded expired", extra={"hold_id": orphan.hold_id}
            )
        svc.inflight.resolved(orphan)
    return recorded


async def run_spool(svc: Services, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await recover_orphans(svc)
            if await replay_spool(svc):
                log.info("spooled settlements replayed")
        except asyncpg.PostgresError:  # not an outage (db.POSTGRES_OUTAGE): a bug, said loudly; the loop lives on
            log.exception("spool replay failed on a postgres error that is not an outage; will retry")
        except Exception:  # whatever it is, the loop must outlive it: spooled money waits on it
            log.exception("spool replay failed; will retry")
        try:
            await asyncio.wait_for(stop.wait(), SPOOL_INTERVAL_S)
        except TimeoutError:
            pass


def _observe(svc: Services, call: Call, outcome: Outcome, result: SettleResult) -> None:
    svc.metrics.child(svc.metrics.settlements, outcome.status.value).inc()
    if result.resolved_now:
        if result.fee_micro:
            svc.metrics.usage_fees.inc(result.fee_micro)
        if result.fee_waived_micro:
            svc.metrics.usage_fees_waived.inc(result.fee_waived_micro)
        if call.postpaid:
            svc.metrics.postpaid_calls.inc()
    usage = outcome.usage or Usage()
    if call.target is not None and outcome.usage is not None:
        _observe_genai(svc, call, usage)
    if tracing.enabled():
        tracing.annotate(
            {
                "gen_ai.usage.input_tokens": _genai_input_tokens(usage),
                "gen_ai.usage.output_tokens": usage.output_tokens,
                "sidecar.call.status": outcome.status.value,
                "sidecar.charged_micro": result.charged_micro,
                "sidecar.hold_micro": result.hold_micro,
            }
        )
    if not (result.resolved_now and result.charged_micro) or call.byok:
        return
    model = call.model.name
    svc.metrics.child(svc.metrics.debited, model).inc(result.charged_micro)
    for token_class in _TOKEN_CLASSES:
        tokens = getattr(usage, token_class)
        if tokens:
            svc.metrics.child(svc.metrics.tokens, model, token_class.removesuffix("_tokens")).inc(tokens)


def _observe_genai(svc: Services, call: Call, usage: Usage) -> None:
    """gen_ai.client.token.usage: per call, input and output (the conventions' two token types)."""
    labels = (call.protocol.operation, call.target.provider, call.target.upstream_model)
    if input_tokens := _genai_input_tokens(usage):
        svc.metrics.child(svc.metrics.genai_tokens, *labels, "input").observe(input_tokens)
    if usage.output_tokens:
        svc.metrics.child(svc.metrics.genai_tokens, *labels, "output").observe(usage.output_tokens)


def _genai_input_tokens(usage: Usage) -> int:
    """The conventions' input tokens include cached ones; our billing classes keep them apart."""
    return usage.input_tokens + usage.cache_read_tokens + usage.cache_write_5m_tokens + usage.cache_write_1h_tokens
