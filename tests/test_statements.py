"""The read side (issue 10): the ledger history and its cursor, CSV statements, the usage summary on
both planes, the margin report, and the daily roll-ups they read, checked against raw ledger rows."""

from __future__ import annotations

import asyncio
import csv
import io
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import orjson
import pytest
from support.harness import ADMIN_TOKEN, KEYS_ADMIN_TOKEN, Sidecar, chat_body
from support.statements import (
    add_entries,
    check_margin,
    check_summary,
    ensure_past_partitions,
    expected_margin,
    expected_summary,
    get,
    raw_rows,
    synthetic_entry,
    visible_eventually,
    walk,
)

from sidecar.audit import Kind, _postgres_findings
from sidecar.money import format_micro
from sidecar.state import keys
from sidecar.statements import history
from sidecar.statements.columns import CSV_HEADER
from sidecar.statements.filters import parse_filters

SUMMARY_PATH = "/v1/credits/projections/usage-summary"


@pytest.fixture(autouse=True)
async def _past_partitions(sidecar: Sidecar) -> None:
    async with sidecar.svc.pool.acquire() as conn:
        await ensure_past_partitions(conn)


async def _calls(sidecar: Sidecar, ws, n: int, **extra) -> None:
    for i in range(n):
        status, _, body = await sidecar.chat(ws, chat_body(f"call number {i}", **extra))
        assert status == 200, body


async def _template(sidecar: Sidecar, redis_client, ws) -> dict[bytes, bytes]:
    """A real settled event, read off the stream before the flusher takes it."""
    await _calls(sidecar, ws, 1)
    for _ in range(100):
        entries = await redis_client.xrange(keys.stream(ws.id))
        if entries:
            return entries[-1][1]
        await asyncio.sleep(0.02)
    raise AssertionError("no settled event on the stream")


# --- history ----------------------------------------------------------------------------------------


async def test_history_pages_every_row_once_with_amounts_as_strings_and_micro(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=5_000_000)
    await _calls(sidecar, ws, 7)
    await sidecar.flush()
    rows = await visible_eventually(sidecar, ws.id)
    raw = {str(r["event_id"]): r for r in await raw_rows(sidecar, ws.id)}
    assert len(rows) == len(raw) == 8  # the grant and 7 calls
    for row in rows:
        source = raw[row["event_id"]]
        assert row["cost_micro"] == source["cost_micro"] and row["cost"] == format_micro(source["cost_micro"])
        assert row["balance_impact_micro"] == source["balance_impact_micro"]
        assert row["balance_impact"] == format_micro(source["balance_impact_micro"])
        assert row["balance_after_micro"] == source["balance_after_micro"]
        assert row["input_tokens"] == source["input_tokens"] and row["output_tokens"] == source["output_tokens"]
        assert row["created_at"].endswith("Z")
        assert row["fee_micro"] == 0 and row["fee"] == "0.000000"
    paged = await walk(sidecar, ws.id, order="asc", limit="3")
    assert [r["event_id"] for r in paged] == [r["event_id"] for r in rows]
    backwards = await walk(sidecar, ws.id, order="desc", limit="2")
    assert [r["event_id"] for r in backwards] == [r["event_id"] for r in reversed(rows)]


