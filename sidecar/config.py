"""Configuration: one YAML file, a pricing file beside it, and environment overrides.

The file's shape is declared once, as msgspec structs below: they check a file (a wrong config fails at
start with a ConfigError naming the key and the problem), they are what the code reads, and they give
the JSON Schema of the Helm chart's values (`sidecar schema`). What one key cannot say alone (a hold
outliving a call, a model's provider existing) is checked by hand, after. Durations are in
milliseconds and sizes in bytes, every name says so, and units and qualifiers come last
(`body_bytes_max`, docs/architecture.md). Keys renamed by that rule are still read, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec
import yaml
from msgspec import Meta, Struct

from sidecar import catalog
from sidecar.errors import StartupError
from sidecar.money import MoneyError, parse_credits, parse_decimal_scaled, parse_price_per_million
from sidecar.pricing import EXTRA_TOKEN_CLASSES, TOOL_FEES, CostProfile, ModelPrice, TokenPrices
from sidecar.protocols.base import ROUTING_FIELDS

log = logging.getLogger(__name__)

Protocol = Literal["openai", "anthropic"]  # the wire-protocol family a provider's base URL speaks
PROTOCOLS = get_args(Protocol)
Permission = Literal[
    "WORKSPACES_MANAGE", "KEYS_MANAGE", "CREDITS_MANAGE", "TENANT_MANAGE", "NOTIFICATIONS_MANAGE", "READ"
]
PERMISSIONS = get_args(Permission)
RoutingField = Literal[ROUTING_FIELDS]  # OpenRouter's request fields a model may allow
# How a model's targets are ordered for a call (proxy/routing.py): as listed, by `priority` (lowest
# first), or by the call's price ceiling on each (cheapest first).
Routing = Literal["order", "priority", "cheapest"]
TARGETS_MAX = 8

Natural = Annotated[int, Meta(ge=0)]
Positive = Annotated[int, Meta(ge=1)]
TimeoutMs = Annotated[int, Meta(ge=100)]  # shorter would fail healthy calls, not protect anything
WindowMs = Annotated[int, Meta(ge=1_000)]
Name = Annotated[str, Meta(min_length=1)]

# Old key -> new key: read for one more release (0.2), with a warning naming both. `[]` is every item.
RENAMED = {
    "server.max_body_bytes": "server.body_bytes_max",
    "server.max_connections": "server.connections_max",
    "server.ops_max_connections": "server.ops_connections_max",
    "auth.default_rpm": "auth.rpm_default",
    "upstream.pool_size": "upstream.pool_connections_max",
    "holds.spool_max_entries": "holds.spool_entries_max",
    "holds.sweep_batch_max": "holds.sweep_batch_holds_max",
    "ledger.batch_max_rows": "ledger.batch_rows_max",
    "ledger.batch_max_age_ms": "ledger.batch_age_ms_max",
    "ledger.retry_backoff_max_ms": "ledger.retry_backoff_ms_max",
    "billing.idempotency_max_body_bytes": "billing.idempotency_body_bytes_max",
    "models[].default_max_output_tokens": "models[].max_output_tokens_default",
    "pricing.minimum_charge": "pricing.charge_min",  # pricing.yaml
}

_NEVER_FORWARDED = {
    "authorization",
    "x-api-key",
    "cookie",
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-connection",
}


class ConfigError(StartupError, ValueError):
    pass


class _Strict(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: Natural = 8080
    ops_port: Natural = 9090
    # Where the ops port listens; "": as `host`. In the agent's own pod the data port listens on
    # 127.0.0.1 (only the agent calls it) while probes and scrapes reach the ops port on 0.0.0.0.
    ops_host: str = ""
    # The data port may be shared by several `sidecar serve` processes on one host (SO_REUSEPORT): a
    # new process starts beside the old one, which drains on SIGTERM while the new one takes every new
    # connection. Each process still needs its own ops_port.
    reuse_port: bool = True
    # Serving processes on the data port (`sidecar serve --workers N` overrides it). 1: one process
    # does everything. N > 1: N workers share the port (SO_REUSEPORT, so reuse_port must stay on) and
    # the ops port, and one background process per host runs the ledger flusher, the hold sweeper and
    # the spool replayer (docs/performance.md). 0: one per CPU the process may use (its cgroup quota).
    workers: Annotated[int, Meta(ge=0, le=256)] = 1
    body_bytes_max: Annotated[int, Meta(ge=1024)] = 8 * 1024 * 1024
    drain_timeout_ms: Natural = 30_000
    # Slow and idle clients (README, security): a request's head must arrive within
    # header_read_timeout_ms of its first byte (of the connection's opening, for the first request),
    # its body within body_read_timeout_ms, and an idle keep-alive connection is closed after
    # keepalive_timeout_ms (keep it above any load balancer's idle timeout in front).
    header_read_timeout_ms: TimeoutMs = 10_000
    body_read_timeout_ms: TimeoutMs = 30_000
    keepalive_timeout_ms: TimeoutMs = 75_000
    # Open connections per port; past it a new one gets 503 and is closed. 0: half the process's
    # open-file limit, so upstream connections, Postgres, Redis and the ops port keep descriptors.
    connections_max: Natural = 0
    ops_connections_max: Positive = 64  # the ops port's own budget: probes and scrapes only
    # The workspaces this data plane serves (a deployment per workspace, README "Deploying"): keys of
    # any other workspace get 401, and the sweeper and flusher leave other workspaces to their own
    # deployment. Empty: every workspace.
    workspaces: tuple[Name, ...] = ()

    def __post_init__(self) -> None:
        if len(set(self.workspaces)) != len(self.workspaces):
            raise ValueError("workspaces: a workspace is listed twice")
        if self.workers != 1 and not self.reuse_port:
            raise ValueError("workers: more than one worker shares the data port, which needs reuse_port: true")


class AuthConfig(_Strict):
    cache_ttl_ms: Annotated[int, Meta(ge=0, le=5_000, description="so a revoked key stops working within 5 s")] = 2_000
    rpm_default: Positive = 40
    rate_window_ms: WindowMs = 60_000
    # A source address with this many failed authentications in a window is refused (429) until
    # the window ends, without a key lookup. 0 turns it off.
    failed_auth_max: Natural = 50
    failed_auth_window_ms: Natural = 60_000

    def __post_init__(self) -> None:
        if self.failed_auth_max and self.failed_auth_window_ms < 1_000:
            raise ValueError("failed_auth_window_ms: must be at least 1000")


class UpstreamConfig(_Strict):
    connect_timeout_ms: Natural = 5_000
    first_byte_timeout_ms: Natural = 120_000
    idle_timeout_ms: Natural = 120_000
    total_timeout_ms: Natural = 600_000
    # A client that takes longer than this to accept one relayed chunk has, in effect, left.
    write_timeout_ms: TimeoutMs = 30_000
    # After a client hangs up mid-stream, keep reading (not relaying) the provider's stream this long
    # for its usage count: an estimate from bytes misses images, cached prefixes and reasoning.
    usage_wait_after_hangup_ms: Natural = 30_000
    # Memory all buffered (non-streamed) answers of the process may hold at once; past it a call is
    # refused with 503 rather than let a few huge answers exhaust the process.
    buffered_answers_bytes_max: Positive = 256 * 1024 * 1024
    pool_connections_max: Natural = 512  # per provider; 0: no limit


class HoldConfig(_Strict):
    ttl_ms: Annotated[int, Meta(ge=0, le=7 * 86_400_000)] = 900_000  # at most a week: Lua keeps now + ttl exact
    settle_budget_ms: TimeoutMs = 60_000  # how long a call may keep retrying its settlement
    # Settlements Redis could not take within the budget wait here, on disk, to be replayed.
    spool_dir: str = "/var/lib/sidecar/spool"
    spool_entries_max: Positive = 100_000
    sweep_interval_ms: Natural = 5_000
    sweep_batch_holds_max: Natural = 200
    # How long past its deadline a hold is left to its own call before the sweeper voids it: room for a
    # settlement spooled while Redis was down to be replayed once Redis is back (proxy/spool.py).
    sweep_grace_ms: Natural = 60_000


class LedgerConfig(_Strict):
    batch_rows_max: Annotated[int, Meta(ge=1, le=10_000)] = 500
    batch_age_ms_max: Natural = 200
    claim_idle_ms: Natural = 30_000
    retry_backoff_ms_max: Natural = 5_000
    workspace_refresh_ms: Natural = 5_000
    # A CSV statement (admin GET .../ledger.csv) streams for at most this long: a year of a busy workspace
    # takes well under a minute (bench/statements.py); a client reading slower than that is cut off.
    statement_export_timeout_ms: Annotated[int, Meta(ge=1_000)] = 600_000


class BillingConfig(_Strict):
    bill_observed_on_upstream_failure: bool = False
    idempotency_ttl_ms: Natural = 86_400_000
    idempotency_body_bytes_max: Natural = 1024 * 1024


class WalletConfig(_Strict):
    """Money settings every workspace gets unless its wallet (admin API) says otherwise; amounts are
    credits as decimal strings, parsed exactly (sidecar/wallet.py)."""

    # The usage fee: this percent of a non-BYOK call's token cost is charged on top (its own column,
    # fee_micro), rounded up to the micro-credit once per call. Never on BYOK calls or free models.
    usage_fee_percent: str = "0"
    # The first this-many credits of usage fees of each workspace are waived (per-workspace override).
    fee_waiver_credits: str = "0"
    # An initial allowance granted exactly once per workspace: when it is created, or on its first use.
    allowance_credits: str = "0"
    allowance_on: Literal["created", "first_use"] = "created"
    # Expiry: each top-up moves the workspace's expiry to `expiry_extend_months` past the later of now
    # and the current expiry, at most `expiry_ahead_months_max` ahead; at expiry the balance is forfeited.
    expiry_enabled: bool = False
    expiry_extend_months: Annotated[int, Meta(ge=1, le=12)] = 1
    expiry_ahead_months_max: Annotated[int, Meta(ge=1, le=36)] = 3
    expiry_check_interval_ms: Annotated[int, Meta(ge=100, le=3_600_000)] = 10_000
    expiry_batch_max: Annotated[int, Meta(ge=1, le=10_000)] = 100  # workspaces forfeited per check

    def __post_init__(self) -> None:
        for name, decimals in (("usage_fee_percent", 4), ("fee_waiver_credits", 6), ("allowance_credits", 6)):
            try:
                value = parse_decimal_scaled(getattr(self, name), decimals)
            except MoneyError as exc:
                raise ValueError(f"{name}: {exc}") from None
            if name == "usage_fee_percent" and value > 100 * 10**4:
                raise ValueError("usage_fee_percent: at most 100")
        if self.expiry_ahead_months_max < self.expiry_extend_months:
            raise ValueError("expiry_ahead_months_max: must be at least expiry_extend_months")


class LimitsConfig(_Strict):
    """Bounds that keep one key or workspace from taking what others need; 0 = none."""

    concurrent_calls_per_key: Natural = 64
    concurrent_calls_per_workspace: Natural = 512
    idempotency_replay_bytes_per_workspace: Natural = 64 * 1024 * 1024
    idempotency_replay_bytes_total: Natural = 1024 * 1024 * 1024


class ByokConfig(_Strict):
    failure_cooldown_ms: Natural = 300_000  # a refused customer key is not tried again for this long
    validate_timeout_ms: Natural = 10_000


class TracingConfig(_Strict):
    """OpenTelemetry traces of each call (observability/tracing.py). Off unless otlp_endpoint is set;
    the caller's `traceparent` is forwarded upstream either way."""

    otlp_endpoint: str = ""  # OTLP/HTTP traces URL, e.g. http://otel-collector:4318/v1/traces; "": no export
    service_name: Name = "ai-metering-sidecar"
    # Of the traces this sidecar starts; a caller's traceparent carries its own sampled flag.
    sampled_percent: Annotated[int, Meta(ge=0, le=100)] = 100
    export_timeout_ms: TimeoutMs = 10_000
    export_queue_spans_max: Positive = 2048  # spans waiting for export; past it, new spans are dropped


