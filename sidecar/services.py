"""The long-lived objects one process shares between its handlers and background tasks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg

from sidecar.auth import Authenticator
from sidecar.balances import Balances
from sidecar.billing.payments import Payments
from sidecar.byok.keys import Resolver
from sidecar.byok.vault import Vault
from sidecar.config import Config
from sidecar.ledger.flusher import Flusher
from sidecar.notify.delivery import DeliveryWorker
from sidecar.observability.metrics import Metrics
from sidecar.proxy.budget import ByteBudget
from sidecar.proxy.inflight import Inflight
from sidecar.proxy.spool import Spool
from sidecar.proxy.upstream import Upstreams
from sidecar.reload.worker import ReloadWorker
from sidecar.state.store import State
from sidecar.watch import BalanceWatch


@dataclass
class Services:
    config: Config
    state: State
    pool: asyncpg.Pool
    balances: Balances
    auth: Authenticator
    upstreams: Upstreams
    metrics: Metrics
    flusher: Flusher
    byok: Resolver
    vault: Vault | None  # None: no key-encryption key configured, so no BYOK key can be used or added
    spool: Spool  # settlements Redis could not take within their budget
    inflight: Inflight  # this process's admitted, unsettled calls, on disk (recovered if it dies)
    buffer_budget: ByteBudget  # memory for buffered (non-streamed) answers, over the whole process
    # Settlements run as their own tasks, so a client that disconnects cannot cancel one half-way;
    # shutdown waits for them.
    settling: set[asyncio.Task] = field(default_factory=set)
    draining: bool = False
    # Once handlers are drained at shutdown, settlements still retrying stop at this loop time and go
    # to the spool: the pod's grace period is finite, the spool outlives the process.
    settle_cutoff_s: float | None = None
    # Money in (sidecar/billing/): payment orders, Stripe, invoices. None only in a Services built by hand.
    payments: Payments | None = None
    payments_problem: str | None = None  # why Stripe is configured but unusable (the control plane refuses to start)
    # Money in (open_services builds them): the data plane's threshold watch, fed by settlements; the
    # control plane's auto-reload loop and notification delivery.
    watch: BalanceWatch | None = None
    reloads: ReloadWorker | None = None
    notifier: DeliveryWorker | None = None