async def test_history_filters(sidecar: Sidecar) -> None:
    office = f"of_{uuid.uuid4().hex[:8]}"  # office ids are global
    ws = await sidecar.workspace(credits_micro=5_000_000, office=office)
    await _calls(sidecar, ws, 3)
    status, _, _ = await sidecar.chat(ws, chat_body(), headers={"x-session-id": "sess-1"})
    assert status == 200
    await sidecar.flush()
    await visible_eventually(sidecar, ws.id)
    assert len(await walk(sidecar, ws.id, kind="grant")) == 1
    assert len(await walk(sidecar, ws.id, kind="usage,grant")) == 5
    assert len(await walk(sidecar, ws.id, session_id="sess-1")) == 1
    assert len(await walk(sidecar, ws.id, key_id=ws.key_id)) == 4
    assert len(await walk(sidecar, ws.id, office_id=office)) == 4
    assert len(await walk(sidecar, ws.id, model="gpt-4o-mini", provider="mock", status="completed")) == 4
    assert len(await walk(sidecar, ws.id, byok="true")) == 0
    assert len(await walk(sidecar, ws.id, byok="false", kind="usage")) == 4
    future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert len(await walk(sidecar, ws.id, **{"from": future})) == 0
    assert len(await walk(sidecar, ws.id, to=future)) == 5


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"limit": "0"}, "invalid_limit"),
        ({"limit": "1001"}, "invalid_limit"),
        ({"limit": "ten"}, "invalid_limit"),
        ({"from": "yesterday"}, "invalid_filter"),
        ({"from": "2026-01-01T00:00:00"}, "invalid_filter"),  # no offset: ambiguous
        ({"from": "2026-02-01", "to": "2026-01-01"}, "invalid_filter"),
        ({"kind": "Usage;drop"}, "invalid_filter"),
        ({"byok": "yes"}, "invalid_filter"),
        ({"order": "random"}, "invalid_filter"),
        ({"modle": "gpt-4o-mini"}, "invalid_filter"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor"),
        ({"model": "x" * 201}, "invalid_filter"),
        ([("kind", "usage"), ("kind", "grant")], "invalid_filter"),
    ],
)
async def test_history_refuses_bad_input_in_the_admin_envelope(sidecar: Sidecar, params, code) -> None:
    ws = await sidecar.workspace()
    if isinstance(params, list):
        status, body = await get(sidecar, f"/workspaces/{ws.id}/ledger", pairs=params)
    else:
        status, body = await get(sidecar, f"/workspaces/{ws.id}/ledger", **params)
    assert status == 400, body
    assert body["error"]["code"] == code and body["error"]["type"] == "admin_error"


async def test_a_cursor_only_works_with_its_own_filters(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=1_000_000)
    await _calls(sidecar, ws, 2)
    await sidecar.flush()
    await visible_eventually(sidecar, ws.id)
    status, page = await get(sidecar, f"/workspaces/{ws.id}/ledger", limit="1", kind="usage")
    assert status == 200 and page["has_more"]
    status, body = await get(sidecar, f"/workspaces/{ws.id}/ledger", cursor=page["next_cursor"], kind="grant")
    assert status == 400 and body["error"]["code"] == "cursor_mismatch"


