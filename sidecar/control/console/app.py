"""The console's routes under /console, and how its callers authenticate.

Log-in takes an admin token (config `admin_tokens`, or SIDECAR_ADMIN_TOKEN) and opens a server-side
session (console/sessions.py); the cookie is HttpOnly, SameSite=Strict, and Secure over TLS (or always,
with `console.secure_cookies`). Every form carries the session's CSRF token (the log-in form a
double-submit one). Each route is declared like an admin route (control/access.py): its permission and
where its workspace comes from, checked by the control plane's one guard (control/server.py) before the
handler runs. The data comes from the same functions the admin API calls (control/admin.py, byok.py,
orders.py for quotes, orders and invoices, reload.py for auto-reload).
"""

from __future__ import annotations

import hmac
import secrets
from importlib import resources
from urllib.parse import urlencode

from aiohttp import web

from sidecar.billing.orders import OrderStatus
from sidecar.control import access, admin, byok, statements
from sidecar.control import orders as orders_api
from sidecar.control import reload as reload_api
from sidecar.control import wallet as wallet_api
from sidecar.control.access import ANY_PERMISSION, IN_PATH, PLATFORM, PUBLIC, SELF, Route
from sidecar.control.console import pages, sessions
from sidecar.control.console.pages import Frame, Markup, badge, card, code, esc, post_button, stat, table
from sidecar.control.http import PRINCIPAL, SERVICES, AdminError, ensure_workspace, valid_id
from sidecar.money import format_micro

PREFIX = "/console"
COOKIE = "sidecar_console"
LOGIN_COOKIE = "sidecar_console_login"
SESSION = web.RequestKey("console_session", sessions.Session)
FORM_FIELDS_MAX = 20
RECENT_CALLS_SHOWN = 10
LEDGER_ROWS_SHOWN = 50
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
_STATIC_BODIES = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in STATIC}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
NOTICES = {
    "key_revoked": "The API key was revoked; calls with it are refused within seconds.",
    "budget_set": "The key's budget was saved.",
    "byok_added": "The provider key was validated and stored. Only its last 4 characters are shown.",
    "byok_deactivated": "The provider key was deactivated: calls use the platform key.",
    "byok_reactivated": "The provider key was reactivated.",
    "reload_saved": "The auto-reload settings were saved.",
    "order_closed": "That order is no longer waiting for payment: see its status below.",
}


# --- authentication (used by control/server.py's guard) -------------------------------------------


async def principal(request: web.Request) -> access.Principal:
    svc = request.app[SERVICES]
    session_id = request.cookies.get(COOKIE, "")
    if not session_id:
        raise AdminError(401, "Log in to use the console.", "no_session")
    async with svc.pool.acquire() as conn:
        session = await sessions.find(conn, session_id)
    if session is None:
        raise AdminError(401, "Your session has ended. Log in again.", "no_session")
    found = access.principal_of_digest(svc.config.admin_tokens, session.token_sha256)
    if found is None:
        raise AdminError(401, "The token this session was opened with is no longer configured.", "no_session")
    request[SESSION] = session
    if request.method != "GET":
        form = await _form(request)
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), session.csrf_token.encode()):
            raise AdminError(
                403, "The form's security token is missing or stale. Reload the page and try again.", "bad_csrf"
            )
    return found


async def refusal(request: web.Request, error: AdminError) -> web.StreamResponse:
    if error.status == 401 and request.method == "GET":
        raise web.HTTPSeeOther(f"{PREFIX}/login")
    frame = _frame(request, None) if PRINCIPAL in request else None
    return _html(pages.error_page(PREFIX, error.status, error.message, frame), error.status)


async def _form(request: web.Request) -> dict[str, str]:
    form = await request.post()
    if len(form) > FORM_FIELDS_MAX:
        raise AdminError(400, "Too many form fields.", "invalid_form")
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _secure(request: web.Request) -> bool:
    return request.secure or request.app[SERVICES].config.console.secure_cookies


def _set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path=PREFIX, httponly=True, samesite="Strict", secure=_secure(request)
    )


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == PREFIX or request.path.startswith(PREFIX + "/"):
        response.headers.update(_SECURITY_HEADERS)
        if not request.path.startswith(PREFIX + "/static/"):
            response.headers["Cache-Control"] = "no-store"


def setup(app: web.Application) -> None:
    app.on_response_prepare.append(_security_headers)


# --- frame and navigation ----------------------------------------------------------------------------


def _nav(principal: access.Principal) -> list[tuple[str, str]]:
    items = [("", "Overview"), ("/ledger", "Ledger"), ("/credits", "Credits"), ("/keys", "API keys")]
    if principal.may("TENANT_MANAGE"):
        items.append(("/byok", "BYOK keys"))
    return items


