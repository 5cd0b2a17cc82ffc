"""What every admin route shares: the services key, the error it raises, reading and answering JSON,
and the checks on ids, names and integers. admin.py and byok.py both import this module and not
each other (as starlette/_utils.py serves its modules)."""

from __future__ import annotations

import re

import orjson
from aiohttp import web

from sidecar import db
from sidecar.errors import ApiError
from sidecar.money import MoneyError, format_micro, parse_credits
from sidecar.services import Services

SERVICES = web.AppKey("control_services", Services)
ROUTE_TABLE = web.AppKey("route_table", dict)  # (method, canonical path) -> access.Route
PRINCIPAL = web.RequestKey("principal", object)  # the access.Principal the guard let through

# \Z, not $: `$` also matches before a trailing newline, which let "wsA\n" pass as a new id.
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
INT32_MAX = 2**31 - 1  # Postgres `integer`: a larger value would fail in the database, not here
NAME_CHARS_MAX = 200


class AdminError(ApiError):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def error_body(path: str | None, status: int, message: str, code: str) -> bytes:
    """The admin API's envelope, for every refusal (serving.py renders the HTTP-level ones with it)."""
    return orjson.dumps({"error": {"message": message, "type": "admin_error", "code": code}})


def error_response(status: int, message: str, code: str) -> web.Response:
    return web.Response(status=status, body=error_body(None, status, message, code), content_type="application/json")


async def read_object(request: web.Request) -> dict:
    try:
        payload = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise AdminError(400, "request body is not valid JSON", "invalid_json") from None
    if not isinstance(payload, dict):
        raise AdminError(400, "request body must be a JSON object", "invalid_json")
    return payload


def valid_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise AdminError(400, f"{what} must be 1-64 characters of letters, digits, '_', '.', '-'", "invalid_id")
    return value


def valid_name(value: object, default: str) -> str:
    """A display name: any printable text (no NUL or other control character), at most 200 characters."""
    if value is None or value == "":
        return default
    if not isinstance(value, str) or len(value) > NAME_CHARS_MAX or not value.isprintable():
        raise AdminError(400, f"name must be a string of at most {NAME_CHARS_MAX} printable characters", "invalid_name")
    return value


def bounded_int(value: object, what: str, low: int, high: int, code: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise AdminError(400, f"{what} must be an integer from {low} to {high}", code)
    return value


async def ensure_workspace(svc: Services, ws: str) -> str:
    """`ws`, checked to be an id of an existing workspace; else AdminError 400 or 404."""
    valid_id(ws, "workspace id")
    async with svc.pool.acquire() as conn:
        if not await db.workspace_exists(conn, ws):
            raise AdminError(404, f"workspace {ws!r} does not exist", "workspace_not_found")
    return ws


def credits_amount(payload: dict, name: str) -> int:
    """An amount given as `<name>_micro` (an integer) or `<name>` (credits, a decimal string), not yet
    bounded; a missing one is refused like a malformed one."""
    if f"{name}_micro" in payload:
        amount = payload[f"{name}_micro"]
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise AdminError(400, f"{name}_micro must be an integer", "invalid_amount")
        return amount
    try:
        return parse_credits(payload.get(name))
    except MoneyError as exc:
        raise AdminError(400, f"{name} (credits, a decimal string) {exc}", "invalid_amount") from None


def credits_field(payload: dict, name: str, high: int, required: bool = False) -> int | None:
    """credits_amount, positive and at most `high` micro-credits; None if neither is given (unless
    `required`: then that is refused)."""
    if not required and f"{name}_micro" not in payload and payload.get(name) is None:
        return None
    amount = credits_amount(payload, name)
    if not 0 < amount <= high:
        raise AdminError(400, f"{name} must be positive and at most {format_micro(high)}", "invalid_amount")
    return amount


def query_limit(request: web.Request, default: int, high: int) -> int:
    text = request.query.get("limit", str(default))
    if not text.isdigit() or not 1 <= int(text) <= high:
        raise AdminError(400, f"limit must be an integer from 1 to {high}", "invalid_limit")
    return int(text)


async def existing_workspace(request: web.Request) -> str:
    return await ensure_workspace(request.app[SERVICES], request.match_info["ws"])
