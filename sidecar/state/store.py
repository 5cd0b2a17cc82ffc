"""Typed calls to the Lua scripts. Knows Redis, nothing of HTTP.

Every script reply is decoded here, once, into a typed result with a named outcome: no caller reads
a reply's positions or a script's sentinel numbers.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from importlib import resources

import orjson

from sidecar.money import AMOUNT_MICRO_MAX
from sidecar.state import keys, servers, transport

SETTLED_RETENTION_MS = 3_600_000  # how long "this hold is resolved" is remembered: far past any retry
EVICT_ENTRIES_MAX_PER_CALL = 1_000  # rate-window entries one admission may drop: bounds its work inside Redis
HOLD_TTL_MS_MAX = 10**12  # ~31 years: any configured TTL fits; keeps now_ms + ttl_ms exact in Lua


class Admission(IntEnum):
    ADMITTED = 0
    RATE_LIMITED = 1
    INSUFFICIENT = 2
    DUPLICATE = 3
    IN_PROGRESS = 4
    IDEMPOTENCY_CONFLICT = 5
    NEED_LOAD = 6
    BACKLOG = 7
    ALREADY_RESOLVED = 8
    OVER_TOKEN_LIMIT = 9
    TOO_MANY_CONCURRENT = 10  # limited_by says whether the key's or the workspace's limit
    CEILING_TOO_LARGE = 11  # at or above AMOUNT_MICRO_MAX: no balance can ever cover it (not sent to Redis)
    NEED_KEY_LOAD = 12  # the key's budget record is not in Redis: rebuild it from Postgres, then admit again
    OVER_KEY_BUDGET = 13  # the call does not fit the key's budget (available_micro: what is left of it)
    EXPIRED = 14  # the workspace's credits expired (expires_at_ms); no call needing credits is admitted


class SettleOutcome(IntEnum):
    SETTLED = 0
    ALREADY_RESOLVED = 1  # nothing changed
    NEED_LOAD = 2  # the workspace's balance is not in Redis (restarted empty): load it, then settle again
    ALREADY_EXPIRED = 3  # nothing changed: the sweeper voided the hold (the call is recorded expired, at 0)


class ExpireOutcome(IntEnum):
    VOIDED = 1
    NOT_DUE = 0  # its deadline (by Redis time, now) has not passed: the call is still running
    ALREADY_RESOLVED = -1
    TOMBSTONED = -2  # not held (yet): a late admission of this hold id will be refused
    LOST_RECORDED = -3  # neither held nor resolved (Redis lost it): recorded expired from the journal


class ExpireStatus(StrEnum):
    EXPIRED = "expired"  # the deadline passed: the sidecar that held it died
    FAILED = "failed"  # admission's reply was lost: the call was never sent
    LOST = "lost"  # its process died; if Redis lost the hold too, record the call from its journal


class GrowHold(IntEnum):
    RAISED = 1  # or already as high
    ALREADY_RESOLVED = -1
    NEED_LOAD = -2
    INSUFFICIENT = -3
    CEILING_TOO_LARGE = -4  # at or above AMOUNT_MICRO_MAX (not sent to Redis)


class Applied(IntEnum):
    """apply.lua's answer for a change Postgres committed."""

    APPLIED = 1
    ALREADY_INCLUDED = 0  # the loaded balance (or an earlier apply) already has it
    NOT_LOADED = -1  # load the balance first (which may include the change), then apply again


class DebitOutcome(IntEnum):
    """debit.lua's answer."""

    DEBITED = 0
    DEBITED_BEFORE = 1  # this event id was debited already: the same result, nothing changed
    NEED_LOAD = 2


@dataclass(frozen=True, slots=True)
class Debit:
    outcome: DebitOutcome
    taken_micro: int = 0
    short_micro: int = 0
    at_ms: int = 0
    balance_after_micro: int = 0
    gen: str = ""


class WalletSet(IntEnum):
    SET = 1
    NOT_NEWER = 0  # the same or a newer version is there already
    NOT_LOADED = -1  # the next load reads the settings from Postgres


