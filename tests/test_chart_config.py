"""The Helm chart's default values must be a config the sidecar loads: the chart writes `config:` and
`pricing:` verbatim into its ConfigMap (sidecar.yaml, pricing.yaml), so a key renamed or removed in
sidecar/config.py would otherwise only show when a pod fails to start. No helm needed; `make chart-check`
also renders the templates with helm."""

import math
from pathlib import Path

import pytest
import yaml
from chart_check import SECRET_ENV

from sidecar.config import ConfigError, load_config

CHART_DIR = Path(__file__).resolve().parent.parent / "helm" / "ai-metering-sidecar"


def chart_values() -> dict:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def write_chart_config(directory: Path, values: dict) -> Path:
    """The files the chart's ConfigMap mounts at /etc/sidecar."""
    (directory / "sidecar.yaml").write_text(yaml.safe_dump(values["config"]))
    (directory / values["config"].get("pricing_file", "pricing.yaml")).write_text(yaml.safe_dump(values["pricing"]))
    return directory / "sidecar.yaml"


def test_chart_default_config_loads_as_a_sidecar_config(tmp_path):
    values = chart_values()
    config = load_config(write_chart_config(tmp_path, values), env=SECRET_ENV)

    assert config.server.host == "0.0.0.0"  # a pod must listen beyond loopback
    assert config.server.port == values["config"]["server"]["port"]
    assert config.server.ops_port == values["config"]["server"]["ops_port"]
    assert config.redis_url == SECRET_ENV["SIDECAR_REDIS_URL"]
    assert config.database_url == SECRET_ENV["SIDECAR_DATABASE_URL"]


def test_chart_config_check_rejects_a_key_the_sidecar_does_not_know(tmp_path):
    # The guard above is only worth something if a drifted key fails the load.
    values = chart_values()
    values["config"]["holds"]["ttl_seconds"] = 900
    with pytest.raises(ConfigError, match=r"holds\.ttl_seconds: unknown key"):
        load_config(write_chart_config(tmp_path, values), env=SECRET_ENV)


@pytest.mark.parametrize("component", ["data", "control"])
def test_chart_default_grace_period_covers_prestop_and_drain(component):
    # The same rule the chart enforces at render time (sidecar.checkGrace), on the defaults.
    values = chart_values()
    drain_s = math.ceil(values["config"]["server"]["drain_timeout_ms"] / 1000)
    workload = values[component]
    assert workload["terminationGracePeriodSeconds"] > workload["preStopSleepSeconds"] + drain_s
