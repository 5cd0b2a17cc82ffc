"""Workspace-scoped access (issue 11.1), route by route.

The tests walk the control plane's router: every route must declare its permission and where its
workspace comes from, and a token (or console session) limited to one workspace is refused every
other workspace on every route, changing nothing there. A route added without a declaration fails
here, by name."""

from __future__ import annotations

import re
import secrets

import pytest
from aiohttp import web
from support.console import ConsoleClient, anonymous, signed_in
from support.harness import (
    ADMIN_TOKEN,
    KEYS_ADMIN_TOKEN,
    SCOPED_ADMIN_TOKEN,
    SCOPED_READER_TOKEN,
    SCOPED_WORKSPACE,
    Sidecar,
)

from sidecar.control import access, server
from sidecar.control.http import ROUTE_TABLE, AdminError

# Routes that need no principal at all, and routes that concern only the caller: each listed by hand,
# so a new one is a decision someone wrote down.
PUBLIC_ROUTES = {
    ("GET", "/console"),
    ("GET", "/console/login"),
    ("POST", "/console/login"),
    ("GET", "/console/static/{name}"),
    ("POST", "/webhooks/stripe"),  # proves itself by the Stripe-Signature header (tests/test_payments.py)
}
SELF_ROUTES = {("GET", "/admin/v1/whoami"), ("POST", "/console/logout")}
# How to aim a body- or lookup-scoped route at another workspace: (method, path) -> fills (path values,
# body). None such yet; a new one without an entry here fails test_every_route_is_walked.
AIMED_ELSEWHERE: dict[tuple[str, str], object] = {}

OTHER_OFFICE = "of_other"


def route_table(sidecar: Sidecar) -> dict:
    return sidecar.control.app[ROUTE_TABLE]


def test_every_route_declares_its_permission_and_workspace_scope(sidecar: Sidecar) -> None:
    table = route_table(sidecar)
    for resource in sidecar.control.app.router.resources():
        for route in resource:
            key = (route.method, resource.canonical)
            assert key in table, f"{key} is routed but declares no permission or scope"
            declared, _ = table[key]
            assert declared.scope is not None, f"{key} declares no workspace scope"
            kind = declared.scope.kind
            if kind is access.Kind.PUBLIC:
                assert key in PUBLIC_ROUTES, f"{key} is public: list it in PUBLIC_ROUTES if it must be"
            if kind is access.Kind.SELF:
                assert key in SELF_ROUTES, f"{key} concerns only the caller: list it in SELF_ROUTES if so"
            if kind is access.Kind.PATH:
                assert "{" + declared.scope.field + "}" in key[1], f"{key} scopes by a path segment it lacks"
            if kind in (access.Kind.BODY, access.Kind.LOOKUP):
                assert key in AIMED_ELSEWHERE, f"{key}: say in AIMED_ELSEWHERE how to aim it at another workspace"


async def test_a_route_without_a_declared_scope_is_refused_to_everyone() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="reached")

    legacy = access.as_route(("GET", "/x", handler, "READ"), "/admin/v1")
    assert legacy.scope is None and legacy.path == "/admin/v1/x"
    everyone = access.Principal("root", frozenset({"READ"}), None, b"")
    with pytest.raises(AdminError, match="declares no permission or workspace scope"):
        await access.check(everyone, legacy, None)


async def test_a_route_added_around_the_tables_is_refused(sidecar: Sidecar) -> None:
    app = server.build_control_app(sidecar.svc)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="reached")

    app.router.add_get("/admin/v1/sneaky", handler)
    from aiohttp.test_utils import TestClient, TestServer

    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/admin/v1/sneaky", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert resp.status == 403 and "reached" not in await resp.text()


# --- the admin API -----------------------------------------------------------------------------------


async def _two_workspaces(sidecar: Sidecar) -> str:
    """The scoped tokens' workspace and another one, each with a key, credits, an office, a BYOK key."""
    other = f"ws_other_{secrets.token_hex(4)}"
    for ws in (SCOPED_WORKSPACE, other):
        status, _ = await sidecar.admin("POST", "/workspaces", {"id": ws, "name": ws})
        assert status in (200, 201)
    await sidecar.admin("POST", f"/workspaces/{other}/offices", {"id": f"{OTHER_OFFICE}_{other}"})
    await sidecar.admin("POST", f"/workspaces/{other}/keys", {"name": "theirs"})
    await sidecar.grant(other, 5_000_000)
    status, _ = await sidecar.admin(
        "POST", f"/workspaces/{other}/byok-keys", {"provider": "mock", "key": "sk-theirs-1234"}
    )
    assert status == 201
    return other


