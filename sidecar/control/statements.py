"""Admin routes of the read side (README, "Statements and reports"), all with the READ permission:

    GET /admin/v1/workspaces/{ws}/ledger          the ledger history, a page at a time (cursor)
    GET /admin/v1/workspaces/{ws}/ledger.csv      the same rows as a streamed CSV statement
    GET /admin/v1/workspaces/{ws}/usage-summary   the usage summary for any period (from, to: UTC days)
    GET /admin/v1/workspaces/{ws}/statements/{month}?format=pdf|csv
                                                  the monthly usage statement (month: YYYY-MM, UTC)
    GET /admin/v1/reports/margin                  the margin report (format=json|csv, workspace_id=...)

Postgres only (DESIGN.md section 12). A bad filter changes nothing and gets a 400 in the admin envelope.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime

from aiohttp import web

from sidecar import db
from sidecar.control.http import SERVICES, AdminError, existing_workspace, json_response, valid_id
from sidecar.services import Services
from sidecar.statements import csv_export, history, margin, monthly, summary
from sidecar.statements.filters import QueryRefused, parse_filters, parse_limit, parse_period

SUMMARY_DAYS_DEFAULT = 30
_PERIOD_PARAMS = frozenset(("from", "to"))


def _refused(error: QueryRefused) -> AdminError:
    return AdminError(400, error.message, error.code)


def _unavailable() -> AdminError:
    return AdminError(503, "the ledger database is unavailable; retry shortly", "postgres_unavailable")


def _once(request: web.Request) -> None:
    """A parameter given twice is refused: which one would count is a guess a statement must not make."""
    repeated = sorted({name for name in request.query if len(request.query.getall(name)) > 1})
    if repeated:
        raise AdminError(400, f"parameter(s) given more than once: {', '.join(repeated)}", "invalid_filter")


def _only(request: web.Request, known: frozenset[str]) -> None:
    _once(request)
    unknown = sorted(set(request.query) - known)
    if unknown:
        raise AdminError(400, f"unknown parameter(s): {', '.join(unknown)}", "invalid_filter")


def _today() -> datetime:
    return datetime.now(UTC)


@contextmanager
def _timed(svc: Services, report: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        svc.metrics.read_seconds.labels(report).observe(time.perf_counter() - started)


async def history_view(svc: Services, ws: str, query: Mapping[str, str]) -> dict:
    """A page of `ws`'s ledger history for the filters in `query` (the admin route's and the console's)."""
    try:
        filters = parse_filters(query)
        limit = parse_limit(query.get("limit"))
        if "format" in query:
            raise QueryRefused("format is for the CSV statement (ledger.csv)")
        with _timed(svc, "history"):
            async with svc.pool.acquire() as conn:
                body = await history.page(conn, ws, filters, query.get("cursor"), limit)
    except QueryRefused as error:
        raise _refused(error) from None
    except db.POSTGRES_OUTAGE:
        raise _unavailable() from None
    return {"workspace_id": ws, **body}


async def ledger_page(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    _once(request)
    return json_response(await history_view(request.app[SERVICES], ws, request.query))


async def ledger_csv(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ws = await existing_workspace(request)
    _once(request)
    try:
        filters = parse_filters(request.query)
        if {"cursor", "limit", "format"} & set(request.query):
            raise QueryRefused("a CSV statement takes the filters only (no cursor, limit or format)")
    except QueryRefused as error:
        raise _refused(error) from None
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="ledger-{ws}.csv"',
            "Cache-Control": "no-store",
        }
    )
    response.enable_chunked_encoding()
    timeout_s = svc.config.ledger.statement_export_timeout_ms / 1000
    try:
        with _timed(svc, "csv"):
            async with svc.pool.acquire() as conn:
                await response.prepare(request)  # headers go out once a connection is ours
                rows = await csv_export.export(conn, ws, filters, response.write, timeout_s)
        svc.metrics.rows_exported.inc(rows)
    except db.POSTGRES_OUTAGE:
        if not response.prepared:
            raise _unavailable() from None
        raise  # mid-stream: the connection is cut without the last chunk, so the client sees a broken download
    await response.write_eof()
    return response


