"""Typed calls to the Lua scripts. Knows Redis, nothing of HTTP."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources

import redis.asyncio as aioredis

from sidecar.state import keys
from sidecar.state.batching import ScriptBatcher

SETTLED_RETENTION_MS = 3_600_000  # how long "this hold is resolved" is remembered: far past any retry


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


@dataclass(frozen=True, slots=True)
class AdmitResult:
    outcome: Admission
    remaining: int = 0
    reset_ms: int = 0
    retry_after_ms: int = 0
    available_micro: int = 0
    now_us: int = 0  # Redis server time of the admission
    tokens_remaining: int = -1  # in the token window, when the key has a token limit
    limited_by: str = ""  # "requests" or "tokens", when rate limited
    replay_status: int = 0
    replay_content_type: str = ""
    replay_body: bytes = b""


@dataclass(frozen=True, slots=True)
class SettleResult:
    resolved_now: bool  # False: this hold was already resolved, nothing changed
    charged_micro: int = 0
    balance_after_micro: int | None = None
    hold_micro: int = 0
    hold_lost: bool = False


class NeedLoad(Exception):
    """The workspace's balance is not in Redis: load it from Postgres, then retry."""


@dataclass(frozen=True, slots=True)
class Account:
    balance_micro: int
    held_micro: int

    @property
    def available_micro(self) -> int:
        return self.balance_micro - self.held_micro


def _script_source(name: str) -> str:
    return (resources.files("sidecar.state") / "lua" / f"{name}.lua").read_text()


def _resolution_keys(ws: str, key_id: str, idempotency_key: str | None) -> list[str]:
    """The keys every script that resolves a hold touches (settle.lua, expire.lua), in their KEYS order."""
    return [
        keys.acct(ws),
        keys.holds(ws),
        keys.hold_deadlines(ws),
        keys.hold_meta(ws),
        keys.settled(ws),
        keys.stream(ws),
        keys.idempotency(ws, key_id, idempotency_key or ""),
    ]


def _int_or_none(value: bytes | str | int) -> int | None:
    return None if value in (b"", "") else int(value)


