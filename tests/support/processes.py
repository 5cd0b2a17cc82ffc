"""Running `sidecar serve` as a real OS process, for the tests that kill it or stop it with a signal.

The process is a supervisor.Child: its own session (so `kill()` takes down anything it spawned), output
in a log file whose tail is attached to every failure, every wait bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from sidecar.devtools import supervisor
from support.harness import PLATFORM_KEY, PRICING, TEST_KEK, base_config

SIDECAR_BIN = Path(sys.executable).with_name("sidecar")
START_TIMEOUT_S = 20.0


def write_config(
    directory: Path, redis_url: str, database_url: str, provider_url: str, port: int, ops_port: int, **overrides: Any
) -> Path:
    """The harness's configuration (same models, prices and fault headers) as YAML files for the CLI."""
    raw = base_config(provider_url, **overrides)
    raw["server"] = {**raw["server"], "host": "127.0.0.1", "port": port, "ops_port": ops_port}
    raw["redis_url"] = redis_url
    raw["database_url"] = database_url
    raw["pricing_file"] = "pricing.yaml"
    raw["holds"] = {"spool_dir": str(directory / "spool"), **raw["holds"]}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pricing.yaml").write_text(yaml.safe_dump(PRICING))
    path = directory / "sidecar.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class SidecarProcess:
    """One `sidecar serve` process on free ports."""

    def __init__(self, child: supervisor.Child, port: int, ops_port: int) -> None:
        self.child = child
        self.port = port
        self.ops_port = ops_port

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.child.process

    @property
    def log_path(self) -> Path:
        return self.child.log_path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    @classmethod
    async def serve(
        cls,
        directory: Path,
        redis_url: str,
        database_url: str,
        provider_url: str,
        port: int | None = None,
        log_level: str = "INFO",
        **overrides: Any,
    ) -> SidecarProcess:
        """Write a config into `directory`, start `sidecar serve` and return once its ops port answers.
        `port`: a data port to share with another process (server.reuse_port); default a free one."""
        free_port, ops_port = supervisor.free_ports(2)
        port = port or free_port
        config = write_config(directory, redis_url, database_url, provider_url, port, ops_port, **overrides)
        env = {
            **os.environ,
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_DATABASE_URL": database_url,
            "MOCK_PLATFORM_KEY": PLATFORM_KEY,
            "SIDECAR_KEK": TEST_KEK,  # the shared test database may hold BYOK keys sealed under it
        }
        argv = [str(SIDECAR_BIN), "serve", "--config", str(config), "--log-level", log_level]
        child = supervisor.spawn("sidecar", argv, directory / "sidecar.log", cwd=directory, env=env)
        # Kills the child if it exits or does not answer in time.
        await supervisor.wait_http_ok(child, f"http://127.0.0.1:{ops_port}/healthz", START_TIMEOUT_S)
        return cls(child, port, ops_port)

    def signal(self, sig: signal.Signals) -> None:
        self.child.signal(sig)

    def kill(self) -> None:
        """SIGKILL the process and its session, as a crash (or the OOM killer) would."""
        self.child.kill()

    async def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code, or None if the process still runs after timeout_s."""
        return await self.child.wait_exit(timeout_s)

    async def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time. Safe to call twice.

        Without blocking the loop: the process calls back into the mock provider this test's loop serves."""
        return await self.child.stop_async(timeout_s)

    def log_tail(self) -> str:
        return "\n--- " + self.child.log_tail()