async def summary_view(svc: Services, ws: str, query: Mapping[str, str]) -> dict:
    """`ws`'s usage summary for the period in `query` (the admin route's and the console's)."""
    unknown = sorted(set(query) - _PERIOD_PARAMS)
    if unknown:
        raise AdminError(400, f"unknown parameter(s): {', '.join(unknown)}", "invalid_filter")
    try:
        period = parse_period(query.get("from"), query.get("to"), _today().date(), SUMMARY_DAYS_DEFAULT)
        with _timed(svc, "summary"):
            async with svc.pool.acquire() as conn:
                return await summary.usage_summary(conn, ws, period, period)
    except QueryRefused as error:
        raise _refused(error) from None
    except db.POSTGRES_OUTAGE:
        raise _unavailable() from None


async def usage_summary(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    return json_response(await summary_view(request.app[SERVICES], ws, request.query))


async def margin_report(request: web.Request) -> web.Response:
    _only(request, _PERIOD_PARAMS | {"workspace_id", "format"})
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        raise AdminError(400, "format must be json or csv", "invalid_format")
    ws = request.query.get("workspace_id")
    if ws is not None:
        valid_id(ws, "workspace_id")
    try:
        period = parse_period(request.query.get("from"), request.query.get("to"), _today().date(), SUMMARY_DAYS_DEFAULT)
        svc = request.app[SERVICES]
        with _timed(svc, "margin"):
            async with svc.pool.acquire() as conn:
                if ws is not None and not await db.workspace_exists(conn, ws):
                    raise AdminError(404, f"workspace {ws!r} does not exist", "workspace_not_found")
                report = await margin.margin_report(conn, period, ws)
    except QueryRefused as error:
        raise _refused(error) from None
    except db.POSTGRES_OUTAGE:
        raise _unavailable() from None
    if fmt == "csv":
        name = f"margin-{period.first.isoformat()}-{period.last.isoformat()}.csv"
        return web.Response(
            body=margin.to_csv(report),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    return json_response(report)


async def monthly_statement(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    _only(request, frozenset(("format",)))
    fmt = request.query.get("format", "pdf")
    if fmt not in ("pdf", "csv"):
        raise AdminError(400, "format must be pdf or csv", "invalid_filter")
    try:
        month = monthly.parse_month(request.match_info["month"])
    except QueryRefused as error:
        raise _refused(error) from None
    svc = request.app[SERVICES]
    try:
        with _timed(svc, "monthly_statement"):
            async with svc.pool.acquire() as conn:
                statement = await monthly.build(conn, ws, month)
    except db.POSTGRES_OUTAGE:
        raise _unavailable() from None
    name = f"statement-{ws}-{month:%Y-%m}.{fmt}"
    if fmt == "csv":
        body, content_type = monthly.to_csv(statement), "text/csv"
    else:
        body, content_type = monthly.render_pdf(statement), "application/pdf"
    return web.Response(
        body=body,
        content_type=content_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"},
    )


WORKSPACE_ROUTES = (
    ("GET", "/admin/v1/workspaces/{ws}/ledger", ledger_page, "READ"),
    ("GET", "/admin/v1/workspaces/{ws}/ledger.csv", ledger_csv, "READ"),
    ("GET", "/admin/v1/workspaces/{ws}/usage-summary", usage_summary, "READ"),
    ("GET", "/admin/v1/workspaces/{ws}/statements/{month}", monthly_statement, "READ"),
)
# The margin report shows what the platform pays upstream: platform-wide tokens only.
PLATFORM_ROUTES = (("GET", "/admin/v1/reports/margin", margin_report, "READ"),)
