"""Configuration: one YAML file, a pricing file beside it, and environment overrides.

A wrong config fails at start with a ConfigError naming the key and the problem. Durations are in
milliseconds and sizes in bytes, and every name says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.money import MoneyError, parse_credits, parse_price_per_million
from sidecar.pricing import CostProfile, ModelPrice, TokenPrices
from sidecar.protocols.base import ROUTING_FIELDS

PROTOCOLS = ("openai", "anthropic")  # the wire-protocol family a provider's base URL speaks


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


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    ops_port: int = 9090
    max_body_bytes: int = 8 * 1024 * 1024
    drain_timeout_ms: int = 30_000
    # Slow and idle clients (README, security): a request's head must arrive within
    # header_read_timeout_ms of its first byte (of the connection's opening, for the first request),
    # its body within body_read_timeout_ms, and an idle keep-alive connection is closed after
    # keepalive_timeout_ms (keep it above any load balancer's idle timeout in front).
    header_read_timeout_ms: int = 10_000
    body_read_timeout_ms: int = 30_000
    keepalive_timeout_ms: int = 75_000
    # Open connections per port; past it a new one gets 503 and is closed. 0: half the process's
    # open-file limit, so upstream connections, Postgres, Redis and the ops port keep descriptors.
    max_connections: int = 0
    ops_max_connections: int = 64  # the ops port's own budget: probes and scrapes only


@dataclass(frozen=True)
class AuthConfig:
    cache_ttl_ms: int = 2_000
    default_rpm: int = 40
    rate_window_ms: int = 60_000
    # A source address with this many failed authentications in a window is refused (429) until
    # the window ends, without a key lookup. 0 turns it off.
    failed_auth_max: int = 50
    failed_auth_window_ms: int = 60_000


@dataclass(frozen=True)
class UpstreamConfig:
    connect_timeout_ms: int = 5_000
    first_byte_timeout_ms: int = 120_000
    idle_timeout_ms: int = 120_000
    total_timeout_ms: int = 600_000
    # A client that takes longer than this to accept one relayed chunk has, in effect, left.
    write_timeout_ms: int = 30_000
    # After a client hangs up mid-stream, keep reading (not relaying) the provider's stream this long
    # for its usage count: an estimate from bytes misses images, cached prefixes and reasoning.
    usage_wait_after_hangup_ms: int = 30_000
    # Memory all buffered (non-streamed) answers of the process may hold at once; past it a call is
    # refused with 503 rather than let a few huge answers exhaust the process.
    buffered_answers_bytes_max: int = 256 * 1024 * 1024
    pool_size: int = 512


@dataclass(frozen=True)
class HoldConfig:
    ttl_ms: int = 900_000
    settle_budget_ms: int = 60_000  # how long a call may keep retrying its settlement
    # Settlements Redis could not take within the budget wait here, on disk, to be replayed.
    spool_dir: str = "/var/lib/sidecar/spool"
    spool_max_entries: int = 100_000
    sweep_interval_ms: int = 5_000
    sweep_batch_max: int = 200
    # How long past its deadline a hold is left to its own call before the sweeper voids it: room for a
    # settlement spooled while Redis was down to be replayed once Redis is back (proxy/spool.py).
    sweep_grace_ms: int = 60_000


@dataclass(frozen=True)
class LedgerConfig:
    batch_max_rows: int = 500
    batch_max_age_ms: int = 200
    claim_idle_ms: int = 30_000
    retry_backoff_max_ms: int = 5_000
    workspace_refresh_ms: int = 5_000


@dataclass(frozen=True)
class BillingConfig:
    bill_observed_on_upstream_failure: bool = False
    idempotency_ttl_ms: int = 86_400_000
    idempotency_max_body_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds that keep one key or workspace from taking what others need; 0 = none."""

    concurrent_calls_per_key: int = 64
    concurrent_calls_per_workspace: int = 512
    idempotency_replay_bytes_per_workspace: int = 64 * 1024 * 1024
    idempotency_replay_bytes_total: int = 1024 * 1024 * 1024


@dataclass(frozen=True)
class ByokConfig:
    failure_cooldown_ms: int = 300_000  # a refused customer key is not tried again for this long
    validate_timeout_ms: int = 10_000


PERMISSIONS = ("WORKSPACES_MANAGE", "KEYS_MANAGE", "CREDITS_MANAGE", "TENANT_MANAGE", "READ")


@dataclass(frozen=True)
class AdminToken:
    """An admin API token, stored as its SHA-256 only, with what it may do."""

    name: str
    sha256: bytes
    permissions: frozenset[str]


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    protocol: str
    base_url: str
    api_key_env: str | None
    forward_headers: tuple[str, ...] = ()  # client headers passed upstream beyond the built-in allow-list
    openrouter: bool = False  # OpenRouter's dialect: its own request fields and attribution headers