def _frame(request: web.Request, ws: dict | None, active: str = "") -> Frame:
    found = request[PRINCIPAL]
    return Frame(
        prefix=PREFIX,
        principal_name=found.name,
        csrf=request[SESSION].csrf_token,
        workspace=ws["id"] if ws else None,
        workspace_name=ws["name"] if ws else None,
        can_switch=found.workspace is None and found.may("READ"),
        nav=_nav(found) if ws else (),
        active=active,
    )


async def _workspace(request: web.Request) -> dict:
    svc = request.app[SERVICES]
    return await admin.workspace_view(svc, await ensure_workspace(svc, request.match_info["ws"]))


def _notice(request: web.Request) -> str:
    return pages.notice(NOTICES.get(request.query.get("notice", ""), ""))


def _see(path: str, notice: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"{path}?notice={notice}")


# --- log-in and log-out ------------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    try:
        found = await principal(request)
    except AdminError:
        raise web.HTTPSeeOther(f"{PREFIX}/login") from None
    if found.workspace is not None:
        raise web.HTTPSeeOther(f"{PREFIX}/w/{found.workspace}")
    raise web.HTTPSeeOther(f"{PREFIX}/workspaces")


async def login_form(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    login_csrf = secrets.token_urlsafe(24)
    response = _html(pages.login_page(PREFIX, login_csrf, error), status)
    _set_cookie(response, request, LOGIN_COOKIE, login_csrf, 3600)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    form = await _form(request)
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(form.get("csrf", "").encode(), expected.encode()):
        return await login_form(request, "The log-in form expired. Try again.", 403)
    found = access.principal_of_token(svc.config.admin_tokens, form.get("token", "").strip())
    if found is None:  # 401: serving.guard counts it against the address (FailedAuthLimiter)
        return await login_form(request, "That token is not valid.", 401)
    console = svc.config.console
    async with svc.pool.acquire() as conn:
        session_id, _ = await sessions.open_session(
            conn, found.sha256, console.session_ttl_ms, console.sessions_per_token_max
        )
    response = web.HTTPSeeOther(PREFIX)
    _set_cookie(response, request, COOKIE, session_id, console.session_ttl_ms // 1000)
    response.del_cookie(LOGIN_COOKIE, path=PREFIX)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    async with request.app[SERVICES].pool.acquire() as conn:
        await sessions.close(conn, request.cookies.get(COOKIE, ""))
    response = web.HTTPSeeOther(f"{PREFIX}/login")
    response.del_cookie(COOKIE, path=PREFIX)
    raise response


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise AdminError(404, "No such file.", "not_found")
    return web.Response(
        body=_STATIC_BODIES[name], content_type=STATIC[name], headers={"Cache-Control": "public, max-age=300"}
    )


# --- pages -------------------------------------------------------------------------------------------


async def workspaces(request: web.Request) -> web.Response:
    rows = [
        (pages.link(f"{PREFIX}/w/{w['id']}", w["name"]), code(w["id"]), w["created_at"][:10])
        for w in await admin.workspaces_list(request.app[SERVICES])
    ]
    body = card("All workspaces", table(("Name", "Id", "Created"), rows, "No workspace yet."))
    return _html(pages.page("Workspaces", body, _frame(request, None)))


def _when(text: str | None) -> str:
    return (text or "")[:19].replace("T", " ")


def _recent_rows(rows: list[dict]) -> list[tuple]:
    return [
        (
            _when(r["created_at"]),
            code(r["model"] or "-"),
            badge(r["status"], "ok" if r["status"] == "completed" else "warn"),
            f"{r['input_tokens']:,}",
            f"{r['output_tokens']:,}",
            badge("BYOK", "info") if r["byok"] else "credits",
            r["cost"],
        )
        for r in rows
    ]


def _reload_state(reload: dict) -> tuple[str, str]:
    """The overview's auto-reload card: on or off, and what it does or why it stopped."""
    if reload.get("in_flight"):
        return "reloading", f"buying {reload['in_flight']['amount']} credits now"
    if reload["enabled"]:
        return "on", f"buys {reload['amount']} below {reload['threshold']}"
    if reload.get("disabled_reason"):
        return "off", f"turned off: {reload['disabled_reason']}"
    return "off", "set it on the Credits page" if not reload.get("configured", True) else "turned off"


async def overview(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    ws = await _workspace(request)
    money = await admin.balance_view(svc, ws["id"])
    wallet = await wallet_api.wallet_view(svc, ws["id"])
    keys = await admin.keys_list(svc, ws["id"])
    usage = await statements.summary_view(svc, ws["id"], {})
    totals, byok_totals = usage["totals"], usage["byok"]
    expires = wallet["expires_at"][:10] if wallet["expires_at"] else "never"
    reload = await reload_api.settings_view(svc, ws["id"])
    balances = "".join(
        (
            stat("Balance", money["balance"], "credits", "balance"),
            stat("Available", money["available"], "balance less held", "available"),
            stat("Held", money["held"], "reserved by calls in flight", "held"),
            stat("Credits expire", expires, f"{wallet['mode']} wallet", "expiry"),
            stat("Auto-reload", *_reload_state(reload), "auto-reload"),
        )
    )
    month = "".join(
        (
            stat("Calls", f"{totals['calls']:,}", "paid with credits", "calls-30d"),
            stat("Credits spent", totals["credits_spent"], f"fees {totals['fees']}", "spent-30d"),
            stat("BYOK calls", f"{byok_totals['calls']:,}", f"priced {byok_totals['cost']}, not charged", "byok-30d"),
            stat("Active API keys", str(sum(1 for k in keys if not k["revoked_at"])), "", "active-keys"),
        )
    )
    week = usage["daily"][-7:]
    chart = pages.bar_chart([(d["date"][5:], d["credits_spent_micro"], d["credits_spent"]) for d in week], "credits")
    calls_week = sum(d["calls"] + d["byok_calls"] for d in week)
    products = [
        (
            p["provider"],
            code(p["model"]),
            f"{p['calls']:,}",
            f"{sum(p['tokens'].values()):,}",
            p["credits_spent"],
            f"{p['byok']['calls']:,}",
        )
        for p in usage["products"]
    ]
    by_model = table(
        ("Provider", "Model", "Calls", "Tokens", "Credits", "BYOK calls"),
        products,
        "No usage in the last 30 days.",
        numeric=(2, 3, 4, 5),
    )
    recent = await statements.history_view(svc, ws["id"], {"kind": "usage", "limit": str(RECENT_CALLS_SHOWN)})
    calls = table(
        ("Time (UTC)", "Model", "Status", "Input tokens", "Output tokens", "Paid with", "Cost"),
        _recent_rows(recent["data"]),
        "No call yet. Calls appear here a moment after they finish.",
        numeric=(3, 4, 6),
    )
    more = f'<p><a href="{PREFIX}/w/{esc(ws["id"])}/ledger">The whole ledger, with filters and CSV</a></p>'
    body = (
        f'<div class="stats">{balances}</div>'
        f'<p class="section-label">Last 30 days ({esc(usage["period"]["from"])} to {esc(usage["period"]["to"])})</p>'
        f'<div class="stats">{month}</div>'
        '<div class="grid2">'
        + card(f"Credits spent, last 7 days ({calls_week:,} calls)", chart, "chart-card")
        + card("By model, last 30 days", by_model, "models")
        + "</div>"
        + card(f"Recent calls (last {RECENT_CALLS_SHOWN})", calls + more, "calls")
    )
    return _html(pages.page("Overview", body, _frame(request, ws, ""), _notice(request)))


LEDGER_KINDS = ("usage", "grant", "topup", "allowance", "refund", "expiry")
LEDGER_FILTERS = ("kind", "status", "model", "from", "to", "byok")


def _ledger_query(request: web.Request) -> dict[str, str]:
    """The filters the form sent, empty fields dropped (the statement functions refuse the unknown)."""
    wanted = (*LEDGER_FILTERS, "cursor")
    return {k: v.strip() for k, v in request.query.items() if k in wanted and v.strip()}


def _filters_form(ws: str, query: dict[str, str]) -> str:
    def selected(name: str, value: str) -> str:
        return " selected" if query.get(name) == value else ""

    kinds = "".join(f'<option value="{k}"{selected("kind", k)}>{k}</option>' for k in LEDGER_KINDS)
    byok = "".join(
        f'<option value="{v}"{selected("byok", v)}>{label}</option>'
        for v, label in (("true", "BYOK"), ("false", "credits"))
    )
    return (
        f'<form class="filters" method="get" action="{PREFIX}/w/{esc(ws)}/ledger">'
        f'<label>Kind <select name="kind"><option value="">any</option>{kinds}</select></label>'
        f'<label>Status <input name="status" value="{esc(query.get("status", ""))}" '
        'placeholder="e.g. completed"></label>'
        f'<label>Model <input name="model" value="{esc(query.get("model", ""))}" placeholder="any"></label>'
        f'<label>From (UTC) <input type="date" name="from" value="{esc(query.get("from", ""))}"></label>'
        f'<label>To (UTC) <input type="date" name="to" value="{esc(query.get("to", ""))}"></label>'
        f'<label>Paid with <select name="byok"><option value="">any</option>{byok}</select></label>'
        '<button type="submit">Filter</button></form>'
    )


def _amount(text: str | None) -> Markup:
    if text is None:
        return Markup("-")
    return Markup(f'<span class="{"neg" if text.startswith("-") else "pos"}">{esc(text)}</span>')


async def ledger(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    ws = await _workspace(request)
    query = _ledger_query(request)
    frame = _frame(request, ws, "/ledger")
    try:
        found = await statements.history_view(svc, ws["id"], {**query, "limit": str(LEDGER_ROWS_SHOWN)})
    except AdminError as exc:
        if exc.status != 400:
            raise
        body = card("Filters", pages.notice(exc.message, "error") + _filters_form(ws["id"], query))
        return _html(pages.page("Ledger", body, frame), 400)
    rows = [
        (
            _when(r["created_at"]),
            r["kind"],
            badge(r["status"], "ok" if r["status"] in ("completed", "settled") else "warn"),
            code(r["model"]) if r["model"] else "-",
            f"{r['input_tokens']:,} / {r['output_tokens']:,}",
            badge("BYOK", "info") if r["byok"] else "",
            r["cost"],
            _amount(r["balance_impact"]),
            r["balance_after"] or "-",
        )
        for r in found["data"]
    ]
    headers = (
        "Time (UTC)",
        "Kind",
        "Status",
        "Model",
        "Tokens in / out",
        "",
        "Cost",
        "Balance change",
        "Balance after",
    )
    listing = table(headers, rows, "No ledger entry matches these filters.", numeric=(4, 6, 7, 8))
    filters = {k: v for k, v in query.items() if k != "cursor"}
    csv_link = f"{PREFIX}/w/{ws['id']}/ledger.csv" + (f"?{urlencode(filters)}" if filters else "")
    nav = f'<a class="button" href="{esc(csv_link)}" data-test="csv">Download CSV</a>'
    if found["has_more"]:
        next_link = f"{PREFIX}/w/{ws['id']}/ledger?{urlencode({**filters, 'cursor': found['next_cursor']})}"
        nav += f'<a class="button" href="{esc(next_link)}" data-test="next">Older entries</a>'
    body = card("Filters", _filters_form(ws["id"], query)) + card(
        "Entries",
        listing + f'<div class="actions"><span>{LEDGER_ROWS_SHOWN} per page</span><span>{nav}</span></div>',
        "ledger",
    )
    return _html(pages.page("Ledger", body, frame))


async def ledger_csv(request: web.Request) -> web.StreamResponse:
    """The admin API's CSV statement, as it is: the same handler, behind the console's session."""
    return await statements.ledger_csv(request)


async def _keys_page(
    request: web.Request, ws: dict, new_key: dict | None = None, error: str = "", budget_error: str = ""
) -> web.Response:
    svc = request.app[SERVICES]
    frame = _frame(request, ws, "/keys")
    may_manage = request[PRINCIPAL].may("KEYS_MANAGE")
    rows = []
    keys = await admin.keys_list(svc, ws["id"])
    for k in keys:
        revoked = bool(k["revoked_at"])
        action = (
            post_button(
                f"{PREFIX}/w/{ws['id']}/keys/{k['id']}/revoke",
                "Revoke",
                frame.csrf,
                danger=True,
                confirm=f"Revoke the key ending {k['last4']}? Calls with it will be refused.",
            )
            if may_manage and not revoked
            else ""
        )
        rows.append(
            (
                k["name"],
                code(f"…{k['last4']}"),
                code(k["id"]),
                k["office_id"] or "-",
                f"{k['rate_limit_rpm']:,}/min",
                f"{k['remaining']} of {k['budget']} left ({k['budget_period']})" if k.get("budget") else "none",
                k["created_at"][:16].replace("T", " ") if k["created_at"] else "",
                badge("revoked", "off") if revoked else badge("active", "ok"),
                action,
            )
        )
    parts = []
    if new_key is not None:
        parts.append(
            card(
                "New API key: copy it now",
                "<p>This is the only time the key is shown. Store it in your agent's secret store.</p>"
                f'<div class="secret"><input id="new-key" readonly value="{esc(new_key["key"])}" data-test="new-key">'
                '<button type="button" class="copy" data-copy="new-key">Copy</button></div>',
                "highlight",
            )
        )
    if may_manage:
        parts.append(
            card(
                "Create an API key",
                pages.notice(error, "error")
                + f'<form class="row" method="post" action="{PREFIX}/w/{esc(ws["id"])}/keys">'
                '<label>Name <input name="name" maxlength="200" placeholder="e.g. research-agent"></label>'
                "<label>Requests per minute "
                '<input name="rate_limit_rpm" inputmode="numeric" placeholder="default"></label>'
                f'{pages.csrf_field(frame.csrf)}<button type="submit">Create key</button></form>',
            )
        )
    headers = ("Name", "Key", "Id", "Office", "Rate limit", "Budget", "Created (UTC)", "Status", "")
    parts.append(card("Keys", table(headers, rows, "No API key yet.")))
    live = [k for k in keys if not k["revoked_at"]]
    if may_manage and live:
        options = "".join(
            f'<option value="{esc(k["id"])}">{esc(k["name"])} (…{esc(k["last4"])})</option>' for k in live
        )
        periods = "".join(f'<option value="{p}">{p}</option>' for p in ("monthly", "daily", "total"))
        parts.append(
            card(
                "Set a key's budget",
                "<p>A key whose budget is spent is refused (402) until its period ends; the workspace's other "
                "keys go on. Leave the amount empty to remove a budget.</p>"
                + pages.notice(budget_error, "error")
                + f'<form class="row" method="post" action="{PREFIX}/w/{esc(ws["id"])}/budgets">'
                f'<label>Key <select name="key_id">{options}</select></label>'
                '<label>Budget (credits) <input name="budget" inputmode="decimal" placeholder="e.g. 5.00"></label>'
                f'<label>Period <select name="period">{periods}</select></label>'
                f'{pages.csrf_field(frame.csrf)}<button type="submit">Set budget</button></form>',
            )
        )
    status = 400 if error or budget_error else (201 if new_key else 200)
    return _html(pages.page("API keys", "".join(parts), frame, _notice(request)), status)


async def keys_page(request: web.Request) -> web.Response:
    return await _keys_page(request, await _workspace(request))


def _optional_int(text: str) -> int | str | None:
    text = text.strip()
    if not text:
        return None
    return int(text) if text.isdigit() and len(text) < 12 else text  # a non-number reaches bounded_int's message


async def create_key(request: web.Request) -> web.Response:
    ws = await _workspace(request)
    form = await _form(request)
    payload: dict = {"name": form.get("name", "").strip()}
    if (rpm := _optional_int(form.get("rate_limit_rpm", ""))) is not None:
        payload["rate_limit_rpm"] = rpm
    try:
        created = await admin.key_create(request.app[SERVICES], ws["id"], payload)
    except AdminError as exc:
        if exc.status != 400:
            raise
        return await _keys_page(request, ws, error=exc.message)
    return await _keys_page(request, ws, new_key=created)


async def set_budget(request: web.Request) -> web.Response:
    ws = await _workspace(request)
    form = await _form(request)
    budget = form.get("budget", "").strip() or None
    try:
        await wallet_api.key_budget_set(
            request.app[SERVICES], ws["id"], form.get("key_id", ""), {"budget": budget, "period": form.get("period")}
        )
    except AdminError as exc:
        if exc.status != 400:
            raise
        return await _keys_page(request, ws, budget_error=exc.message)
    raise _see(f"{PREFIX}/w/{ws['id']}/keys", "budget_set")


async def revoke_key(request: web.Request) -> web.Response:
    ws = await _workspace(request)
    await admin.key_revoke(request.app[SERVICES], ws["id"], request.match_info["key_id"])
    raise _see(f"{PREFIX}/w/{ws['id']}/keys", "key_revoked")


ORDERS_SHOWN = 50
INVOICES_SHOWN = 50
_ORDER_STATUS = {
    OrderStatus.CREATED: "warn",
    OrderStatus.PENDING: "warn",
    OrderStatus.PAID: "ok",
    OrderStatus.CREDITED: "ok",
    OrderStatus.REFUNDED: "info",
}


def _buy_form(ws: str, frame: Frame, payments, amount: str, error: str) -> str:
    low, high = format_micro(payments.amount_micro_min), format_micro(payments.amount_micro_max)
    return (
        f"<p>Credits are bought through the payment provider's checkout: enter an amount, review the fee "
        f"and tax, then pay. One credit costs 1 {esc(payments.currency.upper())}; "
        f"from {esc(low)} to {esc(high)} per order.</p>"
        + pages.notice(error, "error")
        + f'<form class="row" method="post" action="{PREFIX}/w/{esc(ws)}/credits/quote">'
        f'<label>Credits <input name="amount" inputmode="decimal" value="{esc(amount)}" '
        'placeholder="e.g. 10.00" required></label>'
        f'{pages.csrf_field(frame.csrf)}<button type="submit">Review purchase</button></form>'
    )


def _orders_table(found: list[dict]) -> str:
    rows = [
        (
            _when(o["created_at"]),
            code(o["id"]),
            o["purpose"],
            badge(o["status"], _ORDER_STATUS.get(o["status"], "off")),
            o["amount"],
            o["price"]["fee"],
            o["price"]["tax"],
            f"{o['price']['total']} {o['currency'].upper()}",
        )
        for o in found
    ]
    headers = ("Created (UTC)", "Order", "Kind", "Status", "Credits", "Fee", "Tax", "Total")
    return table(headers, rows, "No order yet.", numeric=(4, 5, 6, 7))


def _invoices_table(ws: str, found: list[dict]) -> str:
    rows = [
        (
            code(i["number"]),
            code(i["order_id"]),
            _when(i["issued_at"]),
            Markup(
                f'<a class="button small" href="{PREFIX}/w/{esc(ws)}/invoices/{esc(i["number"])}/pdf" '
                f'data-test="invoice-pdf">PDF</a>'
            ),
        )
        for i in found
    ]
    return table(("Number", "Order", "Issued (UTC)", ""), rows, "No invoice yet: one is issued per paid order.")


def _reload_card(ws: str, frame: Frame, settings: dict, may_manage: bool, error: str) -> str:
    if settings.get("configured") is False:
        state = "<p>Auto-reload is off: it has never been set up.</p>"
    else:
        word = badge("on", "ok") if settings["enabled"] else badge("off", "off")
        why = f" ({esc(settings['disabled_reason'])})" if settings.get("disabled_reason") else ""
        state = (
            f"<p>Auto-reload is {word}{why}: when the available balance falls below "
            f"<strong>{esc(settings['threshold'])}</strong> credits, "
            f"<strong>{esc(settings['amount'])}</strong> credits are bought with the saved payment method "
            f"({'saved' if settings['payment_method_saved'] else 'the one of the latest paid checkout'}).</p>"
        )
    if not may_manage:
        return card("Auto-reload", state, "auto-reload")
    checked = " checked" if settings.get("enabled") else ""
    form = (
        pages.notice(error, "error") + f'<form class="row" method="post" action="{PREFIX}/w/{esc(ws)}/auto-reload">'
        f'<label>Threshold (credits) <input name="threshold" inputmode="decimal" '
        f'value="{esc(settings.get("threshold", ""))}" placeholder="e.g. 5.00"></label>'
        f'<label>Reload amount (credits) <input name="amount" inputmode="decimal" '
        f'value="{esc(settings.get("amount", ""))}" placeholder="e.g. 20.00"></label>'
        f'<label class="check"><input type="checkbox" name="enabled" value="on"{checked}> Enabled</label>'
        f'{pages.csrf_field(frame.csrf)}<button type="submit">Save auto-reload</button></form>'
    )
    return card("Auto-reload", state + form, "auto-reload")


async def _credits_page(
    request: web.Request, ws: dict, amount: str = "", error: str = "", reload_error: str = "", status: int = 200
) -> web.Response:
    svc = request.app[SERVICES]
    frame = _frame(request, ws, "/credits")
    may_manage = request[PRINCIPAL].may("CREDITS_MANAGE")
    money = await admin.balance_view(svc, ws["id"])
    stats = "".join(
        (
            stat("Balance", money["balance"], "credits", "balance"),
            stat("Available", money["available"], "balance less held", "available"),
        )
    )
    parts = [f'<div class="stats">{stats}</div>']
    if svc.payments is None or svc.payments.gateway is None:
        no_provider = "<p>No payment provider is configured: credits are granted by an operator.</p>"
        parts.append(card("Buy credits", no_provider, "buy"))
    elif may_manage:
        parts.append(card("Buy credits", _buy_form(ws["id"], frame, svc.payments, amount, error), "buy"))
    if svc.payments is not None:
        listed = await orders_api.orders_page(svc, ws["id"], ORDERS_SHOWN)
        parts.append(card("Orders", _orders_table(listed), "orders"))
        found = await orders_api.invoices_page(svc, ws["id"], INVOICES_SHOWN)
        parts.append(card("Invoices", _invoices_table(ws["id"], found), "invoices"))
    settings = await reload_api.settings_view(svc, ws["id"])
    parts.append(_reload_card(ws["id"], frame, settings, may_manage, reload_error))
    return _html(pages.page("Credits", "".join(parts), frame, _notice(request)), status)


async def credits_page(request: web.Request) -> web.Response:
    return await _credits_page(request, await _workspace(request))


def _payments_of(request: web.Request):
    payments = request.app[SERVICES].payments
    if payments is None or payments.gateway is None:
        message = "No payment provider is configured: credits cannot be bought here."
        raise AdminError(409, message, "provider_not_configured")
    return payments


async def quote(request: web.Request) -> web.Response:
    """The purchase's figures before paying: the same Payments.quote an order freezes."""
    svc = request.app[SERVICES]
    ws = await _workspace(request)
    amount_text = (await _form(request)).get("amount", "").strip()
    try:
        amount_micro = orders_api.order_amount(_payments_of(request), {"amount": amount_text})
        figures = await orders_api.quote_view(svc, ws["id"], amount_micro)
    except AdminError as exc:
        if exc.status != 400:
            raise
        return await _credits_page(request, ws, amount_text, exc.message, status=400)
    frame = _frame(request, ws, "/credits")
    currency = figures["currency"].upper()
    rows = [
        ("Credits", format_micro(amount_micro)),
        (f"Amount ({currency})", figures["amount"]),
        (f"Purchase fee ({figures['fee_percent']}%)", figures["fee"]),
        (f"Tax: {figures['label']}", figures["tax"]),
        (
            Markup("<strong>Total</strong>"),
            Markup(f'<strong data-test="total">{esc(figures["total"])} {esc(currency)}</strong>'),
        ),
    ]
    confirm = (
        f'<form class="row" method="post" action="{PREFIX}/w/{esc(ws["id"])}/credits/orders">'
        f'<input type="hidden" name="amount" value="{esc(format_micro(amount_micro))}">'
        f'<input type="hidden" name="client_order_id" value="console-{secrets.token_hex(8)}">'
        f'{pages.csrf_field(frame.csrf)}<button type="submit" data-test="confirm">'
        f"Pay {esc(figures['total'])} {esc(currency)}</button>"
        f'<a href="{PREFIX}/w/{esc(ws["id"])}/credits">Cancel</a></form>'
    )
    body = card(
        "Confirm your purchase",
        "<p>Nothing is charged yet: confirming opens the payment provider's checkout for this total.</p>"
        + table(("", ""), rows, "", numeric=(1,)).replace("<table>", '<table class="figures">', 1)
        + confirm,
        "confirm",
    )
    return _html(pages.page("Buy credits", body, frame))


async def create_order(request: web.Request) -> web.Response:
    """Creates the order (idempotent by the confirmation's client_order_id) and sends the browser on to
    the provider's checkout. A page whose script follows the link, not a 303: the console's
    Content-Security-Policy (form-action 'self') forbids a form's redirect to another origin."""
    svc = request.app[SERVICES]
    ws = await _workspace(request)
    form = await _form(request)
    try:
        client_order_id = valid_id(form.get("client_order_id"), "client_order_id")
        amount_micro = orders_api.order_amount(_payments_of(request), {"amount": form.get("amount", "").strip()})
        order, _ = await orders_api.order_create(svc, ws["id"], client_order_id, amount_micro)
    except AdminError as exc:
        if exc.status not in (400, 409, 502):
            raise
        return await _credits_page(request, ws, form.get("amount", ""), exc.message, status=exc.status)
    if order.status is not OrderStatus.PENDING or not order.checkout_url:
        raise _see(f"{PREFIX}/w/{ws['id']}/credits", "order_closed")
    body = card(
        "Opening the payment page",
        f"<p>Order <code>{esc(order.id)}</code> is waiting for payment. If the payment page does not open, "
        f'<a href="{esc(order.checkout_url)}" data-redirect data-test="checkout">continue to payment</a>.</p>',
    )
    return _html(pages.page("Buy credits", body, _frame(request, ws, "/credits")))


async def invoice_pdf(request: web.Request) -> web.Response:
    """The admin API's invoice PDF, behind the console's session."""
    ws = await _workspace(request)
    return await orders_api.invoice_pdf_response(request.app[SERVICES], ws["id"], request.match_info["number"])


async def save_reload(request: web.Request) -> web.Response:
    ws = await _workspace(request)
    form = await _form(request)
    payload = {
        "enabled": form.get("enabled") == "on",
        "threshold": form.get("threshold", "").strip() or None,
        "amount": form.get("amount", "").strip() or None,
    }
    try:
        await reload_api.settings_put(request.app[SERVICES], ws["id"], payload)
    except AdminError as exc:
        if exc.status not in (400, 409):
            raise
        return await _credits_page(request, ws, reload_error=exc.message, status=exc.status)
    raise _see(f"{PREFIX}/w/{ws['id']}/credits", "reload_saved")


_BYOK_STATUS = {"active": "ok", "failing": "warn", "inactive": "off"}


async def _byok_page(request: web.Request, ws: dict, error: str = "", status: int = 200) -> web.Response:
    svc = request.app[SERVICES]
    frame = _frame(request, ws, "/byok")
    rows = []
    for k in await byok.keys_list(svc, ws["id"], None):
        verb = "reactivate" if k["status"] == "inactive" else "deactivate"
        action = f"{PREFIX}/w/{ws['id']}/byok/{k['id']}/{verb}"
        button = post_button(action, verb.capitalize(), frame.csrf, danger=verb == "deactivate")
        if k["office_id"]:  # the office travels with the form: keys are addressed within their scope
            button = Markup(
                button.replace("</form>", f'<input type="hidden" name="office" value="{esc(k["office_id"])}"></form>')
            )
        rows.append(
            (
                k["provider"],
                code(f"…{k['last4']}"),
                k["office_id"] or "whole workspace",
                badge(k["status"], _BYOK_STATUS.get(k["status"], "warn")),
                (k["last_used_at"] or "never")[:16].replace("T", " "),
                (k["created_at"] or "")[:16].replace("T", " "),
                button,
            )
        )
    options = "".join(f'<option value="{esc(p)}">{esc(p)}</option>' for p in sorted(svc.config.providers))
    add = card(
        "Add a provider key",
        "<p>Calls to this provider are then paid with your own key: they are recorded for visibility and not "
        "deducted from your credits. The key is checked with the provider before it is stored.</p>"
        + pages.notice(error, "error")
        + f'<form class="row" method="post" action="{PREFIX}/w/{esc(ws["id"])}/byok">'
        f'<label>Provider <select name="provider">{options}</select></label>'
        '<label class="grow">API key <input name="key" type="password" autocomplete="off" required></label>'
        f'{pages.csrf_field(frame.csrf)}<button type="submit">Validate and add</button></form>',
    )
    headers = ("Provider", "Key", "Scope", "Status", "Last used (UTC)", "Added (UTC)", "")
    body = add + card("Provider keys", table(headers, rows, "No provider key: calls use the platform's keys."))
    return _html(pages.page("BYOK keys", body, frame, _notice(request)), status)


async def byok_page(request: web.Request) -> web.Response:
    return await _byok_page(request, await _workspace(request))


async def add_byok(request: web.Request) -> web.Response:
    ws = await _workspace(request)
    form = await _form(request)
    try:
        await byok.key_add(
            request.app[SERVICES], ws["id"], None, {"provider": form.get("provider"), "key": form.get("key")}
        )
    except AdminError as exc:
        if exc.status not in (400, 502, 503):
            raise
        return await _byok_page(request, ws, exc.message, exc.status)
    raise _see(f"{PREFIX}/w/{ws['id']}/byok", "byok_added")


async def _byok_status(request: web.Request, status: str) -> web.Response:
    ws = await _workspace(request)
    office = (await _form(request)).get("office") or None
    await byok.key_set_status(request.app[SERVICES], ws["id"], office, request.match_info["key_id"], status)
    done = "byok_reactivated" if status == "active" else "byok_deactivated"
    raise _see(f"{PREFIX}/w/{ws['id']}/byok", done)


async def deactivate_byok(request: web.Request) -> web.Response:
    return await _byok_status(request, "inactive")


async def reactivate_byok(request: web.Request) -> web.Response:
    return await _byok_status(request, "active")


ROUTES = (
    Route("GET", "", index, ANY_PERMISSION, PUBLIC),
    Route("GET", "/login", login_form, ANY_PERMISSION, PUBLIC),
    Route("POST", "/login", login, ANY_PERMISSION, PUBLIC),
    Route("GET", "/static/{name}", static, ANY_PERMISSION, PUBLIC),
    Route("POST", "/logout", logout, ANY_PERMISSION, SELF),
    Route("GET", "/workspaces", workspaces, "READ", PLATFORM),
    Route("GET", "/w/{ws}", overview, "READ", IN_PATH),
    Route("GET", "/w/{ws}/ledger", ledger, "READ", IN_PATH),
    Route("GET", "/w/{ws}/ledger.csv", ledger_csv, "READ", IN_PATH),
    Route("GET", "/w/{ws}/credits", credits_page, "READ", IN_PATH),
    Route("POST", "/w/{ws}/credits/quote", quote, "CREDITS_MANAGE", IN_PATH),
    Route("POST", "/w/{ws}/credits/orders", create_order, "CREDITS_MANAGE", IN_PATH),
    Route("GET", "/w/{ws}/invoices/{number}/pdf", invoice_pdf, "READ", IN_PATH),
    Route("POST", "/w/{ws}/auto-reload", save_reload, "CREDITS_MANAGE", IN_PATH),
    Route("GET", "/w/{ws}/keys", keys_page, "READ", IN_PATH),
    Route("POST", "/w/{ws}/keys", create_key, "KEYS_MANAGE", IN_PATH),
    Route("POST", "/w/{ws}/keys/{key_id}/revoke", revoke_key, "KEYS_MANAGE", IN_PATH),
    Route("POST", "/w/{ws}/budgets", set_budget, "KEYS_MANAGE", IN_PATH),
    Route("GET", "/w/{ws}/byok", byok_page, "TENANT_MANAGE", IN_PATH),
    Route("POST", "/w/{ws}/byok", add_byok, "TENANT_MANAGE", IN_PATH),
    Route("POST", "/w/{ws}/byok/{key_id}/deactivate", deactivate_byok, "TENANT_MANAGE", IN_PATH),
    Route("POST", "/w/{ws}/byok/{key_id}/reactivate", reactivate_byok, "TENANT_MANAGE", IN_PATH),
)
