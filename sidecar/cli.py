"""The one CLI: `sidecar serve | control | dev | migrate | audit | admin | mock-provider | kek | token-hash |
schema`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import os
import sys
from types import ModuleType

from sidecar.config import Config, ConfigError, load_config
from sidecar.observability.logging import setup_logging

CONFIG_PATH_DEFAULT = os.environ.get("SIDECAR_CONFIG", "config/sidecar.yaml")


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"sidecar: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _tune_gc() -> None:
    # The long-lived objects of a started process (modules, config, pools) never become garbage:
    # freezing them keeps every collection from walking them again, and a larger young generation
    # makes collections rarer. Both shorten the pauses that show up as tail latency.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)


GC_YOUNG_THRESHOLD = 20_000


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; this only guards odd platforms
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _run(
    config: Config,
    data_plane: bool,
    control_plane: bool,
    port: int,
    control_port: int | None,
    background: bool | None = None,
    shared_ops_port: bool = False,
) -> None:
    from sidecar.app import Runtime, open_services

    svc = await open_services(config)
    _tune_gc()
    runtime = Runtime(
        svc, data_plane=data_plane, control_plane=control_plane, background=background, shared_ops_port=shared_ops_port
    )
    runtime.install_signal_handlers()
    await runtime.start(config.server.host, port, config.server.ops_port, control_port)
    await runtime.stop.wait()
    await runtime.shutdown()


def _serve(config: Config, workers: int | None) -> int:
    """`sidecar serve`: one process, or a supervisor of `workers` (sidecar/workers.py)."""
    from sidecar import workers as supervisor

    workers = config.server.workers if workers is None else workers
    workers = workers or supervisor.usable_cpus()
    if workers == 1:
        asyncio.run(_run(config, True, False, config.server.port, None))
        return 0
    if not config.server.reuse_port:
        print("sidecar serve: --workers above 1 needs server.reuse_port: true", file=sys.stderr)
        return 2
    from sidecar.app import SHUTDOWN_SETTLE_S

    def body(role: supervisor.Role, index: int) -> int:
        serving = role is supervisor.Role.WORKER
        port = config.server.port
        asyncio.run(_run(config, serving, False, port, None, background=not serving, shared_ops_port=True))
        return 0

    # A worker's drain: its connections (drain_timeout_ms), then its settlements, with a margin.
    stop_timeout_s = config.server.drain_timeout_ms / 1000 + SHUTDOWN_SETTLE_S + 10
    return supervisor.supervise(workers, body, stop_timeout_s)


async def _migrate(config: Config) -> None:
    from sidecar.ledger.migrate import migrate_url

    applied = await migrate_url(config.database_url)
    print(f"migrations applied: {', '.join(applied) if applied else 'none (up to date)'}")


def _kek(args: argparse.Namespace) -> int:
    from sidecar.byok import rotate
    from sidecar.byok.vault import VaultError, generate_kek

    if args.kek_command == "generate":
        print(generate_kek())
        return 0
    config = _load(args.config)
    try:
        rewrapped, total, failed = asyncio.run(rotate.rotate_all(config.database_url, os.environ))
    except VaultError as exc:
        print(f"sidecar kek rotate: {exc}", file=sys.stderr)
        return 2
    print(f"re-wrapped {rewrapped} of {total} stored keys under the newest KEK")
    if failed:
        print(
            f"sidecar kek rotate: {len(failed)} stored key(s) failed authentication and were left as they are "
            f"(altered, or sealed under a KEK not configured): {', '.join(failed)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _devtool(command: str, module: str) -> ModuleType | None:
    """sidecar.devtools.<module>, imported only for the command that needs it: `serve | control | migrate`
    never load the development tools, which the production image does not ship. None (said in one line)
    when they are not installed."""
    package = "sidecar.devtools"
    try:
        return importlib.import_module(f"{package}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name not in (package, f"{package}.{module}"):
            raise  # something the tools need is missing: that traceback says what
    print(
        f"sidecar {command}: not available in this installation: the development tools ({package}) are left "
        "out of the production image; use a checkout (make run, or pip install -e .) instead",
        file=sys.stderr,
    )
    return None


def _audit(args: argparse.Namespace) -> int:
    from sidecar import audit

    redis_url, database_url = args.redis_url, args.database_url
    if not (redis_url and database_url):
        config = _load(args.config)
        redis_url, database_url = redis_url or config.redis_url, database_url or config.database_url
    limits = audit.Limits(
        hold_grace_ms=args.hold_grace_ms,
        backlog_age_ms_max=args.backlog_age_ms_max,
        owed_age_ms_max=args.owed_age_ms_max,
    )
    try:
        report = asyncio.run(audit.run(redis_url, database_url, limits, args.workspace or None))
    except audit.UNREACHABLE as exc:  # exit 2, not 1: nothing was audited, which is not "drift found"
        print(f"sidecar audit: could not read Redis or Postgres: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(report.text())
    if args.textfile or args.pushgateway:
        audit.export_metrics(report, args.textfile, args.pushgateway)
    return 0 if report.ok else 1


def _ledger(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime
    from pathlib import Path

    import asyncpg

    from sidecar.statements import archive

    database_url = args.database_url or _load(args.config).database_url

    async def run() -> list[archive.Archived]:
        conn = await asyncpg.connect(database_url)
        try:
            before = archive.parse_month(args.before)
            today = datetime.now(UTC).date()
            return await archive.run(conn, before, Path(args.dir), today, args.drop, args.dry_run)
        finally:
            await conn.close()

    if not args.dry_run:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    try:
        done = asyncio.run(run())
    except archive.ArchiveRefused as refused:
        print(f"sidecar ledger archive: refused: {refused}", file=sys.stderr)
        return 1
    for item in done:
        verb = "would archive" if args.dry_run else ("archived and dropped" if item.dropped else "archived")
        where = f" -> {item.file} (sha256 {item.sha256})" if item.file else ""
        print(f"{verb} {item.month:%Y-%m}: {item.rows} rows{where}")
    if not done:
        print(f"nothing to archive before {args.before}")
    return 0


def _catalog(args: argparse.Namespace) -> int:
    from sidecar import catalog_report

    config = _load(args.config)
    if args.provider and args.provider not in config.providers:
        print(f"sidecar catalog: no provider {args.provider!r} in {config.source}", file=sys.stderr)
        return 2
    found = catalog_report.rows(config, args.provider, args.all)
    try:
        if args.json:
            import json

            for row in found:
                print(json.dumps(row.as_json()))
        else:
            print(catalog_report.text(found))
        sys.stdout.flush()
    except BrokenPipeError:  # `sidecar catalog | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the runtime installed its own handlers: nothing to stop
        return 130


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="sidecar", description="Metering sidecar for AI agents")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "data plane: proxy routes, ledger flusher, hold sweeper"),
        ("control", "control plane: the admin API"),
        ("migrate", "apply the Postgres schema migrations"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", default=CONFIG_PATH_DEFAULT, help="YAML config file (env SIDECAR_CONFIG)")
        cmd.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "INFO"))
        if name == "serve":
            cmd.add_argument(
                "--workers",
                type=int,
                choices=range(0, 257),
                metavar="N",
                default=os.environ.get("SIDECAR_WORKERS") or None,  # a string default goes through type=int
                help="serving processes sharing the port, plus one for the flusher and sweeper; 0: one per "
                "usable CPU (env SIDECAR_WORKERS; default: config server.workers)",
            )
    kek = sub.add_parser("kek", help="key-encryption keys of the BYOK vault")
    kek_sub = kek.add_subparsers(dest="kek_command", required=True)
    kek_sub.add_parser("generate", help="print a new random KEK (id:base64) for SIDECAR_KEK / SIDECAR_KEK_FILE")
    rotate = kek_sub.add_parser("rotate", help="re-wrap every stored data key under the newest configured KEK")
    rotate.add_argument("--config", default=CONFIG_PATH_DEFAULT, help="YAML config file (env SIDECAR_CONFIG)")
    audit = sub.add_parser("audit", help="check every workspace's money: ledger, accounts and Redis; exit 1 on drift")
    audit.add_argument("--config", default=CONFIG_PATH_DEFAULT, help="YAML config file, for the URLs not given below")
    audit.add_argument("--redis-url", default=os.environ.get("SIDECAR_REDIS_URL"))
    audit.add_argument("--database-url", default=os.environ.get("SIDECAR_DATABASE_URL"))
    audit.add_argument("--workspace", action="append", help="audit only this workspace (repeatable)")
    audit.add_argument("--hold-grace-ms", type=int, default=60_000, help="how late a hold may be before it is drift")
    audit.add_argument(
        "--backlog-age-ms-max", "--backlog-age-max-ms", type=int, default=300_000, help="oldest unflushed event allowed"
    )
    audit.add_argument(
        "--owed-age-ms-max", "--owed-age-max-ms", type=int, default=300_000, help="oldest change owed to Redis allowed"
    )
    audit.add_argument("--textfile", help="write the findings as Prometheus gauges to this file")
    audit.add_argument("--pushgateway", help="push the findings as Prometheus gauges to this Pushgateway")
    audit.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "WARNING"))
    shown = sub.add_parser(
        "catalog", help="what each provider offers, its upstream and sell prices (the model catalog)"
    )
    shown.add_argument("--config", default=CONFIG_PATH_DEFAULT, help="YAML config file (env SIDECAR_CONFIG)")
    shown.add_argument("--provider", help="only this configured provider")
    shown.add_argument("--all", action="store_true", help="also the catalog's models not offered, and why")
    shown.add_argument("--json", action="store_true", help="one JSON object per line")
    ledger = sub.add_parser("ledger", help="the ledger's retention: archive old monthly partitions")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    archive = ledger_sub.add_parser(
        "archive", help="detach monthly partitions before a month, write each to a CSV file (README, retention)"
    )
    archive.add_argument("--before", required=True, help="archive the months before this one (YYYY-MM)")
    archive.add_argument("--dir", required=True, help="where the month files (ledger-YYYY-MM.csv) are written")
    archive.add_argument("--drop", action="store_true", help="drop each detached table once its file is verified")
    archive.add_argument("--dry-run", action="store_true", help="say what would be archived, change nothing")
    archive.add_argument("--config", default=CONFIG_PATH_DEFAULT, help="YAML config file, for the database URL")
    archive.add_argument("--database-url", default=os.environ.get("SIDECAR_DATABASE_URL"))
    archive.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "WARNING"))
    sub.add_parser("token-hash", help="read an admin token on stdin, print the SHA-256 to put in admin_tokens")
    sub.add_parser("schema", help="print the JSON Schema of the Helm chart's values (make schema writes it)")
    dev = sub.add_parser("dev", help="everything on one machine, with embedded Redis/Postgres and a mock provider")
    dev.add_argument("--data-dir", default=".sidecar-dev", help="where embedded Redis/Postgres keep their data")
    dev.add_argument("--port", type=int, default=8080)
    dev.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "WARNING"))
    sub.add_parser("mock-provider", help="the deterministic OpenAI-compatible provider", add_help=False)
    sub.add_parser("admin", help="operate over the admin API (SIDECAR_ADMIN_URL, SIDECAR_ADMIN_TOKEN)", add_help=False)

    args, rest = parser.parse_known_args(argv)
    if args.command == "admin":
        from sidecar import admin_cli

        return admin_cli.run(rest)
    if args.command == "mock-provider":
        if (mock_provider := _devtool(args.command, "mock_provider")) is None:
            return 2
        return mock_provider.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "token-hash":
        import hashlib

        token = sys.stdin.readline().strip()
        if not token:
            parser.error("token-hash: give the token on standard input")
        print(hashlib.sha256(token.encode()).hexdigest())
        return 0
    if args.command == "schema":
        import json

        from sidecar.config import values_schema

        print(json.dumps(values_schema(), indent=2))
        return 0
    if args.command == "kek":
        return _kek(args)
    if args.command == "catalog":
        return _catalog(args)
    setup_logging(args.log_level)
    _event_loop_policy()
    if args.command == "audit":
        return _audit(args)
    if args.command == "ledger":
        return _ledger(args)
    if args.command == "dev":
        if (dev_mode := _devtool(args.command, "dev")) is None:
            return 2
        return dev_mode.main(args)
    config = _load(args.config)
    if args.command == "migrate":
        asyncio.run(_migrate(config))
    elif args.command == "serve":
        return _serve(config, args.workers)
    elif args.command == "control":
        asyncio.run(_run(config, False, True, config.server.port, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
