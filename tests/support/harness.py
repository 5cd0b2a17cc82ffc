"""A whole sidecar in the test's event loop: real Redis, real Postgres, the in-tree mock provider,
and the data-plane and admin apps on real ports. Tests drive it over HTTP like a client would."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp.test_utils import TestServer

from sidecar import db, price_versions
from sidecar.app import build_data_app, close_services, open_services
from sidecar.config import PERMISSIONS, Config, parse_config
from sidecar.control.server import build_control_app
from sidecar.devtools import mock_provider
from sidecar.services import Services
from sidecar.state import keys

ADMIN_TOKEN = "test-admin-token"
PLATFORM_KEY = "sk-platform-test-0000"
TEST_KEK = "testkek1:" + base64.b64encode(bytes(range(32))).decode()
# Admin tokens with fewer permissions than the bootstrap one, stored (as configured) by their SHA-256.
TENANT_ADMIN_TOKEN = "tenant-admin-token"
KEYS_ADMIN_TOKEN = "keys-admin-token"
# Tokens limited to one workspace (admin_tokens[].workspace): every permission, and READ only.
SCOPED_WORKSPACE = "ws_scoped"
SCOPED_ADMIN_TOKEN = "scoped-admin-token"
SCOPED_READER_TOKEN = "scoped-reader-token"
ALL_PERMISSIONS = list(PERMISSIONS)  # every permission the config knows
ADMIN_TOKENS = [
    {
        "name": "scoped",
        "sha256": hashlib.sha256(SCOPED_ADMIN_TOKEN.encode()).hexdigest(),
        "permissions": ALL_PERMISSIONS,
        "workspace": SCOPED_WORKSPACE,
    },
    {
        "name": "scoped-reader",
        "sha256": hashlib.sha256(SCOPED_READER_TOKEN.encode()).hexdigest(),
        "permissions": ["READ"],
        "workspace": SCOPED_WORKSPACE,
    },
    {
        "name": "tenant",
        "sha256": hashlib.sha256(TENANT_ADMIN_TOKEN.encode()).hexdigest(),
        "permissions": ["TENANT_MANAGE", "READ"],
    },
    {
        "name": "keys",
        "sha256": hashlib.sha256(KEYS_ADMIN_TOKEN.encode()).hexdigest(),
        "permissions": ["KEYS_MANAGE", "READ"],
    },
]

# The mock provider's per-request fault knobs, forwarded so tests can drive faults call by call.
MOCK_FAULT_HEADERS = list(mock_provider.FAULT_HEADERS)

PRICING = {
    "charge_min": "0",
    "models": {
        # 5.00 / 25.00 per 1M: 10,000 input + 2,000 output costs exactly 0.100000 credits.
        "gpt-4o-mini": {
            "input": "5.00",
            "output": "25.00",
            "cache_read": "0.50",
            "upstream": {"input": "4.00", "output": "20.00"},
        },
        "mock-free": {"input": "0", "output": "0"},
        # Anthropic-style prices, every cache class distinct, so a wrong class shows in the cost.
        "claude-test": {
            "input": "3.00",
            "output": "15.00",
            "cache_read": "0.30",
            "cache_write_5m": "3.75",
            "cache_write_1h": "6.00",
        },
        "embed-small": {"input": "0.02", "output": "0"},
        # Fallback: the first target is dear, the second cheap; the call is billed where it was served.
        "fallback-first": {"input": "50.00", "output": "100.00"},
        "fallback-second": {"input": "1.00", "output": "2.00"},
        # OpenRouter: the requested model's price, and the model OpenRouter says actually served.
        "router-requested": {"input": "2.00", "output": "8.00"},
        "router/served": {"input": "1.00", "output": "4.00"},
        # A dearer model a client may list in OpenRouter's `models`: the hold must cover it.
        "router/dear": {"input": "20.00", "output": "80.00"},
    },
}


def _providers(urls: dict[str, str]) -> list[dict]:
    """Every provider the tests use; all but `mock-dead` are mock servers on this machine."""
    common = {"api_key_env": "MOCK_PLATFORM_KEY", "forward_headers": MOCK_FAULT_HEADERS}
    return [
        {"name": "mock", "protocol": "openai", "base_url": urls["mock"], **common},
        {"name": "mock-anthropic", "protocol": "anthropic", "base_url": urls["mock"], **common},
        {"name": "mock-503", "protocol": "openai", "base_url": urls.get("mock-503", urls["mock"]), **common},
        {"name": "mock-dead", "protocol": "openai", "base_url": urls.get("mock-dead", urls["mock"]), **common},
        # Stands in for OpenAI with OpenAI's catalog prices (issue 16): offers nothing by itself.
        {"name": "mock-catalog", "protocol": "openai", "base_url": urls["mock"], "price_source": "openai", **common},
        # The same for Anthropic's catalog, over Anthropic Messages.
        {
            "name": "mock-anthropic-catalog",
            "protocol": "anthropic",
            "base_url": urls["mock"],
            "price_source": "anthropic",
            **common,
        },
        {
            "name": "mock-openrouter",
            "protocol": "openai",
            "openrouter": True,
            "base_url": urls.get("mock-openrouter", urls["mock"]),
            **common,
        },
    ]


def _models() -> list[dict]:
    window = {"context_window_tokens": 128000}
    return [
        {"name": "gpt-4o-mini", "aliases": ["mini"], "provider": "mock", "max_output_tokens_default": 100, **window},
        {
            "name": "mock-free",
            "provider": "mock",
            "upstream_model": "mock-model",
            "max_output_tokens_default": 50,
            "context_window_tokens": 32000,
        },
        {"name": "claude-test", "provider": "mock-anthropic", "max_output_tokens_default": 100, **window},
        {"name": "embed-small", "provider": "mock", "max_output_tokens_default": 1, **window},
        {
            "name": "fallback-503",
            "targets": [
                {"provider": "mock-503", "upstream_model": "first-model", "price": "fallback-first"},
                {"provider": "mock", "upstream_model": "second-model", "price": "fallback-second"},
            ],
            "max_output_tokens_default": 100,
            **window,
        },
        {
            "name": "fallback-dead",
            "targets": [
                {"provider": "mock-dead", "upstream_model": "first-model", "price": "fallback-first"},
                {"provider": "mock", "upstream_model": "second-model", "price": "fallback-second"},
            ],
            "max_output_tokens_default": 100,
            **window,
        },
        {
            "name": "router-model",
            "targets": [
                {"provider": "mock-openrouter", "upstream_model": "router/requested", "price": "router-requested"}
            ],
            "allow_routing_fields": ["provider", "route", "models"],
            "max_output_tokens_default": 100,
            **window,
        },
    ]


def base_config(provider_url: str, extra_urls: dict[str, str] | None = None, **overrides: Any) -> dict:
    raw = {
        "server": {"body_bytes_max": 64 * 1024, "drain_timeout_ms": 2000},
        "auth": {"cache_ttl_ms": 200},
        "upstream": {
            "connect_timeout_ms": 1000,
            "first_byte_timeout_ms": 5000,
            "idle_timeout_ms": 5000,
            "total_timeout_ms": 20000,
            "usage_wait_after_hangup_ms": 2000,
        },
        "holds": {"ttl_ms": 40000, "sweep_interval_ms": 200, "settle_budget_ms": 2000, "sweep_grace_ms": 0},
        "ledger": {"batch_rows_max": 500, "batch_age_ms_max": 20, "claim_idle_ms": 1000, "workspace_refresh_ms": 60000},
        "providers": _providers({"mock": provider_url, **(extra_urls or {})}),
        "models": _models(),
        "admin_tokens": ADMIN_TOKENS,
        "byok": {"failure_cooldown_ms": 60_000, "validate_timeout_ms": 2_000},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw


def build_config(
    redis_url: str,
    database_url: str,
    provider_url: str,
    extra_urls: dict[str, str] | None = None,
    more_providers: list[dict] = (),
    more_models: list[dict] = (),
    **overrides: Any,
) -> Config:
    env = {"SIDECAR_REDIS_URL": redis_url, "SIDECAR_DATABASE_URL": database_url, "SIDECAR_ADMIN_TOKEN": ADMIN_TOKEN}
    raw = base_config(provider_url, extra_urls, **overrides)
    raw["providers"] = [*raw["providers"], *more_providers]
    raw["models"] = [*raw["models"], *more_models]
    return parse_config(raw, PRICING, env, source="tests")


@dataclass
class Workspace:
    id: str
    key: str
    key_id: str


@dataclass
class Sidecar:
    svc: Services
    data: TestServer
    control: TestServer
    provider: TestServer
    http: aiohttp.ClientSession
    extra: list = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return str(self.data.make_url("/v1"))

    @property
    def recorded(self):
        return self.provider.app[mock_provider.RECORDED]

    async def admin(
        self, method: str, path: str, body: dict | None = None, token: str = ADMIN_TOKEN
    ) -> tuple[int, dict]:
        url = self.control.make_url("/admin/v1" + path)
        async with self.http.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.json()

    async def workspace(
        self, credits_micro: int = 0, rpm: int = 1000, office: str | None = None, ws_id: str | None = None
    ) -> Workspace:
        ws = ws_id or f"ws_{secrets.token_hex(6)}"
        status, _ = await self.admin("POST", "/workspaces", {"id": ws, "name": "test"})
        assert status == 201
        if office:
            status, _ = await self.admin("POST", f"/workspaces/{ws}/offices", {"id": office})
            assert status == 201
        if credits_micro:
            await self.grant(ws, credits_micro)
        status, created = await self.admin(
            "POST", f"/workspaces/{ws}/keys", {"name": "t", "rate_limit_rpm": rpm, "office_id": office}
        )
        assert status == 201, created
        return Workspace(ws, created["key"], created["id"])

    async def grant(self, ws: str, amount_micro: int, grant_id: str | None = None) -> dict:
        status, body = await self.admin(
            "POST",
            f"/workspaces/{ws}/grants",
            {"grant_id": grant_id or secrets.token_hex(8), "amount_micro": amount_micro},
        )
        assert status in (200, 201), body
        return body

    async def chat(
        self, ws: Workspace, body: dict | None = None, headers: dict | None = None, raw: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        payload = raw if raw is not None else orjson.dumps(body or chat_body())
        async with self.http.post(
            self.data.make_url("/v1/chat/completions"),
            data=payload,
            headers={"Authorization": f"Bearer {ws.key}", "Content-Type": "application/json", **(headers or {})},
        ) as resp:
            return resp.status, resp.headers.copy(), await resp.read()

    async def flush(self) -> None:
        """Drain every ledger stream into Postgres."""
        for ws in await self.workspace_ids():
            self.svc.flusher.note_workspace(ws)
        for _ in range(200):
            await self.svc.flusher.flush_once()
            if await self.svc.flusher.backlog() == 0:
                return
        raise AssertionError("ledger did not drain")

    async def workspace_ids(self) -> list[str]:
        async with self.svc.pool.acquire() as conn:
            return await db.workspace_ids(conn)

    async def ledger(self, ws: str, kind: str = "usage") -> list[asyncpg.Record]:
        async with self.svc.pool.acquire() as conn:
            return await conn.fetch(
                "SELECT * FROM ledger WHERE workspace_id = $1 AND kind = $2 ORDER BY created_at", ws, kind
            )

    async def ledger_eventually(self, ws: str, rows_min: int = 1, wait_s_max: float = 5.0) -> list[asyncpg.Record]:
        """The workspace's usage rows once at least `rows_min` are there (a call settles just after its
        client saw the end), flushing as it waits; what is there when the wait runs out."""
        rows: list[asyncpg.Record] = []
        for _ in range(int(wait_s_max / 0.05)):
            await self.flush()
            rows = await self.ledger(ws)
            if len(rows) >= rows_min:
                break
            await asyncio.sleep(0.05)
        return rows

    async def redis_account(self, ws: str) -> tuple[int, int]:
        await self.svc.balances.ensure_loaded(ws)  # a workspace that never held anything may not be loaded
        account = await self.svc.state.account(ws)
        assert account is not None
        return account.balance_micro, account.held_micro

    async def assert_identity(self, ws: str, postpaid: bool = False) -> dict[str, int]:
        """DESIGN.md §6: grants + top-ups + allowances - refunds - expiries - usage - fees == balance, in
        Redis and in Postgres, from the ledger alone (each term from its own rows, see db.ledger_identity)."""
        await self.flush()
        async with self.svc.pool.acquire() as conn:
            identity = await db.ledger_identity(conn, ws)
        expected = identity["expected"]
        assert identity["account_balance"] == expected, identity
        assert identity["debits"] == identity["usage"] + identity["fees"], identity
        balance, held = await self.redis_account(ws)
        assert balance == expected, (balance, identity)
        assert held == 0, f"holds left: {held}"
        assert balance >= 0 or postpaid  # only post-charge may end below zero
        assert await self.svc.state.active_holds(ws) == 0
        return identity

    async def rows_per_request(self, ws: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in await self.ledger(ws):
            counts[row["request_id"]] = counts.get(row["request_id"], 0) + 1
        return counts


def chat_body(content: str = "hello there, how are you today?", **extra: Any) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


async def start_sidecar(
    redis_url: str,
    database_url: str,
    provider_options: mock_provider.MockOptions | None = None,
    provider_url: str | None = None,
    env: dict[str, str] | None = None,
    more_providers: list[dict] = (),
    more_models: list[dict] = (),
    **overrides: Any,
) -> Sidecar:
    """`provider_url` points the sidecar elsewhere than at the mock (which still runs, for `recorded`)."""
    provider = TestServer(mock_provider.build_app(provider_options or mock_provider.MockOptions()))
    failing = TestServer(mock_provider.build_app(mock_provider.MockOptions(status=503)))
    router = TestServer(mock_provider.build_app(mock_provider.MockOptions(flavor="openrouter")))
    for server in (provider, failing, router):
        await server.start_server()
    extra_urls = {
        "mock-503": str(failing.make_url("/v1")),
        "mock-dead": f"http://127.0.0.1:{_closed_port()}/v1",
        "mock-openrouter": str(router.make_url("/api/v1")),
    }
    main_url = provider_url or str(provider.make_url("/v1"))
    spool_dir = tempfile.mkdtemp(prefix="sidecar-spool-")
    overrides["holds"] = {"spool_dir": spool_dir, **overrides.get("holds", {})}
    config = build_config(redis_url, database_url, main_url, extra_urls, more_providers, more_models, **overrides)
    svc = await open_services(config, env={"MOCK_PLATFORM_KEY": PLATFORM_KEY, **(env or {"SIDECAR_KEK": TEST_KEK})})
    svc.spool.open()
    svc.inflight.open()
    await price_versions.register(svc.pool, config.pricing)  # what Runtime.start does for `sidecar serve`
    data = TestServer(build_data_app(svc))
    control = TestServer(build_control_app(svc))
    await data.start_server()
    await control.start_server()
    http = aiohttp.ClientSession()
    return Sidecar(svc, data, control, provider, http, extra=[failing, router])


async def stop_sidecar(sidecar: Sidecar) -> None:
    await sidecar.http.close()
    if sidecar.svc.settling:
        await asyncio.wait(list(sidecar.svc.settling), timeout=5)
    await sidecar.data.close()
    await sidecar.control.close()
    await sidecar.provider.close()
    for server in sidecar.extra:
        await server.close()
    await close_services(sidecar.svc)
    sidecar.svc.inflight.close()
    shutil.rmtree(sidecar.svc.spool.directory, ignore_errors=True)


def _closed_port() -> int:
    """A port nothing listens on: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def migrated(database_url: str) -> None:
    from sidecar.ledger.migrate import migrate_url

    await migrate_url(database_url)


def stream_key(ws: str) -> str:
    return keys.stream(ws)


def run_migrations_once(database_url: str) -> None:
    from support.services import run_sync

    run_sync(lambda: migrated(database_url))
