"""Running `sidecar serve` as a real OS process, for the tests that kill it or stop it with a signal.

A process is always started in its own session (so `kill()` takes down anything it spawned) and its
output goes to a log file whose tail is attached to every failure. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sidecar.embedded import free_port
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

    def __init__(self, process: subprocess.Popen[bytes], port: int, ops_port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.ops_port = ops_port
        self.log_path = log_path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    @classmethod
    async def serve(
        cls, directory: Path, redis_url: str, database_url: str, provider_url: str, **overrides: Any
    ) -> SidecarProcess:
        """Write a config into `directory`, start `sidecar serve` and return once its ops port answers."""
        port, ops_port = free_port(), free_port()
        while ops_port == port:
            ops_port = free_port()
        config = write_config(directory, redis_url, database_url, provider_url, port, ops_port, **overrides)
        env = {
            **os.environ,
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_DATABASE_URL": database_url,
            "MOCK_PLATFORM_KEY": PLATFORM_KEY,
            "SIDECAR_KEK": TEST_KEK,  # the shared test database may hold BYOK keys sealed under it
        }
        log_path = directory / "sidecar.log"
        process = _spawn([str(SIDECAR_BIN), "serve", "--config", str(config), "--log-level", "INFO"], env, log_path)
        instance = cls(process, port, ops_port, log_path)
        try:
            await instance.wait_ready()
        except BaseException:
            instance.kill()
            raise
        return instance

    async def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"sidecar exited during start ({self.process.returncode}){self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with http.get(self.ops_url + "/healthz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError(f"sidecar did not become healthy within {timeout_s} s{self.log_tail()}")

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process and its session, as a crash (or the OOM killer) would."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    async def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code, or None if the process still runs after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.02)
        return self.process.poll()

    async def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time. Safe to call twice."""
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
            code = await self.wait_exit(timeout_s)
            if code is not None:
                return code
        self.kill()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            tail = [f"(no log: {exc})"]
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(tail)


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    # Its own session, so kill() reaches everything it started; output to a file, never a pipe that fills.
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
