"""`sidecar dev` as a new user runs it: a real process with embedded Redis/Postgres and the mock provider,
called with the official SDK and with the very lines it prints; Ctrl-C leaves no process behind and loses
no ledger row; a second run on the same data directory finds the same key, balance and ledger."""

from __future__ import annotations

import http.cookiejar
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import openai
import pytest
from support import services
from support.harness import Sidecar
from support.services import run_sync

from sidecar.config import parse_config
from sidecar.devtools import dev, embedded
from sidecar.money import format_micro

SIDECAR = Path(sys.executable).with_name("sidecar")
READY_LINE = "Ctrl-C stops everything."
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
CALL_TIMEOUT_S = 15.0
INITIAL_GRANT_MICRO = 10_000_000
TOP_UP_MICRO = 5_000_000  # bought through the fake Stripe
MOCK_ANSWER = "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
# Anything that would point `sidecar dev` at outside servers or a real provider.
FOREIGN_ENV = (
    "SIDECAR_REDIS_URL",
    "SIDECAR_DATABASE_URL",
    "SIDECAR_ADMIN_TOKEN",
    "SIDECAR_CONFIG",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENROUTER_API_KEY",
    "ANTHROPIC_API_KEY",
)

pytestmark = pytest.mark.skipif(not SIDECAR.exists(), reason=f"no sidecar executable at {SIDECAR}")


# ---------------------------------------------------------------------------------------------------------
# Processes, through /proc (psutil is not a dependency)