async def test_history_needs_an_admin_token_and_an_existing_workspace(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace()
    assert (await get(sidecar, f"/workspaces/{ws.id}/ledger", token="wrong"))[0] == 401
    assert (await get(sidecar, f"/workspaces/{ws.id}/ledger", token=KEYS_ADMIN_TOKEN))[0] == 200  # holds READ
    status, body = await get(sidecar, "/workspaces/ws_nobody/ledger")
    assert status == 404 and body["error"]["code"] == "workspace_not_found"


async def test_pages_neither_skip_nor_repeat_while_calls_keep_settling(sidecar: Sidecar, redis_client) -> None:
    """Rows keep arriving while a client pages: late rows settled long before the cursor's position
    (a backlog flushed after an outage), and a flush transaction held open across several pages."""
    ws = await sidecar.workspace(credits_micro=10**9)
    template = await _template(sidecar, redis_client, ws)
    await sidecar.flush()
    now = datetime.now(UTC)
    await add_entries(redis_client, sidecar, ws.id, [synthetic_entry(template, ws.id, now) for _ in range(30)])
    await sidecar.flush()

    stop = asyncio.Event()

    async def settle_more() -> None:
        for i in range(40):
            # Settled an hour ago, flushed now: behind any time-based cursor.
            late = [synthetic_entry(template, ws.id, now - timedelta(hours=1, seconds=i)) for _ in range(3)]
            await add_entries(redis_client, sidecar, ws.id, late)
            await sidecar.svc.flusher.flush_once()
            await asyncio.sleep(0.005)
        stop.set()

    held = await asyncpg.connect(sidecar.svc.config.database_url)
    try:
        slow = held.transaction()
        await slow.start()  # a flush that has written a row and not committed yet
        held_id = uuid.uuid4()
        await held.execute(
            "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, cost_micro, balance_impact_micro) "
            "VALUES ($1, $2, 'usage', 'failed', $3, 0, 0)",
            held_id,
            now - timedelta(days=1),
            ws.id,
        )
        writer = asyncio.create_task(settle_more())
        seen: list[str] = []
        cursor = None
        committed = False
        for pages in range(5000):
            query = {"order": "asc", "limit": "7", **({"cursor": cursor} if cursor else {})}
            status, page = await get(sidecar, f"/workspaces/{ws.id}/ledger", **query)
            assert status == 200, page
            seen += [r["event_id"] for r in page["data"]]
            cursor = page["next_cursor"]
            if pages == 20:
                # Meanwhile, later flushes committed: none was shown past the open transaction.
                assert len(seen) == 32, len(seen)
                await slow.commit()  # its row, a day old, commits while the reader waits at its place
                committed = True
            if not page["has_more"]:
                if stop.is_set() and committed and len(seen) == len(await raw_rows(sidecar, ws.id)):
                    break
                await asyncio.sleep(0.02)  # rows of transactions that began before ours: the watermark waits
        await writer
    finally:
        await held.close()
    raw = {str(r["event_id"]) for r in await raw_rows(sidecar, ws.id)}
    assert len(seen) == len(set(seen)), "a row was served twice"
    assert set(seen) == raw, f"{len(raw - set(seen))} row(s) skipped"
    assert str(held_id) in seen
    assert len(raw) == 1 + 1 + 30 + 120 + 1


async def test_a_deep_page_costs_what_the_first_costs(sidecar: Sidecar) -> None:
    """EXPLAIN ANALYZE: the first page and a page 15,000 rows deep each read a handful of index and
    heap pages (the cursor is the index scan's start key), never the workspace's rows before it."""
    ws = await sidecar.workspace()
    async with sidecar.svc.pool.acquire() as conn:
        for batch in range(100):  # 100 flushes of 200 rows: 100 transactions, as the flusher writes them
            await conn.execute(
                "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, provider, model, cost_micro, "
                "balance_impact_micro) SELECT gen_random_uuid(), now() - make_interval(secs => g), 'usage', "
                "'completed', $1, 'mock', 'gpt-4o-mini', 10, 0 FROM generate_series($2::int, $2 + 199) AS g",
                ws.id,
                batch * 200,
            )
        await conn.execute("ANALYZE ledger")
        deep = await conn.fetchrow(
            "SELECT insert_xid::text AS xid, event_id FROM ledger WHERE workspace_id = $1 "
            "ORDER BY insert_xid, event_id OFFSET 15000 LIMIT 1",
            ws.id,
        )
        filters = parse_filters({"order": "asc"})
        costs = []
        for after in (None, (int(deep["xid"]), deep["event_id"])):
            query, args = history.page_query(filters, after, 100)
            [plan] = orjson.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}", ws.id, *args))
            costs.append(plan)
    for plan in costs:
        text = orjson.dumps(plan).decode()
        assert "ledger_history" in text or "insert_xid_event_id" in text, text
        assert plan["Plan"]["Actual Rows"] == 101  # the page and one more, to know whether there is more
        buffers = plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"]
        assert buffers < 200, f"a page read {buffers} buffers: {text}"  # the workspace's rows fill ~700


# --- CSV ----------------------------------------------------------------------------------------------


async def test_the_csv_statement_has_every_column_and_the_same_rows(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=3_000_000)
    await _calls(sidecar, ws, 4)
    await sidecar.flush()
    rows = await visible_eventually(sidecar, ws.id)
    status, body = await get(sidecar, f"/workspaces/{ws.id}/ledger.csv", order="asc")
    assert status == 200
    lines = list(csv.reader(io.StringIO(body.decode())))
    assert tuple(lines[0]) == CSV_HEADER
    assert len(lines) == 1 + len(rows)
    for line, row in zip(lines[1:], rows, strict=True):
        record = dict(zip(CSV_HEADER, line, strict=True))
        assert record["event_id"] == row["event_id"]
        assert record["created_at"] == row["created_at"]  # the same UTC text, from SQL and from Python
        for name in ("cost", "fee", "fee_waived", "balance_impact", "balance_after", "short"):
            micro = row[f"{name}_micro"]
            assert record[name] == (row[name] or "")
            assert record[f"{name}_micro"] == ("" if micro is None else str(micro))
        assert record["byok"] == "false" and record["input_tokens"] == str(row["input_tokens"])
        assert record["price_version"] == (row["price_version"] or "")
    # Each call names the price version it was billed at, whose prices the price_versions table keeps.
    usage = [row for row in rows if row["kind"] == "usage"]
    assert usage and all(row["price_version"] for row in usage)
    async with sidecar.svc.pool.acquire() as conn:
        known = await conn.fetch(
            "SELECT version FROM price_versions WHERE version = ANY($1::text[])", [r["price_version"] for r in usage]
        )
    assert {r["version"] for r in known} == {r["price_version"] for r in usage}
    status, body = await get(sidecar, f"/workspaces/{ws.id}/ledger.csv", kind="grant")
    assert len(body.decode().splitlines()) == 2
    status, body = await get(sidecar, f"/workspaces/{ws.id}/ledger.csv", limit="5")
    assert status == 400 and body["error"]["code"] == "invalid_filter"