class NotificationsConfig(_Strict):
    """Signed webhooks to each workspace's endpoint (sidecar/notify/), delivered by the control plane."""

    delivery_timeout_ms: TimeoutMs = 5_000  # one POST to the customer's endpoint
    attempts_max: Annotated[int, Meta(ge=1, le=50)] = 8  # then the delivery is recorded failed
    retry_backoff_ms_min: Annotated[int, Meta(ge=100)] = 10_000  # doubled after each failed attempt
    retry_backoff_ms_max: Annotated[int, Meta(ge=100)] = 3_600_000
    batch_deliveries_max: Annotated[int, Meta(ge=1, le=1_000)] = 50  # claimed per round
    poll_interval_ms: Annotated[int, Meta(ge=10)] = 1_000
    # Past this many undelivered events a workspace's new events are dropped (counted, logged).
    pending_deliveries_per_workspace_max: Positive = 1_000
    expiry_warning_ms: Natural = 7 * 86_400_000  # `credits.expiring` fires this long before the expiry
    expiry_check_interval_ms: Annotated[int, Meta(ge=1_000)] = 60_000

    def __post_init__(self) -> None:
        if self.retry_backoff_ms_min > self.retry_backoff_ms_max:
            raise ValueError("retry_backoff_ms_min: must not exceed retry_backoff_ms_max")