@dataclass(frozen=True)
class Target:
    """One way to serve a model: a provider, its id for the model, and the price entry to bill."""

    provider: str
    upstream_model: str
    price: str


@dataclass(frozen=True)
class ModelConfig:
    name: str
    targets: tuple[Target, ...]  # tried in order; the next one only if nothing reached the client yet
    default_max_output_tokens: int
    context_window_tokens: int
    aliases: tuple[str, ...] = ()
    # OpenRouter routing fields (protocols.base.ROUTING_FIELDS) a client may send for this model;
    # the others get a 400. With `models` allowed, the hold is at the dearest model listed.
    allow_routing_fields: tuple[str, ...] = ()

    @property
    def provider(self) -> str:
        return self.targets[0].provider

    @property
    def upstream_model(self) -> str:
        return self.targets[0].upstream_model


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
    source: str = field(default="<defaults>", compare=False)

    def model(self, public_name: str) -> ModelConfig | None:
        return self.models.get(public_name)

    def catalog(self) -> list[ModelConfig]:
        """Each model once, by its public name."""
        return sorted({m.name: m for m in self.models.values()}.values(), key=lambda m: m.name)


# --- parsing helpers: each names the key path in its error ---------------------------------------


def _section(raw: dict, key: str, path: str) -> dict:
    value = raw.get(key, {}) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}{key}: must be a mapping, got {type(value).__name__}")
    return value


def _build(cls: type, raw: dict, path: str) -> Any:
    known = {f for f in cls.__dataclass_fields__}
    _no_unknown_keys(raw, tuple(sorted(known)), path)
    defaults = cls()
    values = {}
    for name in known:
        default = getattr(defaults, name)
        value = raw.get(name, default)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}{name}: must be true or false, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{path}{name}: must be a non-negative integer, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{path}{name}: must be a string, got {value!r}")
        values[name] = value
    return cls(**values)


_PROVIDER_KEYS = ("name", "protocol", "base_url", "api_key_env", "forward_headers", "openrouter")
_MODEL_KEYS = (
    "name",
    "aliases",
    "provider",
    "upstream_model",
    "targets",
    "default_max_output_tokens",
    "context_window_tokens",
    "allow_routing_fields",
)


def _no_unknown_keys(raw: dict, known: tuple[str, ...], path: str) -> None:
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{path}{unknown[0]}: unknown key (known: {', '.join(known)})")


def _require_str(raw: dict, key: str, path: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}{key}: required, must be a non-empty string")
    return value