async def test_sql_and_python_write_amounts_alike(sidecar: Sidecar) -> None:
    from sidecar.statements.columns import sql_credits

    values = [0, 1, -1, 999_999, 1_000_000, -1_000_001, 123_456_789, -(10**15), 10**15, None]
    async with sidecar.svc.pool.acquire() as conn:
        got = await conn.fetch(f"SELECT {sql_credits('v')} AS t FROM unnest($1::bigint[]) AS v", values)
    assert [r["t"] for r in got] == [None if v is None else format_micro(v) for v in values]


# --- roll-ups, summary, margin --------------------------------------------------------------------------


async def test_a_replayed_batch_does_not_double_the_roll_ups(sidecar: Sidecar, redis_client) -> None:
    ws = await sidecar.workspace(credits_micro=10**8)
    template = await _template(sidecar, redis_client, ws)
    await sidecar.flush()
    entries = [synthetic_entry(template, ws.id, datetime.now(UTC)) for _ in range(5)]
    await add_entries(redis_client, sidecar, ws.id, entries)
    await sidecar.flush()

    async def rollup() -> list:
        async with sidecar.svc.pool.acquire() as conn:
            return [dict(r) for r in await conn.fetch("SELECT * FROM ledger_daily WHERE workspace_id = $1", ws.id)]

    before = await rollup()
    await add_entries(redis_client, sidecar, ws.id, entries)  # the same batch again (a crash before the ack)
    await sidecar.flush()
    assert await rollup() == before
    assert sum(r["rows"] for r in before if r["kind"] == "usage") == 6


