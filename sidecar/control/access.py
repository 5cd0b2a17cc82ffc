"""Who may call a control-plane route, and on which workspace: principals, route declarations, and the
one check every route goes through.

A principal is an admin token (or a console session opened with one): a set of permissions, and
optionally ONE workspace it is limited to (config `admin_tokens[].workspace`). A scoped principal can
never see or touch another workspace, and never calls a platform route (creating or listing
workspaces).

Every route declares, beside its permission, where its workspace comes from (`Scope`): the path's
`{ws}`, a JSON body field, a lookup of the resource it names, none at all (`SELF`: it concerns only
the caller), or `PLATFORM` (every workspace: scoped principals are refused). The check is made here,
before the handler runs, so a handler cannot forget it; a route that declares no scope is refused
to everyone (tests/test_access.py walks the router and fails on such a route).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

import orjson
from aiohttp import web

from sidecar.config import AdminToken
from sidecar.control.http import AdminError

ANY_PERMISSION = "ANY"  # a route any valid token may call (it concerns only the caller)


@dataclass(frozen=True, slots=True)
class Principal:
    """An admin token as the control plane sees it: its name, permissions and workspace limit."""

    name: str
    permissions: frozenset[str]
    workspace: str | None  # None: platform-wide
    sha256: bytes  # the configured digest, which names the token (console sessions refer to it)

    def may(self, permission: str) -> bool:
        return permission == ANY_PERMISSION or permission in self.permissions

    def sees(self, workspace: str) -> bool:
        return self.workspace is None or hmac.compare_digest(self.workspace.encode(), workspace.encode())


def principal_of_token(tokens: tuple[AdminToken, ...], token: str) -> Principal | None:
    """The configured admin token matching `token`, or None; every entry compared in constant time."""
    if not token or not token.isascii():  # a token is ASCII; other bytes match nothing
        return None
    return principal_of_digest(tokens, hashlib.sha256(token.encode()).digest())


def principal_of_digest(tokens: tuple[AdminToken, ...], digest: bytes) -> Principal | None:
    found = None
    for configured in tokens:  # no early exit: the time taken does not tell which entry matched
        if hmac.compare_digest(configured.sha256, digest):
            found = configured
    if found is None:
        return None
    return Principal(found.name, frozenset(found.permissions), found.workspace, found.sha256)


def principal_of_header(tokens: tuple[AdminToken, ...], authorization: str) -> Principal | None:
    if authorization[:7].lower() != "bearer ":
        return None
    return principal_of_token(tokens, authorization[7:].strip())


class Kind(Enum):
    PATH = "path"  # the route's `{ws}` path segment
    BODY = "body"  # a field of the JSON body
    LOOKUP = "lookup"  # found from the resource the route names (an order id, ...)
    SELF = "self"  # no workspace: the route concerns only the caller (whoami)
    PLATFORM = "platform"  # every workspace: platform-wide principals only
    PUBLIC = "public"  # no principal at all: the console's log-in page and its static files


Lookup = Callable[[web.Request], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class Scope:
    kind: Kind
    field: str = ""  # PATH: the match_info name; BODY: the JSON field
    lookup: Lookup | None = None  # LOOKUP: the resource's workspace, None if it does not exist

    async def workspace(self, request: web.Request) -> str | None:
        """The workspace this request acts on (None: none named, or the resource does not exist)."""
        if self.kind is Kind.PATH:
            return request.match_info.get(self.field)
        if self.kind is Kind.BODY:
            try:
                payload = orjson.loads(await request.read() or b"{}")
            except orjson.JSONDecodeError:
                return None
            value = payload.get(self.field) if isinstance(payload, dict) else None
            return value if isinstance(value, str) else None
        if self.kind is Kind.LOOKUP and self.lookup is not None:
            return await self.lookup(request)
        return None


IN_PATH = Scope(Kind.PATH, "ws")
SELF = Scope(Kind.SELF)
PLATFORM = Scope(Kind.PLATFORM)
PUBLIC = Scope(Kind.PUBLIC)


def in_body(field: str) -> Scope:
    return Scope(Kind.BODY, field)


def looked_up(lookup: Lookup) -> Scope:
    return Scope(Kind.LOOKUP, lookup=lookup)


@dataclass(frozen=True, slots=True)
class Route:
    """One control-plane route: what it needs and where its workspace comes from."""

    method: str
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    permission: str
    scope: Scope | None  # None only for a route written before scopes: refused until it declares one


def as_route(entry: Route | tuple, prefix: str = "") -> Route:
    """A Route from a Route or a (method, path, handler, permission[, scope]) tuple, under `prefix`."""
    if isinstance(entry, Route):
        return Route(entry.method, prefix + entry.path, entry.handler, entry.permission, entry.scope)
    method, path, handler, permission, *rest = entry
    return Route(method, prefix + path, handler, permission, rest[0] if rest else None)


def declared(routes: tuple, scope: Scope) -> tuple[Route, ...]:
    """(method, path, handler, permission) tuples, all declared with `scope`: how control/server.py
    wires a module whose routes share one scope."""
    return tuple(Route(m, p, h, perm, scope) for m, p, h, perm in routes)


async def check(principal: Principal, route: Route | None, request: web.Request) -> None:
    """Raises AdminError unless `principal` may call `route` for this request's workspace."""
    if route is None or route.scope is None:
        # fail closed: a route nobody declared a permission and scope for is nobody's
        raise AdminError(403, "this route declares no permission or workspace scope", "permission_denied")
    if not principal.may(route.permission):
        raise AdminError(403, f"this admin token lacks the {route.permission} permission", "permission_denied")
    if principal.workspace is None or route.scope.kind is Kind.SELF:
        return
    if route.scope.kind is Kind.PLATFORM:
        raise AdminError(403, "a workspace-scoped token cannot use platform-wide routes", "workspace_forbidden")
    workspace = await route.scope.workspace(request)
    # A workspace that does not exist is refused like another's: a scoped token learns nothing
    # about which workspaces exist.
    if workspace is None or not principal.sees(workspace):
        raise AdminError(403, "this token is limited to another workspace", "workspace_forbidden")
