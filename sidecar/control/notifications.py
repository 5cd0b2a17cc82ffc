"""Admin routes for notifications: a workspace's webhook endpoint (NOTIFICATIONS_MANAGE to change, READ
to see) and its delivery log (READ).

The endpoint's signing secret is in the answer that creates it (or rotates it) and never again.
"""

from __future__ import annotations

import secrets

import yarl
from aiohttp import web

from sidecar.control.http import (
    SERVICES,
    AdminError,
    credits_field,
    existing_workspace,
    json_response,
    query_limit,
    read_object,
)
from sidecar.money import AMOUNT_MICRO_MAX, format_micro
from sidecar.notify import endpoints, events
from sidecar.notify.events import DeliveryState, Enqueued, EventType
from sidecar.reload import store as reload_store

URL_CHARS_MAX = 2048
SUBSCRIBABLE = tuple(t.value for t in EventType if t is not EventType.PING)


def _url(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= URL_CHARS_MAX:
        raise AdminError(400, f"url must be an http(s) URL of at most {URL_CHARS_MAX} characters", "invalid_url")
    try:
        url = yarl.URL(value)
    except ValueError:
        raise AdminError(400, "url is not a valid URL", "invalid_url") from None
    if url.scheme not in ("http", "https") or not url.host or url.user or url.password or url.fragment:
        raise AdminError(400, "url must be an absolute http(s) URL, without credentials or fragment", "invalid_url")
    return value


def _events(value: object) -> list[str]:
    if value is None:
        return [*SUBSCRIBABLE, EventType.PING.value]
    if not isinstance(value, list) or not value or any(v not in SUBSCRIBABLE for v in value):
        raise AdminError(400, f"events must be a non-empty list of: {', '.join(SUBSCRIBABLE)}", "invalid_events")
    return sorted({*value, EventType.PING.value})


async def _watch_threshold(conn, ws: str) -> int | None:
    return await conn.fetchval(
        "SELECT threshold_micro FROM balance_watches WHERE workspace_id = $1 AND kind = 'notify'", ws
    )


def _view(endpoint: endpoints.Endpoint, threshold_micro: int | None) -> dict:
    return {
        **endpoint.view(),
        "low_balance_threshold_micro": threshold_micro,
        "low_balance_threshold": format_micro(threshold_micro) if threshold_micro is not None else None,
    }


async def put_endpoint(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    ws = await existing_workspace(request)
    payload = await read_object(request)
    url = _url(payload.get("url"))
    subscribed = _events(payload.get("events"))
    threshold = credits_field(payload, "low_balance_threshold", AMOUNT_MICRO_MAX)
    rotate = payload.get("rotate_secret", False)
    if not isinstance(rotate, bool):
        raise AdminError(400, "rotate_secret must be true or false", "invalid_rotate_secret")
    if svc.vault is None:
        raise AdminError(
            409, "no key-encryption key is configured (SIDECAR_KEK) to seal the signing secret", "vault_unavailable"
        )
    async with svc.pool.acquire() as conn, conn.transaction():
        endpoint, secret = await endpoints.upsert(conn, svc.vault, ws, url, subscribed, rotate)
        await reload_store.set_watch(conn, ws, "notify", threshold)
    if svc.watch is not None:
        svc.watch.forget(ws)
    body = _view(endpoint, threshold)
    if secret is not None:
        body["secret"] = secret  # the only time it is shown
    return json_response(body, 201 if secret is not None else 200)


async def get_endpoint(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    async with request.app[SERVICES].pool.acquire() as conn:
        endpoint = await endpoints.get(conn, ws)
        threshold = await _watch_threshold(conn, ws)
    if endpoint is None:
        raise AdminError(404, "this workspace has no notification endpoint", "endpoint_not_found")
    return json_response(_view(endpoint, threshold))


async def delete_endpoint(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    ws = await existing_workspace(request)
    async with svc.pool.acquire() as conn, conn.transaction():
        if not await endpoints.delete(conn, ws):
            raise AdminError(404, "this workspace has no notification endpoint", "endpoint_not_found")
        await reload_store.set_watch(conn, ws, "notify", None)
        dropped = await events.drop_pending(conn, ws, "the endpoint was removed")
    if svc.watch is not None:
        svc.watch.forget(ws)
    return json_response({"workspace_id": ws, "deleted": True, "pending_dropped": dropped})


async def send_test(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    ws = await existing_workspace(request)
    async with svc.pool.acquire() as conn:
        outcome = await events.enqueue(
            conn,
            ws,
            EventType.PING,
            f"ping:{secrets.token_hex(8)}",
            {"message": "a test event"},
            svc.config.notifications.pending_deliveries_per_workspace_max,
        )
    if outcome is Enqueued.NO_ENDPOINT:
        raise AdminError(404, "this workspace has no notification endpoint", "endpoint_not_found")
    if outcome is Enqueued.QUEUE_FULL:
        raise AdminError(409, "too many undelivered events for this workspace", "notification_queue_full")
    return json_response({"workspace_id": ws, "queued": True}, 202)


async def list_deliveries(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    state = request.query.get("state")
    if state is not None and state not in {s.value for s in DeliveryState}:
        raise AdminError(400, "state must be pending, delivered or failed", "invalid_state")
    limit = query_limit(request, 50, events.LIST_ROWS_MAX)
    async with request.app[SERVICES].pool.acquire() as conn:
        data = await events.list_deliveries(conn, ws, limit, state)
    return json_response({"data": data})


ROUTES = (
    ("PUT", "/{ws}/notifications/endpoint", put_endpoint, "NOTIFICATIONS_MANAGE"),
    ("GET", "/{ws}/notifications/endpoint", get_endpoint, "READ"),
    ("DELETE", "/{ws}/notifications/endpoint", delete_endpoint, "NOTIFICATIONS_MANAGE"),
    ("POST", "/{ws}/notifications/test", send_test, "NOTIFICATIONS_MANAGE"),
    ("GET", "/{ws}/notifications/deliveries", list_deliveries, "READ"),
)
