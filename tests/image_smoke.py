"""Run the built image against this machine's Redis and Postgres (`make image-smoke`): `migrate`, then
`serve` and `control`, then one metered call through the image's data plane, found in the ledger with
its cost, and the container's HEALTHCHECK reporting healthy.

Needs a docker daemon and host networking (docs/deploy.md). The provider is the in-tree mock provider,
run on the host from the development venv: the image has no development tools. A fresh database is
created for the run and dropped after; containers are removed whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import yaml

from sidecar.devtools import supervisor

PLATFORM_KEY = "sk-platform-image-smoke"
ADMIN_TOKEN = "image-smoke-" + secrets.token_hex(8)
DOCKER_TIMEOUT_S = 300
READY_TIMEOUT_S = 60
HEALTHY_TIMEOUT_S = 60
LEDGER_TIMEOUT_S = 20
CREDITS_MICRO = 1_000_000
PRICING = {"charge_min": "0", "models": {"gpt-4o-mini": {"input": "5.00", "output": "25.00"}}}


class SmokeError(Exception):
    pass


def config(provider_url: str, port: int, ops_port: int) -> dict:
    return {
        "pricing_file": "pricing.yaml",
        "server": {"host": "127.0.0.1", "port": port, "ops_port": ops_port, "drain_timeout_ms": 2000},
        "providers": [
            {"name": "mock", "protocol": "openai", "base_url": provider_url, "api_key_env": "MOCK_PLATFORM_KEY"}
        ],
        "models": [
            {"name": "gpt-4o-mini", "provider": "mock", "max_output_tokens_default": 100, "context_window_tokens": 8000}
        ],
    }


def docker(binary: str, *args: str, check: bool = True) -> str:
    done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=DOCKER_TIMEOUT_S, check=False)
    if check and done.returncode != 0:
        raise SmokeError(f"docker {' '.join(args[:3])}...: exit {done.returncode}\n{done.stderr}{done.stdout}")
    return done.stdout.strip()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def write_configs(directory: Path, provider_url: str, ports: dict[str, tuple[int, int]]) -> None:
    """One config per role (its ports) and the pricing file, readable by the image's user (uid 10001)."""
    directory.chmod(0o755)
    for role, (port, ops_port) in ports.items():
        (directory / f"{role}.yaml").write_text(yaml.safe_dump(config(provider_url, port, ops_port)))
    (directory / "pricing.yaml").write_text(yaml.safe_dump(PRICING))
    for path in directory.iterdir():
        path.chmod(0o644)


async def wait_ready(url: str, timeout_s: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url, headers=headers) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise SmokeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


