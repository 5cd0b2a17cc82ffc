"""Assembly: the services a process shares, the data-plane app, and a runtime that starts and
stops them in order (graceful drain on SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar import db, expiry, price_versions, scrub, serving, sweeper, wallet
from sidecar.auth import Authenticator, FailedAuthLimiter
from sidecar.balances import Balances
from sidecar.billing.payments import Payments, open_payments
from sidecar.byok import keys as byok_keys
from sidecar.byok.keys import Resolver
from sidecar.byok.vault import KekMissing, KeyRing, Vault, VaultError, check_startup
from sidecar.config import Config
from sidecar.control.server import build_control_app
from sidecar.ledger.flusher import Flusher
from sidecar.notify import endpoints as notify_endpoints
from sidecar.notify import expiry as notify_expiry
from sidecar.notify.delivery import DeliveryWorker
from sidecar.observability import tracing
from sidecar.observability.metrics import Metrics
from sidecar.ops import build_ops_app, warn_if_evicting
from sidecar.proxy import handler, settlement
from sidecar.proxy.budget import ByteBudget
from sidecar.proxy.inflight import Inflight
from sidecar.proxy.spool import Spool
from sidecar.proxy.upstream import Upstreams
from sidecar.reload.orders_gateway import OrdersReloadGateway, order_listener
from sidecar.reload.worker import ReloadWorker
from sidecar.services import Services
from sidecar.state import servers
from sidecar.state.store import State, StateLimits
from sidecar.statements import data_route
from sidecar.watch import BalanceWatch

log = logging.getLogger("sidecar.app")

SHUTDOWN_SETTLE_S = 5.0
# After the data listener closed, how long a connection it accepted has to send its request before
# the process refuses new calls (503) and closes idle connections.
ACCEPTED_GRACE_S = 0.2
REDIS_CONNECTIONS_MAX = 128
REDIS_POOL_WAIT_S = 5.0


async def open_services(config: Config, env: dict[str, str] | None = None) -> Services:
    if not config.redis_url or not config.database_url:
        raise SystemExit(
            "redis_url and database_url are required (config file or SIDECAR_REDIS_URL / "
            "SIDECAR_DATABASE_URL); `sidecar dev` starts both for you"
        )
    scrub.remember(config.admin_token)  # the bootstrap admin token never reaches a log line
    tracing.configure(config.tracing)  # off (nothing per call) unless tracing.otlp_endpoint is set
    try:
        client = _open_redis(config.redis_url)
    except ValueError as exc:  # a malformed cluster URL: say which part, in one line
        raise SystemExit(f"sidecar: redis_url: {exc}") from None
    limits = config.limits
    state = State(
        client,
        lean=True,  # the hot path on its own pipelined connection (state/transport.py says when it can)
        limits=StateLimits(
            concurrent_calls_per_key=limits.concurrent_calls_per_key,
            concurrent_calls_per_workspace=limits.concurrent_calls_per_workspace,
            replay_bytes_per_workspace=limits.idempotency_replay_bytes_per_workspace,
            replay_bytes_total=limits.idempotency_replay_bytes_total,
        ),
    )
    try:
        pg_pool = await db.create_pool(config.database_url)
    except BaseException:
        await client.aclose()
        raise
    metrics = Metrics()
    balances = Balances(state, pg_pool, wallet.Policy.from_config(config.wallet))
    balances.on_movement = metrics.on_movement
    flusher = Flusher(
        client,
        pg_pool,
        balances,
        config.ledger,
        served=frozenset(config.server.workspaces),
        on_batch=metrics.on_flush,
        on_failure=metrics.flush_failures.inc,
        on_dead_letter=metrics.dead_letters.inc,
    )
    try:
        vault = await _open_vault(pg_pool, env)
    except BaseException:
        await pg_pool.close()
        await client.aclose()
        raise
    upstreams = Upstreams(config, env)
    try:
        await upstreams.start()
    except BaseException:
        await pg_pool.close()
        await client.aclose()
        raise
    try:
        await servers.ready(client)
        await state.load_scripts()
    except Exception:
        log.warning("could not load Lua scripts at start; they load on first use")
    await warn_if_evicting(client)
    payments, payments_problem = open_payments(
        config, pg_pool, balances, metrics.payments, dict(os.environ) if env is None else env
    )
    return Services(
        payments=payments,
        payments_problem=payments_problem,
        spool=Spool(config.holds.spool_dir, config.holds.spool_entries_max),
        inflight=Inflight(config.holds.spool_dir),
        buffer_budget=ByteBudget(config.upstream.buffered_answers_bytes_max),
        config=config,
        state=state,
        pool=pg_pool,
        balances=balances,
        auth=Authenticator(pg_pool, config.auth.cache_ttl_ms, workspaces=frozenset(config.server.workspaces)),
        upstreams=upstreams,
        metrics=metrics,
        flusher=flusher,
        byok=Resolver(pg_pool, config.notifications.pending_deliveries_per_workspace_max),
        vault=vault,
        watch=BalanceWatch(pg_pool, config, metrics),
        reloads=_reloads(pg_pool, state, config, metrics, payments),
        notifier=DeliveryWorker(pg_pool, vault, config.notifications, metrics),
    )


def _open_redis(redis_url: str) -> servers.Client:
    """A blocking pool: under a burst, calls wait (bounded) for a connection instead of failing. A
    `redis+cluster://` URL gives redis-py's cluster client instead (state/servers.py)."""
    return servers.open_client(
        redis_url,
        connections_max=REDIS_CONNECTIONS_MAX,
        pool_wait_s=REDIS_POOL_WAIT_S,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=10,
        # After a Redis restart every pooled connection is dead; retry on a fresh one rather than fail
        # the call. Safe because every script is idempotent for its call (see state/lua/*.lua).
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.01), 2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