class AutoReloadConfig(_Strict):
    """Reloads started when a settlement leaves a workspace under its threshold (sidecar/reload/)."""

    failures_max: Annotated[int, Meta(ge=1, le=100)] = 3  # consecutive failures, then auto-reload turns off
    retry_backoff_ms_min: Annotated[int, Meta(ge=100)] = 300_000  # after the first failure; doubled each time
    retry_backoff_ms_max: Annotated[int, Meta(ge=100)] = 86_400_000
    poll_interval_ms: Annotated[int, Meta(ge=10)] = 1_000
    batch_reloads_max: Annotated[int, Meta(ge=1, le=1_000)] = 20  # started per round
    # A reload whose payment neither started nor was confirmed by a webhook within this is failed.
    stuck_timeout_ms: Annotated[int, Meta(ge=1_000)] = 86_400_000

    def __post_init__(self) -> None:
        if self.retry_backoff_ms_min > self.retry_backoff_ms_max:
            raise ValueError("retry_backoff_ms_min: must not exceed retry_backoff_ms_max")


class BalanceWatchConfig(_Strict):
    """How the data plane notices a settlement crossing a threshold, off the call's path (watch.py)."""

    settings_cache_ms: Natural = 5_000  # a changed threshold reaches every replica within this
    pending_workspaces_max: Positive = 10_000  # workspaces waiting to be checked; past it, counted and skipped
    batch_workspaces_max: Annotated[int, Meta(ge=1, le=10_000)] = 200


class ConsoleConfig(_Strict):
    """The billing console under /console (control plane)."""

    session_ttl_ms: Annotated[int, Meta(ge=60_000)] = 8 * 3_600_000  # a log-in lasts this long at most
    sessions_per_token_max: Positive = 50  # past it, the token's oldest session is ended
    # Secure cookies even when the request arrived over plain HTTP (behind a TLS-terminating proxy).
    # Requests that arrive over TLS always get Secure cookies.
    secure_cookies: bool = False


class ProviderConfig(_Strict):
    name: Name
    protocol: Protocol
    base_url: Name
    api_key_env: str | None = None
    forward_headers: tuple[str, ...] = ()  # client headers passed upstream beyond the built-in allow-list
    openrouter: bool = False  # OpenRouter's dialect: its own request fields and attribution headers
    # The model catalog (sidecar/catalog.py): the genai-prices provider id whose bundled prices price this
    # provider's models by their upstream id alone (explicit prices in pricing.yaml still win).
    price_source: str | None = None
    # Upstream model ids (globs: "gpt-4o*") offered as models of their own, named by their id. A glob
    # skips the models the catalog cannot price; an exact id that cannot be priced stops the start.
    offer: tuple[Name, ...] = ()
    # The sell price of this provider's catalog-priced models: upstream * (1 + markup/100), exactly.
    markup_percent: str = "0"
    # For the models `offer` adds: the output cap injected when a client sends none, and the context
    # window of a model the catalog does not know the window of (without it such a model is skipped).
    max_output_tokens_default: Positive = 4096
    context_window_tokens: Annotated[int, Meta(ge=1)] | None = None

    def __post_init__(self) -> None:
        if self.offer and not self.price_source:
            raise ValueError("offer: needs price_source, the catalog the offered models are priced from")
        _check_markup(self.markup_percent)
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: must start with http:// or https://, got {self.base_url!r}")
        if not all(h.strip() for h in self.forward_headers):
            raise ValueError("forward_headers: must be a list of header names")
        if {h.lower() for h in self.forward_headers} & _NEVER_FORWARDED:
            raise ValueError("forward_headers: credentials and hop-by-hop headers are never forwarded")
        msgspec.structs.force_setattr(self, "base_url", self.base_url.rstrip("/"))
        msgspec.structs.force_setattr(self, "forward_headers", tuple(h.lower() for h in self.forward_headers))


class Target(_Strict):
    """One way to serve a model: a provider, its id for the model, and the price entry to bill."""

    provider: Name
    upstream_model: str | None = None  # default: the model's name
    price: str | None = None  # default: the model's name
    priority: Natural | None = None  # with the model's `routing: priority`: lowest first (ties: as listed)


class ModelConfig(_Strict):
    name: Name
    # Injected when a client sends no cap, so the hold has a ceiling. Required, unless the model's
    # provider has a price_source (then: the provider's max_output_tokens_default).
    max_output_tokens_default: Positive | None = None
    # Required (or known to the catalog of its provider's price_source): it bounds the input of a call
    # with images or files, whose tokens are not bounded by their bytes, so the hold is a real worst case.
    context_window_tokens: Positive | None = None
    # Sell price of a catalog-priced model: upstream * (1 + markup/100); default: its provider's markup.
    markup_percent: str | None = None
    aliases: tuple[Name, ...] = ()
    provider: str | None = None  # with upstream_model: the one-target shorthand of `targets`
    upstream_model: str | None = None
    # Tried in the `routing` order; the next one only if nothing reached the client yet.
    targets: Annotated[tuple[Target, ...], Meta(max_length=TARGETS_MAX)] = ()
    # order: as listed; priority: by each target's `priority`, lowest first; cheapest: by the call's
    # price ceiling on each target, cheapest first. In every case a target whose ceiling the workspace
    # cannot cover is skipped (402 only when none fits).
    routing: Routing = "order"
    # OpenRouter routing fields (protocols.base.ROUTING_FIELDS) a client may send for this model;
    # the others get a 400. With `models` allowed, the hold is at the dearest model listed.
    allow_routing_fields: tuple[RoutingField, ...] = ()

    def __post_init__(self) -> None:
        if self.markup_percent is not None:
            _check_markup(self.markup_percent)
        prioritized = [t.priority is not None for t in self.targets]
        if self.routing == "priority" and not all(prioritized):
            raise ValueError("targets: with routing: priority, every target needs a priority")
        if self.routing != "priority" and any(prioritized):
            raise ValueError("routing: a target has a priority; set routing: priority to use it")


