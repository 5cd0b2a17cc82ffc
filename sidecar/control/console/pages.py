"""The console's HTML: one layout and small builders, plain string templates, every value escaped.

Nothing here does I/O or knows a request: the handlers (console/app.py) pass plain values in and get a
page out. Every interpolated value goes through `esc` (or is built from escaped parts), so data can
never become markup. No inline script or style: the Content-Security-Policy allows only our own files.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from string import Template


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


class Markup(str):
    """HTML already built from escaped parts: passed through as it is."""


def render(value: object) -> str:
    return value if isinstance(value, Markup) else esc(value)


_LAYOUT = Template(
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · Sidecar console</title>
<link rel="stylesheet" href="$prefix/static/console.css">
<script src="$prefix/static/console.js" defer></script>
</head>
<body>
<header class="top">
  <a class="brand" href="$prefix">Sidecar <span>billing console</span></a>
  $workspace
  <nav>$nav</nav>
  $account
</header>
<main>
$notice
<h1>$title</h1>
$body
</main>
</body>
</html>
"""
)


@dataclass(frozen=True, slots=True)
class Frame:
    """What every signed-in page shows around its content."""

    prefix: str  # /console
    principal_name: str
    csrf: str
    workspace: str | None = None  # the workspace shown, for its navigation
    workspace_name: str | None = None
    can_switch: bool = False  # a platform-wide token: a link to the workspace list
    nav: Sequence[tuple[str, str]] = ()  # (path under the workspace, label)
    active: str = ""


def page(title: str, body: str, frame: Frame | None, notice: str = "", prefix: str = "/console") -> str:
    prefix = frame.prefix if frame else prefix
    workspace = nav = account = ""
    if frame is not None:
        if frame.workspace:
            base = f"{frame.prefix}/w/{esc(frame.workspace)}"
            nav = "".join(
                f'<a href="{base}{esc(path)}"{" class=active" if path == frame.active else ""}>{esc(label)}</a>'
                for path, label in frame.nav
            )
            switch = f' <a class="switch" href="{frame.prefix}/workspaces">switch</a>' if frame.can_switch else ""
            workspace = (
                f'<div class="ws"><span class="ws-name">{esc(frame.workspace_name or frame.workspace)}</span>'
                f"<code>{esc(frame.workspace)}</code>{switch}</div>"
            )
        account = (
            f'<form class="account" method="post" action="{frame.prefix}/logout">'
            f'<span title="admin token">{esc(frame.principal_name)}</span>'
            f'{csrf_field(frame.csrf)}<button class="link" type="submit">Log out</button></form>'
        )
    return _LAYOUT.substitute(
        title=esc(title), prefix=prefix, workspace=workspace, nav=nav, account=account, notice=notice, body=body
    )


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(token)}">'


def notice(text: str, kind: str = "ok") -> str:
    return f'<div class="notice {esc(kind)}" role="status">{esc(text)}</div>' if text else ""


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], empty: str, numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in numeric else ''}>{render(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    if not body:
        body = f'<tr><td class="empty" colspan="{len(headers)}">{esc(empty)}</td></tr>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def stat(label: str, value: str, hint: str = "", test_id: str = "") -> str:
    tid = f' data-test="{esc(test_id)}"' if test_id else ""
    small = f"<small>{esc(hint)}</small>" if hint else ""
    return f'<div class="stat"><span class="label">{esc(label)}</span><strong{tid}>{esc(value)}</strong>{small}</div>'


def card(title: str, content: str, extra_class: str = "") -> str:
    return f'<section class="card {esc(extra_class)}"><h2>{esc(title)}</h2>{content}</section>'


def post_button(action: str, label: str, csrf: str, danger: bool = False, confirm: str = "") -> Markup:
    confirm_attr = f' data-confirm="{esc(confirm)}"' if confirm else ""
    cls = "danger small" if danger else "small"
    return Markup(
        f'<form class="inline" method="post" action="{esc(action)}"{confirm_attr}>{csrf_field(csrf)}'
        f'<button class="{cls}" type="submit">{esc(label)}</button></form>'
    )


def badge(text: str, kind: str) -> Markup:
    return Markup(f'<span class="badge {esc(kind)}">{esc(text)}</span>')


def code(text: object) -> Markup:
    return Markup(f"<code>{esc(text)}</code>")


def link(href: str, text: str) -> Markup:
    return Markup(f'<a href="{esc(href)}">{esc(text)}</a>')


def login_page(prefix: str, login_csrf: str, error: str = "") -> str:
    body = f"""
<form class="card login" method="post" action="{prefix}/login">
  <p>Sign in with an admin token. A token limited to one workspace opens that workspace only.</p>
  {notice(error, "error")}
  <label for="token">Admin token</label>
  <input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
  {csrf_field(login_csrf)}
  <button type="submit">Log in</button>
</form>"""
    return page("Log in", body, None, prefix=prefix)


def error_page(prefix: str, status: int, message: str, frame: Frame | None) -> str:
    titles = {400: "Bad request", 401: "Not signed in", 403: "Not allowed", 404: "Not found"}
    title = titles.get(status, "Something went wrong")
    back = f'<p><a href="{prefix}">Back to the console</a></p>'
    login = f'<p><a href="{prefix}/login">Log in</a></p>' if status == 401 else back
    body = f'<section class="card error-page"><p class="status">{status}</p><p>{esc(message)}</p>{login}</section>'
    return page(title, body, frame, prefix=prefix)


CHART_W, CHART_H, CHART_PAD = 640, 200, 28


def bar_chart(days: Sequence[tuple[str, int, str]], unit: str) -> Markup:
    """An SVG bar chart, drawn here (no script): (label, value, value as text) per bar."""
    if not days:
        return Markup("")
    top = max(v for _, v, _ in days) or 1
    slot = (CHART_W - 2 * CHART_PAD) / len(days)
    bars = []
    for i, (label, value, shown) in enumerate(days):
        height = round((CHART_H - 2 * CHART_PAD) * value / top)
        x = round(CHART_PAD + i * slot + slot * 0.15)
        y = CHART_H - CHART_PAD - height
        width = round(slot * 0.7)
        bars.append(
            f"<g><title>{esc(label)}: {esc(shown)} {esc(unit)}</title>"
            f'<rect class="bar" x="{x}" y="{y}" width="{width}" height="{max(height, 1)}" rx="3"></rect>'
            + (f'<text class="value" x="{x + width // 2}" y="{y - 6}">{esc(shown)}</text>' if value else "")
            + f'<text class="day" x="{x + width // 2}" y="{CHART_H - 8}">{esc(label)}</text></g>'
        )
    base = CHART_H - CHART_PAD
    axis = f'<line class="axis" x1="{CHART_PAD}" y1="{base}" x2="{CHART_W - CHART_PAD}" y2="{base}"></line>'
    return Markup(
        f'<svg class="chart" viewBox="0 0 {CHART_W} {CHART_H}" role="img" aria-label="{esc(unit)} per day">'
        f"{axis}{''.join(bars)}</svg>"
    )