async def _state_of(sidecar: Sidecar, ws: str) -> tuple:
    """Everything a refused call could have changed in `ws`, read with the platform token."""
    _, keys = await sidecar.admin("GET", f"/workspaces/{ws}/keys")
    _, balance = await sidecar.admin("GET", f"/workspaces/{ws}/balance")
    _, byok = await sidecar.admin("GET", f"/workspaces/{ws}/byok-keys")
    _, listed = await sidecar.admin("GET", "/workspaces")
    async with sidecar.svc.pool.acquire() as conn:
        offices = await conn.fetchval("SELECT count(*) FROM offices WHERE workspace_id = $1", ws)
    return keys, balance["balance_micro"], byok, len(listed["data"]), offices


def _fill(path: str, ws: str, office: str) -> str:
    path = path.replace("{ws}", ws).replace("{office}", office)
    return re.sub(r"\{[a-z_]+\}", "key_0000", path)


BODIES = {
    "/offices": {"id": "of_sneaky"},
    "/keys": {"name": "sneaky"},
    "/grants": {"grant_id": "sneaky", "amount": "100"},
    "/byok-keys": {"provider": "mock", "key": "sk-sneaky-9999"},
    "/workspaces": {"id": "ws_sneaky"},
}


def _body(path: str) -> dict | None:
    return next((b for suffix, b in BODIES.items() if path.endswith(suffix)), None)


async def test_a_scoped_token_is_refused_every_other_workspace_on_every_admin_route(sidecar: Sidecar) -> None:
    other = await _two_workspaces(sidecar)
    before = await _state_of(sidecar, other)
    walked = 0
    for (method, path), (route, gate) in route_table(sidecar).items():
        if gate is not server.ADMIN_API or route.scope.kind in (access.Kind.SELF, access.Kind.PUBLIC):
            continue  # public routes (the payment webhook) name no workspace a token could reach
        target = _fill(path, other, f"{OTHER_OFFICE}_{other}").removeprefix("/admin/v1")
        status, body = await sidecar.admin(method, target, _body(path), token=SCOPED_ADMIN_TOKEN)
        assert status == 403 and body["error"]["code"] == "workspace_forbidden", (method, path, status, body)
        walked += 1
    assert walked >= 15
    assert await _state_of(sidecar, other) == before


async def test_a_scoped_token_works_in_its_own_workspace(sidecar: Sidecar) -> None:
    await _two_workspaces(sidecar)
    for (method, path), (route, gate) in route_table(sidecar).items():
        if gate is not server.ADMIN_API or route.scope.kind is not access.Kind.PATH:
            continue
        url = sidecar.control.make_url(_fill(path, SCOPED_WORKSPACE, "of_none"))
        headers = {"Authorization": f"Bearer {SCOPED_ADMIN_TOKEN}"}
        async with sidecar.http.request(method, url, json=_body(path), headers=headers) as resp:
            status, body = resp.status, await resp.text()  # a CSV for ledger.csv
        assert status != 403, (method, path, status, body)  # 404 for the made-up ids, else served
    status, me = await sidecar.admin("GET", "/whoami", token=SCOPED_ADMIN_TOKEN)
    assert status == 200 and me["workspace"] == SCOPED_WORKSPACE and "READ" in me["permissions"]
    status, balance = await sidecar.admin("GET", f"/workspaces/{SCOPED_WORKSPACE}/balance", token=SCOPED_ADMIN_TOKEN)
    assert status == 200 and balance["workspace_id"] == SCOPED_WORKSPACE


async def test_a_scoped_token_learns_nothing_of_which_workspaces_exist(sidecar: Sidecar) -> None:
    other = await _two_workspaces(sidecar)
    answers = set()
    for ws in (other, "ws_never_created"):
        status, body = await sidecar.admin("GET", f"/workspaces/{ws}/balance", token=SCOPED_ADMIN_TOKEN)
        answers.add((status, body["error"]["code"], body["error"]["message"]))
    assert len(answers) == 1


async def test_permissions_still_hold_inside_the_workspace(sidecar: Sidecar) -> None:
    await _two_workspaces(sidecar)
    status, body = await sidecar.admin(
        "POST", f"/workspaces/{SCOPED_WORKSPACE}/keys", {"name": "x"}, token=SCOPED_READER_TOKEN
    )
    assert status == 403 and body["error"]["code"] == "permission_denied"
    status, _ = await sidecar.admin("GET", f"/workspaces/{SCOPED_WORKSPACE}/keys", token=SCOPED_READER_TOKEN)
    assert status == 200
    # a platform-wide token without READ still cannot list
    status, _ = await sidecar.admin("GET", "/workspaces", token=KEYS_ADMIN_TOKEN)
    assert status == 200  # KEYS_MANAGE + READ
    status, body = await sidecar.admin("GET", "/workspaces", token="not-a-token")
    assert status == 401


