"""The control plane's app: every route table (admin API, BYOK, console), and the one guard that
authenticates each request and checks its permission and workspace (control/access.py) before any
handler runs.

A table says how its callers authenticate: the admin API by `Authorization: Bearer <admin token>`,
answering refusals in its JSON envelope; the console by its session cookie (and a CSRF token on every
form), answering with pages. Either way the same Route declaration and the same access.check decide.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from sidecar import serving
from sidecar.auth import FailedAuthLimiter
from sidecar.control import access, admin, byok, notifications, orders, reload, statements
from sidecar.control import wallet as wallet_api
from sidecar.control.console import app as console
from sidecar.control.http import PRINCIPAL, ROUTE_TABLE, SERVICES, AdminError, error_body, error_response
from sidecar.services import Services


@dataclass(frozen=True, slots=True)
class Gate:
    """How one table's callers prove who they are, and how a refusal is answered to them."""

    principal: Callable[[web.Request], Awaitable[access.Principal]]  # raises AdminError
    refuse: Callable[[web.Request, AdminError], Awaitable[web.StreamResponse]]


async def _bearer(request: web.Request) -> access.Principal:
    found = access.principal_of_header(
        request.app[SERVICES].config.admin_tokens, request.headers.get("Authorization", "")
    )
    if found is None:
        raise AdminError(401, "missing or invalid admin token", "invalid_admin_token")
    return found


async def _json_refusal(request: web.Request, error: AdminError) -> web.Response:
    return error_response(error.status, error.message, error.code)


ADMIN_API = Gate(_bearer, _json_refusal)
CONSOLE = Gate(console.principal, console.refusal)

# (prefix, routes, gate): a new module's routes are one line here.
TABLES = (
    (admin.SELF_PREFIX, admin.SELF_ROUTES, ADMIN_API),
    (admin.PREFIX, admin.ROUTES, ADMIN_API),
    (admin.PREFIX, byok.ROUTES, ADMIN_API),
    (admin.PREFIX, access.declared(wallet_api.ROUTES, access.IN_PATH), ADMIN_API),
    (admin.PREFIX, access.declared(orders.PREFIX_ROUTES, access.IN_PATH), ADMIN_API),
    (admin.PREFIX, access.declared(reload.ROUTES, access.IN_PATH), ADMIN_API),
    (admin.PREFIX, access.declared(notifications.ROUTES, access.IN_PATH), ADMIN_API),
    # Stripe's webhook proves itself by its signature (billing/stripe_gateway.py), not by a token.
    ("", tuple(access.Route(*r, access.ANY_PERMISSION, access.PUBLIC) for r in orders.PUBLIC_ROUTES), ADMIN_API),
    ("", access.declared(statements.WORKSPACE_ROUTES, access.IN_PATH), ADMIN_API),
    ("", access.declared(statements.PLATFORM_ROUTES, access.PLATFORM), ADMIN_API),  # the margin report
    (console.PREFIX, console.ROUTES, CONSOLE),
)


@web.middleware
async def _access_guard(request: web.Request, handler):
    resource = request.match_info.route.resource
    entry = request.app[ROUTE_TABLE].get((request.method, resource.canonical if resource else ""))
    if entry is None:
        if resource is None:  # the router's own 404/405: nothing to guard, serving.guard words it
            return await handler(request)
        # a route added around the tables: nobody declared who may call it, so nobody may
        return error_response(403, "this route declares no permission or workspace scope", "permission_denied")
    route, gate = entry
    try:
        if route.scope is None or route.scope.kind is not access.Kind.PUBLIC:
            principal = await gate.principal(request)
            await access.check(principal, route, request)
            request[PRINCIPAL] = principal
        return await handler(request)
    except AdminError as error:
        return await gate.refuse(request, error)


def build_control_app(svc: Services) -> web.Application:
    config = svc.config
    limiter = FailedAuthLimiter(config.auth.failed_auth_max, config.auth.failed_auth_window_ms)
    guard = serving.guard(error_body, config.server.body_read_timeout_ms / 1000, limiter)
    app = web.Application(middlewares=[guard, _access_guard], client_max_size=1024 * 1024)
    app[serving.ERROR_BODY] = error_body
    app[SERVICES] = svc
    app[ROUTE_TABLE] = {}
    for prefix, routes, gate in TABLES:
        for entry in routes:
            route = access.as_route(entry, prefix)
            app.router.add_route(route.method, route.path, route.handler)
            app[ROUTE_TABLE][(route.method, route.path)] = (route, gate)
    console.setup(app)
    return app
