"""`sidecar admin`: the operator's CLI over the admin API (README, "sidecar admin").

Reads SIDECAR_ADMIN_URL (the control plane's base URL, e.g. http://127.0.0.1:8081) and
SIDECAR_ADMIN_TOKEN from the environment (or --url / --token-file). Prints readable tables, or the
API's JSON with --json. Every command is one `Command` in COMMANDS: a new admin route gets its command
in a few lines. Secrets (a BYOK key) are read from standard input, never from the command line.

Exit codes: 0 done, 1 the API refused (its message on stderr), 2 usage or connection error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sidecar.errors import ControlFlow

TIMEOUT_S = 30
RESPONSE_BYTES_MAX = 64 * 1024 * 1024  # a ledger export is streamed to the output in chunks up to this
CHUNK_BYTES = 64 * 1024
CELL_CHARS_MAX = 48


@dataclass(frozen=True)
class Arg:
    """One argument: `where` it goes (path, query, body, stdin: a secret read from standard input)."""

    name: str
    help: str
    where: str = "path"
    required: bool = True
    type: Callable[[str], object] = str


@dataclass(frozen=True)
class Command:
    group: str
    name: str  # "" for a group that is a command itself (`sidecar admin balance WS`)
    help: str
    method: str
    path: str  # under /admin/v1, with {arg} placeholders
    args: Sequence[Arg] = ()
    columns: Sequence[str] = ()  # of a listing's rows, for the table; empty: every field, key per line
    raw: bool = False  # the answer is a file (CSV, PDF): written to stdout or --output as it is
    body: dict = field(default_factory=dict)  # fixed body fields


WS = Arg("ws", "workspace id")
KEY_COLUMNS = ("id", "name", "last4", "office_id", "rate_limit_rpm", "created_at", "revoked_at")
BYOK_COLUMNS = ("id", "provider", "scope", "office_id", "last4", "status", "created_at", "last_used_at")
LEDGER_COLUMNS = ("created_at", "kind", "status", "model", "input_tokens", "output_tokens", "cost", "balance_impact")
# The ledger's filters (README, "Statements and reports"), as query parameters.
LEDGER_FILTERS = tuple(
    Arg(name, help, "query", False)
    for name, help in (
        ("from", "from this time or UTC date (2026-12-01)"),
        ("to", "up to this time or UTC date, excluded"),
        ("kind", "usage, grant, topup, ... (comma-separated)"),
        ("status", "completed, failed, ... (comma-separated)"),
        ("model", "model name(s)"),
        ("key_id", "API key id(s)"),
        ("byok", "true or false"),
    )
)

COMMANDS: tuple[Command, ...] = (
    Command("whoami", "", "the token's name, permissions and workspace", "GET", "/whoami"),
    Command("workspaces", "list", "every workspace", "GET", "/workspaces", columns=("id", "name", "created_at")),
    Command("workspaces", "show", "one workspace", "GET", "/workspaces/{ws}", (WS,)),
    Command(
        "workspaces",
        "create",
        "create a workspace (idempotent by id)",
        "POST",
        "/workspaces",
        (Arg("id", "workspace id (default: generated)", "body", False), Arg("name", "display name", "body", False)),
    ),
    Command(
        "keys",
        "list",
        "a workspace's API keys (last 4 characters only)",
        "GET",
        "/workspaces/{ws}/keys",
        (WS,),
        KEY_COLUMNS,
    ),
    Command(
        "keys",
        "create",
        "create an API key: shown once",
        "POST",
        "/workspaces/{ws}/keys",
        (
            WS,
            Arg("name", "display name", "body", False),
            Arg("rate_limit_rpm", "requests per minute", "body", False, int),
            Arg("tokens_per_minute", "tokens per minute", "body", False, int),
            Arg("office_id", "office the key belongs to", "body", False),
        ),
    ),
    Command(
        "keys",
        "revoke",
        "revoke an API key",
        "POST",
        "/workspaces/{ws}/keys/{key_id}/revoke",
        (WS, Arg("key_id", "key id")),
    ),
    Command(
        "grants",
        "create",
        "grant credits (idempotent by grant id)",
        "POST",
        "/workspaces/{ws}/grants",
        (
            WS,
            Arg("amount", "credits, a decimal string (e.g. 25.00)", "body"),
            Arg("grant_id", "idempotency id of this grant", "body"),
            Arg("kind", "grant or topup", "body", False),
        ),
    ),
    Command(
        "keys",
        "budget",
        "set a key's budget (omit --budget to remove it)",
        "POST",
        "/workspaces/{ws}/keys/{key_id}/budget",
        (
            WS,
            Arg("key_id", "key id"),
            Arg("budget", "credits per period", "body", False),
            Arg("period", "monthly, daily or total", "body", False),
        ),
        body={"budget": None},
    ),
    Command(
        "balance", "", "a workspace's balance, held and available credits", "GET", "/workspaces/{ws}/balance", (WS,)
    ),
    Command(
        "wallet",
        "",
        "a workspace's wallet: mode, credit limit, fee waiver, expiry",
        "GET",
        "/workspaces/{ws}/wallet",
        (WS,),
    ),
    Command(
        "ledger",
        "list",
        "a page of a workspace's ledger, newest first",
        "GET",
        "/workspaces/{ws}/ledger",
        (
            WS,
            *LEDGER_FILTERS,
            Arg("limit", "rows (default 100)", "query", False),
            Arg("cursor", "next_cursor of the page before", "query", False),
        ),
        LEDGER_COLUMNS,
    ),
    Command(
        "ledger",
        "export",
        "the CSV statement of a workspace's ledger (to stdout or --output)",
        "GET",
        "/workspaces/{ws}/ledger.csv",
        (WS, *LEDGER_FILTERS),
        raw=True,
    ),
    Command(
        "usage",
        "",
        "a workspace's usage summary (default: the last 30 days)",
        "GET",
        "/workspaces/{ws}/usage-summary",
        (WS, Arg("from", "first UTC day", "query", False), Arg("to", "last UTC day", "query", False)),
    ),
    Command("byok", "list", "a workspace's provider keys", "GET", "/workspaces/{ws}/byok-keys", (WS,), BYOK_COLUMNS),
    Command(
        "byok",
        "add",
        "add a provider key (validated first); the key is read from standard input",
        "POST",
        "/workspaces/{ws}/byok-keys",
        (WS, Arg("provider", "configured provider name", "body"), Arg("key", "", "stdin")),
    ),
    Command(
        "byok",
        "deactivate",
        "stop using a provider key",
        "POST",
        "/workspaces/{ws}/byok-keys/{key_id}/deactivate",
        (WS, Arg("key_id", "BYOK key id")),
    ),
    Command(
        "byok",
        "reactivate",
        "use a provider key again",
        "POST",
        "/workspaces/{ws}/byok-keys/{key_id}/reactivate",
        (WS, Arg("key_id", "BYOK key id")),
    ),
)


class _CliError(ControlFlow):
    """A usage or setup problem, said in one line by `run` (exit 2)."""


def _parser(commands: Sequence[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar admin",
        description="Operate the sidecar over its admin API. Environment: SIDECAR_ADMIN_URL, SIDECAR_ADMIN_TOKEN.",
    )
    parser.add_argument("--url", default=os.environ.get("SIDECAR_ADMIN_URL", ""), help="control plane base URL")
    parser.add_argument("--token-file", help="read the admin token from this file instead of SIDECAR_ADMIN_TOKEN")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer (for scripts)")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    by_group: dict[str, list[Command]] = {}
    for command in commands:
        by_group.setdefault(command.group, []).append(command)
    for group, members in by_group.items():
        if members[0].name == "":
            _add_args(groups.add_parser(group, help=members[0].help), members[0])
            continue
        sub = groups.add_parser(group, help=", ".join(m.name for m in members)).add_subparsers(
            dest="action", required=True, metavar="ACTION"
        )
        for command in members:
            _add_args(sub.add_parser(command.name, help=command.help), command)
    return parser


def _add_args(parser: argparse.ArgumentParser, command: Command) -> None:
    parser.set_defaults(command=command)
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON answer")
    if command.raw:
        parser.add_argument("--output", "-o", help="write the file here (default: standard output)")
    for arg in command.args:
        if arg.where == "stdin":
            continue
        if arg.where == "path" or (arg.required and arg.where == "body"):
            parser.add_argument(arg.name, help=arg.help, type=arg.type)
        else:
            parser.add_argument("--" + arg.name.replace("_", "-"), dest=arg.name, help=arg.help, type=arg.type)


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        with open(args.token_file) as handle:
            token = handle.read().strip()
    else:
        token = os.environ.get("SIDECAR_ADMIN_TOKEN", "").strip()
    if not token:
        raise _CliError("no admin token: set SIDECAR_ADMIN_TOKEN (or --token-file)")
    return token


def _request(args: argparse.Namespace, command: Command) -> urllib.request.Request:
    if not args.url:
        raise _CliError("no admin URL: set SIDECAR_ADMIN_URL (or --url), e.g. http://127.0.0.1:8081")
    path_values, query, body = {}, {}, dict(command.body)
    for arg in command.args:
        if arg.where == "stdin":
            value = sys.stdin.readline().strip()
            if not value:
                raise _CliError(f"give the {arg.name} on standard input (it is never taken from the command line)")
        else:
            value = getattr(args, arg.name)
        if value is None:
            continue
        if arg.where == "path":
            path_values[arg.name] = urllib.parse.quote(str(value), safe="")
        elif arg.where == "query":
            query[arg.name] = value
        else:
            body[arg.name] = value
    url = args.url.rstrip("/") + "/admin/v1" + command.path.format(**path_values)
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if command.method in ("POST", "PUT", "PATCH") else None
    headers = {"Authorization": f"Bearer {_token(args)}", "Content-Type": "application/json"}
    return urllib.request.Request(url, data=data, method=command.method, headers=headers)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= CELL_CHARS_MAX else text[: CELL_CHARS_MAX - 1] + "…"


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    columns = list(columns) or sorted({k for r in rows for k in r})
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines) if rows else "(none)"


def readable(answer: object, command: Command) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("data"), list):
        more = f"\nmore: --cursor {answer['next_cursor']}" if answer.get("has_more") else ""
        return table(answer["data"], command.columns) + more
    if isinstance(answer, dict):
        width = max((len(k) for k in answer), default=0)
        lines = [f"{k.ljust(width)}  {_cell(v) if k != 'key' else v}" for k, v in answer.items()]
        if "key" in answer:
            lines.append("\nThe key is shown this once: store it now.")
        return "\n".join(lines)
    return json.dumps(answer, indent=2)


def _write_raw(response, output: str | None) -> None:
    sink = open(output, "wb") if output else sys.stdout.buffer
    written = 0
    try:
        while chunk := response.read(CHUNK_BYTES):
            written += len(chunk)
            if written > RESPONSE_BYTES_MAX:
                raise _CliError(f"the answer exceeds {RESPONSE_BYTES_MAX} bytes; narrow the request")
            sink.write(chunk)
    finally:
        if output:
            sink.close()


def run(argv: Sequence[str], commands: Sequence[Command] = COMMANDS) -> int:
    parser = _parser(commands)
    args = parser.parse_args(list(argv))
    command: Command = args.command
    try:
        request = _request(args, command)
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            if command.raw:
                _write_raw(response, getattr(args, "output", None))
                return 0
            answer = json.loads(response.read(RESPONSE_BYTES_MAX) or b"null")
    except urllib.error.HTTPError as exc:
        return _refused(exc)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"sidecar admin: cannot reach {args.url}: {reason}", file=sys.stderr)
        return 2
    except _CliError as exc:
        print(f"sidecar admin: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(answer, indent=2) if args.json else readable(answer, command))
    return 0


def _refused(exc: urllib.error.HTTPError) -> int:
    try:
        error = json.loads(exc.read(64 * 1024))["error"]
        message = f"{error['message']} ({error['code']}, HTTP {exc.code})"
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {exc.code} {exc.reason}"
    print(f"sidecar admin: {message}", file=sys.stderr)
    return 1