def _parent_pids() -> dict[int, int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            # The command name may contain spaces or parentheses; the fields after the last ") " do not.
            fields = stat.read_text().rsplit(") ", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    return parents


def _descendants(pid: int) -> set[int]:
    parents = _parent_pids()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie holds no port, file or lock any more


def _processes_inside(directory: Path) -> list[int]:
    """Processes whose working directory is in `directory` (embedded servers run in their data dir)."""
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        with suppress(OSError):
            if Path(os.readlink(cwd)).is_relative_to(directory) and _alive(int(cwd.parent.name)):
                found.append(int(cwd.parent.name))
    return found


def _free_port_block(size: int, attempts: int = 50) -> int:
    """A port p such that p .. p+size-1 are all free (data plane, admin API, ops)."""
    for _ in range(attempts):
        base = embedded.free_port()
        if base + size > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError(f"no {size} consecutive free ports found in {attempts} attempts")


# ---------------------------------------------------------------------------------------------------------
# The `sidecar dev` process and its banner


@dataclass
class Banner:
    text: str

    def field(self, pattern: str) -> str:
        match = re.search(pattern, self.text, re.M)
        assert match, f"{pattern!r} not in banner:\n{self.text}"
        return match.group(1)

    @property
    def base_url(self) -> str:
        return self.field(r"^\s+Base URL\s+(\S+)")

    @property
    def key(self) -> str:
        return self.field(r"^\s+API key\s+(\S+)")

    @property
    def admin_url(self) -> str:
        return self.field(r"^Admin API\s+(\S+)")

    @property
    def admin_token(self) -> str:
        return self.field(r"^Admin API\s+\S+\s+token: (\S+)")

    @property
    def console_url(self) -> str:
        return self.field(r"^Console\s+(\S+)")

    @property
    def metrics_url(self) -> str:
        return self.field(r"^Metrics\s+(\S+)")

    @property
    def database_url(self) -> str:
        return self.field(r"^\s+\S*psql (postgresql://\S+)")

    def block(self, first_line_prefix: str, lines: int | None = None) -> str:
        """The printed lines from the one starting with the prefix: `lines` of them, or while they end in \\."""
        text = self.text.splitlines()
        start = next(i for i, line in enumerate(text) if line.strip().startswith(first_line_prefix))
        end = start + 1
        if lines is not None:
            end = start + lines
        else:
            while text[end - 1].endswith("\\"):
                end += 1
        return "\n".join(line.strip() if lines else line for line in text[start:end])


class DevProcess:
    def __init__(self, data_dir: Path, port: int, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        self.log_path = log_path
        self._stderr = open(log_path, "wb")  # a file, not a pipe: a chatty process can never block on it
        self.process = subprocess.Popen(
            [str(SIDECAR), "dev", "--data-dir", str(data_dir), "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.strip() == READY_LINE:
                self._ready.set()
        self._ready.set()  # EOF: the process died; wait_ready reports it

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> Banner:
        started = time.monotonic()
        self._ready.wait(START_TIMEOUT_S)
        if READY_LINE not in self.lines:
            self.kill()
            raise AssertionError(
                f"sidecar dev not ready within {START_TIMEOUT_S} s (exit {self.process.poll()}):\n"
                f"{self.output()}\n{self.log_path.read_text(errors='replace')}"
            )
        self.ready_s = time.monotonic() - started
        return Banner(self.output())

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)
        self._stderr.close()


# ---------------------------------------------------------------------------------------------------------
# Calling it


def _client(banner: Banner) -> openai.OpenAI:
    return openai.OpenAI(base_url=banner.base_url, api_key=banner.key, max_retries=0, timeout=CALL_TIMEOUT_S)


def _chat(banner: Banner) -> str:
    completion = _client(banner).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
    return completion.choices[0].message.content


def _chat_streamed(banner: Banner) -> str:
    stream = _client(banner).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def _balance_micro(banner: Banner) -> int:
    request = urllib.request.Request(
        f"{banner.admin_url}/workspaces/demo/balance", headers={"Authorization": f"Bearer {banner.admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S) as response:
        return json.loads(response.read())["balance_micro"]


def _admin_post(banner: Banner, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{banner.admin_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {banner.admin_token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S) as response:
        return json.loads(response.read())


def _top_up(banner: Banner, amount_micro: int) -> None:
    """A customer's top-up in `sidecar dev`, without network: an order, the fake Stripe's checkout page,
    Pay, and the balance once the signed webhook has credited it."""
    before = _balance_micro(banner)
    order = _admin_post(
        banner, "/workspaces/demo/orders", {"client_order_id": "dev-top-up", "amount_micro": amount_micro}
    )
    with urllib.request.urlopen(order["checkout_url"], timeout=CALL_TIMEOUT_S) as page:
        assert b"Pay" in page.read()
    with urllib.request.urlopen(urllib.request.Request(order["checkout_url"], data=b""), timeout=CALL_TIMEOUT_S):
        pass  # the Pay button; redirected to the success page
    deadline = time.monotonic() + 10
    while _balance_micro(banner) != before + amount_micro:
        assert time.monotonic() < deadline, "the top-up was not credited"
        time.sleep(0.05)


def _console_overview(banner: Banner) -> str:
    """Logs in to the printed console URL with the printed token, as a browser would; the page it lands on."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with opener.open(banner.console_url, timeout=CALL_TIMEOUT_S) as response:  # -> the log-in page
        csrf = re.search(r'name="csrf" value="([^"]+)"', response.read().decode()).group(1)
    form = urllib.parse.urlencode({"token": banner.admin_token, "csrf": csrf}).encode()
    with opener.open(banner.console_url + "/login", data=form, timeout=CALL_TIMEOUT_S) as response:
        return response.read().decode()


def _run_printed(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=CALL_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def _ledger_facts(database_url: str) -> dict:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        usage = await conn.fetch("SELECT status, cost_micro FROM ledger WHERE workspace_id = 'demo' AND kind = 'usage'")
        grants = await conn.fetchval("SELECT count(*) FROM ledger WHERE workspace_id = 'demo' AND kind = 'grant'")
        balance = await conn.fetchval("SELECT balance_micro FROM accounts WHERE workspace_id = 'demo'")
    finally:
        await conn.close()
    return {
        "usage_rows": len(usage),
        "statuses": {r["status"] for r in usage},
        "debits": sum(r["cost_micro"] for r in usage),
        "grant_rows": grants,
        "balance": balance,
    }


def _ledger_at_rest(postgres_dir: Path) -> dict:
    """The ledger as the stopped sidecar left it: read with nothing running that could still flush."""
    server = embedded.start_postgres(postgres_dir)
    try:
        return run_sync(lambda: _ledger_facts(server.url))
    finally:
        server.stop()


def _stop_and_check_nothing_left(dev: DevProcess, data_dir: Path) -> None:
    children = _descendants(dev.process.pid)
    assert children, "expected the embedded Redis and Postgres as child processes"
    postmaster_pid = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    assert postmaster_pid in children

    exit_code = dev.interrupt()

    assert exit_code == 0, dev.log_path.read_text(errors="replace")
    assert dev.lines[-1] == "stopped."
    assert not [pid for pid in children if _alive(pid)], "child processes outlived sidecar dev"
    assert not _processes_inside(data_dir)
    assert not (data_dir / "postgres" / "postmaster.pid").exists(), "Postgres was not shut down cleanly"


# ---------------------------------------------------------------------------------------------------------


def test_dev_runs_meters_stops_cleanly_and_keeps_its_state(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    port = _free_port_block(3)

    first = DevProcess(data_dir, port, tmp_path / "first.stderr")
    try:
        banner = first.wait_ready()
        assert banner.base_url == f"http://127.0.0.1:{port}/v1"
        assert banner.admin_url == f"http://127.0.0.1:{port + 1}/admin/v1"
        assert banner.metrics_url == f"http://127.0.0.1:{port + 2}/metrics"
        assert first.ready_s < 15, "a new user should be running in seconds"
        assert (data_dir / "dev-state.json").stat().st_mode & 0o077 == 0, "the key file must be private"
        assert _balance_micro(banner) == INITIAL_GRANT_MICRO
        assert banner.console_url == f"http://127.0.0.1:{port + 1}/console"
        landing = _console_overview(banner)  # the bootstrap token sees every workspace
        assert "<h1>Workspaces</h1>" in landing and "/console/w/demo" in landing
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        printed_cli = banner.block("SIDECAR_ADMIN_URL=", lines=1)
        answer = subprocess.run(["bash", "-c", printed_cli], capture_output=True, text=True, env=env, timeout=60)
        assert answer.returncode == 0 and format_micro(INITIAL_GRANT_MICRO) in answer.stdout, answer.stderr

        assert _chat(banner) == MOCK_ANSWER
        snippet = banner.block("from openai import OpenAI", lines=3)
        assert _run_printed([sys.executable, "-c", snippet]).strip() == MOCK_ANSWER.strip()
        calls = 2
        if shutil.which("curl"):
            answer = json.loads(_run_printed(["bash", "-c", banner.block("curl http")]))
            assert answer["choices"][0]["message"]["content"] == MOCK_ANSWER
            calls += 1
        with urllib.request.urlopen(banner.metrics_url, timeout=CALL_TIMEOUT_S) as response:
            assert b"sidecar_requests_total" in response.read()
        assert _balance_micro(banner) < INITIAL_GRANT_MICRO
        _top_up(banner, TOP_UP_MICRO)
        # The last call right before Ctrl-C: its row is the one most likely still waiting in Redis.
        assert _chat_streamed(banner) == MOCK_ANSWER
        calls += 1
        _stop_and_check_nothing_left(first, data_dir)
    finally:
        first.kill()

    # Every call's row reached Postgres before the stop completed, and the account agrees with them.
    ledger = _ledger_at_rest(data_dir / "postgres")
    assert ledger["usage_rows"] == calls and ledger["statuses"] == {"completed"}
    assert ledger["grant_rows"] == 1
    assert ledger["balance"] == INITIAL_GRANT_MICRO + TOP_UP_MICRO - ledger["debits"]

    second = DevProcess(data_dir, port, tmp_path / "second.stderr")
    try:
        again = second.wait_ready()
        assert (again.key, again.admin_token) == (banner.key, banner.admin_token)
        assert again.database_url == banner.database_url, "the printed psql URL should stay the same"
        assert _balance_micro(again) == ledger["balance"], "the balance must survive, the grant not apply twice"
        assert _chat(again) == MOCK_ANSWER
        assert _balance_micro(again) < ledger["balance"]
        assert run_sync(lambda: _ledger_facts(again.database_url))["grant_rows"] == 1
        _stop_and_check_nothing_left(second, data_dir)
    finally:
        second.kill()
    assert _ledger_at_rest(data_dir / "postgres")["usage_rows"] == calls + 1


# ---------------------------------------------------------------------------------------------------------
# The pieces, in process


async def test_demo_key_is_kept_until_revoked_and_credits_granted_once(sidecar: Sidecar, tmp_path: Path) -> None:
    state: dict = {}
    key = await dev.ensure_demo(sidecar.svc, state, tmp_path)
    assert await dev.ensure_demo(sidecar.svc, state, tmp_path) == key
    assert json.loads((tmp_path / dev.STATE_FILE).read_text())["demo_key"] == key
    [record] = (await sidecar.admin("GET", "/workspaces/demo/keys"))[1]["data"]
    status, _ = await sidecar.admin("POST", f"/workspaces/demo/keys/{record['id']}/revoke")
    assert status == 200

    replacement = await dev.ensure_demo(sidecar.svc, state, tmp_path)

    assert replacement != key and replacement.startswith("sk-sc-")
    assert json.loads((tmp_path / dev.STATE_FILE).read_text())["demo_key"] == replacement
    assert (await sidecar.redis_account("demo"))[0] == INITIAL_GRANT_MICRO


@pytest.mark.parametrize(
    ("env", "provider", "model"),
    [
        ({}, "mock,mock-anthropic", dev.CLAUDE_MODEL),
        ({"OPENAI_API_KEY": "sk-x"}, "openai", "gpt-4o-mini"),
        ({"OPENROUTER_API_KEY": "sk-or-x"}, "openrouter", "openai/gpt-4o-mini"),
        ({"OPENAI_API_KEY": "sk-x", "OPENROUTER_API_KEY": "sk-or-x"}, "openai", "gpt-4o-mini"),
    ],
)
def test_every_provider_choice_makes_a_valid_config(env: dict, provider: str, model: str) -> None:
    upstream = dev.choose_upstream(env, lambda: "http://127.0.0.1:1/v1")
    raw = dev.dev_config_raw(8080, "redis://127.0.0.1:1/0", "postgresql://x@127.0.0.1:1/sidecar", upstream)

    config = parse_config(raw, dev.PRICING, {"SIDECAR_ADMIN_TOKEN": "t"}, source="dev")

    assert list(config.providers) == provider.split(",")
    assert config.model("gpt-4o-mini") is not None and config.model(model) is not None
    assert config.server.ops_port == 8082


def test_anthropic_key_sends_claude_to_anthropic_and_the_rest_to_the_mock() -> None:
    env = {"ANTHROPIC_API_KEY": "sk-ant-x"}
    upstream = dev.choose_upstream(env, lambda: "http://127.0.0.1:1/v1")
    assert upstream.uses_mock
    config = parse_config(
        dev.dev_config_raw(8080, "redis://127.0.0.1:1/0", "postgresql://x@127.0.0.1:1/s", upstream),
        dev.PRICING,
        {"SIDECAR_ADMIN_TOKEN": "t"},
        source="dev",
    )
    assert config.model(dev.CLAUDE_MODEL).provider == "anthropic"
    assert config.providers["anthropic"].base_url == "https://api.anthropic.com/v1"
    assert config.model("gpt-4o-mini").provider == "mock"
    [note] = dev.provider_notes(env, upstream)
    assert "Anthropic" in note


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands Postgres to another OS user")
def test_dev_says_in_one_line_why_postgres_cannot_start(redis_url: str) -> None:
    """Root, a venv inside a directory only root may enter (`mktemp -d`), Postgres from pgserver in it:
    the postgres user cannot reach those binaries, and `sidecar dev` says so and what to do, in one line."""
    if importlib.util.find_spec("pgserver") is None:
        pytest.skip("pgserver is not installed (the `embedded` extra)")
    private = Path(tempfile.mkdtemp(prefix="sidecar-private-"))
    try:
        (private / "venv").symlink_to(Path(sys.prefix), target_is_directory=True)
        python = private / "venv" / "bin" / Path(sys.executable).name
        env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        env |= {"SIDECAR_REDIS_URL": redis_url, embedded.PREFER_ENV: "package"}
        with services.postgres_tmp_dir() as data_dir:
            result = subprocess.run(
                [str(python), "-m", "sidecar.cli", "dev", "--data-dir", str(data_dir), "--port", "0"],
                capture_output=True, text=True, timeout=60, env=env, cwd=Path(__file__).resolve().parents[1],
            )  # fmt: skip
    finally:
        shutil.rmtree(private, ignore_errors=True)

    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sidecar dev: as root, the embedded Postgres runs as the 'postgres' user"), lines
    assert f"{private} (mode 700) is closed to it" in lines[0] and f"chmod o+x {private}" in lines[0]