async def test_the_usage_summary_on_the_data_plane_matches_raw_rows(sidecar: Sidecar, redis_client) -> None:
    ws = await sidecar.workspace(credits_micro=5_000_000)
    await _calls(sidecar, ws, 3)
    template = await _template(sidecar, redis_client, ws)
    now = datetime.now(UTC)
    # Calls of earlier days, and one outside the 30 days.
    entries = [synthetic_entry(template, ws.id, now - timedelta(days=d)) for d in (1, 2, 6, 8, 29, 31)]
    entries.append(synthetic_entry(template, ws.id, now - timedelta(days=3), byok=True, model="claude-test"))
    await add_entries(redis_client, sidecar, ws.id, entries)
    await sidecar.flush()
    await sidecar.grant(ws.id, 1_000_000)

    async with sidecar.http.post(
        sidecar.data.make_url(SUMMARY_PATH), data=b"{}", headers={"Authorization": f"Bearer {ws.key}"}
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    today = datetime.now(UTC).date()
    assert body["period"] == {"from": (today - timedelta(days=29)).isoformat(), "to": today.isoformat(), "days": 30}
    assert [d["date"] for d in body["daily"]] == [(today - timedelta(days=6 - i)).isoformat() for i in range(7)]
    expected = expected_summary(await raw_rows(sidecar, ws.id), today - timedelta(days=29), today, today - timedelta(6))
    check_summary(body, expected)
    assert body["totals"]["calls"] == 4 + 5  # 4 real calls, 5 synthetic inside the window
    assert body["byok"]["calls"] == 1
    assert {m["kind"] for m in body["movements"]} == {"grant"}


async def test_the_usage_summary_refuses_bad_keys_and_bodies_in_the_openai_envelope(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace()
    url = sidecar.data.make_url(SUMMARY_PATH)
    cases = [
        ({"Authorization": "Bearer sk-sc-nope"}, b"{}", 401, "invalid_api_key"),
        ({}, b"{}", 401, "invalid_api_key"),
        ({"Authorization": f"Bearer {ws.key}"}, b"[1]", 400, "invalid_json"),
        ({"Authorization": f"Bearer {ws.key}"}, b"{nope", 400, "invalid_json"),
        ({"Authorization": f"Bearer {ws.key}"}, b'{"days": 90}', 400, "unknown_parameter"),
    ]
    for headers, body, status, code in cases:
        async with sidecar.http.post(url, data=body, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == status, answer
            assert answer["error"]["code"] == code and "message" in answer["error"] and "type" in answer["error"]
    async with sidecar.http.post(url, headers={"Authorization": f"Bearer {ws.key}"}) as resp:
        assert resp.status == 200  # no body at all is fine
    async with sidecar.http.get(url, headers={"Authorization": f"Bearer {ws.key}"}) as resp:
        assert resp.status == 405


async def test_the_operators_summary_and_margin_cover_any_period(sidecar: Sidecar, redis_client) -> None:
    ws = await sidecar.workspace(credits_micro=5_000_000)
    template = await _template(sidecar, redis_client, ws)
    now = datetime.now(UTC)
    entries = [synthetic_entry(template, ws.id, now - timedelta(days=d)) for d in (40, 41, 100)]
    entries.append(synthetic_entry(template, ws.id, now - timedelta(days=40), byok=True))
    await add_entries(redis_client, sidecar, ws.id, entries)
    await sidecar.flush()
    first, last = (now - timedelta(days=60)).date(), now.date()
    status, body = await get(
        sidecar, f"/workspaces/{ws.id}/usage-summary", **{"from": first.isoformat(), "to": last.isoformat()}
    )
    assert status == 200, body
    assert len(body["daily"]) == 61
    check_summary(body, expected_summary(await raw_rows(sidecar, ws.id), first, last, first))

    params = {"from": first.isoformat(), "to": last.isoformat(), "workspace_id": ws.id}
    status, report = await get(sidecar, "/reports/margin", **params)
    assert status == 200, report
    check_margin(report, expected_margin(await raw_rows(sidecar, ws.id), first, last))
    [line] = report["data"]
    assert (
        line["upstream_cost_micro"] > 0 and line["margin_micro"] == line["charged_micro"] - line["upstream_cost_micro"]
    )
    assert line["byok_calls"] == 1
    status, body = await get(sidecar, "/reports/margin", format="csv", **params)
    assert status == 200
    lines = list(csv.DictReader(io.StringIO(body.decode())))
    assert lines[0]["margin_micro"] == str(line["margin_micro"]) and lines[-1]["provider"] == "total"

    for bad, code in (
        ({"from": "2026-13-01"}, "invalid_period"),
        ({"from": "2026-02-01", "to": "2026-01-01"}, "invalid_period"),
        ({"from": "2020-01-01", "to": "2026-01-01"}, "invalid_period"),
        ({"format": "xml"}, "invalid_format"),
        ({"workspace_id": "ws_nobody"}, "workspace_not_found"),
        ({"group": "model"}, "invalid_filter"),
    ):
        status, body = await get(sidecar, "/reports/margin", **bad)
        assert status in (400, 404) and body["error"]["code"] == code, (bad, body)


async def test_roll_ups_follow_rows_of_any_kind_and_roll_back_with_them(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace(credits_micro=2_000_000)
    async with sidecar.svc.pool.acquire() as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, cost_micro, "
                    "balance_impact_micro) VALUES ($1, now(), 'usage', 'completed', $2, -5, 0)",
                    uuid.uuid4(),
                    ws.id,
                )
        rows = await conn.fetch(
            "SELECT kind, rows, balance_impact_micro FROM ledger_daily WHERE workspace_id = $1", ws.id
        )
    assert [(r["kind"], r["rows"], r["balance_impact_micro"]) for r in rows] == [("grant", 1, 2_000_000)]


async def test_the_summary_endpoint_answers_from_roll_ups_only(sidecar: Sidecar, redis_client) -> None:
    """A roll-up row alone (no ledger row) shows in the summary: it reads roll-ups, not the ledger."""
    ws = await sidecar.workspace()
    today = datetime.now(UTC).date()
    async with sidecar.svc.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO ledger_daily VALUES ($1, $2, 'usage', 'completed', 'mock', 'gpt-4o-mini', false, "
            "7, 70, 7, 0, 0, 0, 0, 700, 500, 0, -700)",
            ws.id,
            today,
        )
    async with sidecar.http.post(
        sidecar.data.make_url(SUMMARY_PATH), headers={"Authorization": f"Bearer {ws.key}"}
    ) as resp:
        body = orjson.loads(await resp.read())
    assert body["totals"]["calls"] == 7 and body["totals"]["credits_spent"] == "0.000700"
    assert body["daily"][-1]["calls"] == 7
    async with sidecar.svc.pool.acquire() as conn:  # and the audit sees the roll-up the ledger does not back
        [finding] = await _postgres_findings(conn, [ws.id])
    assert finding.kind == Kind.ROLLUP_VS_LEDGER and "the ledger has 0 row(s)" in finding.detail


async def test_a_client_leaving_a_csv_download_midway_frees_its_connection(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace()
    async with sidecar.svc.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO ledger (event_id, created_at, kind, status, workspace_id, cost_micro, balance_impact_micro, "
            "error) SELECT gen_random_uuid(), now(), 'usage', 'failed', $1, 0, 0, repeat('x', 2000) "
            "FROM generate_series(1, 5000)",
            ws.id,
        )
    url = sidecar.control.make_url(f"/admin/v1/workspaces/{ws.id}/ledger.csv")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    for _ in range(sidecar.svc.pool.get_max_size() + 2):  # more than the pool holds: a leak would hang
        async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
            assert resp.status == 200
            await resp.content.readany()  # the first chunk, then the client goes away
    status, body = await asyncio.wait_for(get(sidecar, f"/workspaces/{ws.id}/ledger", limit="1"), 30)
    assert status == 200 and len(body["data"]) == 1


# --- the monthly usage statement ------------------------------------------------------------------------


async def test_the_monthly_statement_matches_the_raw_rows_as_csv_and_pdf(sidecar: Sidecar) -> None:
    """Opening balance, each kind's net, the usage lines and the closing balance, from the roll-ups,
    equal the same figures recomputed from the raw ledger rows; the PDF prints them."""
    from pypdf import PdfReader

    ws = await sidecar.workspace(credits_micro=3_000_000)
    await _calls(sidecar, ws, 3)
    await sidecar.grant(ws.id, 250_000, grant_id="statement-extra")
    await sidecar.flush()
    await visible_eventually(sidecar, ws.id)
    async with sidecar.svc.pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM ledger WHERE workspace_id = $1", ws.id)
    now = datetime.now(UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    month = f"{start:%Y-%m}"
    inside = [r for r in rows if r["created_at"] >= start]
    opening = sum(r["balance_impact_micro"] for r in rows if r["created_at"] < start)
    closing = sum(r["balance_impact_micro"] for r in rows)
    assert closing == (await sidecar.assert_identity(ws.id))["account_balance"]

    status, body = await get(sidecar, f"/workspaces/{ws.id}/statements/{month}", format="csv")
    assert status == 200
    lines = list(csv.DictReader(io.StringIO(body.decode())))
    by_section = {}
    for line in lines:
        by_section.setdefault(line["section"], []).append(line)
    assert int(by_section["opening_balance"][0]["balance_impact_micro"]) == opening
    assert int(by_section["closing_balance"][0]["balance_impact_micro"]) == closing
    nets = {line["kind"]: int(line["balance_impact_micro"]) for line in by_section["kind_total"]}
    expected_nets: dict[str, int] = {}
    for r in inside:
        expected_nets[r["kind"]] = expected_nets.get(r["kind"], 0) + r["balance_impact_micro"]
    assert nets == expected_nets
    [usage] = by_section["usage"]  # one model, one provider
    calls = [r for r in inside if r["kind"] == "usage"]
    assert int(usage["calls"]) == len(calls) == 3
    assert int(usage["input_tokens"]) == sum(r["input_tokens"] for r in calls)
    assert int(usage["balance_impact_micro"]) == sum(r["balance_impact_micro"] for r in calls)

    status, pdf = await get(sidecar, f"/workspaces/{ws.id}/statements/{month}")
    assert status == 200 and pdf[:5] == b"%PDF-"
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert f"Usage statement {month}" in text
    for figure in (opening, closing, *expected_nets.values(), -usage_sum(calls)):
        assert format_micro(figure) in text, figure

    for bad in ("2026-13", "26-01", "1999-12"):
        status, answer = await get(sidecar, f"/workspaces/{ws.id}/statements/{bad}")
        assert status == 400 and answer["error"]["code"] == "invalid_filter"
    status, answer = await get(sidecar, f"/workspaces/{ws.id}/statements/{month}", format="xls")
    assert status == 400


def usage_sum(calls: list) -> int:
    return sum(r["balance_impact_micro"] for r in calls)
