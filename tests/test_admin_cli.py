"""`sidecar admin` (issue 11.5) as an operator runs it: the installed CLI in a subprocess, against a
running sidecar's admin API, with the URL and token from the environment."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from support.harness import ADMIN_TOKEN, SCOPED_ADMIN_TOKEN, SCOPED_WORKSPACE, Sidecar

from sidecar import admin_cli


async def cli(sidecar: Sidecar | None, *argv: str, token: str = ADMIN_TOKEN, stdin: str = "") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    if sidecar is not None:
        env["SIDECAR_ADMIN_URL"] = str(sidecar.control.make_url("")).rstrip("/")
    env["SIDECAR_ADMIN_TOKEN"] = token
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar.cli",
        "admin",
        *argv,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 60)
    return process.returncode, out.decode(), err.decode()


async def test_workspaces_keys_grants_and_balance(sidecar: Sidecar) -> None:
    code, out, err = await cli(sidecar, "--json", "workspaces", "create", "--id", "ws_cli", "--name", "CLI test")
    assert code == 0, err
    assert json.loads(out)["id"] == "ws_cli"
    code, out, _ = await cli(sidecar, "workspaces", "list")
    assert code == 0 and out.splitlines()[0].split() == ["ID", "NAME", "CREATED_AT"]
    assert any(line.startswith("ws_cli ") for line in out.splitlines())

    code, out, _ = await cli(sidecar, "--json", "keys", "create", "ws_cli", "--name", "agent", "--rate-limit-rpm", "60")
    created = json.loads(out)
    assert code == 0 and created["key"].startswith("sk-sc-") and created["rate_limit_rpm"] == 60
    code, out, _ = await cli(sidecar, "keys", "list", "ws_cli")
    assert code == 0 and created["id"] in out and created["key"][-4:] in out
    assert created["key"] not in out  # the key itself is shown once, at creation only

    code, out, _ = await cli(sidecar, "grants", "create", "ws_cli", "12.50", "g-1")
    assert code == 0 and "12.500000" in out
    code, out, _ = await cli(sidecar, "grants", "create", "ws_cli", "12.50", "g-1")  # a replay: nothing more
    code, out, _ = await cli(sidecar, "--json", "balance", "ws_cli")
    assert code == 0 and json.loads(out)["balance_micro"] == 12_500_000
    code, out, _ = await cli(sidecar, "balance", "ws_cli")
    assert code == 0 and "available" in out and "12.500000" in out

    code, out, _ = await cli(sidecar, "keys", "revoke", "ws_cli", created["id"])
    assert code == 0 and "revoked_at" in out
    _, listed = await sidecar.admin("GET", "/workspaces/ws_cli/keys")
    assert listed["data"][0]["revoked_at"] is not None


async def test_byok_keys_are_read_from_standard_input(sidecar: Sidecar) -> None:
    ws = await sidecar.workspace()
    code, out, err = await cli(sidecar, "--json", "byok", "add", ws.id, "mock", stdin="sk-customer-cli-key-7777\n")
    assert code == 0, err
    added = json.loads(out)
    assert added["last4"] == "7777" and "sk-customer-cli-key" not in out
    code, out, _ = await cli(sidecar, "byok", "list", ws.id)
    assert code == 0 and "7777" in out and "active" in out
    code, out, _ = await cli(sidecar, "--json", "byok", "deactivate", ws.id, added["id"])
    assert code == 0 and json.loads(out)["status"] == "inactive"
    code, out, _ = await cli(sidecar, "--json", "byok", "reactivate", ws.id, added["id"])
    assert code == 0 and json.loads(out)["status"] == "active"
    code, _, err = await cli(sidecar, "byok", "add", ws.id, "mock")  # nothing on stdin
    assert code == 2 and "standard input" in err


async def test_refusals_say_why_and_exit_1(sidecar: Sidecar) -> None:
    other = await sidecar.workspace()
    await sidecar.admin("POST", "/workspaces", {"id": SCOPED_WORKSPACE})
    code, out, _ = await cli(sidecar, "--json", "whoami", token=SCOPED_ADMIN_TOKEN)
    assert code == 0 and json.loads(out)["workspace"] == SCOPED_WORKSPACE
    code, out, err = await cli(sidecar, "balance", other.id, token=SCOPED_ADMIN_TOKEN)
    assert code == 1 and out == "" and "workspace_forbidden" in err and "HTTP 403" in err
    code, _, err = await cli(sidecar, "workspaces", "list", token="wrong-token")
    assert code == 1 and "invalid_admin_token" in err
    assert "wrong-token" not in err
    code, _, err = await cli(sidecar, "grants", "create", other.id, "-1", "g-neg")
    assert code == 1 and "invalid_amount" in err


async def test_configuration_errors_exit_2() -> None:
    code, _, err = await cli(None, "workspaces", "list")
    assert code == 2 and "SIDECAR_ADMIN_URL" in err
    code, _, err = await cli(None, "--url", "http://127.0.0.1:9", "workspaces", "list")
    assert code == 2 and "cannot reach" in err


def test_a_new_route_gets_its_command_in_a_few_lines(capsys) -> None:
    extra = admin_cli.Command(
        "orders", "list", "a workspace's orders", "GET", "/workspaces/{ws}/orders", (admin_cli.WS,), ("id", "state")
    )
    parser = admin_cli._parser((*admin_cli.COMMANDS, extra))
    args = parser.parse_args(["orders", "list", "ws_1"])
    assert args.command is extra and args.ws == "ws_1"
    assert admin_cli.readable({"data": [{"id": "o1", "state": "paid", "x": 1}]}, extra).split() == [
        "ID",
        "STATE",
        "o1",
        "paid",
    ]


async def test_ledger_list_export_usage_and_budgets(sidecar: Sidecar, tmp_path) -> None:
    ws = await sidecar.workspace(credits_micro=10_000_000)
    for _ in range(3):
        status, _, _ = await sidecar.chat(ws)
        assert status == 200
    rows = await sidecar.ledger_eventually(ws.id, 3)
    code, out, err = await cli(sidecar, "ledger", "list", ws.id, "--kind", "usage", "--limit", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["CREATED_AT", "KIND", "STATUS"] and lines[-1].startswith("more: --cursor ")
    code, out, _ = await cli(sidecar, "--json", "ledger", "list", ws.id, "--kind", "usage", "--cursor", lines[-1][15:])
    assert code == 0 and len(json.loads(out)["data"]) == 1

    target = tmp_path / "statement.csv"
    code, _, err = await cli(sidecar, "ledger", "export", ws.id, "--kind", "usage", "--output", str(target))
    assert code == 0, err
    header, *exported = target.read_text().strip().splitlines()
    assert header.startswith("event_id,") and {line.split(",")[0] for line in exported} == {
        str(r["event_id"]) for r in rows
    }
    code, out, _ = await cli(sidecar, "ledger", "export", ws.id)  # to standard output: the grant too
    assert code == 0 and len(out.strip().splitlines()) == 1 + 4
    code, _, err = await cli(sidecar, "ledger", "export", ws.id, "--kind", "Not A Word")
    assert code == 1 and "invalid_filter" in err

    code, out, _ = await cli(sidecar, "--json", "usage", ws.id)
    assert code == 0 and json.loads(out)["totals"]["calls"] == 3
    code, out, _ = await cli(
        sidecar, "--json", "keys", "budget", ws.id, ws.key_id, "--budget", "2.50", "--period", "daily"
    )
    assert code == 0 and json.loads(out)["budget_micro"] == 2_500_000 and json.loads(out)["budget_period"] == "daily"
    code, out, _ = await cli(sidecar, "--json", "keys", "budget", ws.id, ws.key_id)  # removed
    assert code == 0 and json.loads(out)["budget_micro"] is None