def _reloads(pool, state: State, config: Config, metrics: Metrics, payments: Payments | None) -> ReloadWorker:
    """Reloads are payment orders charged through Stripe (without Stripe, auto-reload cannot be turned
    on); the webhook that ends a reload order ends its reload at once."""
    if payments is None or payments.gateway is None:
        return ReloadWorker(pool, state, config, metrics, gateway=None)
    gateway = OrdersReloadGateway(payments)
    worker = ReloadWorker(pool, state, config, metrics, gateway)
    payments.listeners.append(order_listener(gateway, worker))
    return worker


async def _open_vault(pg_pool, env: dict[str, str] | None) -> Vault | None:
    """The BYOK vault from SIDECAR_KEK / SIDECAR_KEK_FILE. Refuse to start when stored BYOK keys could
    not be opened: calls would otherwise silently move to the platform key and the customer's credits."""
    try:
        ring = KeyRing.from_env(os.environ if env is None else env)
    except VaultError as exc:  # a malformed SIDECAR_KEK / SIDECAR_KEK_FILE: say which, in one line
        raise SystemExit(f"sidecar: {exc}") from None
    async with pg_pool.acquire() as conn:
        # Notification endpoints' signing secrets are sealed by the same vault.
        stored_kek_ids = await byok_keys.kek_ids(conn) + await notify_endpoints.kek_ids(conn)
    try:
        check_startup(ring, stored_kek_ids)
    except KekMissing as exc:
        raise SystemExit(f"sidecar: {exc}") from None
    return Vault(ring) if ring is not None else None


async def close_services(svc: Services) -> None:
    if svc.notifier is not None:
        await svc.notifier.close()
    if svc.payments is not None:
        await svc.payments.close()
    await svc.upstreams.close()
    await svc.pool.close()
    await svc.state.aclose()
    if svc.config.tracing.otlp_endpoint:  # export what is queued; a provider a test installed is its own
        await asyncio.to_thread(tracing.shutdown)


def build_data_app(svc: Services) -> web.Application:
    config = svc.config
    limiter = FailedAuthLimiter(config.auth.failed_auth_max, config.auth.failed_auth_window_ms)
    guard = serving.guard(serving.protocol_error_body, config.server.body_read_timeout_ms / 1000, limiter)
    app = web.Application(client_max_size=config.server.body_bytes_max, middlewares=[guard])
    app[serving.ERROR_BODY] = serving.protocol_error_body
    app[handler.SERVICES] = svc
    handler.add_routes(app)
    data_route.add_route(app)
    return app


