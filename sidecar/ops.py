"""The ops port: /healthz (the process is up), /readyz (its dependencies are), /metrics."""

from __future__ import annotations

import asyncio
import logging

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from sidecar.observability.metrics import Metrics, RedisCheck
from sidecar.services import Services
from sidecar.state import servers

log = logging.getLogger("sidecar.ops")

SERVICES = web.AppKey("ops_services", Services)
_CHECK_TIMEOUT_S = 2.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    checks: dict[str, str] = {}
    warnings: list[str] = []
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S):
            await svc.state.redis.ping()
            checks["redis"] = "ok"
            checks["scripts"] = "ok" if await svc.state.scripts_loaded() else "not loaded"
            if checks["scripts"] != "ok":
                await svc.state.load_scripts()
            policy, aof = await check_redis_safety(svc.state.redis, svc.metrics)
            problem = eviction_problem(policy)
            if policy is None:
                warnings.append(problem)
            else:
                checks["redis_eviction"] = problem or "ok"
            if aof is None:
                warnings.append("could not read redis aof_enabled (INFO persistence refused); production needs AOF")
            elif not aof:
                warnings.append("redis appendonly is off; production needs AOF so settled events survive a restart")
    except Exception as exc:  # any failure means not ready; the type says which
        checks.setdefault("redis", f"error: {type(exc).__name__}")
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S), svc.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"error: {type(exc).__name__}"
    if svc.draining:
        checks["draining"] = "yes"
    ready = all(v == "ok" for k, v in checks.items() if k != "draining") and not svc.draining
    body = {"ready": ready, "checks": checks, "warnings": warnings}
    return web.Response(status=200 if ready else 503, body=orjson.dumps(body), content_type="application/json")


async def eviction_policy(redis: servers.Client) -> str | None:
    """Redis's maxmemory-policy: from CONFIG GET, or, where a managed Redis disables CONFIG, from
    INFO memory. None when neither answers. In a cluster, every primary's: the first that is not
    noeviction, else None if one would not say."""
    policies = await servers.on_each_primary(redis, _eviction_policy_of)
    unsafe = [p for p in policies if p is not None and p != "noeviction"]
    if unsafe:
        return unsafe[0]
    return None if None in policies else "noeviction"


async def _eviction_policy_of(redis: servers.Client, **routing) -> str | None:
    try:
        reply = await redis.config_get("maxmemory-policy", **routing)
        for key, value in reply.items():
            if _text(key) == "maxmemory-policy":
                return _text(value)
    except RedisError:
        pass
    try:
        policy = (await redis.info("memory", **routing)).get("maxmemory_policy")
    except RedisError:
        return None
    return _text(policy) if policy is not None else None


async def aof_enabled(redis: servers.Client) -> bool | None:
    """Whether Redis writes an append-only file, from INFO persistence (allowed where CONFIG is not).
    None when Redis will not say. In a cluster: False if any primary has it off."""
    found = await servers.on_each_primary(redis, _aof_enabled_of)
    if False in found:
        return False
    return None if None in found else True


async def _aof_enabled_of(redis: servers.Client, **routing) -> bool | None:
    try:
        value = (await redis.info("persistence", **routing)).get("aof_enabled")
    except RedisError:
        return None
    return None if value is None else int(value) == 1


async def check_redis_safety(redis: servers.Client, metrics: Metrics) -> tuple[str | None, bool | None]:
    """Read the eviction policy and AOF state, and export both as gauges (the alerts read them)."""
    policy = await eviction_policy(redis)
    aof = await aof_enabled(redis)
    metrics.redis_noeviction.set(_check(None if policy is None else policy == "noeviction"))
    metrics.redis_aof_enabled.set(_check(aof))
    return policy, aof


def _check(value: bool | None) -> RedisCheck:
    if value is None:
        return RedisCheck.UNKNOWN
    return RedisCheck.ON if value else RedisCheck.OFF


def eviction_problem(policy: str | None) -> str | None:
    """Why this policy cannot serve money, or None. Any eviction loses state: an evicted idempotency
    record bills a retried call twice; an evicted account is reloaded while its holds survive."""
    if policy is None:
        return "could not read redis maxmemory-policy (CONFIG and INFO refused); production needs noeviction"
    if policy == "noeviction":
        return None
    return (
        f"redis maxmemory-policy is {policy!r}: keys can be evicted, which loses idempotency records and "
        "balances; set maxmemory-policy noeviction"
    )


async def warn_if_evicting(redis: servers.Client) -> None:
    """At start: say it in the log too, not only on /readyz."""
    try:
        problem = eviction_problem(await eviction_policy(redis))
    except (RedisError, OSError):
        return  # Redis is not reachable yet: /readyz reports it
    if problem:
        log.warning("redis is not safe for metering: %s", problem)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def metrics(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S):
            svc.metrics.ledger_lag.set(await svc.flusher.backlog())
            await check_redis_safety(svc.state.redis, svc.metrics)
    except Exception:  # the gauges keep their last values when Redis is away
        pass
    body = generate_latest(svc.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_ops_app(svc: Services) -> web.Application:
    app = web.Application()
    app[SERVICES] = svc
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