def _parse_providers(items: Any) -> dict[str, ProviderConfig]:
    if not isinstance(items, list) or not items:
        raise ConfigError("providers: must be a non-empty list")
    providers: dict[str, ProviderConfig] = {}
    for i, raw in enumerate(items):
        path = f"providers[{i}]."
        if not isinstance(raw, dict):
            raise ConfigError(f"providers[{i}]: must be a mapping")
        _no_unknown_keys(raw, _PROVIDER_KEYS, path)
        name = _require_str(raw, "name", path)
        protocol = _require_str(raw, "protocol", path)
        if protocol not in PROTOCOLS:
            raise ConfigError(f"{path}protocol: unknown protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
        base_url = _require_str(raw, "base_url", path).rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{path}base_url: must start with http:// or https://, got {base_url!r}")
        if name in providers:
            raise ConfigError(f"{path}name: duplicate provider {name!r}")
        forward = raw.get("forward_headers") or []
        if not isinstance(forward, list) or not all(isinstance(h, str) and h.strip() for h in forward):
            raise ConfigError(f"{path}forward_headers: must be a list of header names")
        if {h.lower() for h in forward} & _NEVER_FORWARDED:
            raise ConfigError(f"{path}forward_headers: credentials and hop-by-hop headers are never forwarded")
        openrouter = raw.get("openrouter", False)
        if not isinstance(openrouter, bool):
            raise ConfigError(f"{path}openrouter: must be true or false")
        providers[name] = ProviderConfig(
            name, protocol, base_url, raw.get("api_key_env"), tuple(h.lower() for h in forward), openrouter
        )
    return providers


def _parse_models(items: Any, providers: dict[str, ProviderConfig]) -> dict[str, ModelConfig]:
    if not isinstance(items, list) or not items:
        raise ConfigError("models: must be a non-empty list")
    models: dict[str, ModelConfig] = {}
    for i, raw in enumerate(items):
        path = f"models[{i}]."
        if not isinstance(raw, dict):
            raise ConfigError(f"models[{i}]: must be a mapping")
        _no_unknown_keys(raw, _MODEL_KEYS, path)
        name = _require_str(raw, "name", path)
        targets = _parse_targets(raw, name, providers, path)
        cap = raw.get("default_max_output_tokens")
        if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
            raise ConfigError(f"{path}default_max_output_tokens: required, must be a positive integer")
        window = raw.get("context_window_tokens")
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            # Required: it bounds the input of a call with images, audio or files, whose tokens
            # are not bounded by their bytes, so the hold is a real worst case.
            raise ConfigError(f"{path}context_window_tokens: required, must be a positive integer")
        aliases = raw.get("aliases") or []
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise ConfigError(f"{path}aliases: must be a list of names")
        routing = raw.get("allow_routing_fields") or []
        if not isinstance(routing, list) or not set(routing) <= set(ROUTING_FIELDS):
            raise ConfigError(f"{path}allow_routing_fields: must be a list of {', '.join(ROUTING_FIELDS)}")
        model = ModelConfig(
            name=name,
            targets=targets,
            default_max_output_tokens=cap,
            context_window_tokens=window,
            aliases=tuple(aliases),
            allow_routing_fields=tuple(routing),
        )
        for public in (name, *aliases):
            if public in models:
                raise ConfigError(f"{path}name: model name or alias {public!r} is defined twice")
            models[public] = model
    return models


def _parse_targets(raw: dict, name: str, providers: dict[str, ProviderConfig], path: str) -> tuple[Target, ...]:
    """`targets: [{provider, upstream_model, price}]`, or the one-target shorthand `provider` + `upstream_model`."""
    if "targets" in raw:
        if "provider" in raw or "upstream_model" in raw:
            raise ConfigError(f"{path}targets: give either targets or provider/upstream_model, not both")
        items = raw["targets"]
        if not isinstance(items, list) or not items or len(items) > MAX_TARGETS:
            raise ConfigError(f"{path}targets: must be a list of 1 to {MAX_TARGETS} targets")
    else:
        items = [{"provider": raw.get("provider"), "upstream_model": raw.get("upstream_model")}]
    targets = []
    for j, item in enumerate(items):
        where = f"{path}targets[{j}]." if "targets" in raw else path
        if not isinstance(item, dict):
            raise ConfigError(f"{where.rstrip('.')}: must be a mapping")
        _no_unknown_keys(item, ("provider", "upstream_model", "price"), where)
        provider = _require_str(item, "provider", where)
        if provider not in providers:
            raise ConfigError(f"{where}provider: unknown provider {provider!r}")
        upstream = item.get("upstream_model") or name
        targets.append(Target(provider, upstream, str(item.get("price") or name)))
    return tuple(targets)


MAX_TARGETS = 8
_PRICE_CLASSES = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")


def _parse_prices(raw: Any, path: str) -> TokenPrices:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of token class to price per 1M tokens")
    unknown = sorted(set(raw) - set(_PRICE_CLASSES))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown token class (known: {', '.join(_PRICE_CLASSES)})")
    for required in ("input", "output"):
        if required not in raw:
            raise ConfigError(f"{path}.{required}: required")
    scaled = {}
    for cls in _PRICE_CLASSES:
        # An unpriced cache class costs what plain input costs: never less than the provider charges us.
        text = raw.get(cls, raw["input"])
        try:
            scaled[cls] = parse_price_per_million(text)
        except MoneyError as exc:
            raise ConfigError(f"{path}.{cls}: {exc}") from None
    return TokenPrices(**scaled)


def parse_pricing(raw: Any, source: str) -> CostProfile:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping")
    try:
        minimum = parse_credits(str(raw.get("minimum_charge", "0")))
    except MoneyError as exc:
        raise ConfigError(f"{source}: minimum_charge: {exc}") from None
    models_raw = raw.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        raise ConfigError(f"{source}: models: must be a non-empty mapping of model name to prices")
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
        minimum_charge_micro=minimum,
        models=models,
    )


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _with_env_spool_dir(holds: HoldConfig, env: dict[str, str]) -> HoldConfig:
    spool_dir = env.get("SIDECAR_SPOOL_DIR")
    return dataclasses.replace(holds, spool_dir=spool_dir) if spool_dir else holds


