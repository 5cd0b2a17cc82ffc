"""Helpers of the read-side tests: admin GETs, synthetic ledger events, and the figures recomputed from
raw ledger rows (independently of sidecar/statements, which reads the roll-ups)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta

import asyncpg
import orjson

from sidecar.money import format_micro
from sidecar.state import keys
from support.harness import ADMIN_TOKEN, Sidecar

TOKENS = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h", "reasoning")


async def get(
    sidecar: Sidecar, path: str, token: str = ADMIN_TOKEN, pairs: list | None = None, **params: str
) -> tuple[int, dict | bytes]:
    """GET on the admin API; `pairs` for a query string naming a parameter twice."""
    url = sidecar.control.make_url("/admin/v1" + path)
    async with sidecar.http.get(url, params=pairs or params, headers={"Authorization": f"Bearer {token}"}) as resp:
        body = await resp.read()
        if resp.content_type == "application/json":
            return resp.status, orjson.loads(body)
        return resp.status, body


async def walk(sidecar: Sidecar, ws: str, **params: str) -> list[dict]:
    """Every row of the history, page by page."""
    rows, cursor = [], None
    for _ in range(10_000):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        status, page = await get(sidecar, f"/workspaces/{ws}/ledger", **query)
        assert status == 200, page
        rows += page["data"]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return rows
    raise AssertionError("the history did not end")


async def raw_rows(sidecar: Sidecar, ws: str) -> list[asyncpg.Record]:
    async with sidecar.svc.pool.acquire() as conn:
        return await conn.fetch("SELECT * FROM ledger WHERE workspace_id = $1", ws)


async def visible_eventually(sidecar: Sidecar, ws: str, wait_s: float = 30.0) -> list[dict]:
    """The full history once it shows every committed row: the watermark waits for transactions of
    the whole Postgres cluster that began before ours (other test sessions' included) to end."""
    rows: list[dict] = []
    for _ in range(int(wait_s / 0.1)):
        rows = await walk(sidecar, ws, order="asc", limit="1000")
        if len(rows) == len(await raw_rows(sidecar, ws)):
            return rows
        await asyncio.sleep(0.1)
    return rows


def synthetic_entry(template: dict[bytes, bytes], ws: str, at: datetime, **changes: object) -> dict[bytes, bytes]:
    """A settled event as settle.lua writes it, from a real one: a new event id, another time."""
    event = orjson.loads(template[b"e"])
    event_id = str(uuid.uuid4())
    event.update(workspace_id=ws, event_id=event_id, request_id=event_id.replace("-", ""), **changes)
    fields = {**template, b"e": orjson.dumps(event), b"at": str(int(at.timestamp() * 1000)).encode()}
    fields[b"impact"] = b"0"  # no balance moves: these tests read the ledger, not balances
    return fields


async def add_entries(redis_client, sidecar: Sidecar, ws: str, entries: list[dict[bytes, bytes]]) -> None:
    for fields in entries:
        await redis_client.xadd(keys.stream(ws), fields)
    sidecar.svc.flusher.note_workspace(ws)


# --- figures recomputed from raw rows ---------------------------------------------------------------


def _day(row: asyncpg.Record) -> date:
    return row["created_at"].astimezone(UTC).date()


def _fee(row: asyncpg.Record) -> int:
    return row["fee_micro"] if "fee_micro" in row else 0


def expected_summary(rows: list[asyncpg.Record], first: date, last: date, series_first: date) -> dict:
    """The usage summary's figures straight from ledger rows: totals, byok, movements, products, days."""
    inside = [r for r in rows if first <= _day(r) <= last]
    usage = [r for r in inside if r["kind"] == "usage"]

    def tally(group: list[asyncpg.Record], byok: bool) -> dict:
        picked = [r for r in group if r["byok"] == byok]
        statuses: dict[str, int] = defaultdict(int)
        for r in picked:
            statuses[r["status"]] += 1
        out = {
            "calls": len(picked),
            "calls_by_status": dict(sorted(statuses.items())),
            "tokens": {c: sum(r[f"{c}_tokens"] for r in picked) for c in TOKENS},
            "cost_micro": sum(r["cost_micro"] for r in picked),
        }
        if not byok:
            out["credits_spent_micro"] = -sum(r["balance_impact_micro"] for r in picked)
            out["fees_micro"] = sum(_fee(r) for r in picked)
        return out

    movements: dict[str, list] = defaultdict(list)
    for r in inside:
        if r["kind"] != "usage":
            movements[r["kind"]].append(r)
    products: dict[tuple, list] = defaultdict(list)
    for r in usage:
        products[(r["provider"] or "", r["model"] or "")].append(r)
    days = []
    d = series_first
    while d <= last:
        credit = [r for r in usage if _day(r) == d and not r["byok"]]
        byok = [r for r in usage if _day(r) == d and r["byok"]]
        days.append(
            {
                "date": d.isoformat(),
                "calls": len(credit),
                "tokens": sum(r[f"{c}_tokens"] for r in credit for c in TOKENS),
                "credits_spent_micro": -sum(r["balance_impact_micro"] for r in credit),
                "fees_micro": sum(_fee(r) for r in credit),
                "byok_calls": len(byok),
                "byok_tokens": sum(r[f"{c}_tokens"] for r in byok for c in TOKENS),
            }
        )
        d = date.fromordinal(d.toordinal() + 1)
    return {
        "totals": tally(usage, False),
        "byok": tally(usage, True),
        "movements": {k: (len(v), sum(r["balance_impact_micro"] for r in v)) for k, v in sorted(movements.items())},
        "products": {k: (tally(v, False), tally(v, True)) for k, v in products.items()},
        "daily": days,
    }


def check_summary(body: dict, expected: dict) -> None:
    """Every figure of a summary answer against the recomputed one, to the micro-credit."""
    totals = body["totals"]
    for name, value in expected["totals"].items():
        assert totals[name] == value, (name, totals[name], value)
    assert totals["credits_spent"] == format_micro(expected["totals"]["credits_spent_micro"])
    for name, value in expected["byok"].items():
        assert body["byok"][name] == value, (name, body["byok"][name], value)
    got_movements = {m["kind"]: (m["count"], m["amount_micro"]) for m in body["movements"]}
    assert got_movements == expected["movements"]
    got_products = {(p["provider"], p["model"]): p for p in body["products"]}
    assert set(got_products) == set(expected["products"])
    for key, (credit, byok) in expected["products"].items():
        for name, value in credit.items():
            assert got_products[key][name] == value, (key, name)
        for name, value in byok.items():
            assert got_products[key]["byok"][name] == value, (key, "byok", name)
    for got, want in zip(body["daily"], expected["daily"], strict=True):
        assert {k: got[k] for k in want} == want


def expected_margin(rows: list[asyncpg.Record], first: date, last: date) -> dict[tuple[str, str], dict[str, int]]:
    lines: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        if r["kind"] != "usage" or not first <= _day(r) <= last:
            continue
        line = lines[(r["provider"] or "", r["model"] or "")]
        tokens = sum(r[f"{c}_tokens"] for c in TOKENS)
        if r["byok"]:
            line["byok_calls"] += 1
            line["byok_tokens"] += tokens
            line["byok_cost_micro"] += r["cost_micro"]
        else:
            line["calls"] += 1
            line["tokens"] += tokens
            line["charged_micro"] += -r["balance_impact_micro"]
            line["fees_micro"] += _fee(r)
            line["upstream_cost_micro"] += r["upstream_cost_micro"]
            line["margin_micro"] += -r["balance_impact_micro"] - r["upstream_cost_micro"]
    return {k: dict(v) for k, v in lines.items()}


def check_margin(report: dict, expected: dict[tuple[str, str], dict[str, int]]) -> None:
    got = {(line["provider"], line["model"]): line for line in report["data"]}
    assert set(got) == set(expected), (set(got), set(expected))
    for key, figures in expected.items():
        for name, value in figures.items():
            assert got[key][name] == value, (key, name, got[key][name], value)
        assert got[key]["margin"] == format_micro(got[key]["margin_micro"])


async def ensure_past_partitions(conn: asyncpg.Connection, months: int = 14) -> None:
    """Monthly ledger partitions for the past `months`, as `sidecar migrate` made them back then: rows
    these tests date in the past must not land in ledger_default (an audit finding for every test)."""
    month = datetime.now(UTC).date().replace(day=1)
    for _ in range(months):
        end, month = month, (month - timedelta(days=1)).replace(day=1)
        name = f"ledger_{month:%Y_%m}"
        if await conn.fetchval("SELECT to_regclass($1)", name) is None:
            await conn.execute(f"CREATE TABLE {name} PARTITION OF ledger FOR VALUES FROM ('{month}') TO ('{end}')")
            await conn.execute("SELECT ledger_protect($1::regclass)", name)