async def run(args: argparse.Namespace) -> list[str]:
    report: list[str] = []
    run_id = secrets.token_hex(4)
    database = f"sidecar_image_smoke_{run_id}"
    database_url = with_database(args.database_url, database)
    data_port, data_ops, control_port, control_ops, mock_port = supervisor.free_ports(5)
    names = {role: f"sidecar-smoke-{role}-{run_id}" for role in ("serve", "control")}
    env = {"SIDECAR_REDIS_URL": args.redis_url, "SIDECAR_DATABASE_URL": database_url}
    mock = None
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f'CREATE DATABASE "{database}"')
    with tempfile.TemporaryDirectory(prefix="sidecar-image-smoke-") as tmp:
        directory = Path(tmp)
        provider_url = f"http://127.0.0.1:{mock_port}/v1"
        write_configs(directory, provider_url, {"serve": (data_port, data_ops), "control": (control_port, control_ops)})
        mount = ["--network", "host", "-v", f"{directory}:/etc/sidecar:ro"]
        env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
        try:
            mock = supervisor.spawn(
                "mock-provider",
                [str(Path(sys.executable).with_name("sidecar")), "mock-provider", "--port", str(mock_port)],
                directory.parent / f"{directory.name}-mock.log",
                cwd=directory.parent,
                env=dict(os.environ),
            )
            await wait_ready(
                f"http://127.0.0.1:{mock_port}/v1/models", READY_TIMEOUT_S, {"Authorization": f"Bearer {PLATFORM_KEY}"}
            )

            out = docker(
                args.docker,
                "run",
                "--rm",
                *mount,
                *env_args,
                args.image,
                "migrate",
                "--config",
                "/etc/sidecar/serve.yaml",
            )
            report.append(f"migrate: {out.splitlines()[-1] if out else '(no output)'}")

            docker(
                args.docker, "run", "-d", "--name", names["serve"], *mount, *env_args,
                "-e", f"MOCK_PLATFORM_KEY={PLATFORM_KEY}",
                "-e", f"SIDECAR_HEALTHCHECK_URL=http://127.0.0.1:{data_ops}/healthz",
                args.image, "serve", "--config", "/etc/sidecar/serve.yaml",
            )  # fmt: skip
            docker(
                args.docker, "run", "-d", "--name", names["control"], *mount, *env_args,
                "-e", f"SIDECAR_ADMIN_TOKEN={ADMIN_TOKEN}",
                "-e", f"SIDECAR_HEALTHCHECK_URL=http://127.0.0.1:{control_ops}/healthz",
                args.image, "control", "--config", "/etc/sidecar/control.yaml",
            )  # fmt: skip
            await wait_ready(f"http://127.0.0.1:{data_ops}/readyz", READY_TIMEOUT_S)
            await wait_ready(f"http://127.0.0.1:{control_ops}/readyz", READY_TIMEOUT_S)
            report.append(f"serve and control: /readyz 200 (data :{data_port}, admin :{control_port})")

            ws = f"ws_smoke_{run_id}"
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            base = f"http://127.0.0.1:{control_port}/admin/v1/workspaces"
            async with aiohttp.ClientSession() as http:
                async with http.post(base, json={"id": ws, "name": "image smoke"}, headers=auth) as resp:
                    if resp.status != 201:
                        raise SmokeError(f"create workspace: {resp.status} {await resp.text()}")
                grant = {"grant_id": f"smoke-{run_id}", "amount_micro": CREDITS_MICRO}
                async with http.post(f"{base}/{ws}/grants", json=grant, headers=auth) as resp:
                    if resp.status not in (200, 201):
                        raise SmokeError(f"grant: {resp.status} {await resp.text()}")
                async with http.post(f"{base}/{ws}/keys", json={"name": "smoke"}, headers=auth) as resp:
                    if resp.status != 201:
                        raise SmokeError(f"create key: {resp.status} {await resp.text()}")
                    key = (await resp.json())["key"]
                call = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello from the image"}]}
                url = f"http://127.0.0.1:{data_port}/v1/chat/completions"
                async with http.post(url, json=call, headers={"Authorization": f"Bearer {key}"}) as resp:
                    body = await resp.json()
                    if resp.status != 200:
                        raise SmokeError(f"metered call: {resp.status} {body}")
                    cost = int(resp.headers["x-sidecar-cost-micro"])
                    balance = int(resp.headers["x-sidecar-balance-micro"])
            usage = body["usage"]
            expected = 5 * usage["prompt_tokens"] + 25 * usage["completion_tokens"]
            if cost != expected or balance != CREDITS_MICRO - cost:
                raise SmokeError(f"cost {cost} / balance {balance}, expected {expected} / {CREDITS_MICRO - expected}")
            report.append(
                f"metered call: 200, {usage['prompt_tokens']}+{usage['completion_tokens']} tokens, cost {cost} micro"
            )

            conn = await asyncpg.connect(database_url)
            try:
                deadline = time.monotonic() + LEDGER_TIMEOUT_S
                rows = []
                while time.monotonic() < deadline and not rows:
                    rows = await conn.fetch(
                        "SELECT status, cost_micro FROM ledger WHERE workspace_id = $1 AND kind = 'usage'", ws
                    )
                    await asyncio.sleep(0.5)
                account = await conn.fetchval("SELECT balance_micro FROM accounts WHERE workspace_id = $1", ws)
            finally:
                await conn.close()
            recorded = [(r["status"], r["cost_micro"]) for r in rows]
            if recorded != [("completed", cost)] or account != CREDITS_MICRO - cost:
                raise SmokeError(f"ledger {[dict(r) for r in rows]}, account {account}")
            report.append(f"ledger: one row, completed, {cost} micro; accounts balance {account}")

            deadline = time.monotonic() + HEALTHY_TIMEOUT_S
            health = ""
            while time.monotonic() < deadline:
                health = docker(args.docker, "inspect", "--format", "{{.State.Health.Status}}", names["serve"])
                if health in ("healthy", "unhealthy"):
                    break
                await asyncio.sleep(1)
            if health != "healthy":
                raise SmokeError(f"HEALTHCHECK: {health}")
            labels = json.loads(docker(args.docker, "inspect", "--format", "{{json .Config.Labels}}", args.image))
            oci = {k.removeprefix("org.opencontainers.image."): v for k, v in labels.items()}
            report.append(f"HEALTHCHECK: {health}; OCI labels: {oci}")
        except SmokeError as exc:
            report.append(f"FAILED: {exc}")
            for name in names.values():
                report.append(f"--- {name} logs:\n" + docker(args.docker, "logs", "--tail", "30", name, check=False))
            raise SmokeError("\n".join(report)) from None
        finally:
            for name in names.values():
                docker(args.docker, "rm", "-f", name, check=False)
            if mock is not None:
                await mock.stop_async(5)
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await admin.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docker", default="docker")
    parser.add_argument("--image", default="ai-metering-sidecar:0.1.0")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a role that may create and drop the run's database")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(run(args))
    except SmokeError as exc:
        print(f"image-smoke: FAILED\n{exc}", file=sys.stderr)
        return 1
    for line in report:
        print(f"image-smoke: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
