"""Starting and stopping what the benchmark measures: Redis, Postgres, the mock provider, the bare
pass-through and the sidecar, each a process of its own on 127.0.0.1.

Redis and Postgres are private servers from `sidecar.devtools.embedded` in a temporary directory unless
BENCH_REDIS_URL / BENCH_DATABASE_URL name others (deliberately not the SIDECAR_* variables: the bench
writes thousands of rows into an append-only ledger, which must not land in a dev database by accident).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sidecar.devtools import embedded, supervisor
from sidecar.devtools.supervisor import Child, free_port, wait_http_ok, wait_log_match

HOST = "127.0.0.1"
UPSTREAM_KEY = "sk-bench-upstream"  # what the mock is sent by the pass-through and the sidecar
PROVIDER_KEY_ENV = "BENCH_PROVIDER_KEY"
MODEL = "gpt-4o-mini"
START_TIMEOUT_S = 30.0
LISTENING = r"listening on (http://\S+/v1)"
# A bench key must never be throttled, and its workspace never run dry.
BENCH_RPM = 10_000_000
BENCH_CREDITS_MICRO = 10**12  # 1,000,000 credits
PRICING = {
    "profile": "bench",
    "currency": "USD",
    "charge_min": "0.000001",
    "models": {MODEL: {"input": "0.15", "output": "0.60", "cache_read": "0.075"}},
}

__all__ = ["Child", "Stores", "start_mock", "start_passthrough", "start_sidecar"]


def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
    # The log dir as cwd, never the caller's: see supervisor.spawn.
    return supervisor.spawn(name, argv, log_dir / f"{name}.log", cwd=log_dir, env=env)


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


async def start_mock(log_dir: Path) -> Child:
    # Keep only one recorded request: the mock's request log is for tests, not a cost to bench.
    argv = [_bin("sidecar"), "mock-provider", "--port", "0", "--max-recorded-requests", "1"]
    child = spawn("mock", argv, log_dir)
    child.url = (await wait_log_match(child, LISTENING, START_TIMEOUT_S)).group(1)
    return child


async def start_passthrough(log_dir: Path, upstream_url: str) -> Child:
    port = free_port()
    argv = [sys.executable, "-m", "bench.passthrough", "--port", str(port), "--upstream", upstream_url]
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    child = spawn("passthrough", argv, log_dir, env)
    child.url = (await wait_log_match(child, LISTENING, START_TIMEOUT_S)).group(1)
    return child


def _pythonpath() -> str:
    """So `-m bench.*` resolves from any working directory: the repo root, then whatever was set."""
    root = str(Path(__file__).resolve().parent.parent)
    existing = os.environ.get("PYTHONPATH", "")
    return f"{existing}{os.pathsep}{root}" if existing else root


def sidecar_source(work_dir: Path) -> str:
    """Where the `sidecar` package the served process imports lives (a checkout, or a PYTHONPATH override)."""
    probe = "import os, sidecar; print(os.path.dirname(os.path.realpath(sidecar.__file__)))"
    try:
        return subprocess.run(
            [sys.executable, "-c", probe], cwd=work_dir, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"


def sidecar_config(directory: Path, provider_url: str, port: int, ops_port: int) -> Path:
    raw = {
        "pricing_file": "pricing.yaml",
        "server": {"host": HOST, "port": port, "ops_port": ops_port, "drain_timeout_ms": 2000},
        # 1,000 concurrent streams need 1,000 upstream connections; the default pool (512) would queue half.
        "upstream": {"pool_connections_max": 4096},
        # The bench measures speed, not the guards: one key runs up to 1,000 streams at once.
        "limits": {"concurrent_calls_per_key": 100_000, "concurrent_calls_per_workspace": 100_000},
        "holds": {"spool_dir": str(directory / "spool")},
        "providers": [
            {
                "name": "mock",
                "protocol": "openai",
                "base_url": provider_url,
                "api_key_env": PROVIDER_KEY_ENV,
                "forward_headers": ["x-mock-chunks", "x-mock-delay-ms"],
            }
        ],
        "models": [
            {"name": MODEL, "provider": "mock", "max_output_tokens_default": 256, "context_window_tokens": 128000}
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pricing.yaml").write_text(yaml.safe_dump(PRICING))
    path = directory / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


async def start_sidecar(
    log_dir: Path, provider_url: str, redis_url: str, database_url: str, log_level: str, workers: int = 1
) -> tuple[Child, str]:
    port, ops_port = supervisor.free_ports(2)
    config = sidecar_config(log_dir / "sidecar-config", provider_url, port, ops_port)
    env = {
        **os.environ,
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_DATABASE_URL": database_url,
        "SIDECAR_ADMIN_TOKEN": secrets.token_urlsafe(24),
        PROVIDER_KEY_ENV: UPSTREAM_KEY,
    }
    argv = [_bin("sidecar"), "serve", "--config", str(config), "--log-level", log_level]
    if workers != 1:
        argv += ["--workers", str(workers)]
    child = spawn("sidecar", argv, log_dir, env)
    child.url = f"http://{HOST}:{port}/v1"
    ops_url = f"http://{HOST}:{ops_port}"
    await wait_http_ok(child, ops_url + "/readyz", START_TIMEOUT_S)
    return child, ops_url


@dataclass
class Stores:
    """Redis and Postgres: the private ones this run started (stopped at the end), or external URLs."""

    redis_url: str = ""
    database_url: str = ""
    redis: embedded.RedisServer | None = None
    postgres: embedded.PostgresServer | None = None
    notes: list[str] = field(default_factory=list)

    def start(self, data_dir: Path) -> None:
        """On the main thread: only its children get the death signal that stops them with us."""
        self.redis_url = os.environ.get("BENCH_REDIS_URL", "")
        self.database_url = os.environ.get("BENCH_DATABASE_URL", "")
        if not self.redis_url:
            # AOF on (appendfsync everysec), as production must run it.
            self.redis = embedded.start_redis(data_dir / "redis", persistent=True)
            self.redis_url = self.redis.url
            self.notes.append(f"Redis: private {self.redis.binary} (AOF on, appendfsync everysec)")
        else:
            self.notes.append("Redis: external (BENCH_REDIS_URL)")
        if not self.database_url:
            self.postgres = embedded.start_postgres(data_dir / "postgres", dbname="bench", durable=False)
            self.database_url = self.postgres.url
            self.notes.append(
                f"Postgres: private {self.postgres.bin_dir}/postgres, durable=False (fsync and "
                "full_page_writes off; synchronous_commit stays on): flush rates are above what a disk-bound "
                "production Postgres gives"
            )
        else:
            self.notes.append("Postgres: external (BENCH_DATABASE_URL)")

    def stop(self) -> None:
        for server in (self.redis, self.postgres):
            if server is not None:
                with contextlib.suppress(Exception):  # stop the other one anyway
                    server.stop()
