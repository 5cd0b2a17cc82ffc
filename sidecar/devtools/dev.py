"""`sidecar dev`: a working, metered proxy on one machine in seconds, with nothing to install or sign up for.

Redis and Postgres are private servers (sidecar.devtools.embedded) in the data directory unless SIDECAR_REDIS_URL /
SIDECAR_DATABASE_URL point elsewhere; the provider is the in-process mock unless a real provider key is set.
A demo workspace, API key and credits are created once; the data directory keeps them, the ledger and the
balances across runs. Ctrl-C drains, flushes the ledger and stops every server this process started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from sidecar import db
from sidecar.auth import hash_key, new_key
from sidecar.config import ConfigError, parse_config
from sidecar.devtools import embedded, fake_stripe, mock_provider
from sidecar.errors import StartupError
from sidecar.money import format_micro

HOST = "127.0.0.1"
STATE_FILE = "dev-state.json"  # ports, admin token and the demo key: secrets, so mode 0600
LOCK_FILE = "dev.lock"
DEMO_WORKSPACE = "demo"
DEMO_GRANT_ID = "dev-initial-grant"
DEMO_GRANT_MICRO = 10_000_000  # 10.00 credits
# Generous, so a local load loop is not throttled, yet low enough that rate limiting is still visible.
DEMO_KEY_RPM = 600
# The mock refuses a call without a bearer token and takes any other; this one never leaves the machine.
MOCK_KEY_ENV = "SIDECAR_DEV_MOCK_KEY"
MOCK_KEY = "sk-mock-dev"
STOP_TIMEOUT_S = 30.0
SDK_PROMPT = "Say hello"

# Every model is priced from the catalog of its provider's price_source (sidecar/catalog.py: genai-prices'
# bundled snapshot), at the upstream price (no markup). Only the mock's own free model is priced here.
PRICING: dict[str, Any] = {
    "profile": "dev",
    "currency": "USD",
    "charge_min": "0.000001",
    "models": {"mock-free": {"input": "0", "output": "0"}},
}
# Every model the catalog can price, of every provider `sidecar dev` is configured for.
OFFER_ALL = ["*"]


class DevError(StartupError):
    """A start-up problem the user can fix; printed as one line, without a traceback."""


# ---------------------------------------------------------------------------------------------------------
# Persistent state in the data directory


def _read_state(data_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(data_dir: Path, state: dict[str, Any]) -> None:
    # Write-then-rename, so a crash mid-write cannot lose the key a user has already copied.
    temp = data_dir / f"{STATE_FILE}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(state, out, indent=2)
    os.chmod(temp, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    os.replace(temp, data_dir / STATE_FILE)


@contextlib.contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """One `sidecar dev` per data directory: a second one would fight over the same Postgres cluster."""
    with open(data_dir / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DevError(f"another `sidecar dev` is already running on {data_dir}") from None
        yield


# ---------------------------------------------------------------------------------------------------------
# Embedded servers


def _port_is_free(port: int | None) -> bool:
    if not port:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers themselves do, so the last run's connections lingering in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _stored_port(state: dict[str, Any], name: str) -> int | None:
    # The last run's port keeps the printed psql URL stable; any free port will do when it is taken.
    port = state.get(name)
    return port if isinstance(port, int) and _port_is_free(port) else None


@dataclass
class Servers:
    """The embedded servers this process started, so it stops exactly those."""

    redis: embedded.RedisServer | None = None
    postgres: embedded.PostgresServer | None = None

    def stop(self) -> None:
        # Called once the runtime has flushed the ledger, so neither server holds anything still needed.
        for server in (self.redis, self.postgres):
            if server is not None:
                server.stop(timeout_s=STOP_TIMEOUT_S)


def start_servers(data_dir: Path, state: dict[str, Any], env: dict[str, str], servers: Servers) -> None:
    """Start Redis and Postgres unless their URLs are set. Runs on the main thread on purpose: only its
    children get the death signal that stops them if this process is killed outright."""
    if not env.get("SIDECAR_REDIS_URL"):
        servers.redis = embedded.start_redis(
            data_dir / "redis", port=_stored_port(state, "redis_port"), persistent=True
        )
        state["redis_port"] = servers.redis.port
    if not env.get("SIDECAR_DATABASE_URL"):
        servers.postgres = embedded.start_postgres(
            data_dir / "postgres", port=_stored_port(state, "postgres_port"), dbname="sidecar"
        )
        state["postgres_port"] = servers.postgres.port


# ---------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Upstream:
    """Where calls go: a real provider when its key is set, else the in-process mock."""

    label: str
    providers: list[dict[str, Any]]
    models: list[dict[str, Any]]
    example_model: str
    uses_mock: bool


def _mock_upstream(base_url: str) -> Upstream:
    provider = {
        "name": "mock",
        "protocol": "openai",
        "base_url": base_url,
        "api_key_env": MOCK_KEY_ENV,
        # Lets a developer inject provider faults per call (see sidecar.devtools.mock_provider).
        "forward_headers": list(mock_provider.FAULT_HEADERS),
        # The mock answers any model: it stands in for OpenAI, with OpenAI's catalog and prices.
        "price_source": "openai",
        "offer": OFFER_ALL,
        "max_output_tokens_default": 1024,
    }
    # The same mock also speaks Anthropic Messages, so the anthropic SDK works against `sidecar dev` too.
    anthropic = {**provider, "name": "mock-anthropic", "protocol": "anthropic", "price_source": "anthropic"}
    models = [
        {
            "name": "mock-free",
            "provider": "mock",
            "upstream_model": "mock-model",
            "max_output_tokens_default": 1024,
            "context_window_tokens": 128_000,
        },
    ]
    return Upstream("mock provider (in-process)", [provider, anthropic], models, "gpt-4o-mini", uses_mock=True)


def _openai_upstream() -> Upstream:
    provider = {
        "name": "openai",
        "protocol": "openai",
        "base_url": "https://api.openai.com/v1",
        "api_key_env": "OPENAI_API_KEY",
        "price_source": "openai",
        "offer": OFFER_ALL,
    }
    return Upstream("OpenAI (api.openai.com, your OPENAI_API_KEY)", [provider], [], "gpt-4o-mini", False)


def _openrouter_upstream() -> Upstream:
    provider = {
        "name": "openrouter",
        "protocol": "openai",
        "base_url": "https://openrouter.ai/api/v1",
        "api_key_env": "OPENROUTER_API_KEY",
        "price_source": "openrouter",
        "offer": OFFER_ALL,
    }
    models = [
        # The short name too, so the snippets printed for OpenAI work unchanged. Priced from the catalog.
        {"name": name, "aliases": [name.removeprefix("openai/")], "provider": "openrouter"}
        for name in ("openai/gpt-4o-mini", "openai/gpt-4o")
    ]
    return Upstream("OpenRouter (your OPENROUTER_API_KEY)", [provider], models, "openai/gpt-4o-mini", False)


def choose_upstream(env: dict[str, str], mock_url: Callable[[], str]) -> Upstream:
    """OpenAI if its key is set, else OpenRouter, else the mock (whose URL is asked for only then);
    and Anthropic for real when its key is set (the claude model, over /v1/messages)."""
    if env.get("OPENAI_API_KEY"):
        upstream = _openai_upstream()
    elif env.get("OPENROUTER_API_KEY"):
        upstream = _openrouter_upstream()
    else:
        upstream = _mock_upstream(mock_url())
    if not env.get("ANTHROPIC_API_KEY"):
        return upstream
    return dataclasses.replace(
        upstream, providers=[*(p for p in upstream.providers if p["name"] != "mock-anthropic"), _ANTHROPIC_PROVIDER]
    )


# The Claude model the printed snippets use (every Claude model of the catalog is offered and priced).
CLAUDE_MODEL = "claude-haiku-4-5"
_ANTHROPIC_PROVIDER = {
    "name": "anthropic",
    "protocol": "anthropic",
    "base_url": "https://api.anthropic.com/v1",
    "api_key_env": "ANTHROPIC_API_KEY",
    "price_source": "anthropic",
    "offer": OFFER_ALL,
}


def provider_notes(env: dict[str, str], upstream: Upstream) -> list[str]:
    notes = []
    if env.get("ANTHROPIC_API_KEY"):
        notes.append("note: ANTHROPIC_API_KEY is set: the Claude models go to Anthropic (POST /v1/messages).")
    if env.get("OPENAI_API_KEY") and env.get("OPENROUTER_API_KEY"):
        notes.append("note: OPENAI_API_KEY and OPENROUTER_API_KEY are both set; OpenAI is used.")
    return notes


def dev_config_raw(port: int, redis_url: str, database_url: str, upstream: Upstream) -> dict[str, Any]:
    return {
        "redis_url": redis_url,
        "database_url": database_url,
        # Short drain: on Ctrl-C a developer waits for in-flight calls, not for production's 30 s.
        "server": {"host": HOST, "port": port, "ops_port": port + 2, "drain_timeout_ms": 5_000},
        "providers": upstream.providers,
        "models": upstream.models,
    }


def dev_payments_raw(fake_url: str) -> dict[str, Any]:
    """`payments` for `sidecar dev`: Stripe is the local fake (no network), with its dev secrets."""
    return {
        "stripe": {
            "api_base": fake_url,
            "success_url": f"{fake_url}/done?order={{ORDER_ID}}",
            "cancel_url": f"{fake_url}/done?order={{ORDER_ID}}&canceled=1",
        }
    }


async def start_fake_stripe(control_port: int) -> tuple[web.AppRunner, str]:
    """The fake Stripe for top-ups in `sidecar dev`: its Pay page completes the Checkout Session and it
    delivers the signed webhooks to the control plane, as Stripe would."""
    fake = fake_stripe.FakeStripe(webhook_url=f"http://{HOST}:{control_port}/webhooks/stripe")
    runner, _, url = await fake_stripe.start(HOST, 0, fake)
    return runner, url


def _admin_token(env: dict[str, str], state: dict[str, Any]) -> str:
    if env.get("SIDECAR_ADMIN_TOKEN"):
        return env["SIDECAR_ADMIN_TOKEN"]
    if not isinstance(state.get("admin_token"), str):
        state["admin_token"] = secrets.token_urlsafe(24)
    return state["admin_token"]


# ---------------------------------------------------------------------------------------------------------
# Mock provider and demo data


async def start_mock_provider() -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(mock_provider.build_app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://{HOST}:{port}/v1"


async def _usable_key(conn: Any, raw_key: Any) -> bool:
    if not isinstance(raw_key, str):
        return False
    record = await db.api_key_by_hash(conn, hash_key(raw_key))
    return record is not None and record.revoked_at is None and record.workspace_id == DEMO_WORKSPACE


async def ensure_demo(svc: Any, state: dict[str, Any], data_dir: Path) -> str:
    """The demo workspace, its key and its first credits; idempotent, so every run finds the same ones.
    Returns the raw key."""
    async with svc.pool.acquire() as conn:
        await db.create_workspace(conn, DEMO_WORKSPACE, "Demo workspace (sidecar dev)")
        if not await _usable_key(conn, state.get("demo_key")):
            raw = new_key()
            record = db.ApiKeyRecord(
                id=f"key_{secrets.token_hex(8)}",
                workspace_id=DEMO_WORKSPACE,
                office_id=None,
                name="sidecar dev demo key",
                key_hash=hash_key(raw),
                last4=raw[-4:],
                rate_limit_rpm=DEMO_KEY_RPM,
                created_at=None,
                revoked_at=None,
            )
            await db.insert_api_key(conn, record)
            state["demo_key"] = raw
            _write_state(data_dir, state)
    # A replayed grant id changes nothing, so this runs on every start.
    await svc.balances.grant(DEMO_WORKSPACE, DEMO_GRANT_ID, "grant", DEMO_GRANT_MICRO)
    await svc.balances.ensure_loaded(DEMO_WORKSPACE)
    return state["demo_key"]


# ---------------------------------------------------------------------------------------------------------
# The banner


@dataclass(frozen=True)
class BannerInfo:
    port: int
    key: str
    admin_token: str
    balance_micro: int
    upstream: Upstream
    database_url: str
    psql: str
    data_dir: Path
    embedded: list[str]
    startup_s: float


def _curl_chat(base_url: str, key: str, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    return (
        f"  curl {base_url}/chat/completions \\\n"
        f'    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\\n'
        f"    -d {shlex.quote(body)}"
    )


def _sdk_snippet(base_url: str, key: str, model: str) -> str:
    return (
        "  from openai import OpenAI\n"
        f'  client = OpenAI(base_url="{base_url}", api_key="{key}")\n'
        f'  print(client.chat.completions.create(model="{model}", '
        f'messages=[{{"role": "user", "content": "{SDK_PROMPT}"}}]).choices[0].message.content)'
    )


def render_banner(info: BannerInfo) -> str:
    base_url = f"http://{HOST}:{info.port}/v1"
    admin_url = f"http://{HOST}:{info.port + 1}/admin/v1"
    ops_url = f"http://{HOST}:{info.port + 2}"
    balance_curl = (
        f'  curl -H "Authorization: Bearer {info.admin_token}" {admin_url}/workspaces/{DEMO_WORKSPACE}/balance'
    )
    ledger_sql = (
        "SELECT created_at, kind, status, model, input_tokens, output_tokens, cost_micro, balance_after_micro "
        "FROM ledger ORDER BY created_at DESC LIMIT 10"
    )
    stores = ", ".join(info.embedded) if info.embedded else "none"
    lines = [
        "",
        f"sidecar dev is ready in {info.startup_s:.1f} s",
        "",
        f"  Base URL     {base_url}",
        f"  API key      {info.key}",
        f"  Workspace    {DEMO_WORKSPACE} (balance {format_micro(info.balance_micro)} credits)",
        f"  Provider     {info.upstream.label}",
        "",
        "Call it with curl:",
        _curl_chat(base_url, info.key, info.upstream.example_model),
        "",
        "or with the OpenAI SDK (pip install openai):",
        _sdk_snippet(base_url, info.key, info.upstream.example_model),
        "",
        f"Admin API    {admin_url}   token: {info.admin_token}",
        "  Balance:",
        balance_curl,
        "  or with the operator CLI:",
        f"  SIDECAR_ADMIN_URL=http://{HOST}:{info.port + 1} SIDECAR_ADMIN_TOKEN={info.admin_token} "
        f"sidecar admin balance {DEMO_WORKSPACE}",
        f"Console      http://{HOST}:{info.port + 1}/console   log in with the admin token above",
        f"Metrics      {ops_url}/metrics   (health: {ops_url}/healthz, {ops_url}/readyz)",
        "Ledger       (settled calls reach Postgres within a second)",
        f"  {info.psql} {info.database_url} -c {shlex.quote(ledger_sql)}",
        "",
        f"Data dir     {info.data_dir}  (embedded: {stores}; delete it to start over)",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


def _psql_command(servers: Servers) -> str:
    if shutil.which("psql"):
        return "psql"
    # The `embedded` extra's Postgres ships a psql beside the server, just not on PATH.
    bundled = servers.postgres.bin_dir / "psql" if servers.postgres else None
    return str(bundled) if bundled and bundled.exists() else "psql"


# ---------------------------------------------------------------------------------------------------------
# Running


def _on_stop_signals(callback: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, callback)


@dataclass(frozen=True)
class Urls:
    redis: str
    database: str


def _store_urls(env: dict[str, str], servers: Servers) -> Urls:
    return Urls(
        redis=env.get("SIDECAR_REDIS_URL") or (servers.redis.url if servers.redis else ""),
        database=env.get("SIDECAR_DATABASE_URL") or (servers.postgres.url if servers.postgres else ""),
    )


async def _banner_info(
    args: argparse.Namespace,
    data_dir: Path,
    svc: Any,
    key: str,
    upstream: Upstream,
    servers: Servers,
    started_at: float,
) -> BannerInfo:
    account = await svc.state.account(DEMO_WORKSPACE)
    return BannerInfo(
        port=args.port,
        key=key,
        admin_token=svc.config.admin_token,
        balance_micro=account.balance_micro if account else 0,
        upstream=upstream,
        database_url=svc.config.database_url,
        psql=_psql_command(servers),
        data_dir=data_dir,
        embedded=[name for name, server in (("Redis", servers.redis), ("Postgres", servers.postgres)) if server],
        startup_s=time.monotonic() - started_at,
    )


async def serve(
    args: argparse.Namespace,
    data_dir: Path,
    state: dict[str, Any],
    env: dict[str, str],
    servers: Servers,
    started_at: float,
    received: list[int],
    out: IO[str],
) -> None:
    from sidecar.app import Runtime, open_services
    from sidecar.ledger.migrate import migrate_url

    # Until the runtime owns the signals, a Ctrl-C only marks the start as abandoned, so the cleanup
    # below still runs in order.
    early_stop = asyncio.Event()
    _on_stop_signals(early_stop.set)
    if received:  # a signal came between the servers' start and the line above
        early_stop.set()

    urls = _store_urls(env, servers)
    await migrate_url(urls.database)
    mock_runner: web.AppRunner | None = None
    mock_url = ""
    if not env.get("OPENAI_API_KEY") and not env.get("OPENROUTER_API_KEY"):
        mock_runner, mock_url = await start_mock_provider()
    stripe_runner, stripe_url = await start_fake_stripe(args.port + 1)
    try:
        upstream = choose_upstream(env, lambda: mock_url)
        for note in provider_notes(env, upstream):
            print(note, file=out, flush=True)
        config_env = {
            "SIDECAR_SPOOL_DIR": str(data_dir / "spool"),
            **env,
            "SIDECAR_ADMIN_TOKEN": _admin_token(env, state),
        }
        _write_state(data_dir, state)
        raw = {
            **dev_config_raw(args.port, urls.redis, urls.database, upstream),
            "payments": dev_payments_raw(stripe_url),
        }
        config = parse_config(raw, PRICING, config_env, source="dev")
        stripe_env = {
            "STRIPE_SECRET_KEY": fake_stripe.DEV_SECRET_KEY,
            "STRIPE_WEBHOOK_SECRET": fake_stripe.DEV_WEBHOOK_SECRET,
        }
        svc = await open_services(config, env={**env, MOCK_KEY_ENV: MOCK_KEY, **stripe_env})
        runtime = Runtime(svc, data_plane=True, control_plane=True)
        runtime.install_signal_handlers()
        if early_stop.is_set():
            runtime.stop.set()
        try:
            await _start_runtime(runtime, args.port)
            key = await ensure_demo(svc, state, data_dir)
            info = await _banner_info(args, data_dir, svc, key, upstream, servers, started_at)
            if not runtime.stop.is_set():
                print(render_banner(info), file=out, flush=True)
                print(f"Top-ups: the fake Stripe is on {stripe_url} (README, Buying credits).", file=out, flush=True)
            await runtime.stop.wait()
            print("stopping: draining calls and flushing the ledger ...", file=out, flush=True)
        finally:
            # Drains in-flight calls (which still need the provider) and flushes the ledger.
            await runtime.shutdown()
    finally:
        await stripe_runner.cleanup()
        if mock_runner is not None:
            await mock_runner.cleanup()


async def _start_runtime(runtime: Any, port: int) -> None:
    try:
        await runtime.start(HOST, port, port + 2, port + 1)
    except OSError as exc:
        raise DevError(
            f"cannot listen on ports {port}-{port + 2} ({exc.strerror or exc}); pick others with --port"
        ) from None


@contextlib.contextmanager
def _stop_signals_recorded() -> Iterator[list[int]]:
    """Until the event loop takes the signals over, a first Ctrl-C (or SIGTERM) is only recorded, so a
    server half-way through its start is still stopped in order. A second one gives up at once; the
    servers then stop on their death signal."""
    received: list[int] = []

    def record(signum: int, _frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        print("stopping as soon as the start is done ...", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace, data_dir: Path, started_at: float) -> None:
    env = dict(os.environ)
    state = _read_state(data_dir)
    servers = Servers()
    try:
        with _stop_signals_recorded() as received:
            if not env.get("SIDECAR_REDIS_URL") or not env.get("SIDECAR_DATABASE_URL"):
                print(f"starting embedded Redis/Postgres in {data_dir} ...", flush=True)
            start_servers(data_dir, state, env, servers)
            _write_state(data_dir, state)
            if not received:
                asyncio.run(serve(args, data_dir, state, env, servers, started_at, received, sys.stdout))
    finally:
        # A further Ctrl-C must not interrupt the servers' own clean shutdown (bounded by STOP_TIMEOUT_S).
        with _signals_ignored():
            servers.stop()


def main(args: argparse.Namespace) -> int:
    started_at = time.monotonic()
    data_dir = Path(args.data_dir).resolve()
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _exclusive(data_dir):
            _run(args, data_dir, started_at)
    except (DevError, ConfigError, embedded.EmbeddedError) as exc:
        print(f"sidecar dev: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during the start: what had started is stopped
        return 130
    print("stopped.", flush=True)
    return 0
