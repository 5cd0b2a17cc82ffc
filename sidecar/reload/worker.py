"""The control plane's auto-reload loop: starts the pending reloads' payments, ends the started ones as
their payment orders ended (credited by the payment webhook, or failed), starts a new reload when a
failure's back-off is over and the balance is still under the threshold, and fails reloads stuck past
`auto_reload.stuck_timeout_ms`. Bounded per round by `batch_reloads_max`; everything it acts on is in
Postgres, so a restart resumes where it stopped (a payment started twice is the same payment: the
reload id is its idempotency key).

`payment_succeeded` / `payment_failed` end a reload (this loop calls them; each is idempotent).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from sidecar.config import Config
from sidecar.db import POSTGRES_OUTAGE
from sidecar.observability.metrics import Metrics
from sidecar.reload import store
from sidecar.reload.gateway import ProviderIds, ReloadDeclined, ReloadGateway
from sidecar.reload.store import Ended, Failure, ReloadReason
from sidecar.state.store import State

log = logging.getLogger("sidecar.reload")

NO_METHOD = "no saved payment method"
STUCK = "no confirmation from the payment provider in time"


class ReloadWorker:
    def __init__(
        self, pool: asyncpg.Pool, state: State, config: Config, metrics: Metrics, gateway: ReloadGateway | None
    ) -> None:
        self.pool, self.state, self.config, self.metrics, self.gateway = pool, state, config, metrics, gateway

    @property
    def _pending_max(self) -> int:
        return self.config.notifications.pending_deliveries_per_workspace_max

    async def run(self, stop: asyncio.Event) -> None:
        interval_s = self.config.auto_reload.poll_interval_ms / 1000
        while not stop.is_set():
            try:
                await self.run_once()
            except POSTGRES_OUTAGE as exc:
                log.warning("auto-reload paused: postgres unavailable", extra={"error": type(exc).__name__})
            except Exception:  # the loop must outlive any one bad round
                log.exception("auto-reload round failed; will retry")
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except TimeoutError:
                pass

    async def run_once(self) -> int:
        """One round. Returns how many payments it tried to start."""
        await self._end_finished()
        await self._fail_stuck()
        await self._retry_due()
        started = await self._start_pending()
        async with self.pool.acquire() as conn:
            self.metrics.auto_reload_disabled_workspaces.set(await store.disabled_count(conn))
        return started

    async def _start_pending(self) -> int:
        if self.gateway is None:
            return 0  # no payment provider configured: the settings API refuses to turn reloads on
        async with self.pool.acquire() as conn:
            due = await store.pending(conn, self.config.auto_reload.batch_reloads_max)
        for reload, method in due:
            method = method or await self.gateway.saved_method(reload.workspace_id)
            if method is None:
                await self.payment_failed_now(reload.id, NO_METHOD)
                continue
            try:
                ids = await self.gateway.start_reload_payment(
                    reload.workspace_id, reload.id, reload.amount_micro, method
                )
            except ReloadDeclined as exc:
                await self.payment_failed_now(reload.id, exc.reason, ProviderIds(exc.payment_id or "", exc.order_id))
                continue
            except Exception as exc:  # not started: the next round asks again, with the same idempotency key
                log.warning(
                    "could not start an auto-reload payment; will retry",
                    extra={"workspace_id": reload.workspace_id, "reload_id": reload.id, "error": type(exc).__name__},
                )
                continue
            async with self.pool.acquire() as conn:
                if await store.mark_started(conn, reload.id, ids.payment_id, ids.order_id):
                    self.metrics.child(self.metrics.auto_reloads, "started").inc()
                    log.info(
                        "auto-reload payment started",
                        extra={"workspace_id": reload.workspace_id, "reload_id": reload.id},
                    )
        return len(due)

    async def _end_finished(self) -> None:
        """End the started reloads whose payment order ended (the webhook credited it, or it failed)."""
        if self.gateway is None:
            return
        async with self.pool.acquire() as conn:
            started = await store.processing(conn, self.config.auto_reload.batch_reloads_max)
        outcomes = await self.gateway.payment_outcomes([order_id for _, order_id in started])
        for reload_id, order_id in started:
            outcome = outcomes.get(order_id)
            if outcome is None:
                continue
            async with self.pool.acquire() as conn:
                if outcome.succeeded:
                    await self.payment_succeeded(conn, reload_id)
                else:
                    await self.payment_failed(conn, reload_id, outcome.reason or "failed")

    async def _retry_due(self) -> None:
        """After a failure's back-off: a new reload if the live balance is still under the threshold."""
        async with self.pool.acquire() as conn:
            due = await store.due_retries(conn, self.config.auto_reload.batch_reloads_max)
        for ws, threshold_micro in due:
            account = await self.state.account(ws)
            if account is None or account.available_micro >= threshold_micro:
                continue  # not loaded or back above: the next settlement re-arms the watch
            async with self.pool.acquire() as conn:
                if await store.begin(conn, ws, ReloadReason.RETRY, account.available_micro):
                    self.metrics.child(self.metrics.auto_reloads, "created").inc()

    async def _fail_stuck(self) -> None:
        timeout_s = self.config.auto_reload.stuck_timeout_ms / 1000
        async with self.pool.acquire() as conn:
            stuck = await store.stuck(conn, timeout_s, self.config.auto_reload.batch_reloads_max)
        for reload_id in stuck:
            await self.payment_failed_now(reload_id, STUCK)

    async def payment_failed_now(self, reload_id: str, reason: str, provider: ProviderIds | None = None) -> Failure:
        async with self.pool.acquire() as conn:
            return await self.payment_failed(conn, reload_id, reason, provider)

    async def payment_succeeded(self, conn: asyncpg.Connection, reload_id: str) -> Ended:
        ended = await store.payment_succeeded(conn, reload_id, self._pending_max)
        if ended is Ended.RECORDED:
            self.metrics.child(self.metrics.auto_reloads, "succeeded").inc()
        return ended

    async def payment_failed(
        self, conn: asyncpg.Connection, reload_id: str, reason: str, provider: ProviderIds | None = None
    ) -> Failure:
        failure = await store.payment_failed(
            conn, reload_id, reason, self.config.auto_reload, self._pending_max, provider
        )
        if failure.ended is Ended.RECORDED:
            self.metrics.child(self.metrics.auto_reloads, "failed").inc()
            if failure.disabled:
                self.metrics.child(self.metrics.auto_reloads, "disabled").inc()
            log.warning(
                "auto-reload failed" + ("; auto-reload turned off" if failure.disabled else ""),
                extra={"reload_id": reload_id, "error": reason, "failures": failure.failures},
            )
        return failure
