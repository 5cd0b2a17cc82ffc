"""The admin API under /admin/v1: workspaces, offices, API keys, credit grants, balances, and
(in control/byok.py) customers' own provider keys.

Every route needs `Authorization: Bearer <admin token>` holding the route's permission. Tokens are
configured as SHA-256 digests (`admin_tokens`), plus SIDECAR_ADMIN_TOKEN with every permission. A
created API key is returned once and never again; lists show its last 4 characters only.

A token may be limited to one workspace (`admin_tokens[].workspace`); each route below declares where
its workspace comes from and control/access.py refuses a scoped token anything else (README, "Admin API").

Each route is a thin handler over a function taking the services and plain values: the console
(control/console/) calls the same functions, so there is one copy of each rule.
"""

from __future__ import annotations

import secrets

from aiohttp import web

from sidecar import db
from sidecar.auth import hash_key, new_key
from sidecar.control import wallet as wallet_api
from sidecar.control.access import ANY_PERMISSION, IN_PATH, PLATFORM, SELF, Route
from sidecar.control.http import (
    INT32_MAX,
    PRINCIPAL,
    SERVICES,
    AdminError,
    bounded_int,
    credits_field,
    existing_workspace,
    json_response,
    read_object,
    valid_id,
    valid_name,
)
from sidecar.money import AMOUNT_MICRO_MAX, format_micro
from sidecar.movements import CREDIT_KINDS
from sidecar.services import Services

GRANT_MICRO_MAX = AMOUNT_MICRO_MAX  # a typo guard, far above any real grant; keeps Redis arithmetic exact


async def create_workspace(request: web.Request) -> web.Response:
    payload = await read_object(request)
    ws = valid_id(payload.get("id") or f"ws_{secrets.token_hex(6)}", "id")
    name = valid_name(payload.get("name"), ws)
    svc = request.app[SERVICES]
    async with svc.pool.acquire() as conn:
        created = await db.create_workspace(conn, ws, name)
    await svc.balances.grant_initial_allowance(ws)  # once per workspace (config wallet.allowance_on: created)
    return json_response({"id": ws, "name": name, "created": created}, 201 if created else 200)


