"""Prometheus metrics. One registry per process (tests build several apps in one process).

Labels are bounded sets (route, configured model names, status codes, outcome names): never a key,
a workspace-supplied string or anything secret.
"""

from __future__ import annotations

from enum import IntEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.observability.payment_metrics import PaymentMetrics

_CHILDREN_MAX = 10_000
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The OpenTelemetry GenAI conventions' advised boundaries for gen_ai.client.token.usage.
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class RedisCheck(IntEnum):
    """A Redis setting the money path depends on, as a gauge value alerts can compare."""

    UNKNOWN = -1  # not read yet, or Redis refused both CONFIG and INFO
    OFF = 0
    ON = 1


READ_REPORTS = ("history", "csv", "summary", "margin")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._children: dict = {}
        self.requests = Counter(
            "sidecar_requests", "Calls by route, model and HTTP status", ["route", "model", "status"], registry=r
        )
        self.upstream_latency = Histogram(
            "sidecar_upstream_latency_seconds",
            "Upstream call duration",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_attempts = Counter(
            "sidecar_upstream_attempts",
            "Upstream attempts by provider and outcome (HTTP status, timeout, unreachable)",
            ["provider", "outcome"],
            registry=r,
        )
        self.upstream_ttfb = Histogram(
            "sidecar_upstream_ttfb_seconds",
            "Upstream time to first byte",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "sidecar_overhead_seconds",
            "Time spent in the sidecar before forwarding (auth, admission)",
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        # Named as the OpenTelemetry GenAI semantic conventions name them (gen_ai.client.operation.duration,
        # gen_ai.client.token.usage), in Prometheus form; README "Traces" maps the rest.
        self.genai_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration: the upstream call, from sending to its last byte",
            ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.genai_tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per GenAI operation, by token type (input, output)",
            ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_token_type"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "sidecar_tokens", "Tokens billed, by model and class", ["model", "token_class"], registry=r
        )
        self.debited = Counter("sidecar_credits_debited_micro", "Micro-credits debited", ["model"], registry=r)
        self.holds_active = Gauge("sidecar_holds_active", "Holds taken by this process and not yet settled", registry=r)
        self.payment_required = Counter("sidecar_payment_required", "402 answers", ["route"], registry=r)
        self.rate_limited = Counter(
            "sidecar_rate_limited", "429 answers from the sidecar's limiter", ["route"], registry=r
        )
        self.settlements = Counter("sidecar_settlements", "Settled calls by outcome", ["status"], registry=r)
        self.ledger_lag = Gauge("sidecar_ledger_stream_lag", "Ledger events in Redis not yet in Postgres", registry=r)
        self.flush_batch_rows = Histogram(
            "sidecar_ledger_flush_batch_rows",
            "Rows inserted per flush batch",
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )
        self.flush_duration = Histogram(
            "sidecar_ledger_flush_duration_seconds", "Flush batch duration", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.flush_failures = Counter("sidecar_ledger_flush_failures", "Failed flush attempts", registry=r)
        self.dead_letters = Counter(
            "sidecar_ledger_dead_letters", "Ledger events Postgres refused, moved to the dead-letter stream", registry=r
        )
        self.byok_fallbacks = Counter(
            "sidecar_byok_fallbacks",
            "Calls moved from a customer's key to the platform key, by provider and reason",
            ["provider", "reason"],
            registry=r,
        )
        self.holds_expired = Counter("sidecar_holds_expired", "Holds voided by the sweeper", registry=r)
        # Money in and out beyond usage (sidecar/movements.py, sidecar/wallet.py).
        self.movements = Counter(
            "sidecar_movements_micro", "Micro-credits moved by credits and debits, by kind", ["kind"], registry=r
        )
        self.debits_short = Counter(
            "sidecar_debits_short_micro",
            "Micro-credits a debit asked for and could not take, by kind",
            ["kind"],
            registry=r,
        )
        self.usage_fees = Counter("sidecar_usage_fees_micro", "Usage fees charged on non-BYOK calls", registry=r)
        self.usage_fees_waived = Counter(
            "sidecar_usage_fees_waived_micro", "Usage fees the workspaces' fee waivers took", registry=r
        )
        self.key_budget_refusals = Counter(
            "sidecar_key_budget_refusals", "Calls refused with 402 because the key's budget was spent", registry=r
        )
        self.postpaid_calls = Counter("sidecar_postpaid_calls", "Calls settled post-charge (nothing held)", registry=r)
        self.expiry_forfeits = Counter("sidecar_expiry_forfeits", "Expired balances forfeited", registry=r)
        self.spooled = Counter(
            "sidecar_settlements_spooled",
            "Settlements written to the disk spool: Redis did not take them in time",
            registry=r,
        )
        self.settlements_lost = Counter(
            "sidecar_settlements_lost", "Settlements neither taken by Redis nor spooled (alert on any)", registry=r
        )
        # The read side (sidecar/statements): how long each report takes, and what CSV statements stream.
        self.read_seconds = Histogram(
            "sidecar_read_seconds",
            "Read-side answers (history page, CSV statement, usage summary, margin report), by report",
            ["report"],
            buckets=(*_LATENCY_BUCKETS, 600),
            registry=r,
        )
        for report in READ_REPORTS:  # every series exists from the start, so panels and alerts always read it
            self.read_seconds.labels(report)
        self.rows_exported = Counter(
            "sidecar_statement_rows_exported", "Ledger rows streamed in CSV statements", registry=r
        )
        self.dependency_errors = Counter(
            "sidecar_dependency_errors", "Redis or Postgres errors on the request path", ["dependency"], registry=r
        )
        # Money in: auto-reload, the balance watch that triggers it, notifications (README, "Auto-reload").
        self.auto_reloads = Counter(
            "sidecar_auto_reloads",
            "Auto-reloads by step: created, started (payment begun), succeeded, failed, disabled (turned off)",
            ["outcome"],
            registry=r,
        )
        self.auto_reload_disabled_workspaces = Gauge(
            "sidecar_auto_reload_disabled_workspaces",
            "Workspaces whose auto-reload turned itself off after repeated failures (control plane)",
            registry=r,
        )
        self.balance_crossings = Counter(
            "sidecar_balance_crossings", "Thresholds crossed downward, by watch (notify, reload)", ["kind"], registry=r
        )
        self.balance_watch_skipped = Counter(
            "sidecar_balance_watch_skipped",
            "Settlement observations skipped: too many workspaces waiting to be checked",
            registry=r,
        )
        self.notification_deliveries = Counter(
            "sidecar_notification_deliveries",
            "Webhook delivery attempts by outcome: delivered, retry, failed (gave up)",
            ["outcome"],
            registry=r,
        )
        self.notifications_pending = Gauge(
            "sidecar_notifications_pending", "Notification events not yet delivered (control plane)", registry=r
        )
        # Read by /readyz and by each /metrics scrape (sidecar/ops.py), so alerts need no probe.
        self.redis_noeviction = Gauge(
            "sidecar_redis_noeviction",
            "1 when Redis's maxmemory-policy is noeviction, 0 when Redis may evict keys, -1 when unread",
            registry=r,
        )
        self.redis_aof_enabled = Gauge(
            "sidecar_redis_aof_enabled", "1 when Redis has AOF on, 0 when off, -1 when unread", registry=r
        )
        self.redis_noeviction.set(RedisCheck.UNKNOWN)
        self.redis_aof_enabled.set(RedisCheck.UNKNOWN)
        self.payments = PaymentMetrics(r)

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, cached: the hot path asks for the same few children every call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= _CHILDREN_MAX:  # label values are bounded sets; this is a backstop
                return metric.labels(*labels)
            found = self._children[key] = metric.labels(*labels)
        return found

    def on_movement(self, kind: str, amount_micro: int, short_micro: int = 0) -> None:
        if amount_micro:
            self.child(self.movements, kind).inc(amount_micro)
        if short_micro:
            self.child(self.debits_short, kind).inc(short_micro)

    def on_flush(self, rows: int, seconds: float, entries: int) -> None:
        self.flush_batch_rows.observe(rows)
        self.flush_duration.observe(seconds)
