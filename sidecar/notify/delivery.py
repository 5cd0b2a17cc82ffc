"""The delivery worker: sends due notification events to their endpoints, signed, with retries.

Bounded everywhere: at most `batch_deliveries_max` events per round, sent concurrently, each POST within
`delivery_timeout_ms`, at most `attempts_max` attempts per event with exponential back-off between them.
Everything it needs is in Postgres, so a restart loses nothing: a claim is a lease, and an event whose
sender died is due again when the lease ends. Runs in the control plane.

The endpoint's URL is never logged (customers put tokens in URLs); neither is the secret.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import asyncpg

from sidecar.byok.vault import Vault, VaultError
from sidecar.config import NotificationsConfig
from sidecar.db import POSTGRES_OUTAGE
from sidecar.notify import endpoints, events, signing
from sidecar.notify.events import Delivery, DeliveryState
from sidecar.observability.metrics import Metrics

log = logging.getLogger("sidecar.notify")

USER_AGENT = "ai-metering-sidecar-webhooks/1"
LEASE_MARGIN_S = 1.0  # a claim outlives the POST's timeout by this much
BACKOFF_DOUBLINGS_MAX = 30  # 2**30 x the first wait is past any configured maximum


def backoff_s(config: NotificationsConfig, attempts: int) -> float:
    """The wait after the `attempts`-th failed attempt: the minimum, doubled each time, capped."""
    doubled = config.retry_backoff_ms_min * 2 ** min(attempts - 1, BACKOFF_DOUBLINGS_MAX)
    return min(doubled, config.retry_backoff_ms_max) / 1000


class DeliveryWorker:
    def __init__(self, pool: asyncpg.Pool, vault: Vault | None, config: NotificationsConfig, metrics: Metrics) -> None:
        self.pool, self.vault, self.config, self.metrics = pool, vault, config, metrics
        self._session: aiohttp.ClientSession | None = None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    sent = await self.run_once()
                except POSTGRES_OUTAGE as exc:
                    sent = 0
                    log.warning(
                        "notification delivery paused: postgres unavailable", extra={"error": type(exc).__name__}
                    )
                except Exception:  # the loop must outlive any one bad round
                    sent = 0
                    log.exception("notification delivery round failed; will retry")
                if sent < self.config.batch_deliveries_max:  # a full batch: more may be due now
                    try:
                        await asyncio.wait_for(stop.wait(), self.config.poll_interval_ms / 1000)
                    except TimeoutError:
                        pass
        finally:
            await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_once(self) -> int:
        """One round: claim what is due, send it, record each outcome. Returns how many were attempted."""
        lease_s = self.config.delivery_timeout_ms / 1000 + LEASE_MARGIN_S
        async with self.pool.acquire() as conn:
            due = await events.claim_due(conn, self.config.batch_deliveries_max, lease_s)
            by_ws = {ws: await endpoints.get(conn, ws) for ws in {d.workspace_id for d in due}}
        if due:
            await asyncio.gather(*(self._deliver(d, by_ws[d.workspace_id]) for d in due))
        async with self.pool.acquire() as conn:
            self.metrics.notifications_pending.set(await events.pending_count(conn))
        return len(due)

    async def _deliver(self, delivery: Delivery, endpoint: endpoints.Endpoint | None) -> None:
        started = time.monotonic()
        status_code, error = None, None
        if endpoint is None:
            error = "the workspace has no notification endpoint any more"
            await self._record(delivery, None, error, started, final=True)
            return
        try:
            secret = self._secret(endpoint)
        except VaultError as exc:
            await self._record(delivery, None, f"the signing secret cannot be opened: {type(exc).__name__}", started)
            return
        body = delivery.body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            signing.HEADER: signing.sign(secret, body, int(time.time())),
            signing.EVENT_ID_HEADER: delivery.id,
            signing.EVENT_TYPE_HEADER: delivery.event_type,
        }
        del secret
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.delivery_timeout_ms / 1000)
            async with self._http().post(
                endpoint.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                status_code = resp.status
                if not 200 <= resp.status < 300:
                    error = f"the endpoint answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"the endpoint could not be reached: {type(exc).__name__}"
        await self._record(delivery, status_code, error, started)

    def _secret(self, endpoint: endpoints.Endpoint) -> str:
        if self.vault is None:
            raise VaultError("no key-encryption key is configured")
        return self.vault.open(endpoint.sealed, endpoints.aad(endpoint.workspace_id))

    async def _record(
        self, delivery: Delivery, status_code: int | None, error: str | None, started: float, final: bool = False
    ) -> None:
        duration_ms = int((time.monotonic() - started) * 1000)
        if error is None:
            state, outcome = DeliveryState.DELIVERED, "delivered"
        elif final or delivery.attempts >= self.config.attempts_max:
            state, outcome = DeliveryState.FAILED, "failed"
        else:
            state, outcome = DeliveryState.PENDING, "retry"
        self.metrics.child(self.metrics.notification_deliveries, outcome).inc()
        if state is DeliveryState.FAILED:
            log.warning(
                "notification not delivered; giving up",
                extra={"workspace_id": delivery.workspace_id, "delivery_id": delivery.id, "error": error},
            )
        async with self.pool.acquire() as conn:
            await events.record_attempt(
                conn, delivery, status_code, error, duration_ms, state, backoff_s(self.config, delivery.attempts)
            )

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # A small pool: deliveries are few and a slow endpoint must not take every socket.
            connector = aiohttp.TCPConnector(limit=self.config.batch_deliveries_max, limit_per_host=8)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session