async def create_office(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    payload = await read_object(request)
    office = valid_id(payload.get("id") or f"of_{secrets.token_hex(6)}", "id")
    async with request.app[SERVICES].pool.acquire() as conn:
        owner = await db.office_workspace(conn, office)
        if owner is not None and owner != ws:
            raise AdminError(409, f"office {office!r} belongs to another workspace", "office_conflict")
        created = await db.create_office(conn, office, ws, valid_name(payload.get("name"), office))
    return json_response({"id": office, "workspace_id": ws, "created": created}, 201 if created else 200)


def _key_view(record: db.ApiKeyRecord) -> dict:
    return {
        "id": record.id,
        "workspace_id": record.workspace_id,
        "office_id": record.office_id,
        "name": record.name,
        "last4": record.last4,
        "rate_limit_rpm": record.rate_limit_rpm,
        "tokens_per_minute": record.tokens_per_minute,
        "created_at": record.created_at.isoformat() if record.created_at else None,
        "revoked_at": record.revoked_at.isoformat() if record.revoked_at else None,
    }


# --- the functions the routes and the console share -------------------------------------------------


async def workspaces_list(svc: Services) -> list[dict]:
    async with svc.pool.acquire() as conn:
        rows = await db.list_workspaces(conn)
    return [{"id": r.id, "name": r.name, "created_at": r.created_at.isoformat()} for r in rows]


async def workspace_view(svc: Services, ws: str) -> dict:
    async with svc.pool.acquire() as conn:
        found = await db.get_workspace(conn, ws)
    if found is None:
        raise AdminError(404, f"workspace {ws!r} does not exist", "workspace_not_found")
    return {"id": found.id, "name": found.name, "created_at": found.created_at.isoformat()}


async def key_create(svc: Services, ws: str, payload: dict) -> dict:
    """A new API key of `ws`: its view plus the key itself, which is never shown again."""
    rpm = bounded_int(
        payload.get("rate_limit_rpm", svc.config.auth.rpm_default), "rate_limit_rpm", 1, 1_000_000, "invalid_rate_limit"
    )
    tpm = payload.get("tokens_per_minute")
    if tpm is not None:  # an `integer` column
        tpm = bounded_int(tpm, "tokens_per_minute (or null)", 1, INT32_MAX, "invalid_rate_limit")
    name = valid_name(payload.get("name"), "default")
    office = payload.get("office_id")
    async with svc.pool.acquire() as conn:
        if office is not None and await db.office_workspace(conn, valid_id(office, "office_id")) != ws:
            raise AdminError(404, f"office {office!r} does not exist in this workspace", "office_not_found")
        raw = new_key()
        record = db.ApiKeyRecord(
            id=f"key_{secrets.token_hex(8)}",
            workspace_id=ws,
            office_id=office,
            name=name,
            key_hash=hash_key(raw),
            last4=raw[-4:],
            rate_limit_rpm=rpm,
            created_at=None,
            revoked_at=None,
            tokens_per_minute=tpm,
        )
        await db.insert_api_key(conn, record)
    return {**_key_view(record), "key": raw}


async def keys_list(svc: Services, ws: str) -> list[dict]:
    """The workspace's keys (last 4 characters only), each with its budget."""
    async with svc.pool.acquire() as conn:
        records = await db.list_api_keys(conn, ws)
    return [{**_key_view(r), **await wallet_api.key_budget_view(svc, r)} for r in records]


async def key_revoke(svc: Services, ws: str, key_id: str) -> dict:
    async with svc.pool.acquire() as conn:
        record = await db.revoke_api_key(conn, ws, valid_id(key_id, "key id"))
    if record is None:
        raise AdminError(404, "no such key in this workspace", "key_not_found")
    return _key_view(record)


async def grant_credits(svc: Services, ws: str, payload: dict) -> dict:
    grant_id = valid_id(payload.get("grant_id"), "grant_id")
    kind = payload.get("kind", "grant")
    if kind not in CREDIT_KINDS:
        raise AdminError(400, "kind must be 'grant', 'topup' or 'allowance'", "invalid_kind")
    amount = credits_field(payload, "amount", GRANT_MICRO_MAX, required=True)
    try:
        result = await svc.balances.credit(ws, grant_id, kind, amount)
    except db.GrantConflict:
        raise AdminError(
            409, "this grant_id was already used with a different amount or kind", "grant_conflict"
        ) from None
    except db.BalanceLimitExceeded as exc:
        raise AdminError(409, str(exc), "balance_limit") from None
    except db.ExpiryPending as exc:
        raise AdminError(409, str(exc), "expiry_pending") from None
    return {
        "grant_id": grant_id,
        "event_id": str(result.event_id),
        "kind": kind,
        "amount_micro": amount,
        "amount": format_micro(amount),
        "created": result.created,
    }


async def balance_view(svc: Services, ws: str) -> dict:
    await svc.balances.ensure_loaded(ws)
    account = await svc.state.account(ws)
    async with svc.pool.acquire() as conn:
        settled_micro, _ = await db.account_snapshot(conn, ws)
    return {
        "workspace_id": ws,
        "balance_micro": account.balance_micro,
        "held_micro": account.held_micro,
        "available_micro": account.available_micro,
        "balance": format_micro(account.balance_micro),
        "held": format_micro(account.held_micro),
        "available": format_micro(account.available_micro),
        "ledger_balance_micro": settled_micro,  # what Postgres has flushed so far
    }


# --- the routes ---------------------------------------------------------------------------------------


async def list_workspaces(request: web.Request) -> web.Response:
    return json_response({"data": await workspaces_list(request.app[SERVICES])})


async def get_workspace(request: web.Request) -> web.Response:
    ws = valid_id(request.match_info["ws"], "workspace id")
    return json_response(await workspace_view(request.app[SERVICES], ws))


async def whoami(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    return json_response(
        {"name": principal.name, "permissions": sorted(principal.permissions), "workspace": principal.workspace}
    )


async def create_key(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    return json_response(await key_create(request.app[SERVICES], ws, await read_object(request)), 201)


async def list_keys(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    return json_response({"data": await keys_list(request.app[SERVICES], ws)})


async def revoke_key(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    return json_response(await key_revoke(request.app[SERVICES], ws, request.match_info["key_id"]))


async def grant(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    body = await grant_credits(request.app[SERVICES], ws, await read_object(request))
    return json_response(body, 201 if body["created"] else 200)


async def balance(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    return json_response(await balance_view(svc, await existing_workspace(request)))


PREFIX = "/admin/v1/workspaces"
ROUTES = (
    Route("POST", "", create_workspace, "WORKSPACES_MANAGE", PLATFORM),
    Route("GET", "", list_workspaces, "READ", PLATFORM),
    Route("GET", "/{ws}", get_workspace, "READ", IN_PATH),
    Route("POST", "/{ws}/offices", create_office, "WORKSPACES_MANAGE", IN_PATH),
    Route("POST", "/{ws}/keys", create_key, "KEYS_MANAGE", IN_PATH),
    Route("GET", "/{ws}/keys", list_keys, "READ", IN_PATH),
    Route("POST", "/{ws}/keys/{key_id}/revoke", revoke_key, "KEYS_MANAGE", IN_PATH),
    Route("DELETE", "/{ws}/keys/{key_id}", revoke_key, "KEYS_MANAGE", IN_PATH),
    Route("POST", "/{ws}/grants", grant, "CREDITS_MANAGE", IN_PATH),
    Route("GET", "/{ws}/balance", balance, "READ", IN_PATH),
)
# Routes about the caller, not a workspace.
SELF_PREFIX = "/admin/v1"
SELF_ROUTES = (Route("GET", "/whoami", whoami, ANY_PERMISSION, SELF),)
