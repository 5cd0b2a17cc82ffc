"""A wrong config fails at start with a message that names the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sidecar.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).parent.parent
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
            "models.m.cache_red: unknown token class",
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
