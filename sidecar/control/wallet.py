"""Admin API for a workspace's wallet (mode, credit limit, fee waiver, expiry) and its keys' budgets.

Money settings need CREDITS_MANAGE, key budgets KEYS_MANAGE, reading READ. Postgres is the record;
each change is then pushed to Redis (the scripts read the settings there), newest version winning.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from sidecar import db
from sidecar.control.http import SERVICES, AdminError, existing_workspace, json_response, read_object, valid_id
from sidecar.money import AMOUNT_MICRO_MAX, MoneyError, format_micro, parse_credits
from sidecar.services import Services
from sidecar.wallet import BudgetPeriod, Mode, epoch_ms, period_id

_UNSET = object()


def _credits(payload: dict, name: str, nullable: bool) -> object:
    """A credits amount (decimal string) from payload[name]; _UNSET when absent."""
    if name not in payload:
        return _UNSET
    value = payload[name]
    if value is None and nullable:
        return None
    try:
        amount = parse_credits(value)
    except MoneyError as exc:
        what = "a decimal string or null" if nullable else "a decimal string"
        raise AdminError(400, f"{name} (credits, {what}) {exc}", "invalid_amount") from None
    if amount > AMOUNT_MICRO_MAX:
        raise AdminError(400, f"{name} must be at most {format_micro(AMOUNT_MICRO_MAX)}", "invalid_amount")
    return amount


def _expires_at(payload: dict) -> object:
    if "expires_at" not in payload:
        return _UNSET
    value = payload["expires_at"]
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise AdminError(400, "expires_at must be an ISO 8601 time with its offset, or null", "invalid_expiry")
    return parsed.astimezone(UTC)


async def wallet_view(svc: Services, ws: str) -> dict:
    await svc.balances.ensure_loaded(ws)
    async with svc.pool.acquire() as conn:
        row = await db.wallet(conn, ws)
        waived_flushed = await db.fee_waived(conn, ws)
    settings = svc.balances.settings_of(row)
    account = await svc.state.account(ws)
    waived = await svc.state.fee_waived(ws)
    waived_micro = waived if waived is not None else waived_flushed
    waiver_left = max(settings.fee_waiver_micro - waived_micro, 0)
    return {
        "workspace_id": ws,
        "mode": row.mode,
        "credit_limit": format_micro(row.credit_limit_micro),
        "credit_limit_micro": row.credit_limit_micro,
        "fee_waiver": format_micro(settings.fee_waiver_micro),
        "fee_waiver_micro": settings.fee_waiver_micro,
        "fee_waived_micro": waived_micro,
        "fee_waiver_left_micro": waiver_left,
        "usage_fee_percent": svc.config.wallet.usage_fee_percent,
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        "expiry_enabled": svc.config.wallet.expiry_enabled,
        "balance_micro": account.balance_micro if account else None,
        "available_micro": account.available_micro if account else None,
    }


async def get_wallet(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    return json_response(await wallet_view(request.app[SERVICES], ws))


async def set_wallet(request: web.Request) -> web.Response:
    svc = request.app[SERVICES]
    ws = await existing_workspace(request)
    payload = await read_object(request)
    unknown = set(payload) - {"mode", "credit_limit", "fee_waiver", "expires_at"}
    if unknown:
        raise AdminError(400, f"unknown field(s): {', '.join(sorted(unknown))}", "invalid_field")
    changes: dict[str, object] = {}
    if "mode" in payload:
        if payload["mode"] not in tuple(Mode):
            raise AdminError(400, "mode must be 'prepaid' or 'postpaid'", "invalid_mode")
        changes["mode"] = payload["mode"]
    for field, column, nullable in (
        ("credit_limit", "credit_limit_micro", False),
        ("fee_waiver", "fee_waiver_micro", True),
    ):
        value = _credits(payload, field, nullable)
        if value is not _UNSET:
            changes[column] = value
    expires_at = _expires_at(payload)
    if expires_at is not _UNSET:
        changes["expires_at"] = expires_at
    if not changes:
        raise AdminError(400, "nothing to change: give mode, credit_limit, fee_waiver or expires_at", "invalid_field")
    async with svc.pool.acquire() as conn:
        await db.update_wallet(conn, ws, **changes)
    await svc.balances.push_wallet(ws)
    return json_response(await wallet_view(svc, ws))


# --- key budgets ------------------------------------------------------------------------------------


async def key_budget_view(svc: Services, record: db.ApiKeyRecord) -> dict:
    """The key's budget, and what it spent and has left in the current period (Redis, rebuilt from
    Postgres when Redis has no record)."""
    if record.budget_micro is None:
        return dict.fromkeys(("budget", "budget_micro", "budget_period", "spent_micro", "remaining_micro"))
    ws, key_id, period = record.workspace_id, record.id, BudgetPeriod(record.budget_period)
    since_ms = epoch_ms(record.budget_since) if record.budget_since else 0
    state = await svc.state.key_budget(ws, key_id)
    if state is None or state.period != period:
        await svc.balances.load_key_budget(ws, key_id, period.value, since_ms)
        state = await svc.state.key_budget(ws, key_id)
    current = state is not None and state.period_id == period_id(period, await svc.state.time_ms())
    spent = state.spent_micro if current else 0
    held = state.held_micro if state else 0
    remaining = max(record.budget_micro - spent - held, 0)
    return {
        "budget": format_micro(record.budget_micro),
        "budget_micro": record.budget_micro,
        "budget_period": period.value,
        "spent": format_micro(spent),
        "spent_micro": spent,
        "held_micro": held,
        "remaining": format_micro(remaining),
        "remaining_micro": remaining,
    }


async def key_budget_set(svc: Services, ws: str, key_id: str, payload: dict) -> dict:
    """Sets (or, with budget null, removes) a key's budget; the admin route's and the console's."""
    key_id = valid_id(key_id, "key id")
    budget = _credits(payload, "budget", nullable=True)
    if budget is _UNSET:
        raise AdminError(400, "budget (credits, a decimal string, or null to remove it) is required", "invalid_amount")
    period = payload.get("period", BudgetPeriod.MONTHLY.value)
    if budget is not None and period not in tuple(BudgetPeriod):
        raise AdminError(400, "period must be 'total', 'monthly' or 'daily'", "invalid_period")
    async with svc.pool.acquire() as conn:
        record = await db.set_key_budget(conn, ws, key_id, budget, None if budget is None else period)
    if record is None:
        raise AdminError(404, "no such key in this workspace", "key_not_found")
    # The next admission rebuilds the record from Postgres (a 'total' budget counts from now).
    await svc.state.forget_key_budget(ws, key_id)
    return {"id": key_id, "workspace_id": ws, **await key_budget_view(svc, record)}


async def set_key_budget(request: web.Request) -> web.Response:
    ws = await existing_workspace(request)
    payload = await read_object(request)
    return json_response(await key_budget_set(request.app[SERVICES], ws, request.match_info["key_id"], payload))


ROUTES = (
    ("GET", "/{ws}/wallet", get_wallet, "READ"),
    ("POST", "/{ws}/wallet", set_wallet, "CREDITS_MANAGE"),
    ("POST", "/{ws}/keys/{key_id}/budget", set_key_budget, "KEYS_MANAGE"),
)