class State:
    """One instance per process; wraps a redis.asyncio client and the registered scripts.

    Scripts run by EVALSHA and are loaded again on NOSCRIPT (after a Redis restart). The two hot-path
    scripts (admit, settle) go through the batcher, which pipelines concurrent calls.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._batcher = ScriptBatcher(client)
        self._admit = client.register_script(_script_source("admit"))
        self._settle = client.register_script(_script_source("settle"))
        self._expire = client.register_script(_script_source("expire"))
        self._load = client.register_script(_script_source("load"))
        self._apply = client.register_script(_script_source("apply"))
        self._grow = client.register_script(_script_source("grow_hold"))
        self._all = (self._admit, self._settle, self._expire, self._load, self._apply, self._grow)

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
        max_unflushed: int,
        ceiling_tokens: int = 0,
        token_limit: int = 0,
    ) -> AdmitResult:
        assert ceiling_micro >= 0 and rate_limit > 0
        idem_key = keys.idempotency(ws, key_id, idempotency_key or "")
        reply = await self._batcher.run(
            self._admit,
            keys=[
                keys.acct(ws),
                keys.holds(ws),
                keys.hold_deadlines(ws),
                keys.hold_meta(ws),
                keys.rate(ws, key_id),
                idem_key,
                keys.stream(ws),
                keys.settled(ws),
                keys.tokens(ws, key_id),
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
                max_unflushed,
                ceiling_tokens,
                token_limit,
            ],
        )
        outcome = Admission(int(reply[0]))
        if outcome is Admission.ADMITTED:
            return AdmitResult(
                outcome,
                remaining=int(reply[1]),
                reset_ms=int(reply[2]),
                now_us=int(reply[6]),
                tokens_remaining=int(reply[7]),
            )
        if outcome is Admission.RATE_LIMITED:
            return AdmitResult(
                outcome, retry_after_ms=int(reply[1]), reset_ms=int(reply[2]), limited_by=reply[3].decode()
            )
        if outcome is Admission.INSUFFICIENT:
            return AdmitResult(outcome, available_micro=int(reply[1]), remaining=int(reply[2]), reset_ms=int(reply[3]))
        if outcome is Admission.DUPLICATE:
            return AdmitResult(
                outcome, replay_status=int(reply[1]), replay_content_type=reply[2].decode(), replay_body=reply[3]
            )
        return AdmitResult(outcome)

    async def settle(
        self,
        ws: str,
        key_id: str,
        hold_id: str,
        cost_micro: int,
        billed: bool,
        event: bytes,
        idempotency_key: str | None,
        keep_outcome: bool,
        status: int,
        content_type: str,
        body: bytes,
        idempotency_ttl_ms: int,
        tokens_used: int = 0,
    ) -> SettleResult:
        """Raises NeedLoad when Redis lost the workspace (restarted empty) during the call."""
        assert cost_micro >= 0
        idem_mode = ("keep" if keep_outcome else "drop") if idempotency_key else ""
        reply = await self._batcher.run(
            self._settle,
            keys=[*_resolution_keys(ws, key_id, idempotency_key), keys.tokens(ws, key_id)],
            args=[
                hold_id,
                cost_micro,
                "1" if billed else "0",
                event,
                idem_mode,
                status,
                content_type,
                body,
                idempotency_ttl_ms,
                SETTLED_RETENTION_MS,
                tokens_used,
            ],
        )
        if int(reply[0]) == 2:
            raise NeedLoad(ws)
        if int(reply[0]) == 1:
            return SettleResult(resolved_now=False)
        return SettleResult(
            resolved_now=True,
            charged_micro=int(reply[1]),
            balance_after_micro=_int_or_none(reply[2]),
            hold_micro=int(reply[3]),
            hold_lost=int(reply[4]) == 1,
        )

    async def due_holds(self, ws: str, batch_max: int) -> list[tuple[str, bytes]]:
        """Holds past their deadline (by Redis time), with their event templates."""
        seconds, micros = await self.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        ids = await self.redis.zrangebyscore(keys.hold_deadlines(ws), "-inf", now_ms, start=0, num=batch_max)
        if not ids:
            return []
        metas = await self.redis.hmget(keys.hold_meta(ws), ids)
        return [(i.decode(), m or b"{}") for i, m in zip(ids, metas, strict=True)]

    async def expire(self, ws: str, hold_id: str, status: str, key_id: str, idempotency_key: str | None) -> bool:
        """Void a hold that will never be settled and record its call (see expire.lua)."""
        assert status in ("expired", "failed")
        reply = await self._expire(
            keys=_resolution_keys(ws, key_id, idempotency_key),
            args=[hold_id, status, SETTLED_RETENTION_MS],
        )
        return int(reply) == 1

    async def load(
        self,
        ws: str,
        balance_micro: int,
        pg_version: int,
        run_id: str = "",
        replacing_gen: str = "",
        resolved_holds: Sequence[str] = (),
    ) -> bool:
        """Set the balance read from Postgres, with `held` rebuilt from the live holds (see load.lua).
        replacing_gen '': only if Redis has no balance (the first of concurrent loaders wins); else
        replace the load `replacing_gen` if it is still the live one (Redis restarted stale)."""
        reply = await self._load(
            keys=[
                keys.acct(ws),
                keys.applied(ws),
                keys.holds(ws),
                keys.hold_deadlines(ws),
                keys.hold_meta(ws),
                keys.settled(ws),
            ],
            args=[balance_micro, pg_version, secrets.token_hex(8), run_id, replacing_gen, *resolved_holds],
        )
        return int(reply) == 1

    async def apply(self, ws: str, pg_version: int, delta_micro: int, token: str) -> int:
        """1 applied, 0 already included, -1 not loaded."""
        return int(await self._apply(keys=[keys.acct(ws), keys.applied(ws)], args=[pg_version, delta_micro, token]))

    async def grow_hold(self, ws: str, hold_id: str, amount_micro: int) -> int:
        """1 raised, -1 already resolved, -2 need load, -3 insufficient (see grow_hold.lua)."""
        return int(await self._grow(keys=[keys.acct(ws), keys.holds(ws)], args=[hold_id, amount_micro]))

    async def account(self, ws: str) -> Account | None:
        balance, held = await self.redis.hmget(keys.acct(ws), "balance", "held")
        if balance is None:
            return None
        return Account(int(balance), int(held or 0))

    async def generation(self, ws: str) -> str | None:
        gen = await self.redis.hget(keys.acct(ws), "gen")
        return gen.decode() if gen is not None else None

    async def active_holds(self, ws: str) -> int:
        return int(await self.redis.hlen(keys.holds(ws)))
