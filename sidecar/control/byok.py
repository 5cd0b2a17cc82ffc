"""Admin API for customers' own provider keys (BYOK), workspace-wide or per office. Only a token
holding TENANT_MANAGE may call these. A key is validated with its provider before it is stored,
stored sealed, and never shown again: lists carry its last 4 characters only."""

from __future__ import annotations

from aiohttp import web

from sidecar import db
from sidecar.byok import keys as byok_keys
from sidecar.byok.validate import KeyRejected, ValidationUnavailable, validate
from sidecar.byok.vault import binding
from sidecar.control.access import IN_PATH, Route
from sidecar.control.http import SERVICES, AdminError, existing_workspace, json_response, read_object, valid_id
from sidecar.services import Services

KEY_CHARS_MAX = 512


async def _office_of(svc: Services, ws: str, office: str | None) -> str | None:
    """`office`, checked to be an office of `ws` (None: the workspace itself)."""
    if office is not None:
        valid_id(office, "office id")
        async with svc.pool.acquire() as conn:
            if await db.office_workspace(conn, office) != ws:
                raise AdminError(404, f"office {office!r} does not exist in this workspace", "office_not_found")
    return office


# --- the functions the routes and the console share -------------------------------------------------


async def key_add(svc: Services, ws: str, office: str | None, payload: dict) -> dict:
    """Validates the key with its provider, seals and stores it; its view (last 4 characters only)."""
    office = await _office_of(svc, ws, office)
    provider_name = payload.get("provider")
    provider = svc.config.providers.get(provider_name) if isinstance(provider_name, str) else None
    if provider is None:
        known = ", ".join(sorted(svc.config.providers))
        raise AdminError(400, f"provider must be one of: {known}", "invalid_provider")
    key = payload.get("key")
    key = key.strip() if isinstance(key, str) else ""
    # `"` and `\` are refused: JSON spells them `\"` and `\\`, which the scrubber (sidecar/scrub.py)
    # does not match, so a provider quoting such a key in a JSON body would hand it to the client.
    # No provider issues keys with either.
    if not 8 <= len(key) <= KEY_CHARS_MAX or not key.isprintable() or '"' in key or "\\" in key:
        raise AdminError(
            400,
            f"key must be the provider's API key (8 to {KEY_CHARS_MAX} printable characters, no quotes or backslashes)",
            "invalid_key",
        )
    if svc.vault is None:
        raise AdminError(503, "no key-encryption key is configured (SIDECAR_KEK or SIDECAR_KEK_FILE)", "no_kek")
    try:
        await validate(svc.upstreams.session(provider.name), provider, key, svc.config.byok.validate_timeout_ms)
    except KeyRejected as exc:
        raise AdminError(400, str(exc), "key_rejected") from None
    except ValidationUnavailable as exc:
        raise AdminError(502, str(exc), "validation_unavailable") from None
    sealed = svc.vault.seal(key, binding(ws, office, provider.name))
    async with svc.pool.acquire() as conn:
        stored = await byok_keys.insert(conn, ws, office, provider.name, sealed, key[-4:])
    svc.byok.forget(ws)
    return stored.view()


async def keys_list(svc: Services, ws: str, office: str | None) -> list[dict]:
    office = await _office_of(svc, ws, office)
    async with svc.pool.acquire() as conn:
        stored = await byok_keys.list_keys(conn, ws, office)
    return [k.view() for k in stored]


async def key_set_status(svc: Services, ws: str, office: str | None, key_id: str, status: str) -> dict:
    office = await _office_of(svc, ws, office)
    async with svc.pool.acquire() as conn:
        stored = await byok_keys.set_status(conn, ws, office, valid_id(key_id, "key id"), status)
    if stored is None:
        raise AdminError(404, "no such BYOK key in this scope", "byok_key_not_found")
    svc.byok.forget(ws)
    return stored.view()


# --- the routes ---------------------------------------------------------------------------------------


async def add_key(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    payload = await read_object(request)
    return json_response(await key_add(request.app[SERVICES], ws, request.match_info.get("office"), payload), 201)


async def list_keys(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    return json_response({"data": await keys_list(request.app[SERVICES], ws, request.match_info.get("office"))})


async def _set_status(request: web.Request, status: str) -> web.Response:
    ws = await existing_workspace(request)
    office, key_id = request.match_info.get("office"), request.match_info["key_id"]
    return json_response(await key_set_status(request.app[SERVICES], ws, office, key_id, status))


async def deactivate(request: web.Request) -> web.Response:
    return await _set_status(request, "inactive")


async def reactivate(request: web.Request) -> web.Response:
    return await _set_status(request, "active")


ROUTES = tuple(
    Route(method, scope + path, handler, "TENANT_MANAGE", IN_PATH)
    for scope in ("/{ws}/byok-keys", "/{ws}/offices/{office}/byok-keys")
    for method, path, handler in (
        ("POST", "", add_key),
        ("GET", "", list_keys),
        ("POST", "/{key_id}/deactivate", deactivate),
        ("POST", "/{key_id}/reactivate", reactivate),
    )
)
