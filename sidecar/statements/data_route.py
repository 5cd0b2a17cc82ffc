"""`POST /v1/credits/projections/usage-summary` on the data plane (reference 004): an agent reads its
own workspace's usage with its client key. 30-day totals, the per-product breakdown, BYOK apart and a
7-day daily series, from the daily roll-ups (statements/summary.py); errors in the OpenAI envelope.

The body may be empty or `{}`: the key says which workspace, the days are fixed. A process answers at
most SUMMARIES_CONCURRENT_MAX summaries at once; past that, 429 with Retry-After, so a client looping
on this route cannot take the pool's connections from the calls being metered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson
from aiohttp import web

from sidecar.db import POSTGRES_OUTAGE
from sidecar.protocols import ALL as PROTOCOLS
from sidecar.protocols.errors import SidecarError
from sidecar.proxy.handler import SERVICES, authenticate
from sidecar.statements.filters import Period
from sidecar.statements.summary import usage_summary

PATH = "/v1/credits/projections/usage-summary"
TOTAL_DAYS = 30
SERIES_DAYS = 7
SUMMARIES_CONCURRENT_MAX = 4  # of the pool's connections, the rest stay for auth and the flusher
_BUSY = web.AppKey("usage_summaries_running", asyncio.Semaphore)


def periods(today: datetime) -> tuple[Period, Period]:
    last = today.astimezone(UTC).date()
    return Period(last - timedelta(days=TOTAL_DAYS - 1), last), Period(last - timedelta(days=SERIES_DAYS - 1), last)


def _check_body(body: bytes) -> None:
    if not body.strip():
        return
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise SidecarError("invalid_request", "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise SidecarError("invalid_request", "the request body must be a JSON object", code="invalid_json")
    if payload:
        raise SidecarError(
            "invalid_request",
            f"unknown field(s): {', '.join(sorted(payload))}; the summary takes none (send {{}})",
            code="unknown_parameter",
        )


async def _answer(request: web.Request) -> dict:
    svc = request.app[SERVICES]
    caller = await authenticate(svc, PROTOCOLS[0].client_key(request.headers))
    _check_body(await request.read())
    busy = request.app[_BUSY]
    if busy.locked():
        raise SidecarError(
            "rate_limited", "too many usage summaries at once; retry shortly", headers={"Retry-After": "1"}
        )
    total, series = periods(datetime.now(UTC))
    started = time.perf_counter()
    async with busy:
        try:
            async with svc.pool.acquire() as conn:
                return await usage_summary(conn, caller.workspace_id, total, series)
        except POSTGRES_OUTAGE:
            raise SidecarError("unavailable", "the usage store is unavailable; retry shortly") from None
        finally:
            svc.metrics.read_seconds.labels("summary").observe(time.perf_counter() - started)


async def handle(request: web.Request) -> web.Response:
    headers = {"x-request-id": uuid.uuid4().hex}
    try:
        body = await _answer(request)
    except SidecarError as error:
        return web.Response(
            status=error.status,
            body=PROTOCOLS[0].error_body(error),
            content_type="application/json",
            headers={**error.headers, **headers},
        )
    return web.Response(body=orjson.dumps(body), content_type="application/json", headers=headers)


def add_route(app: web.Application) -> None:
    app[_BUSY] = asyncio.Semaphore(SUMMARIES_CONCURRENT_MAX)
    app.router.add_post(PATH, handle)
