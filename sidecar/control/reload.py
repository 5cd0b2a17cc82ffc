"""Admin routes for auto-reload: its settings (CREDITS_MANAGE to change, READ to see) and its reloads.

A reload charges the customer's saved payment method, so turning it on needs a saved method and a
payment provider; a reload amount below the threshold is refused (one reload must lift a balance that
crossed the threshold back over it).
"""

from __future__ import annotations

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
from sidecar.money import AMOUNT_MICRO_MAX
from sidecar.reload import store
from sidecar.reload.gateway import SavedMethod
from sidecar.services import Services

PROVIDER_ID_CHARS_MAX = 255
RECENT_RELOADS = 10


def _provider_id(payload: dict, name: str) -> str | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= PROVIDER_ID_CHARS_MAX or not value.isprintable():
        raise AdminError(
            400, f"{name} must be a non-empty string of at most {PROVIDER_ID_CHARS_MAX} characters", "invalid_id"
        )
    return value


async def settings_view(svc: Services, ws: str) -> dict:
    """The settings and the recent reloads (the admin API and the console)."""
    async with svc.pool.acquire() as conn:
        settings = await store.get_settings(conn, ws)
        reloads = await store.list_reloads(conn, ws, RECENT_RELOADS)
    in_flight = next((r.view() for r in reloads if r.state in ("pending", "processing")), None)
    body = settings.view() if settings else {"workspace_id": ws, "enabled": False, "configured": False}
    return {**body, "in_flight": in_flight, "recent_reloads": [r.view() for r in reloads]}


async def get_settings(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    return json_response(await settings_view(request.app[SERVICES], ws))


async def settings_put(svc: Services, ws: str, payload: dict) -> dict:
    """Checks and saves the settings (the admin API and the console); the view after."""
    enabled = payload.get("enabled", True)
    if not isinstance(enabled, bool):
        raise AdminError(400, "enabled must be true or false", "invalid_enabled")
    threshold = credits_field(payload, "threshold", AMOUNT_MICRO_MAX)
    amount = credits_field(payload, "amount", AMOUNT_MICRO_MAX)
    if threshold is None or amount is None:
        raise AdminError(400, "threshold and amount are required (credits, decimal strings)", "invalid_amount")
    if amount < threshold:
        raise AdminError(400, "amount must be at least the threshold", "invalid_amount")
    method_id = _provider_id(payload, "payment_method_id")
    method = SavedMethod(_provider_id(payload, "customer_id"), method_id) if method_id else None
    async with svc.pool.acquire() as conn:
        prior = await store.get_settings(conn, ws)
    gateway = svc.reloads.gateway if svc.reloads is not None else None
    if enabled and gateway is None:
        raise AdminError(409, "no payment provider is configured for auto-reload", "no_payment_provider")
    if enabled and method is None and (prior is None or prior.method is None):
        # A checkout paid earlier saved a method: auto-reload charges the latest one, read at each reload.
        if await gateway.saved_method(ws) is None:
            raise AdminError(
                409, "no saved payment method: pay a checkout first, or give payment_method_id", "no_payment_method"
            )
    async with svc.pool.acquire() as conn:
        await store.put_settings(conn, ws, enabled, threshold, amount, method)
    if svc.watch is not None:
        svc.watch.forget(ws)
    return await settings_view(svc, ws)


async def put_settings(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    payload = await read_object(request)
    return json_response(await settings_put(request.app[SERVICES], ws, payload))


async def disable(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    ws = await existing_workspace(request)
    async with svc.pool.acquire() as conn:
        prior = await store.get_settings(conn, ws)
        if prior is None:
            raise AdminError(404, "auto-reload is not configured for this workspace", "auto_reload_not_configured")
        await store.put_settings(conn, ws, False, prior.threshold_micro, prior.amount_micro, None)
    if svc.watch is not None:
        svc.watch.forget(ws)
    return json_response(await settings_view(svc, ws))


async def list_reloads(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    limit = query_limit(request, 50, store.LIST_ROWS_MAX)
    async with request.app[SERVICES].pool.acquire() as conn:
        reloads = await store.list_reloads(conn, ws, limit)
    return json_response({"data": [r.view() for r in reloads]})


ROUTES = (
    ("GET", "/{ws}/auto-reload", get_settings, "READ"),
    ("PUT", "/{ws}/auto-reload", put_settings, "CREDITS_MANAGE"),
    ("DELETE", "/{ws}/auto-reload", disable, "CREDITS_MANAGE"),
    ("GET", "/{ws}/auto-reload/reloads", list_reloads, "READ"),
)