# --- the console -------------------------------------------------------------------------------------


def _console_routes(sidecar: Sidecar):
    for (method, path), (route, gate) in route_table(sidecar).items():
        if gate is server.CONSOLE and route.scope.kind is not access.Kind.PUBLIC:
            yield method, path, route


async def _console_call(client: ConsoleClient, method: str, path: str, csrf: str | None = None) -> tuple[int, str]:
    if method == "GET":
        status, page, _ = await client.get(path)
    else:
        status, page, _ = await client.post(path, {"name": "sneaky", "provider": "mock", "key": "sk-sneaky-9999"}, csrf)
    return status, page


async def test_console_routes_refuse_without_a_session(sidecar: Sidecar) -> None:
    other = await _two_workspaces(sidecar)
    before = await _state_of(sidecar, other)
    client = await anonymous(sidecar)
    try:
        for method, path, _ in _console_routes(sidecar):
            status, page = await _console_call(client, method, _fill(path, other, "of_x"), csrf="forged")
            if method == "GET":  # a page: off to the log-in
                assert status == 303, (path, status)
            else:
                assert status == 401 and "Log in" in page, (method, path, status)
    finally:
        await client.close()
    assert await _state_of(sidecar, other) == before


async def test_console_routes_refuse_another_workspace(sidecar: Sidecar) -> None:
    other = await _two_workspaces(sidecar)
    before = await _state_of(sidecar, other)
    client = await signed_in(sidecar, SCOPED_ADMIN_TOKEN)
    walked = 0
    try:
        for method, path, route in _console_routes(sidecar):
            if route.scope.kind is access.Kind.SELF:
                continue
            status, page = await _console_call(client, method, _fill(path, other, "of_x"))
            assert status == 403, (method, path, status)
            assert other not in page and "theirs" not in page
            walked += 1
    finally:
        await client.close()
    assert walked >= 8
    assert await _state_of(sidecar, other) == before


async def test_console_routes_refuse_a_missing_permission(sidecar: Sidecar) -> None:
    await _two_workspaces(sidecar)
    client = await signed_in(sidecar, SCOPED_READER_TOKEN)
    walked = 0
    try:
        for method, path, route in _console_routes(sidecar):
            if route.permission in ("READ", access.ANY_PERMISSION):
                continue
            status, page = await _console_call(client, method, _fill(path, SCOPED_WORKSPACE, "of_x"))
            assert status == 403 and "lacks the" in page, (method, path, status)
            walked += 1
    finally:
        await client.close()
    assert walked >= 5


async def test_console_forms_refuse_a_bad_csrf_token(sidecar: Sidecar) -> None:
    other = await _two_workspaces(sidecar)
    ours = await signed_in(sidecar, ADMIN_TOKEN)  # every permission, every workspace
    before = await _state_of(sidecar, other)
    walked = 0
    try:
        for method, path, _ in _console_routes(sidecar):
            if method == "GET":
                continue
            for forged in ("", "forged", ours.csrf[:-1]):
                status, page = await _console_call(ours, method, _fill(path, other, "of_x"), csrf=forged)
                assert status == 403 and "security token" in page, (method, path, forged, status)
            walked += 1
        # the session is still there: logging out needs the right token too
        status, _, _ = await ours.get(f"/console/w/{other}")
        assert status == 200
    finally:
        await ours.close()
    assert walked >= 6
    assert await _state_of(sidecar, other) == before


async def test_console_log_in_refuses_a_bad_token_and_a_forged_form(sidecar: Sidecar) -> None:
    client = await anonymous(sidecar)
    try:
        status, page, _ = await client.get("/console/login")
        token_csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        status, page, _ = await client.post("/console/login", {"token": "wrong"}, csrf=token_csrf)
        assert status == 401 and "not valid" in page
        status, page, _ = await client.post("/console/login", {"token": ADMIN_TOKEN}, csrf="forged")
        assert status == 403 and "expired" in page
        status, _, _ = await client.get("/console/workspaces")
        assert status == 303  # still not signed in
    finally:
        await client.close()