def _check_markup(text: str) -> None:
    try:
        parse_markup_percent(text)
    except MoneyError as exc:
        raise ValueError(f"markup_percent: {exc}") from None


def parse_markup_percent(text: str) -> Decimal:
    """'12.5' -> Decimal('12.5'): a non-negative decimal string, exact."""
    return Decimal(parse_decimal_scaled(text, 6)) / 10**6


class StripeConfig(_Strict):
    """Stripe, through its official SDK. The secret key and the webhook endpoint's signing secret are
    read at start from a file (a mounted secret; wins) or else an environment variable, never from
    this file, and never written anywhere."""

    secret_key_env: str = "STRIPE_SECRET_KEY"
    secret_key_file: str = ""
    webhook_secret_env: str = "STRIPE_WEBHOOK_SECRET"
    webhook_secret_file: str = ""
    # "": Stripe's own API. The dev tools and the tests point it at the local fake (devtools/fake_stripe.py).
    api_base: str = ""
    # Where Checkout sends the customer back; {ORDER_ID} is replaced by the order's id.
    success_url: Name = "http://localhost:3000/credits/success?order={ORDER_ID}"
    cancel_url: Name = "http://localhost:3000/credits/canceled?order={ORDER_ID}"
    # A webhook signed longer ago than this is refused (400): a replayed capture cannot be used later.
    webhook_tolerance_ms: Annotated[int, Meta(ge=1_000, le=3_600_000)] = 300_000
    timeout_ms: TimeoutMs = 10_000
    max_network_retries: Annotated[int, Meta(ge=0, le=5)] = 2
    product_name: Name = "Credits"

    def __post_init__(self) -> None:
        if self.api_base and not self.api_base.startswith(("http://", "https://")):
            raise ValueError(f"api_base: must start with http:// or https://, got {self.api_base!r}")


class PaymentsConfig(_Strict):
    """Buying credits (README, "Buying credits"): payment orders, paid through Stripe or by hand."""

    # The currency customers pay in; credits are units of it, so it is the cost profile's currency.
    # "": the cost profile's currency.
    currency: str = ""
    order_amount_min: str = "1"  # credits, a decimal string
    order_amount_max: str = "100000"
    stripe: StripeConfig | None = None  # absent: only the manual provider (an operator marks orders paid)

    def __post_init__(self) -> None:
        for key in ("order_amount_min", "order_amount_max"):
            try:
                parse_credits(getattr(self, key))
            except MoneyError as exc:
                raise ValueError(f"{key}: {exc}") from None
        if parse_credits(self.order_amount_min) <= 0 or parse_credits(self.order_amount_min) > parse_credits(
            self.order_amount_max
        ):
            raise ValueError("order_amount_min: must be positive and at most order_amount_max")
        if self.currency and not re.fullmatch(r"[A-Za-z]{3}", self.currency):
            raise ValueError(f"currency: must be a 3-letter ISO 4217 code, got {self.currency!r}")


class FeesConfig(_Strict):
    # Added on top of a purchase: the customer pays amount + fee + tax and receives amount in credits.
    purchase_percent: str = "0"

    def __post_init__(self) -> None:
        _check_percent(self.purchase_percent, "purchase_percent", "1000")


class TaxConfig(_Strict):
    """Tax on purchases (sidecar/billing/tax.py): a rate per buyer country, else the default rate;
    an EU business (a tax id) in another EU country than the invoice issuer's: reverse charge, 0."""

    rates_percent: dict[str, str] = {}  # ISO 3166 alpha-2 country -> percent, e.g. {DE: "19"}
    default_rate_percent: str = "0"
    eu_reverse_charge: bool = True

    def __post_init__(self) -> None:
        _check_percent(self.default_rate_percent, "default_rate_percent", "100")
        for country, rate in self.rates_percent.items():
            if not re.fullmatch(r"[A-Z]{2}", country):
                raise ValueError(f"rates_percent: {country!r} is not an ISO 3166 alpha-2 country code (e.g. DE)")
            _check_percent(rate, f"rates_percent.{country}", "100")


class InvoiceIssuerConfig(_Strict):
    """Who issues the invoices of credited orders; the numbers run per issuer id and year."""

    id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "default"
    number_prefix: Annotated[str, Meta(pattern=r"^[A-Z]{1,8}$")] = "INV"
    legal_name: str = ""
    address: str = ""  # lines separated by "\n"
    country: str = ""  # ISO 3166 alpha-2; the reverse-charge rule compares the buyer's with it
    tax_id: str = ""
    email: str = ""

    def __post_init__(self) -> None:
        if self.country and not re.fullmatch(r"[A-Z]{2}", self.country):
            raise ValueError(f"country: must be an ISO 3166 alpha-2 code (e.g. DE), got {self.country!r}")


class InvoicesConfig(_Strict):
    issuer: InvoiceIssuerConfig = InvoiceIssuerConfig()


def _check_percent(text: str, key: str, high: str) -> None:
    try:
        scaled = parse_decimal_scaled(text, 4)
    except MoneyError as exc:
        raise ValueError(f"{key}: {exc} (a percent with at most 4 decimals)") from None
    if scaled > parse_decimal_scaled(high, 4):
        raise ValueError(f"{key}: must be at most {high} percent")


class AdminTokenEntry(_Strict):
    name: Name
    sha256: str  # of the token: `sidecar token-hash`
    permissions: Annotated[frozenset[Permission], Meta(min_length=1)]
    # Limits the token (and console sessions opened with it) to this one workspace; null: every one.
    workspace: str | None = None

    def __post_init__(self) -> None:
        if self.workspace is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.workspace):
            raise ValueError("workspace: must be a workspace id (1-64 letters, digits, '_', '.', '-')")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
            raise ValueError("sha256: must be the 64 hex digits of the token's SHA-256 (`sidecar token-hash`)")


class ConfigFile(_Strict):
    """sidecar.yaml, as written."""

    providers: Annotated[tuple[ProviderConfig, ...], Meta(min_length=1)]
    models: tuple[ModelConfig, ...] = ()  # besides them, the models the providers `offer`
    redis_url: str = ""
    database_url: str = ""
    pricing_file: str = "pricing.yaml"  # relative to this file
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    holds: HoldConfig = HoldConfig()
    ledger: LedgerConfig = LedgerConfig()
    billing: BillingConfig = BillingConfig()
    wallet: WalletConfig = WalletConfig()
    limits: LimitsConfig = LimitsConfig()
    byok: ByokConfig = ByokConfig()
    tracing: TracingConfig = TracingConfig()
    notifications: NotificationsConfig = NotificationsConfig()
    auto_reload: AutoReloadConfig = AutoReloadConfig()
    balance_watch: BalanceWatchConfig = BalanceWatchConfig()
    console: ConsoleConfig = ConsoleConfig()
    admin_tokens: tuple[AdminTokenEntry, ...] = ()
    payments: PaymentsConfig = PaymentsConfig()
    fees: FeesConfig = FeesConfig()
    tax: TaxConfig = TaxConfig()
    invoices: InvoicesConfig = InvoicesConfig()


