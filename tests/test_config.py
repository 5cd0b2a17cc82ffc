"""A wrong config fails at start with a message that names the key and the problem."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from sidecar.config import (
    PERMISSIONS,
    RENAMED,
    ConfigError,
    ServerConfig,
    load_config,
    parse_config,
    values_schema,
)

ROOT = Path(__file__).parent.parent
CHART = ROOT / "helm" / "ai-metering-sidecar"
PRICING = {"models": {"m": {"input": "1", "output": "2"}}}


def minimal(**extra) -> dict:
    return {
        "providers": [{"name": "p", "protocol": "openai", "base_url": "http://x/v1", "api_key_env": "K"}],
        "models": [{"name": "m", "provider": "p", "max_output_tokens_default": 10, "context_window_tokens": 1000}],
        **extra,
    }


def test_the_example_config_loads() -> None:
    config = load_config(ROOT / "config" / "sidecar.example.yaml", env={})
    assert config.model("gpt-4o-mini-2024-07-18").name == "gpt-4o-mini"
    assert config.pricing.charge_micro_min == 1


def test_routing_fields_are_allowed_per_model() -> None:
    model = {**minimal()["models"][0], "allow_routing_fields": ["models", "route"]}
    config = parse_config({**minimal(), "models": [model]}, PRICING, {})
    assert config.model("m").allow_routing_fields == ("models", "route")
    assert parse_config(minimal(), PRICING, {}).model("m").allow_routing_fields == ()


def test_environment_overrides() -> None:
    env = {"SIDECAR_REDIS_URL": "redis://r:1/0", "SIDECAR_DATABASE_URL": "postgresql://d/x", "SIDECAR_ADMIN_TOKEN": "t"}
    config = parse_config(minimal(redis_url="redis://ignored"), PRICING, env)
    assert (config.redis_url, config.database_url, config.admin_token) == ("redis://r:1/0", "postgresql://d/x", "t")


def test_the_environment_moves_the_spool() -> None:
    raw = minimal(holds={"spool_dir": "/from/file", "spool_entries_max": 7})
    holds = parse_config(raw, PRICING, {"SIDECAR_SPOOL_DIR": "/from/env"}).holds
    assert (holds.spool_dir, holds.spool_entries_max) == ("/from/env", 7)
    assert parse_config(raw, PRICING, {"SIDECAR_SPOOL_DIR": ""}).holds.spool_dir == "/from/file"


@pytest.mark.parametrize(
    ("raw", "pricing", "expected"),
    [
        (minimal(server={"port": "80"}), PRICING, "server.port: must be a non-negative integer"),
        (minimal(server={"prot": 80}), PRICING, "server.prot: unknown key"),
        (minimal(auth={"cache_ttl_ms": 60_000}), PRICING, "auth.cache_ttl_ms: must be at most 5000"),
        (minimal(holds={"ttl_ms": 1000}), PRICING, "holds.ttl_ms: must exceed"),
        (minimal(colour="blue"), PRICING, "colour: unknown key"),
        (
            {**minimal(), "models": [{**minimal()["models"][0], "provider": "nope"}]},
            PRICING,
            "models[0].provider: unknown provider 'nope'",
        ),
        (
            {**minimal(), "models": [{"name": "m", "provider": "p"}]},
            PRICING,
            "models[0].max_output_tokens_default: required",
        ),
        (
            {**minimal(), "providers": [{"name": "p", "protocol": "grpc", "base_url": "http://x"}]},
            PRICING,
            "providers[0].protocol: unknown protocol 'grpc'",
        ),
        (
            {
                **minimal(),
                "providers": [
                    {"name": "p", "protocol": "openai", "base_url": "x", "forward_headers": ["Authorization"]}
                ],
            },
            PRICING,
            "providers[0].base_url: must start with http",
        ),
        (
            {
                **minimal(),
                "providers": [
                    {"name": "p", "protocol": "openai", "base_url": "http://x", "forward_headers": ["Authorization"]}
                ],
            },
            PRICING,
            "providers[0].forward_headers: credentials",
        ),
        (
            {**minimal(), "models": [{**minimal()["models"][0], "allow_routing_fields": ["models", "transforms"]}]},
            PRICING,
            "models[0].allow_routing_fields: must be a list of models, route, provider, plugins",
        ),
        (minimal(), {"models": {"other": {"input": "1", "output": "1"}}}, "pricing: models.m: missing"),
        (minimal(), {"models": {"m": {"input": "1"}}}, "models.m.output: required"),
        (
            minimal(),
            {"models": {"m": {"input": "1", "output": "1", "cache_red": "1"}}},
            "models.m.cache_red: unknown price",
        ),
    ],
)
def test_errors_name_the_key(raw: dict, pricing: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, pricing, {})
    assert expected in str(caught.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml", env={})
    (tmp_path / "bad.yaml").write_text("server: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml", env={})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(minimal(pricing_file="p.yaml")))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"models": {"m": {"input": 1.5, "output": "1"}}}))
    with pytest.raises(ConfigError, match=r"c\.yaml: pricing: models\.m\.input"):
        load_config(tmp_path / "c.yaml", env={})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (minimal(server={"header_read_timeout_ms": 50}), "server.header_read_timeout_ms: must be at least 100"),
        (minimal(ledger={"batch_rows_max": 10_001}), "ledger.batch_rows_max: must be at most 10000"),
        (minimal(server={"port": -1}), "server.port: must be a non-negative integer"),
        (minimal(server={"port": True}), "server.port: must be a non-negative integer, got bool"),
        (
            minimal(billing={"bill_observed_on_upstream_failure": 1}),
            "billing.bill_observed_on_upstream_failure: must be true or false",
        ),
        (minimal(server=[1]), "server: must be a mapping, got a list"),
        (minimal(auth={"failed_auth_window_ms": 10}), "auth.failed_auth_window_ms: must be at least 1000"),
        (minimal(server={"prot": 80}), "server.prot: unknown key (known: body_bytes_max, body_read_timeout_ms,"),
        ({**minimal(), "providers": []}, "providers: must not be empty"),
        (
            {**minimal(), "models": [{**minimal()["models"][0], "targets": [{"provider": "p"}]}]},
            "models[0].targets: give either",
        ),
        (
            {
                **minimal(),
                "models": [
                    {
                        "name": "m",
                        "targets": [{"provider": "q"}],
                        "max_output_tokens_default": 1,
                        "context_window_tokens": 1,
                    }
                ],
            },
            "models[0].targets[0].provider: unknown provider 'q'",
        ),
        (
            {**minimal(), "models": [{"name": "m", "max_output_tokens_default": 1, "context_window_tokens": 1}]},
            "models[0].provider: required",
        ),
        (
            {**minimal(), "models": [{**minimal()["models"][0], "targets": [{"provider": "p"}] * 9, "provider": None}]},
            "models[0].targets: must have at most 8 items",
        ),
        (
            {**minimal(), "models": [*minimal()["models"], {**minimal()["models"][0], "aliases": ["mini"]}]},
            "models[1].name: model name or alias 'm' is defined twice",
        ),
        ({**minimal(), "providers": minimal()["providers"] * 2}, "providers[1].name: duplicate provider 'p'"),
        (minimal(upstream={"buffered_answers_bytes_max": 0}), "upstream.buffered_answers_bytes_max: must be at least"),
        (minimal(holds={"sweep_grace_ms": -1}), "holds.sweep_grace_ms: must be a non-negative integer"),
        (
            minimal(admin_tokens=[{"name": "a", "sha256": "ab", "permissions": ["READ"]}]),
            "admin_tokens[0].sha256: must be the 64 hex digits",
        ),
        (
            minimal(admin_tokens=[{"name": "a", "sha256": "a" * 64, "permissions": ["READ", "ALL"]}]),
            "admin_tokens[0].permissions: must be a list of WORKSPACES_MANAGE, KEYS_MANAGE, CREDITS_MANAGE, "
            "TENANT_MANAGE, NOTIFICATIONS_MANAGE, READ, got 'ALL'",
        ),
        (
            minimal(admin_tokens=[{"name": "a", "sha256": "a" * 64, "permissions": []}]),
            "admin_tokens[0].permissions: must not be empty",
        ),
    ],
)
def test_more_errors_name_the_key(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, PRICING, {})
    assert expected in str(caught.value)


def test_empty_sections_mean_their_defaults() -> None:
    config = parse_config(minimal(server=None, holds=None, admin_tokens=None), PRICING, {})
    assert config.server == ServerConfig() and config.admin_tokens == ()


def test_admin_tokens_and_the_bootstrap_token() -> None:
    digest = hashlib.sha256(b"secret").hexdigest()
    raw = minimal(admin_tokens=[{"name": "ops", "sha256": digest.upper(), "permissions": ["READ"]}])
    config = parse_config(raw, PRICING, {"SIDECAR_ADMIN_TOKEN": "boot"})
    assert [(t.name, t.sha256, t.permissions) for t in config.admin_tokens] == [
        ("bootstrap", hashlib.sha256(b"boot").digest(), frozenset(PERMISSIONS)),
        ("ops", hashlib.sha256(b"secret").digest(), frozenset({"READ"})),
    ]


def test_targets_default_to_the_model_name() -> None:
    pricing = {"models": {"m": {"input": "1", "output": "2"}, "x/m": {"input": "1", "output": "2"}}}
    raw = {
        **minimal(),
        "models": [
            {
                **minimal()["models"][0],
                "provider": None,
                "targets": [{"provider": "p"}, {"provider": "p", "upstream_model": "x/m", "price": "x/m"}],
            }
        ],
    }
    model = parse_config(raw, pricing, {}).model("m")
    assert [(t.provider, t.upstream_model, t.price) for t in model.targets] == [("p", "m", "m"), ("p", "x/m", "x/m")]
    assert (model.provider, model.upstream_model) == ("p", "m")


def _with_key(path: str, value: object) -> tuple[dict, dict]:
    """A minimal config and pricing with `path` ('server.x', 'models[].x', 'pricing.x') set to `value`."""
    raw, pricing = minimal(), {**PRICING}
    root, key = path.rsplit(".", 1)
    if root == "pricing":
        pricing[key] = value
    elif root == "models[]":
        raw["models"] = [{k: v for k, v in raw["models"][0].items() if k != "max_output_tokens_default"} | {key: value}]
    else:
        raw[root] = {key: value}
    return raw, pricing


DEFAULTS = parse_config(minimal(), PRICING, {})


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED.items()))
def test_old_keys_are_read_with_a_warning_naming_both(old: str, new: str, caplog: pytest.LogCaptureFixture) -> None:
    section, key = new.rsplit(".", 1)
    value = {"pricing": "0.5", "models[]": 77}.get(section) or getattr(getattr(DEFAULTS, section), key) + 1
    config = parse_config(*_with_key(old, value), {})
    if section == "pricing":
        assert config.pricing.charge_micro_min == 500_000
    elif section == "models[]":
        assert config.model("m").max_output_tokens_default == 77
    else:
        assert getattr(getattr(config, section), key) == value
    shown = old.replace("[]", "[0]"), new.replace("[]", "[0]")
    assert [r.getMessage() for r in caplog.records if r.name == "sidecar.config"] == [
        f"config key {shown[0]} is renamed {shown[1]}; the old name is read until version 0.2"
    ]


def test_an_old_key_beside_its_new_name_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=r"ledger\.batch_max_rows: renamed ledger\.batch_rows_max, which is also given"
    ):
        parse_config(minimal(ledger={"batch_max_rows": 5, "batch_rows_max": 6}), PRICING, {})


def test_the_chart_schema_is_current() -> None:
    """`make schema` writes it; the chart's values.schema.json must say what the config's types say."""
    committed = json.loads((CHART / "values.schema.json").read_text())
    assert committed == values_schema(), "helm/ai-metering-sidecar/values.schema.json is stale: run `make schema`"


def test_the_chart_schema_knows_every_key_and_marks_old_ones() -> None:
    definitions = values_schema()["definitions"]
    server = definitions["ServerConfig"]["properties"]
    assert server["body_bytes_max"] == {"type": "integer", "minimum": 1024, "default": 8 * 1024 * 1024}
    assert server["max_body_bytes"]["deprecated"] is True
    assert definitions["ModelConfig"]["properties"]["default_max_output_tokens"]["description"] == (
        "renamed models[].max_output_tokens_default"
    )
    assert definitions["AuthConfig"]["properties"]["cache_ttl_ms"]["maximum"] == 5000
    assert definitions["ConfigFile"]["additionalProperties"] is False


def test_the_chart_values_are_a_valid_config() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    config = parse_config(values["config"], values["pricing"], {})
    assert config.server.host == "0.0.0.0" and config.model("gpt-4o-mini") is not None


def test_the_chart_schema_checks_values_as_helm_does() -> None:
    """Helm validates the values against values.schema.json (JSON Schema draft 7) before rendering."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert list(validator.iter_errors(values)) == []
    values["config"]["server"] |= {"body_bytes_max": 10, "prot": 1}
    values["config"]["ledger"] = {"batch_max_rows": 5}  # an old name: still accepted
    values["config"]["models"][0]["allow_routing_fields"] = ["transforms"]
    found = sorted((".".join(map(str, e.absolute_path)), e.validator) for e in validator.iter_errors(values))
    assert found == [
        ("config.models.0.allow_routing_fields.0", "enum"),
        ("config.server", "additionalProperties"),
        ("config.server.body_bytes_max", "minimum"),
    ]


def test_a_hold_ttl_past_a_week_is_refused() -> None:
    """Lua computes now + ttl as a double: a bound keeps it exact (review finding)."""
    from support.harness import build_config

    with pytest.raises(ConfigError, match=r"holds\.ttl_ms: must be at most 604800000"):
        build_config("redis://x", "postgresql://x", "http://x", holds={"ttl_ms": 10**13})