async def test_console_session_cookie_and_log_out(sidecar: Sidecar) -> None:
    client = await anonymous(sidecar)
    try:
        status, page, _ = await client.get("/console/login")
        async with client.http.post(
            client.base + "/console/login",
            data={"token": SCOPED_ADMIN_TOKEN, "csrf": re.search(r'name="csrf" value="([^"]+)"', page).group(1)},
            allow_redirects=False,
        ) as resp:
            cookie = next(h for h in resp.headers.getall("Set-Cookie") if h.startswith("sidecar_console="))
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
        assert "Secure" not in cookie  # plain HTTP, console.secure_cookies off
        async with sidecar.svc.pool.acquire() as conn:
            stored = await conn.fetch("SELECT id_sha256 FROM console_sessions")
        session_id = cookie.split(";")[0].split("=", 1)[1]
        assert all(session_id.encode() not in bytes(r["id_sha256"]) for r in stored)  # only its digest
        status, page, resp = await client.get("/console")
        assert status == 303 and resp.headers["Location"] == f"/console/w/{SCOPED_WORKSPACE}"
        status, page, resp = await client.get(f"/console/w/{SCOPED_WORKSPACE}")
        assert status == 200 and "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        status, _, _ = await client.post("/console/logout", csrf=csrf)
        assert status == 303
        client.http.cookie_jar.update_cookies({"sidecar_console": session_id})  # replaying the old cookie
        status, _, _ = await client.get(f"/console/w/{SCOPED_WORKSPACE}")
        assert status == 303
    finally:
        await client.close()


async def test_another_workspaces_ids_under_its_own_path_change_nothing(sidecar: Sidecar) -> None:
    """A scoped token naming another workspace's key, BYOK key or office inside its own workspace's path
    finds nothing there (404): resources are looked up within the path's workspace."""
    other = await _two_workspaces(sidecar)
    _, keys = await sidecar.admin("GET", f"/workspaces/{other}/keys")
    _, byok_keys = await sidecar.admin("GET", f"/workspaces/{other}/byok-keys")
    key_id, byok_id, office = keys["data"][0]["id"], byok_keys["data"][0]["id"], f"{OTHER_OFFICE}_{other}"
    before = await _state_of(sidecar, other)
    own = f"/workspaces/{SCOPED_WORKSPACE}"
    for method, path, body in (
        ("POST", f"{own}/keys/{key_id}/revoke", None),
        ("DELETE", f"{own}/keys/{key_id}", None),
        ("POST", f"{own}/keys/{key_id}/budget", {"budget": "1.00"}),
        ("POST", f"{own}/byok-keys/{byok_id}/deactivate", None),
        ("GET", f"{own}/offices/{office}/byok-keys", None),
        ("POST", f"{own}/offices/{office}/byok-keys", {"provider": "mock", "key": "sk-sneaky-9999"}),
    ):
        status, answer = await sidecar.admin(method, path, body, token=SCOPED_ADMIN_TOKEN)
        assert status == 404, (method, path, status, answer)
    client = await signed_in(sidecar, SCOPED_ADMIN_TOKEN)
    try:
        for path, form in (
            (f"/console/w/{SCOPED_WORKSPACE}/keys/{key_id}/revoke", {}),
            (f"/console/w/{SCOPED_WORKSPACE}/budgets", {"key_id": key_id, "budget": "1.00", "period": "daily"}),
            (f"/console/w/{SCOPED_WORKSPACE}/byok/{byok_id}/deactivate", {}),
            (f"/console/w/{SCOPED_WORKSPACE}/byok/{byok_id}/deactivate", {"office": office}),
        ):
            status, page, _ = await client.post(path, form)
            assert status == 404 and "theirs" not in page and "1234" not in page, (path, status)
    finally:
        await client.close()
    assert await _state_of(sidecar, other) == before


async def test_body_and_lookup_scopes_find_the_workspace_they_declare(aiohttp_client) -> None:
    """No route uses them yet; the guard's contract for the day one does."""
    scoped = access.Principal("t", frozenset({"READ"}), "ws_a", b"")
    owners = {"o1": "ws_a", "o2": "ws_b"}

    async def owner(request: web.Request) -> str | None:
        return owners.get(request.match_info["order"])

    scopes = {"/body": access.in_body("workspace_id"), "/orders/{order}": access.looked_up(owner)}

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=(await request.read()).decode() or "ok")

    @web.middleware
    async def guard(request: web.Request, handler):
        route = access.Route(request.method, "", handler, "READ", scopes[request.match_info.route.resource.canonical])
        try:
            await access.check(scoped, route, request)
        except AdminError as error:
            return web.Response(status=error.status, text=error.code)
        return await handler(request)

    app = web.Application(middlewares=[guard])
    app.router.add_post("/body", echo)
    app.router.add_get("/orders/{order}", echo)
    client = await aiohttp_client(app)
    resp = await client.post("/body", json={"workspace_id": "ws_a"})
    assert resp.status == 200 and "ws_a" in await resp.text()  # the handler still reads the body
    for body in ({"workspace_id": "ws_b"}, {}, {"workspace_id": 7}, "not an object"):
        resp = await client.post("/body", json=body)
        assert resp.status == 403 and await resp.text() == "workspace_forbidden"
    resp = await client.post("/body", data=b"{not json")
    assert resp.status == 403
    assert (await client.get("/orders/o1")).status == 200
    for order in ("o2", "o_missing"):
        assert (await client.get(f"/orders/{order}")).status == 403