class Runtime:
    """Runs a process's apps and background tasks; stops them in the safe order:
    stop accepting -> drain in-flight calls -> settle them -> flush the ledger -> close."""

    def __init__(
        self,
        svc: Services,
        data_plane: bool,
        control_plane: bool,
        background: bool | None = None,
        shared_ops_port: bool = False,
    ) -> None:
        self.svc = svc
        self.data_plane, self.control_plane = data_plane, control_plane
        # The ledger flusher, the hold sweeper and the spool replayer: in the one data-plane process, or
        # (sidecar serve --workers N) in a background process of their own, once per host.
        self.background = data_plane if background is None else background
        self.shared_ops_port = shared_ops_port  # --workers N: every worker answers probes on the same port
        self.stop = asyncio.Event()
        self._runners: list[web.AppRunner] = []
        self.ports: list[int] = []  # as bound, in start order (data, control, ops): port 0 picks one
        self._tasks: list[asyncio.Task] = []
        self._data_runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, ops_port: int, control_port: int | None = None) -> None:
        svc = self.svc
        limits = serving.data_limits(svc.config.server, serving.raise_file_limit())
        if self.data_plane:
            self._open_spool(journal=True)
            await self._serve(build_data_app(svc), host, port, limits, reuse_port=svc.config.server.reuse_port)
            self._data_runner = self._runners[-1]
            if svc.watch is not None:  # fed in memory by this process's settlements: runs where they do
                self._tasks.append(asyncio.create_task(svc.watch.run(self.stop)))
        if self.data_plane or self.background:
            # The prices this process bills at, so each ledger row's price_version names its prices.
            self._tasks.append(
                asyncio.create_task(price_versions.keep_registered(svc.pool, svc.config.pricing, self.stop))
            )
        if self.background:
            if not self.data_plane:
                self._open_spool(journal=False)
            served = frozenset(svc.config.server.workspaces)
            self._tasks.append(asyncio.create_task(settlement.run_spool(svc, self.stop)))
            self._tasks.append(asyncio.create_task(svc.flusher.run(self.stop)))
            self._tasks.append(
                asyncio.create_task(sweeper.run(svc.state, svc.pool, svc.config.holds, svc.metrics, self.stop, served))
            )
            if svc.config.wallet.expiry_enabled:
                self._tasks.append(
                    asyncio.create_task(expiry.run(svc.balances, svc.config.wallet, svc.metrics, self.stop, served))
                )
        if self.control_plane:
            if svc.payments_problem:  # the control plane takes Stripe's webhooks: it cannot run without them
                raise SystemExit(f"sidecar: {svc.payments_problem}")
            control_port = control_port if control_port is not None else port
            await self._serve(build_control_app(svc), host, control_port, limits)
            for worker in (svc.reloads, svc.notifier):
                if worker is not None:
                    self._tasks.append(asyncio.create_task(worker.run(self.stop)))
            self._tasks.append(asyncio.create_task(notify_expiry.run(svc.pool, svc.config.notifications, self.stop)))
        if not (self.data_plane or self.control_plane):
            return  # the background process of --workers N: the workers answer the probes
        # Its own listener and connection budget: /healthz answers while the data port is flooded.
        ops_host = svc.config.server.ops_host or host
        await self._serve(
            build_ops_app(svc), ops_host, ops_port, serving.ops_limits(svc.config.server), self.shared_ops_port
        )

    def _open_spool(self, journal: bool) -> None:
        """The spool directory (and, where calls are served, this process's journal of admitted calls)."""
        try:
            self.svc.spool.open()
            if journal:
                self.svc.inflight.open()
        except OSError as exc:
            raise SystemExit(
                f"sidecar: holds.spool_dir {self.svc.config.holds.spool_dir!r} is not writable ({exc.strerror}); "
                "set it (or SIDECAR_SPOOL_DIR) to a durable directory the sidecar may write"
            ) from None

    async def _serve(
        self, app: web.Application, host: str, port: int, limits: serving.Limits, reuse_port: bool = False
    ) -> None:
        drain_s = self.svc.config.server.drain_timeout_ms / 1000
        runner = await serving.start(app, host, port, limits, drain_s, reuse_port=reuse_port)
        self._runners.append(runner)
        self.ports.append(runner.addresses[0][1])
        log.info("listening", extra={"url": f"http://{host}:{self.ports[-1]}"})

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)

    async def shutdown(self) -> None:
        svc = self.svc
        if self._data_runner is not None:
            # First stop taking connections: on a shared port (server.reuse_port) the other process takes
            # the new ones from here. Connections already taken bring their request within a moment and
            # are served, not refused: only then does the process call itself draining.
            await serving.stop_accepting(self._data_runner)
            await asyncio.sleep(ACCEPTED_GRACE_S)
        svc.draining = True
        self.stop.set()
        # AppRunner.cleanup closes the listeners, then waits up to shutdown_timeout for in-flight
        # handlers (streams included) before cancelling what is left.
        for runner in self._runners:
            await runner.cleanup()
        # Settlements still retrying (Redis unreachable) spool after SHUTDOWN_SETTLE_S rather than use
        # their whole budget: the process's grace period ends before that, the spool outlives it.
        svc.settle_cutoff_s = asyncio.get_running_loop().time() + SHUTDOWN_SETTLE_S
        if svc.settling:
            await asyncio.wait(list(svc.settling), timeout=SHUTDOWN_SETTLE_S + 5)
        svc.inflight.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.background:
            await svc.flusher.drain(timeout_s=10)
        await close_services(svc)