@dataclass(frozen=True)
class AdminToken:
    """An admin API token, stored as its SHA-256 only, with what it may do."""

    name: str
    sha256: bytes
    permissions: frozenset[str]
    workspace: str | None = None  # None: platform-wide


@dataclass(frozen=True)
class Config:
    redis_url: str
    database_url: str
    admin_token: str | None
    server: ServerConfig
    auth: AuthConfig
    upstream: UpstreamConfig
    holds: HoldConfig
    ledger: LedgerConfig
    billing: BillingConfig
    byok: ByokConfig
    admin_tokens: tuple[AdminToken, ...]
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]  # public name and every alias -> model
    pricing: CostProfile
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    wallet: WalletConfig = field(default_factory=WalletConfig)
    notifications: NotificationsConfig = field(default_factory=NotificationsConfig)
    auto_reload: AutoReloadConfig = field(default_factory=AutoReloadConfig)
    balance_watch: BalanceWatchConfig = field(default_factory=BalanceWatchConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    source: str = field(default="<defaults>", compare=False)
    pricing_by_hand: frozenset[str] = frozenset()  # the price entries of pricing.yaml; the rest: the catalog
    payments: PaymentsConfig = field(default_factory=PaymentsConfig)
    fees: FeesConfig = field(default_factory=FeesConfig)
    tax: TaxConfig = field(default_factory=TaxConfig)
    invoices: InvoicesConfig = field(default_factory=InvoicesConfig)

    def model(self, public_name: str) -> ModelConfig | None:
        return self.models.get(public_name)

    def catalog(self) -> list[ModelConfig]:
        """Each model once, by its public name."""
        return sorted({m.name: m for m in self.models.values()}.values(), key=lambda m: m.name)


def parse_config(raw: Any, pricing_raw: Any, env: dict[str, str], source: str = "<dict>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping")
    file = _convert(_renamed(_without_nulls(raw), ""), ConfigFile)
    providers: dict[str, ProviderConfig] = {}
    for i, provider in enumerate(file.providers):
        if provider.name in providers:
            raise ConfigError(f"providers[{i}].name: duplicate provider {provider.name!r}")
        providers[provider.name] = provider
    pricing = parse_pricing(pricing_raw, "pricing")
    at = datetime.now(tz=UTC)  # catalog prices in force now; the dated changes after it go to pricing.changes
    for i, provider in enumerate(file.providers):
        if provider.price_source is None:
            continue
        if provider.price_source not in catalog.provider_ids():
            raise ConfigError(
                f"providers[{i}].price_source: {catalog.CatalogError.__name__}: unknown price source "
                f"{provider.price_source!r} (known: {', '.join(catalog.provider_ids())})"
            )
        if pricing.currency != catalog.CATALOG_CURRENCY:
            raise ConfigError(
                f"providers[{i}].price_source: the catalog's prices are in {catalog.CATALOG_CURRENCY}, "
                f"the cost profile's currency is {pricing.currency}"
            )
    priced = _Priced(dict(pricing.models), {})
    upstream_by_hand = frozenset(
        name
        for name, entry in (pricing_raw.get("models") or {}).items()
        if isinstance(entry, dict) and "upstream" in entry
    )
    models: dict[str, ModelConfig] = {}
    for i, given in enumerate(file.models):
        model = _with_targets(given, providers, pricing, priced, at, f"models[{i}].", upstream_by_hand)
        for public in (model.name, *model.aliases):
            if public in models:
                raise ConfigError(f"models[{i}].name: model name or alias {public!r} is defined twice")
            models[public] = model
    for i, provider in enumerate(file.providers):
        for model in _offered_models(provider, models, providers, pricing, priced, at, f"providers[{i}]."):
            models[model.name] = model
    if not models:
        raise ConfigError("models: no model is configured or offered (give models, or a provider's offer)")
    by_hand = frozenset(pricing.models)
    pricing = CostProfile(pricing.name, pricing.currency, pricing.charge_micro_min, priced.models, priced.changes)
    bootstrap = env.get("SIDECAR_ADMIN_TOKEN") or None
    admin_tokens = [AdminToken(t.name, bytes.fromhex(t.sha256), t.permissions, t.workspace) for t in file.admin_tokens]
    if bootstrap:  # the environment's token may do everything
        admin_tokens.insert(
            0, AdminToken("bootstrap", hashlib.sha256(bootstrap.encode()).digest(), frozenset(PERMISSIONS))
        )
    holds = file.holds
    if env.get("SIDECAR_SPOOL_DIR"):
        holds = msgspec.structs.replace(holds, spool_dir=env["SIDECAR_SPOOL_DIR"])
    config = Config(
        redis_url=env.get("SIDECAR_REDIS_URL") or file.redis_url,
        database_url=env.get("SIDECAR_DATABASE_URL") or file.database_url,
        admin_token=bootstrap,
        server=file.server,
        auth=file.auth,
        upstream=file.upstream,
        holds=holds,
        ledger=file.ledger,
        billing=file.billing,
        wallet=file.wallet,
        byok=file.byok,
        console=file.console,
        limits=file.limits,
        tracing=file.tracing,
        notifications=file.notifications,
        auto_reload=file.auto_reload,
        balance_watch=file.balance_watch,
        admin_tokens=tuple(admin_tokens),
        providers=providers,
        models=models,
        pricing=pricing,
        source=source,
        pricing_by_hand=by_hand,
        payments=file.payments,
        fees=file.fees,
        tax=file.tax,
        invoices=file.invoices,
    )
    _check_hold_outlives_call(config)
    _check_payment_currency(config)
    return config


@dataclass
class _Priced:
    """The cost profile's entries as they are found: pricing.yaml's, then the catalog's."""

    models: dict[str, ModelPrice]
    changes: dict[str, tuple[ModelPrice, ...]]  # the catalog's dated price changes, by entry


def _with_targets(
    model: ModelConfig,
    providers: dict,
    pricing: CostProfile,
    priced: _Priced,
    at: datetime,
    path: str,
    upstream_by_hand: frozenset[str] = frozenset(),
) -> ModelConfig:
    """`targets: [{provider, upstream_model, price}]`, or the one-target shorthand `provider` + `upstream_model`,
    as the full list, each target's provider known and its price found: in pricing.yaml, else in the
    catalog of the provider's price_source (added to `priced`). The output cap and context window
    missing from the model come from its first provider and the catalog."""
    if model.targets and (model.provider or model.upstream_model):
        raise ConfigError(f"{path}targets: give either targets or provider/upstream_model, not both")
    if not model.targets and not model.provider:
        raise ConfigError(f"{path}provider: required, must be a non-empty string (or give targets)")
    given = model.targets or (Target(provider=model.provider, upstream_model=model.upstream_model),)
    for j, target in enumerate(given):
        if target.provider not in providers:
            where = f"{path}targets[{j}]." if model.targets else path
            raise ConfigError(f"{where}provider: unknown provider {target.provider!r}")
    first_provider = providers[given[0].provider]
    if model.max_output_tokens_default is None and first_provider.price_source is None:
        raise ConfigError(f"{path}max_output_tokens_default: required")
    if model.context_window_tokens is None and first_provider.price_source is None:
        raise ConfigError(f"{path}context_window_tokens: required")
    targets = []
    catalog_window = None
    for j, target in enumerate(given):
        where = f"{path}targets[{j}]." if model.targets else path
        provider = providers[target.provider]
        upstream_model = target.upstream_model or model.name
        price = target.price or model.name
        if price in pricing.models and provider.price_source:  # a sell price by hand: the rest from the catalog
            known = catalog.find(provider.price_source, upstream_model, at)
            if known is not None and j == 0:
                catalog_window = known.context_window_tokens
            if known is not None and known.prices is not None and price not in upstream_by_hand:
                by_hand = pricing.models[price]
                if priced.models[price] == by_hand:  # the first target priced from a catalog gives the upstream
                    priced.models[price] = ModelPrice(model=price, sell=by_hand.sell, upstream=known.prices)
        if price not in pricing.models:
            if provider.price_source is None:
                raise ConfigError(
                    f"pricing: models.{price}: missing, every model needs a price (used by model {model.name})"
                )
            if target.price is None and j > 0:  # the first target's price is the model's; others differ
                price = f"{model.name}@{provider.name}"
            entry = _catalog_price(model, provider, upstream_model, price, priced, at, where)
            if j == 0:
                catalog_window = entry.context_window_tokens
        targets.append(
            Target(provider=target.provider, upstream_model=upstream_model, price=price, priority=target.priority)
        )
    first = targets[0]
    window = model.context_window_tokens or catalog_window or first_provider.context_window_tokens
    if window is None:
        raise ConfigError(
            f"{path}context_window_tokens: required: the catalog ({first_provider.price_source}) does not know "
            f"the context window of {first.upstream_model!r}"
        )
    return msgspec.structs.replace(
        model,
        targets=tuple(targets),
        provider=first.provider,
        upstream_model=first.upstream_model,
        max_output_tokens_default=model.max_output_tokens_default or first_provider.max_output_tokens_default,
        context_window_tokens=window,
    )


def _catalog_price(
    model: ModelConfig,
    provider: ProviderConfig,
    upstream_model: str,
    price: str,
    priced: _Priced,
    at: datetime,
    where: str,
) -> catalog.CatalogModel:
    """Price `upstream_model` from the provider's catalog with the model's (else the provider's) markup,
    as `priced[price]`."""
    source = f"the catalog of {provider.price_source!r} (genai-prices {catalog.package_version()})"
    entry = catalog.find(provider.price_source, upstream_model, at)
    if entry is None:
        raise ConfigError(
            f"{where}upstream_model: {upstream_model!r} is not in {source}; give its price in pricing.yaml"
        )
    if entry.prices is None:
        raise ConfigError(
            f"{where}upstream_model: {upstream_model!r} cannot be priced from {source}: {entry.refused}; "
            "give its price in pricing.yaml"
        )
    markup = parse_markup_percent(model.markup_percent or provider.markup_percent)
    try:
        sell = catalog.with_markup(entry.prices, markup, f"{where}upstream_model: {upstream_model!r}")
    except catalog.CatalogError as exc:
        raise ConfigError(str(exc)) from None
    source = f"genai-prices=={catalog.package_version()}"
    found = ModelPrice(model=price, sell=sell, upstream=entry.prices, source=source)
    if priced.models.setdefault(price, found) != found:
        raise ConfigError(f"{where}price: {price!r} is priced twice, differently (markup or upstream model)")
    if entry.changes:
        dated = []
        for change in entry.changes:
            try:
                sell = catalog.with_markup(change.prices, markup, f"{where}upstream_model: {upstream_model!r}")
            except catalog.CatalogError as exc:
                raise ConfigError(f"{exc} (its price from {change.effective_at.date()})") from None
            effective_ms = int(change.effective_at.timestamp() * 1000)
            dated.append(
                ModelPrice(model=price, sell=sell, upstream=change.prices, effective_ms=effective_ms, source=source)
            )
        priced.changes[price] = tuple(dated)
    return entry


def _offered_models(
    provider: ProviderConfig,
    taken: dict[str, ModelConfig],
    providers: dict,
    pricing: CostProfile,
    priced: _Priced,
    at: datetime,
    path: str,
) -> list[ModelConfig]:
    """The models `provider.offer` adds, named by their upstream id; a name already taken (a configured
    model or alias, or an earlier provider's offer) keeps its first meaning."""
    found: dict[str, catalog.CatalogModel] = {}
    for k, pattern in enumerate(provider.offer):
        where = f"{path}offer[{k}]"
        try:
            matches = catalog.offered(provider.price_source, (pattern,), at)
        except catalog.CatalogError as exc:
            raise ConfigError(f"{path}price_source: {exc}") from None
        if not catalog.is_glob(pattern):
            if not matches:
                raise ConfigError(f"{where}: {pattern!r} is not a model of the catalog of {provider.price_source!r}")
            if not matches[0].offerable:
                raise ConfigError(f"{where}: {pattern!r} cannot be priced from the catalog: {matches[0].refused}")
            if not (matches[0].context_window_tokens or provider.context_window_tokens):
                raise ConfigError(
                    f"{where}: the catalog does not know the context window of {pattern!r}; "
                    "set this provider's context_window_tokens or configure the model under models"
                )
        for entry in matches:
            if entry.offerable and (entry.context_window_tokens or provider.context_window_tokens):
                found.setdefault(entry.model_id, entry)
    added = []
    for model_id in found:
        if model_id in taken:
            continue
        offered = ModelConfig(name=model_id, provider=provider.name, upstream_model=model_id)
        added.append(_with_targets(offered, providers, pricing, priced, at, f"{path}offer: {model_id}: "))
    return added


def _check_payment_currency(config: Config) -> None:
    # Credits are units of the cost profile's currency: a purchase in another currency would need an
    # exchange rate, which the sidecar does not keep.
    currency = config.payments.currency
    if currency and currency.lower() != config.pricing.currency.lower():
        raise ConfigError(
            f"payments.currency: {currency!r} differs from the cost profile's currency "
            f"{config.pricing.currency!r}; credits are bought in the currency they are priced in"
        )


def _check_hold_outlives_call(config: Config) -> None:
    # A hold must outlive one attempt of the call it covers, relay and settlement retries included, or
    # the sweeper would void a live call's hold. Each further attempt (fallback, BYOK retry) pushes the
    # deadline by as much again (handler._extend_hold).
    upstream = config.upstream
    longest_attempt_ms = (
        upstream.first_byte_timeout_ms
        + upstream.total_timeout_ms
        + upstream.usage_wait_after_hangup_ms
        + config.server.drain_timeout_ms
        + config.holds.settle_budget_ms
    )
    if config.holds.ttl_ms <= longest_attempt_ms:
        raise ConfigError(
            "holds.ttl_ms: must exceed upstream.first_byte_timeout_ms + upstream.total_timeout_ms + "
            "upstream.usage_wait_after_hangup_ms + server.drain_timeout_ms + holds.settle_budget_ms "
            f"({longest_attempt_ms})"
        )


# --- pricing.yaml ----------------------------------------------------------------------------------

_PRICE_CLASSES = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
# Optional: a class with a price of its own (per 1M tokens; absent: billed as its parent class, and a
# request that would incur it on purpose is refused), fees in credits per call, context-length tiers.
_EXTRA_CLASSES = EXTRA_TOKEN_CLASSES
_FEES = ("request_fee", *TOOL_FEES)
_TIERS = "tiers"
_PRICE_KEYS = (*_PRICE_CLASSES, *_EXTRA_CLASSES, *_FEES, _TIERS)
FEE_DECIMALS_MAX = 9  # credits per call: a thousandth of a micro-credit


def _parse_prices(raw: Any, path: str, tiers_allowed: bool = True) -> TokenPrices:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of token class to price per 1M tokens")
    known = _PRICE_KEYS if tiers_allowed else _PRICE_KEYS[:-1]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown price (known: {', '.join(known)})")
    for required in ("input", "output"):
        if required not in raw:
            raise ConfigError(f"{path}.{required}: required")
    scaled: dict[str, Any] = {}
    for cls in (*_PRICE_CLASSES, *_EXTRA_CLASSES):
        if cls not in raw and cls in _EXTRA_CLASSES:
            continue
        # An unpriced cache class costs what plain input costs: never less than the provider charges us.
        text = raw.get(cls, raw["input"])
        try:
            scaled[cls] = parse_price_per_million(text)
        except MoneyError as exc:
            raise ConfigError(f"{path}.{cls}: {exc}") from None
    for fee in _FEES:
        if fee in raw:
            try:  # credits per call -> micro-credits per call * PRICE_SCALE
                scaled[fee] = parse_decimal_scaled(raw[fee], FEE_DECIMALS_MAX) * 10**6
            except MoneyError as exc:
                raise ConfigError(f"{path}.{fee}: {exc}") from None
    return TokenPrices(**scaled, tiers=_parse_tiers(raw.get(_TIERS), raw, path))


def _parse_tiers(raw: Any, base: dict, path: str) -> tuple[tuple[int, TokenPrices], ...]:
    """`tiers: [{input_tokens_above: 200000, input: "6", ...}]`: each tier's prices, the base's for what
    it does not give; in ascending order."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}.tiers: must be a non-empty list of {{input_tokens_above: N, <prices>}}")
    tiers, last = [], -1
    for k, tier in enumerate(raw):
        where = f"{path}.tiers[{k}]"
        start = tier.get("input_tokens_above") if isinstance(tier, dict) else None
        if not isinstance(start, int) or isinstance(start, bool) or start <= last:
            raise ConfigError(f"{where}.input_tokens_above: must be an integer above the previous tier's")
        own = {key: value for key, value in tier.items() if key != "input_tokens_above"}
        inherited = {key: value for key, value in base.items() if key != _TIERS}
        tiers.append((start, _parse_prices({**inherited, **own}, where, tiers_allowed=False)))
        last = start
    return tuple(tiers)


def parse_pricing(raw: Any, source: str) -> CostProfile:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping")
    raw = _renamed(raw, "pricing.")
    try:
        charge_min = parse_credits(str(raw.get("charge_min", "0")))
    except MoneyError as exc:
        raise ConfigError(f"{source}: charge_min: {exc}") from None
    models_raw = raw.get("models") or {}  # none: every model is priced from its provider's catalog
    if not isinstance(models_raw, dict):
        raise ConfigError(f"{source}: models: must be a mapping of model name to prices")
    models = {}
    for name, entry in models_raw.items():
        path = f"{source}: models.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: must be a mapping")
        sell = _parse_prices({k: v for k, v in entry.items() if k != "upstream"}, path)
        upstream = _parse_prices(entry["upstream"], f"{path}.upstream") if "upstream" in entry else sell
        models[name] = ModelPrice(model=name, sell=sell, upstream=upstream)
    return CostProfile(
        name=str(raw.get("profile", "default")),
        currency=str(raw.get("currency", "USD")),
        charge_micro_min=charge_min,
        models=models,
    )


# --- from YAML to structs: renamed keys, msgspec's errors in the words of this file -----------------


def _without_nulls(raw: Any) -> Any:
    """An empty YAML key (`server:`) means its default, as if it were not written."""
    if isinstance(raw, dict):
        return {k: _without_nulls(v) for k, v in raw.items() if v is not None}
    if isinstance(raw, list):
        return [_without_nulls(v) for v in raw]
    return raw


def _renamed(raw: dict, root: str) -> dict:
    """A copy of `raw` with every old key of RENAMED under `root` moved to its new name, each with a warning."""
    raw = dict(raw)
    for old, new in RENAMED.items():
        if old.startswith("pricing.") == (root == "pricing."):  # sidecar.yaml's keys, or pricing.yaml's
            *parents, old_key = old.removeprefix(root).split(".")
            _rename_in(raw, parents, old_key, new.rsplit(".", 1)[1], root)
    return raw


def _rename_in(node: Any, parents: list[str], old_key: str, new_key: str, where: str) -> None:
    if parents:
        head, rest = parents[0], parents[1:]
        if head.endswith("[]") and isinstance(node.get(head[:-2]), list):
            node[head[:-2]] = items = [dict(i) if isinstance(i, dict) else i for i in node[head[:-2]]]
            for i, item in enumerate(items):
                _rename_in(item, rest, old_key, new_key, f"{where}{head[:-2]}[{i}].")
        elif isinstance(node.get(head), dict):
            node[head] = dict(node[head])
            _rename_in(node[head], rest, old_key, new_key, f"{where}{head}.")
        return
    if isinstance(node, dict) and old_key in node:
        if new_key in node:
            raise ConfigError(f"{where}{old_key}: renamed {where}{new_key}, which is also given; keep only {new_key}")
        node[new_key] = node.pop(old_key)
        log.warning(
            "config key %s%s is renamed %s%s; the old name is read until version 0.2", where, old_key, where, new_key
        )


def _convert(raw: dict, kind: type) -> Any:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(_in_our_words(str(exc), kind)) from None


_DECLARED_ORDER = {
    tuple(sorted(v)): v for v in (PROTOCOLS, PERMISSIONS, ROUTING_FIELDS, get_args(Routing))
}  # msgspec sorts them
_TYPE_WORDS = {"int": "a non-negative integer", "str": "a string", "bool": "true or false", "object": "a mapping"}
_TYPE_WORDS |= {"array": "a list", "str | null": "a string"}


def _in_our_words(message: str, kind: type) -> str:
    """msgspec's 'Expected `int`, got `str` - at `$.server.port`'
    -> 'server.port: must be a non-negative integer, got str'."""
    text, _, at = message.partition(" - at `$")
    path = at.rstrip("`").lstrip(".")
    if found := re.fullmatch(r"Object contains unknown field `(.+)`", text):
        known = ", ".join(sorted(f.name for f in _type_at(kind, path).fields))
        return f"{_join(path, found[1])}: unknown key (known: {known})"
    if found := re.fullmatch(r"Object missing required field `(.+)`", text):
        return f"{_join(path, found[1])}: required"
    if found := re.fullmatch(r"Invalid enum value (.+)", text):
        declared = _type_at(kind, path).values
        values = ", ".join(_DECLARED_ORDER.get(declared, declared))
        if listed := re.fullmatch(r"(.*)\[\d+\]", path):
            return f"{listed[1]}: must be a list of {values}, got {found[1]}"
        return f"{path}: unknown {path.rsplit('.', 1)[-1]} {found[1]} (known: {values})"
    if found := re.fullmatch(r"Expected `(.+)`, got `(.+)`", text):
        got = {"object": "a mapping", "array": "a list"}.get(found[2], found[2])
        return f"{path}: must be {_TYPE_WORDS.get(found[1], found[1])}, got {got}"
    if found := re.fullmatch(r"Expected `int` ([<>])= (\d+)", text):
        bound = ("at least " if found[1] == ">" else "at most ") + found[2]
        why = _type_at(kind, path, why=True)
        return f"{path}: must be {'a non-negative integer' if bound == 'at least 0' else bound}" + why
    if found := re.fullmatch(r"Expected `(?:array|str)` of length >= 1", text):
        return f"{path}: must not be empty"
    if found := re.fullmatch(r"Expected `array` of length <= (\d+)", text):
        return f"{path}: must have at most {found[1]} items"
    if re.fullmatch(r"[a-z_0-9]+: .*", text):  # a __post_init__'s "key: problem", at the struct's path
        return _join(path, text)
    return f"{path or '<top>'}: {text}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_at(kind: type, path: str, why: bool = False) -> Any:
    """The msgspec.inspect type at `path` ('models[0].targets[1]') of struct `kind`; with `why`, the reason
    its Meta gives for its bounds, as ' (reason)', or ''."""
    node: Any = msgspec.inspect.type_info(kind)
    reason = ""
    for step in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        node = node.item_type if step.startswith("[") else next(f.type for f in node.fields if f.name == step)
        reason = ""
        while isinstance(node, msgspec.inspect.Metadata | msgspec.inspect.UnionType):
            if isinstance(node, msgspec.inspect.UnionType):  # `X | None`: the section, when given, is an X
                node = next(t for t in node.types if not isinstance(t, msgspec.inspect.NoneType))
                continue
            reason = reason or (node.extra_json_schema or {}).get("description", "")
            node = node.type
    return (f" ({reason})" if reason else "") if why else node


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | os.PathLike, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    config_path = Path(path)
    raw = _read_yaml(config_path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: must be a mapping")
    pricing_path = config_path.parent / str(raw.get("pricing_file") or "pricing.yaml")
    pricing_raw = _read_yaml(pricing_path)
    try:
        return parse_config(raw, pricing_raw, env, source=str(config_path))
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None


# --- the Helm chart's values.schema.json -----------------------------------------------------------


def values_schema() -> dict:
    """JSON Schema of the chart's values: `config` is sidecar.yaml (old key names allowed, marked
    deprecated), `pricing` is pricing.yaml (checked at start, see parse_pricing), the rest is the chart's."""
    (config_schema,), definitions = msgspec.json.schema_components([ConfigFile], ref_template="#/definitions/{name}")
    for old, new in RENAMED.items():
        if old.startswith("pricing."):
            continue
        *parents, old_key = old.split(".")
        struct = definitions["ConfigFile"]
        for parent in parents:
            ref = struct["properties"][parent.removesuffix("[]")]
            struct = definitions[(ref.get("items") or ref)["$ref"].rsplit("/", 1)[1]]
        new_key = new.rsplit(".", 1)[1]
        struct["properties"][old_key] = {
            **struct["properties"][new_key],
            "deprecated": True,
            "description": f"renamed {new}",
        }
    for definition in definitions.values():
        if not definition.get("required", True):  # draft-04 readers refuse an empty list
            del definition["required"]
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "ai-metering-sidecar values",
        "type": "object",
        "properties": {
            "config": config_schema,
            "pricing": {"type": "object", "description": "pricing.yaml: credits per 1M tokens, as decimal strings"},
        },
        "definitions": definitions,
    }
    return msgspec.json.decode(msgspec.json.encode(schema))  # plain JSON values: tuple defaults become lists