@dataclass(frozen=True, slots=True)
class WalletSettings:
    """A workspace's wallet settings as the scripts read them (Postgres table `wallets`)."""

    version: int = 0
    postpaid: bool = False
    credit_limit_micro: int = 0
    expires_at_ms: int | None = None
    fee_waiver_micro: int = 0

    def args(self) -> tuple:
        return (
            self.version,
            "postpaid" if self.postpaid else "prepaid",
            self.credit_limit_micro,
            "" if self.expires_at_ms is None else self.expires_at_ms,
            self.fee_waiver_micro,
        )


@dataclass(frozen=True, slots=True)
class KeyBudgetArgs:
    budget_micro: int
    period: str  # 'total' | 'monthly' | 'daily'
    hold_micro: int  # what the call holds against it: its credits ceiling, fee included


@dataclass(frozen=True, slots=True)
class KeyBudgetState:
    period_id: str
    period: str
    spent_micro: int
    held_micro: int


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """A ledger stream entry, read for what a key budget rebuild needs."""

    entry_id: str
    event_id: uuid.UUID | None
    key_id: str | None
    kind: str
    at_ms: int
    impact_micro: int


class HoldExtension(IntEnum):
    NOT_LIVE = 0  # resolved or unknown: nothing changed
    EXTENDED = 1
    ALREADY_LATER = 2  # its deadline was already at least that far: never shortened


class IdempotencyRecord(StrEnum):
    """What settlement does with the call's idempotency record."""

    REPLAY = "replay"  # keep the outcome: a retry gets the stored answer (only a completed call)
    FORGET = "forget"  # delete it: a retry runs again (failed or cancelled: the client has no answer)


@dataclass(frozen=True, slots=True)
class StateLimits:
    """Bounds the scripts enforce; 0 = none. The service takes them from config `limits` (whose
    defaults are the sensible ones); a bare State, as tools and tests make, has none."""

    concurrent_calls_per_key: int = 0
    concurrent_calls_per_workspace: int = 0
    replay_bytes_per_workspace: int = 0
    replay_bytes_total: int = 0


@dataclass(frozen=True, slots=True)
class AdmitResult:
    outcome: Admission
    remaining: int = 0
    reset_ms: int = 0
    retry_after_ms: int = 0
    available_micro: int = 0
    now_us: int = 0  # Redis server time of the admission
    tokens_remaining: int = -1  # in the token window, when the key has a token limit
    limited_by: str = ""  # "requests" or "tokens" when rate limited; "key" or "workspace" when too many concurrent
    postpaid: bool = False  # admitted post-charge: nothing held, the actual cost is debited at settle
    expires_at_ms: int = 0  # EXPIRED: when the credits expired
    replay_status: int = 0
    replay_content_type: str = ""
    replay_body: bytes = b""

    @property
    def replayable(self) -> bool:
        """DUPLICATE with a stored answer; False: remembered as done, its answer was not kept."""
        return self.outcome is Admission.DUPLICATE and self.replay_status != 0


@dataclass(frozen=True, slots=True)
class SettleResult:
    outcome: SettleOutcome
    charged_micro: int = 0
    balance_after_micro: int | None = None
    hold_micro: int = 0
    hold_lost: bool = False
    replay_stored: bool = False  # the response body was kept for replay under the idempotency key
    fee_micro: int = 0  # the usage fee charged on top of charged_micro
    fee_waived_micro: int = 0  # the part of the fee the workspace's waiver took
    held_after_micro: int | None = None  # with balance_after_micro: what the account holds after this
    at_ms: int = 0  # Redis time of the settlement

    @property
    def available_after_micro(self) -> int | None:
        if self.balance_after_micro is None or self.held_after_micro is None:
            return None
        return self.balance_after_micro - self.held_after_micro

    @property
    def resolved_now(self) -> bool:
        """False: this hold was already resolved (or not loaded), nothing changed."""
        return self.outcome is SettleOutcome.SETTLED


@dataclass(frozen=True, slots=True)
class HoldDeadline:
    outcome: HoldExtension
    deadline_ms: int = 0  # Redis time; 0 when not live


@dataclass(frozen=True, slots=True)
class Account:
    balance_micro: int
    held_micro: int

    @property
    def available_micro(self) -> int:
        return self.balance_micro - self.held_micro