def parse_config(raw: dict, pricing_raw: Any, env: dict[str, str], source: str = "<dict>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a mapping")
    known = {
        "redis_url",
        "database_url",
        "server",
        "auth",
        "upstream",
        "holds",
        "ledger",
        "billing",
        "providers",
        "models",
        "pricing_file",
        "byok",
        "limits",
        "admin_tokens",
    }
    _no_unknown_keys(raw, tuple(sorted(known)), "")
    providers = _parse_providers(raw.get("providers"))
    models = _parse_models(raw.get("models"), providers)
    pricing = parse_pricing(pricing_raw, "pricing")
    for model in {m.name: m for m in models.values()}.values():
        for target in model.targets:
            if target.price not in pricing.models:
                raise ConfigError(
                    f"pricing: models.{target.price}: missing, every model needs a price (used by model {model.name})"
                )
    config = Config(
        redis_url=env.get("SIDECAR_REDIS_URL") or raw.get("redis_url") or "",
        database_url=env.get("SIDECAR_DATABASE_URL") or raw.get("database_url") or "",
        admin_token=env.get("SIDECAR_ADMIN_TOKEN") or None,
        server=_build(ServerConfig, _section(raw, "server", ""), "server."),
        auth=_build(AuthConfig, _section(raw, "auth", ""), "auth."),
        upstream=_build(UpstreamConfig, _section(raw, "upstream", ""), "upstream."),
        holds=_with_env_spool_dir(_build(HoldConfig, _section(raw, "holds", ""), "holds."), env),
        ledger=_build(LedgerConfig, _section(raw, "ledger", ""), "ledger."),
        billing=_build(BillingConfig, _section(raw, "billing", ""), "billing."),
        byok=_build(ByokConfig, _section(raw, "byok", ""), "byok."),
        limits=_build(LimitsConfig, _section(raw, "limits", ""), "limits."),
        admin_tokens=_parse_admin_tokens(raw.get("admin_tokens"), env.get("SIDECAR_ADMIN_TOKEN")),
        providers=providers,
        models=models,
        pricing=pricing,
        source=source,
    )
    _check_limits(config)
    return config


def _parse_admin_tokens(items: Any, bootstrap: str | None) -> tuple[AdminToken, ...]:
    """`admin_tokens: [{name, sha256, permissions}]`, plus SIDECAR_ADMIN_TOKEN with every permission."""
    tokens = []
    if bootstrap:
        tokens.append(AdminToken("bootstrap", hashlib.sha256(bootstrap.encode()).digest(), frozenset(PERMISSIONS)))
    if items is None:
        return tuple(tokens)
    if not isinstance(items, list):
        raise ConfigError("admin_tokens: must be a list")
    for i, raw in enumerate(items):
        path = f"admin_tokens[{i}]."
        if not isinstance(raw, dict):
            raise ConfigError(f"admin_tokens[{i}]: must be a mapping")
        _no_unknown_keys(raw, ("name", "sha256", "permissions"), path)
        name = _require_str(raw, "name", path)
        digest = _require_str(raw, "sha256", path)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise ConfigError(f"{path}sha256: must be the 64 hex digits of the token's SHA-256 (`sidecar token-hash`)")
        permissions = raw.get("permissions")
        if not isinstance(permissions, list) or not permissions or not set(permissions) <= set(PERMISSIONS):
            raise ConfigError(f"{path}permissions: must be a non-empty list of {', '.join(PERMISSIONS)}")
        tokens.append(AdminToken(name, bytes.fromhex(digest), frozenset(permissions)))
    return tuple(tokens)


def _check_limits(config: Config) -> None:
    if config.auth.cache_ttl_ms > 5_000:
        raise ConfigError("auth.cache_ttl_ms: must be at most 5000, so a revoked key stops working within 5 s")
    if config.auth.default_rpm < 1 or config.auth.rate_window_ms < 1_000:
        raise ConfigError("auth.default_rpm / auth.rate_window_ms: must be >= 1 and >= 1000")
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
    if config.upstream.write_timeout_ms < 100:
        raise ConfigError("upstream.write_timeout_ms: must be at least 100")
    if config.holds.spool_max_entries < 1:
        raise ConfigError("holds.spool_max_entries: must be at least 1")
    if config.holds.settle_budget_ms < 100:
        raise ConfigError("holds.settle_budget_ms: must be at least 100")
    if not 1 <= config.ledger.batch_max_rows <= 10_000:
        raise ConfigError("ledger.batch_max_rows: must be between 1 and 10000")
    if config.server.max_body_bytes < 1024:
        raise ConfigError("server.max_body_bytes: must be at least 1024")
    for name in ("header_read_timeout_ms", "body_read_timeout_ms", "keepalive_timeout_ms"):
        if getattr(config.server, name) < 100:
            raise ConfigError(f"server.{name}: must be at least 100")
    if config.server.ops_max_connections < 1:
        raise ConfigError("server.ops_max_connections: must be at least 1")
    if config.auth.failed_auth_max and config.auth.failed_auth_window_ms < 1_000:
        raise ConfigError("auth.failed_auth_window_ms: must be at least 1000")


def load_config(path: str | os.PathLike, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    config_path = Path(path)
    raw = _read_yaml(config_path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: must be a mapping")
    pricing_path = config_path.parent / str(raw.get("pricing_file", "pricing.yaml"))
    pricing_raw = _read_yaml(pricing_path)
    try:
        return parse_config(raw, pricing_raw, env, source=str(config_path))
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}") from None
