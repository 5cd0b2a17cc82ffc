"""The ops port: /healthz (the process is up), /readyz (its dependencies are), /metrics."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.services import Services

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
            policy = await _redis_setting(svc, "maxmemory-policy")
            if policy != "noeviction":
                warnings.append(f"redis maxmemory-policy is {policy!r}; production needs noeviction")
            if await _redis_setting(svc, "appendonly") != "yes":
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


async def _redis_setting(svc: Services, name: str) -> str:
    try:
        reply = await svc.state.redis.config_get(name)
    except Exception:  # managed Redis services often refuse CONFIG: nothing to report then
        return "unknown"
    for key, value in reply.items():
        if (key.decode() if isinstance(key, bytes) else key) == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return "unknown"


async def metrics(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    try:
        svc.metrics.ledger_lag.set(await asyncio.wait_for(svc.flusher.backlog(), _CHECK_TIMEOUT_S))
    except Exception:  # the gauge keeps its last value when Redis is away
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