def _script_source(name: str) -> str:
    return (resources.files("sidecar.state") / "lua" / f"{name}.lua").read_text()


def _resolution_keys(ws: str, record_key: str) -> list[str]:
    """The keys every script that resolves a hold touches (settle.lua, expire.lua), in their KEYS order."""
    return [
        keys.acct(ws),
        keys.holds(ws),
        keys.hold_deadlines(ws),
        keys.hold_meta(ws),
        keys.settled(ws),
        keys.stream(ws),
        record_key,
    ]


def _record_key(ws: str, key_id: str, route: str, idempotency_key: str | None) -> str:
    """The idempotency record's key; without an idempotency key, a key no record ever has (same slot)."""
    return keys.idempotency(ws, key_id, route, idempotency_key or "")


def _int_or_none(value: bytes | str | int) -> int | None:
    return None if value in (b"", "") else int(value)


def _decode_admit(reply: list) -> AdmitResult:
    outcome = Admission(int(reply[0]))
    if outcome is Admission.ADMITTED:
        return AdmitResult(
            outcome,
            remaining=int(reply[1]),
            reset_ms=int(reply[2]),
            now_us=int(reply[6]),
            tokens_remaining=int(reply[7]),
            postpaid=int(reply[8]) == 1,
        )
    if outcome is Admission.RATE_LIMITED:
        return AdmitResult(outcome, retry_after_ms=int(reply[1]), reset_ms=int(reply[2]), limited_by=reply[3].decode())
    if outcome is Admission.INSUFFICIENT:
        return AdmitResult(outcome, available_micro=int(reply[1]), remaining=int(reply[2]), reset_ms=int(reply[3]))
    if outcome is Admission.DUPLICATE:
        return AdmitResult(
            outcome, replay_status=int(reply[1]), replay_content_type=reply[2].decode(), replay_body=reply[3]
        )
    if outcome is Admission.TOO_MANY_CONCURRENT:
        return AdmitResult(outcome, limited_by=reply[1].decode())
    if outcome is Admission.OVER_KEY_BUDGET:
        return AdmitResult(outcome, available_micro=int(reply[1]))
    if outcome is Admission.EXPIRED:
        return AdmitResult(outcome, expires_at_ms=int(reply[1]))
    return AdmitResult(outcome)


def _decode_settle(reply: list, with_body: bool) -> SettleResult:
    outcome = SettleOutcome(int(reply[0]))
    if outcome is not SettleOutcome.SETTLED:
        return SettleResult(outcome)
    return SettleResult(
        outcome,
        charged_micro=int(reply[1]),
        balance_after_micro=_int_or_none(reply[2]),
        hold_micro=int(reply[3]),
        hold_lost=int(reply[4]) == 1,
        replay_stored=with_body and int(reply[6]) == 1,  # reply[6]: the record was this hold's
        fee_micro=int(reply[7]),
        fee_waived_micro=int(reply[8]),
        held_after_micro=_int_or_none(reply[9]),
        at_ms=int(reply[5]),
    )


class State:
    """One instance per process; wraps a redis.asyncio client and the registered scripts.

    Scripts run by EVALSHA and are loaded again on NOSCRIPT (after a Redis restart). The two hot-path
    scripts (admit, settle) go through the transport state/transport.py chooses (lean: a pipelined
    connection of their own, on a single Redis server; else redis-py's auto-pipelining batcher). The
    rest, off the hot path, use the client. aclose() closes both.
    """

    def __init__(self, client: servers.Client, limits: StateLimits | None = None, lean: bool = False) -> None:
        self.redis = client
        self.limits = limits or StateLimits()
        self._batcher = transport.hot_path(client, lean)
        self._admit = client.register_script(_script_source("admit"))
        self._settle = client.register_script(_script_source("settle"))
        self._expire = client.register_script(_script_source("expire"))
        self._load = client.register_script(_script_source("load"))
        self._apply = client.register_script(_script_source("apply"))
        self._grow = client.register_script(_script_source("grow_hold"))
        self._extend = client.register_script(_script_source("extend_hold"))
        self._reserve = client.register_script(_script_source("reserve_bytes"))
        self._debit = client.register_script(_script_source("debit"))
        self._wallet = client.register_script(_script_source("wallet"))
        self._key_budget_load = client.register_script(_script_source("key_budget_load"))
        self._all = (
            self._admit,
            self._settle,
            self._expire,
            self._load,
            self._apply,
            self._grow,
            self._extend,
            self._reserve,
            self._debit,
            self._wallet,
            self._key_budget_load,
        )

    async def load_scripts(self) -> None:
        for script in self._all:
            script.sha = await self.redis.script_load(script.script)

    async def scripts_loaded(self) -> bool:
        return all(await self.redis.script_exists(*[s.sha for s in self._all]))

    async def admit(
        self,
        ws: str,
        key_id: str,
        hold_id: str,
        ceiling_micro: int,
        rate_limit: int,
        window_ms: int,
        hold_ttl_ms: int,
        idempotency_key: str | None,
        fingerprint: str,
        idempotency_ttl_ms: int,
        meta: bytes,
        unflushed_max: int,
        ceiling_tokens: int = 0,
        token_limit: int = 0,
        route: str = "",
        key_budget: KeyBudgetArgs | None = None,
    ) -> AdmitResult:
        """key_budget: the key's budget, and what this call holds against it (None: the key has none)."""
        assert ceiling_micro >= 0 and rate_limit > 0 and ceiling_tokens >= 0 and token_limit >= 0
        assert 0 < hold_ttl_ms <= HOLD_TTL_MS_MAX
        if ceiling_micro >= AMOUNT_MICRO_MAX:
            return AdmitResult(Admission.CEILING_TOO_LARGE)
        reply = await self._batcher.run(
            self._admit,
            keys=[
                keys.acct(ws),
                keys.holds(ws),
                keys.hold_deadlines(ws),
                keys.hold_meta(ws),
                keys.rate(ws, key_id),
                _record_key(ws, key_id, route, idempotency_key),
                keys.stream(ws),
                keys.settled(ws),
                keys.tokens(ws, key_id),
                keys.hold_keys(ws),
                keys.live_per_key(ws),
                keys.hold_idempotency(ws),
                keys.key_budgets(ws),
                keys.hold_key_budget(ws),
            ],
            args=[
                hold_id,
                ceiling_micro,
                rate_limit,
                window_ms,
                hold_ttl_ms,
                fingerprint if idempotency_key else "",
                idempotency_ttl_ms,
                meta,
                unflushed_max,
                ceiling_tokens,
                token_limit,
                key_id,
                self.limits.concurrent_calls_per_key,
                self.limits.concurrent_calls_per_workspace,
                EVICT_ENTRIES_MAX_PER_CALL,
                "" if key_budget is None else key_budget.budget_micro,
                "" if key_budget is None else key_budget.period,
                0 if key_budget is None else min(key_budget.hold_micro, AMOUNT_MICRO_MAX),
            ],
        )
        return _decode_admit(reply)

    async def settle(
        self,
        ws: str,
        key_id: str,
        hold_id: str,
        cost_micro: int,
        billed: bool,
        event: bytes,
        idempotency_key: str | None,
        idempotency: IdempotencyRecord,
        status: int,
        content_type: str,
        body: bytes,
        idempotency_ttl_ms: int,
        tokens_used: int = 0,
        route: str = "",
        fee_ppm: int = 0,
        postpaid: bool = False,
        key_budget_period: str = "",
        key_budget_micro: int | None = None,
    ) -> SettleResult:
        """Resolve the hold once (the money rules: settle.lua's header). NEED_LOAD: Redis lost the workspace
        (restarted empty) during the call.

        A body is kept for replay only within the replay-bytes bounds; past them the call is still
        remembered as done, with status 0 (too large to replay)."""
        assert cost_micro >= 0 and tokens_used >= 0 and isinstance(idempotency, IdempotencyRecord)
        # A billed call is charged at most its hold (< AMOUNT_MICRO_MAX); only a BYOK call's recorded
        # cost can be larger, and that figure is for display: bounded, so every number stays exact.
        cost_micro = min(cost_micro, AMOUNT_MICRO_MAX - 1)
        record_key = _record_key(ws, key_id, route, idempotency_key)
        reservations: list[tuple[str, str]] | None = []
        replaying = bool(idempotency_key) and idempotency is IdempotencyRecord.REPLAY
        if replaying and body:
            reservations = await self._reserve_replay_bytes(ws, len(body), idempotency_ttl_ms)
            if reservations is None:  # over a bound: remembered as done, not replayable
                status, content_type, body, reservations = 0, "", b"", []
        reply = await self._batcher.run(
            self._settle,
            keys=[
                *_resolution_keys(ws, record_key),
                keys.tokens(ws, key_id),
                keys.hold_keys(ws),
                keys.live_per_key(ws),
                keys.hold_idempotency(ws),
                keys.expired_holds(ws),
                keys.key_budgets(ws),
                keys.hold_key_budget(ws),
            ],
            args=[
                hold_id,
                cost_micro,
                "1" if billed else "0",
                event,
                idempotency.value if idempotency_key else "",
                status,
                content_type,
                body,
                idempotency_ttl_ms,
                SETTLED_RETENTION_MS,
                tokens_used,
                fee_ppm,
                "1" if postpaid else "0",
                key_budget_period,
                key_id,
                "" if key_budget_micro is None else key_budget_micro,
            ],
        )
        result = _decode_settle(reply, replaying and bool(body))
        if reservations and not result.replay_stored:
            await self._release_replay_bytes(reservations, len(body), idempotency_ttl_ms)
        return result

    async def _reserve_replay_bytes(self, ws: str, size_bytes: int, ttl_ms: int) -> list[tuple[str, str]] | None:
        """Count a body against the workspace's and the overall bound, before it is written. None: over
        a bound. Conservative: a body counted and then not kept is released, but a settle whose reply is
        lost keeps its count (it may have stored the body); a count lasts only the record TTL."""
        reserved: list[tuple[str, str]] = []
        for key, bound in (
            (keys.idempotency_bytes(ws), self.limits.replay_bytes_per_workspace),
            (keys.IDEMPOTENCY_BYTES_TOTAL, self.limits.replay_bytes_total),
        ):
            if bound <= 0:
                continue
            bucket = await self._reserve(keys=[key], args=[size_bytes, bound, ttl_ms, ""])
            if not bucket:
                await self._release_replay_bytes(reserved, size_bytes, ttl_ms)
                return None
            reserved.append((key, bucket.decode() if isinstance(bucket, bytes) else str(bucket)))
        return reserved

    async def _release_replay_bytes(self, reserved: list[tuple[str, str]], size_bytes: int, ttl_ms: int) -> None:
        for key, bucket in reserved:
            await self._reserve(keys=[key], args=[size_bytes, 0, ttl_ms, bucket])

    async def due_holds(self, ws: str, holds_max: int, grace_ms: int = 0) -> list[str]:
        """Ids of holds past their deadline by more than grace_ms (Redis time) when listed; expire()
        checks again."""
        seconds, micros = await servers.time_of(self.redis, keys.hold_deadlines(ws))
        due_ms = seconds * 1000 + micros // 1000 - grace_ms
        ids = await self.redis.zrangebyscore(keys.hold_deadlines(ws), "-inf", due_ms, start=0, num=holds_max)
        return [i.decode() for i in ids]

    async def expire(
        self, ws: str, hold_id: str, status: ExpireStatus, grace_ms: int = 0, template: bytes = b""
    ) -> ExpireOutcome:
        """Void a hold that will never be settled and record its call (see expire.lua). EXPIRED voids
        only a hold whose deadline has passed, by more than grace_ms, by Redis time when the script runs."""
        assert grace_ms >= 0
        status = ExpireStatus(status)
        # The hold knows its own idempotency record (admission wrote it): no caller has to rebuild it.
        record_key = await self.redis.hget(keys.hold_idempotency(ws), hold_id)
        record_key = record_key.decode() if record_key else _record_key(ws, "", "", None)
        reply = await self._expire(
            keys=[
                *_resolution_keys(ws, record_key),
                keys.hold_keys(ws),
                keys.live_per_key(ws),
                keys.hold_idempotency(ws),
                keys.expired_holds(ws),
                keys.key_budgets(ws),
                keys.hold_key_budget(ws),
            ],
            args=[hold_id, status.value, SETTLED_RETENTION_MS, grace_ms, template],
        )
        return ExpireOutcome(int(reply))

    async def extend_hold(self, ws: str, hold_id: str, ttl_ms: int) -> HoldDeadline:
        """Push a live hold's deadline to now + ttl_ms (Redis time); never shortens it."""
        assert 0 < ttl_ms <= HOLD_TTL_MS_MAX
        reply = await self._extend(keys=[keys.holds(ws), keys.hold_deadlines(ws)], args=[hold_id, ttl_ms])
        return HoldDeadline(HoldExtension(int(reply[0])), int(reply[1]))

    async def load(
        self,
        ws: str,
        balance_micro: int,
        pg_version: int,
        run_id: str = "",
        replacing_gen: str = "",
        resolved_holds: Sequence[str] = (),
        waived_micro: int = 0,
        wallet: WalletSettings | None = None,
    ) -> bool:
        """Set the balance read from Postgres, with `held` rebuilt from the live holds (see load.lua).
        replacing_gen '': only if Redis has no balance (the first of concurrent loaders wins); else
        replace the load `replacing_gen` if it is still the live one (Redis restarted stale)."""
        records: list[str] = []
        if resolved_holds:
            found = await self.redis.hmget(keys.hold_idempotency(ws), list(resolved_holds))
            # Every key in KEYS (Redis Cluster): a hold without a record gets a placeholder of its slot.
            records = [r.decode() if r else f"{keys.tag(ws)}:no_record" for r in found]
        reply = await self._load(
            keys=[
                keys.acct(ws),
                keys.applied(ws),
                keys.holds(ws),
                keys.hold_deadlines(ws),
                keys.hold_meta(ws),
                keys.settled(ws),
                keys.hold_keys(ws),
                keys.live_per_key(ws),
                keys.hold_idempotency(ws),
                keys.key_budgets(ws),
                keys.hold_key_budget(ws),
                *records,
            ],
            args=[
                balance_micro,
                pg_version,
                secrets.token_hex(8),
                run_id,
                replacing_gen,
                waived_micro,
                *(wallet or WalletSettings()).args(),
                *resolved_holds,
            ],
        )
        return int(reply) == 1

    async def apply(self, ws: str, pg_version: int, delta_micro: int, token: str, waived_micro: int = 0) -> Applied:
        reply = await self._apply(
            keys=[keys.acct(ws), keys.applied(ws)], args=[pg_version, delta_micro, token, waived_micro]
        )
        return Applied(int(reply))

    async def set_wallet(self, ws: str, wallet: WalletSettings) -> WalletSet:
        """The wallet settings into the loaded account, unless a newer version is there (wallet.lua)."""
        return WalletSet(int(await self._wallet(keys=[keys.acct(ws)], args=list(wallet.args()))))

    async def load_key_budget(
        self, ws: str, key_id: str, period: str, period_id: str, spent_micro: int, last_entry: str, since_ms: int
    ) -> bool:
        """Rebuild a key's budget record (see key_budget_load.lua); False: it was there already."""
        reply = await self._key_budget_load(
            keys=[keys.key_budgets(ws), keys.hold_key_budget(ws), keys.hold_keys(ws), keys.stream(ws)],
            args=[key_id, period, period_id, spent_micro, last_entry, since_ms],
        )
        return int(reply) == 1

    async def key_budget(self, ws: str, key_id: str) -> KeyBudgetState | None:
        """The key's budget record as Redis has it (None: not loaded)."""
        fields = [f"{key_id}:{f}" for f in ("p", "t", "s", "h")]
        period_id, period, spent, held = await self.redis.hmget(keys.key_budgets(ws), fields)
        if period_id is None:
            return None
        return KeyBudgetState(period_id.decode(), (period or b"").decode(), int(spent or 0), int(held or 0))

    async def forget_key_budget(self, ws: str, key_id: str) -> None:
        """Drop a key's budget record: the next admission rebuilds it from Postgres (its budget changed)."""
        await self.redis.hdel(keys.key_budgets(ws), *[f"{key_id}:{f}" for f in ("p", "t", "s", "h")])

    async def stream_entries(self, ws: str, entries_max: int) -> list[StreamEntry]:
        """The workspace's ledger stream (not yet deleted by the flusher), oldest first."""
        found = []
        for entry_id, fields in await self.redis.xrange(keys.stream(ws), count=entries_max):
            try:
                event = orjson.loads(fields[b"e"])
                event_id = uuid.UUID(event["event_id"])
                key_id = event.get("key_id")
            except (KeyError, ValueError, TypeError):
                event_id, key_id = None, None  # unreadable: dead-lettered by the flusher, never in the ledger
            found.append(
                StreamEntry(
                    entry_id.decode(),
                    event_id,
                    key_id,
                    fields.get(b"kind", b"usage").decode(),
                    int(fields.get(b"at", b"0")),
                    int(fields.get(b"impact", b"0")),
                )
            )
        return found

    async def time_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return seconds * 1000 + micros // 1000

    async def debit(self, ws: str, event_id: str, requested_micro: int | None, event: bytes, kind: str) -> Debit:
        """Take min(requested, balance - held) from the live balance once per event id (see debit.lua);
        requested None: everything that remains."""
        assert requested_micro is None or 0 < requested_micro <= AMOUNT_MICRO_MAX
        reply = await self._debit(
            keys=[keys.acct(ws), keys.movements(ws), keys.stream(ws)],
            args=[event_id, "" if requested_micro is None else requested_micro, event, kind],
        )
        outcome = DebitOutcome(int(reply[0]))
        if outcome is DebitOutcome.NEED_LOAD:
            return Debit(outcome)
        gen = reply[5].decode() if isinstance(reply[5], bytes) else str(reply[5])
        return Debit(outcome, int(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]), gen)

    async def grow_hold(self, ws: str, hold_id: str, amount_micro: int) -> GrowHold:
        """Raise a live hold to amount_micro (see grow_hold.lua)."""
        assert amount_micro >= 0
        if amount_micro >= AMOUNT_MICRO_MAX:
            return GrowHold.CEILING_TOO_LARGE
        return GrowHold(int(await self._grow(keys=[keys.acct(ws), keys.holds(ws)], args=[hold_id, amount_micro])))

    async def account(self, ws: str) -> Account | None:
        balance, held = await self.redis.hmget(keys.acct(ws), "balance", "held")
        if balance is None:
            return None
        return Account(int(balance), int(held or 0))

    async def aclose(self) -> None:
        await transport.close(self._batcher)
        await self.redis.aclose()

    async def fee_waived(self, ws: str) -> int | None:
        """The fee waiver used so far, as the live account knows it (None: not loaded)."""
        waived = await self.redis.hget(keys.acct(ws), "waived")
        return int(waived) if waived is not None else None

    async def ping(self) -> None:
        await self.redis.ping()  # in a cluster: one node; a shard that is down fails its own calls

    async def run_id(self, ws: str) -> str:
        """The run_id of the Redis primary that holds the workspace, or '' where INFO is refused (then a
        stale restart goes unnoticed by the data plane, and only `sidecar audit` reports its drift)."""
        return (await self.run_ids()).get(self.server_of(ws), "")

    async def run_ids(self) -> dict[str, str]:
        """Each Redis primary's run_id by server name (one entry for a single server); see servers.py."""
        return await servers.run_ids(self.redis)

    def server_of(self, ws: str) -> str:
        """The name of the Redis primary that holds the workspace (a cluster's shard; '' for one server)."""
        return servers.server_of(self.redis, keys.acct(ws))

    async def hold_ids(self, ws: str) -> list[str]:
        return [h.decode() for h in await self.redis.hkeys(keys.holds(ws))]

    async def load_marks(self, ws: str) -> tuple[str | None, str | None]:
        """The live load's `gen` and the Redis run_id it was loaded under (None: not loaded / unknown)."""
        gen, run = await self.redis.hmget(keys.acct(ws), "gen", "run")
        return (gen.decode() if gen is not None else None, run.decode() if run is not None else None)

    async def generation(self, ws: str) -> str | None:
        gen = await self.redis.hget(keys.acct(ws), "gen")
        return gen.decode() if gen is not None else None

    async def active_holds(self, ws: str) -> int:
        return int(await self.redis.hlen(keys.holds(ws)))
