"""Check the Helm chart with a real helm binary: `helm lint --strict`, `helm template` of every documented
shape (value set), a Kubernetes schema check of every rendered object (the `kubernetes-validate`
package's bundled schemas, offline; the Prometheus Operator's kinds against their required fields), and
every rendered sidecar.yaml loaded with the sidecar's own loader (`make chart-check`; in `make test` via
tests/test_chart_render.py, with a helm fetched by tests/helm_binary.py).

The chart's default `config:` block is also checked without helm by tests/test_chart_config.py; this
adds what only a render shows: the templates, the overrides, and that the workloads agree with the config
they mount (ports, spool directory).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sidecar.config import Config, load_config

# What the chart's Secret provides (envFrom): the loader needs them, the render cannot know them.
SECRET_ENV = {
    "SIDECAR_REDIS_URL": "redis://redis:6379/0",
    "SIDECAR_DATABASE_URL": "postgresql://sidecar@postgres:5432/sidecar",
    "SIDECAR_ADMIN_TOKEN": "chart-check-token",
}
HELM_TIMEOUT_S = 120


@dataclass(frozen=True)
class ValueSet:
    name: str
    overrides: tuple[str, ...] = ()
    expect: dict[str, object] = field(default_factory=dict)


PER_WORKSPACE = (
    "control.enabled=false",
    "migrations.job.enabled=false",
    "migrations.cronJob.enabled=false",
    "audit.enabled=false",
)
AGENT = ("data.enabled=false", "agent.enabled=true", "agent.container.name=agent", "agent.container.image=agent:1")
SIDECAR_COMMANDS = ("serve", "control", "migrate", "audit")

OPERATOR = (
    "metrics.serviceMonitor.enabled=true",
    "metrics.prometheusRule.enabled=true",
    "metrics.dashboard.enabled=true",
    "networkPolicy.enabled=true",
)
# The Kubernetes version whose schemas every object must pass: the oldest the chart supports (native
# sidecar containers, agent.nativeSidecar, need 1.29).
KUBERNETES_VERSION = "1.29.0"

VALUE_SETS = (
    ValueSet("defaults", (), {"hpa": False, "audit": True, "spool_claim": None}),
    ValueSet(
        "autoscaling+claim+no-audit",
        ("data.autoscaling.enabled=true", "data.spool.existingClaim=x", "audit.enabled=false"),
        {"hpa": True, "audit": False, "spool_claim": "x"},
    ),
    ValueSet(
        "audit-pushgateway+migration-secret",
        ("audit.enabled=true", "audit.pushgateway=http://pushgateway:9091", "migrations.secretName=owner"),
        {"hpa": False, "audit": True, "spool_claim": None},
    ),
    ValueSet(
        "no-migration-hook",
        ("migrations.job.enabled=false", "migrations.cronJob.enabled=true"),
        {"hpa": False, "audit": True, "spool_claim": None},
    ),
    # A deployment per workspace: its own data plane; the control plane, migrations and audit run once,
    # in the shared release (README "Deploying").
    ValueSet(
        "per-workspace-release",
        (*PER_WORKSPACE, "config.server.workspaces={ws_acme,ws_acme_eu}"),
        {"control": False, "migrate": False, "audit": False, "workspaces": ("ws_acme", "ws_acme_eu")},
    ),
    # The sidecar as a container in the agent's own pod, as a native sidecar and as a plain container.
    ValueSet(
        "agent-pod",
        (*PER_WORKSPACE, *AGENT, "config.server.workspaces={ws_acme}"),
        {"data": 0, "agent": True, "control": False, "migrate": False, "audit": False, "workspaces": ("ws_acme",)},
    ),
    ValueSet(
        "agent-pod-plain-container",
        (*PER_WORKSPACE, *AGENT, "agent.nativeSidecar=false", "config.server.port=8181"),
        {"data": 0, "agent": True, "control": False, "migrate": False, "audit": False},
    ),
    # With the Prometheus Operator's objects, the dashboard and NetworkPolicies, in both shapes.
    ValueSet(
        "operator+network-policy",
        (*OPERATOR, "networkPolicy.egress[0].to[0].ipBlock.cidr=10.0.0.0/8"),
        {"hpa": False, "audit": True, "spool_claim": None, "monitors": ("ServiceMonitor",), "policies": 2},
    ),
    ValueSet(
        "agent-pod+operator+network-policy",
        (*PER_WORKSPACE, *AGENT, *OPERATOR, "config.server.workspaces={ws_acme}"),
        {
            "data": 0,
            "agent": True,
            "control": False,
            "migrate": False,
            "audit": False,
            "workspaces": ("ws_acme",),
            "monitors": ("PodMonitor",),
            "policies": 1,
        },
    ),
    ValueSet(
        "custom-ports+spool-dir",
        (
            "config.server.port=8181",
            "config.server.ops_port=9191",
            "config.holds.spool_dir=/data/spool",
            "control.enabled=false",
            "migrations.cronJob.enabled=false",
        ),
        {"hpa": False, "audit": True, "spool_claim": None, "control": False},
    ),
)


class ChartCheckError(Exception):
    pass


def run_helm(helm: str, args: list[str]) -> str:
    done = subprocess.run([helm, *args], capture_output=True, text=True, timeout=HELM_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise ChartCheckError(f"helm {' '.join(args)}: exit {done.returncode}\n{done.stderr}{done.stdout}")
    return done.stdout


def load_configmap_config(configmap: dict, env: dict[str, str]) -> Config:
    """Write the ConfigMap's files as the pod sees them under /etc/sidecar, and load them."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in configmap["data"].items():
            Path(tmp, name).write_text(text)
        return load_config(Path(tmp, "sidecar.yaml"), env=env)


def sidecar_configmaps(by_kind: dict[str, list[dict]]) -> list[dict]:
    """The ConfigMaps with a sidecar.yaml (not the dashboard's)."""
    return [c for c in by_kind.get("ConfigMap", []) if "sidecar.yaml" in c.get("data", {})]


def check_rendered(docs: list[dict], expect: dict[str, object]) -> list[str]:
    """The problems of one render (empty: good)."""
    problems: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    configs: dict[str, Config] = {}
    for configmap in sidecar_configmaps(by_kind):
        name = configmap["metadata"]["name"]
        try:
            configs[name] = load_configmap_config(configmap, SECRET_ENV)
        except Exception as exc:
            problems.append(f"ConfigMap {name}: sidecar.yaml does not load: {exc}")
    if not configs:
        return problems or ["no ConfigMap with a sidecar.yaml was rendered"]
    for kind in ("Deployment", "CronJob", "Job"):
        for workload in by_kind.get(kind, []):
            problems += check_workload(kind, workload, configs)
    problems += check_expectations(by_kind, expect)
    problems += check_operator_objects(by_kind, expect)
    return problems


def check_schemas(docs: list[dict]) -> list[str]:
    """Every object against the Kubernetes API's schema (strict: an unknown field is an error too)."""
    import kubernetes_validate

    problems = []
    for doc in docs:
        name = f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        if doc.get("kind") in OPERATOR_KINDS:
            problems += [f"{name}: {p}" for p in OPERATOR_KINDS[doc["kind"]](doc)]
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
            problems.append(f"{name}: no schema: {exc.message}")
    return problems


def _check_monitor(doc: dict, endpoints_key: str) -> list[str]:
    spec = doc.get("spec", {})
    problems = [] if spec.get("selector", {}).get("matchLabels") else ["spec.selector.matchLabels is empty"]
    endpoints = spec.get(endpoints_key) or []
    if not endpoints:
        problems.append(f"spec.{endpoints_key} is empty")
    for endpoint in endpoints:
        if endpoint.get("port") != "ops" or endpoint.get("path") != "/metrics":
            problems.append(f"an endpoint scrapes {endpoint.get('port')}{endpoint.get('path')}, not ops/metrics")
    return problems


def _check_prometheus_rule(doc: dict) -> list[str]:
    groups = doc.get("spec", {}).get("groups") or []
    problems = [] if groups else ["spec.groups is empty"]
    for group in groups:
        for rule in group.get("rules") or []:
            if not isinstance(rule.get("expr"), str) or not (rule.get("alert") or rule.get("record")):
                problems.append(f"group {group.get('name')}: a rule without expr, or without alert/record")
    return problems


# The Prometheus Operator's kinds (CRDs, not in the Kubernetes schemas): their required fields.
OPERATOR_KINDS = {
    "ServiceMonitor": lambda doc: _check_monitor(doc, "endpoints"),
    "PodMonitor": lambda doc: _check_monitor(doc, "podMetricsEndpoints"),
    "PrometheusRule": _check_prometheus_rule,
}


def check_operator_objects(by_kind: dict[str, list[dict]], expect: dict[str, object]) -> list[str]:
    problems = []
    monitors = tuple(k for k in ("ServiceMonitor", "PodMonitor") if by_kind.get(k))
    if monitors != tuple(expect.get("monitors", ())):
        problems.append(f"monitors rendered: {monitors}, expected {expect.get('monitors', ())}")
    policies = len(by_kind.get("NetworkPolicy", []))
    if policies != expect.get("policies", 0):
        problems.append(f"{policies} NetworkPolicies rendered, expected {expect.get('policies', 0)}")
    tests = [p for p in by_kind.get("Pod", []) if p["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    if expect.get("data", 1) and not tests:
        problems.append("no `helm test` pod rendered")
    return problems


def pod_spec(kind: str, workload: dict) -> dict:
    if kind == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def check_workload(kind: str, workload: dict, configs: dict[str, Config]) -> list[str]:
    name = f"{kind} {workload['metadata']['name']}"
    spec = pod_spec(kind, workload)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    config_volume = volumes.get("config", {}).get("configMap", {}).get("name")
    if config_volume not in configs:
        return [f"{name}: mounts ConfigMap {config_volume!r}, which was not rendered"]
    config = configs[config_volume]
    problems = []
    containers = [*spec.get("initContainers", []), *spec["containers"]]
    for container in containers:
        args = container.get("args", [])
        command = args[0] if args else ""
        if command not in SIDECAR_COMMANDS:
            problems += check_agent_container(name, container, config)
            continue
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        if mounts.get("/etc/sidecar") != "config":
            problems.append(f"{name}: the config is not mounted at /etc/sidecar")
        if command in ("serve", "control"):
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            if ports.get("http") != config.server.port or ports.get("ops") != config.server.ops_port:
                problems.append(
                    f"{name}: container ports {ports} differ from the config's"
                    f" server.port {config.server.port} / ops_port {config.server.ops_port}"
                )
        if command == "serve" and mounts.get(config.holds.spool_dir) != "spool":
            problems.append(f"{name}: holds.spool_dir {config.holds.spool_dir} is not a mounted volume ({mounts})")
    return problems


def check_agent_container(name: str, container: dict, config: Config) -> list[str]:
    """The agent beside the sidecar: its SDKs point at the sidecar on loopback, which listens there only."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    problems = []
    if env.get("OPENAI_BASE_URL") != f"http://127.0.0.1:{config.server.port}/v1":
        problems.append(f"{name}: agent OPENAI_BASE_URL is {env.get('OPENAI_BASE_URL')!r}")
    if env.get("ANTHROPIC_BASE_URL") != f"http://127.0.0.1:{config.server.port}":
        problems.append(f"{name}: agent ANTHROPIC_BASE_URL is {env.get('ANTHROPIC_BASE_URL')!r}")
    if config.server.host != "127.0.0.1" or config.server.ops_host != "0.0.0.0":
        listens = f"{config.server.host}, ops {config.server.ops_host}"
        problems.append(f"{name}: the sidecar beside the agent listens on {listens}")
    if "envFrom" in container:
        problems.append(f"{name}: the agent container got the sidecar's Secret")
    return problems


def check_expectations(by_kind: dict[str, list[dict]], expect: dict[str, object]) -> list[str]:
    problems = []
    has_hpa = bool(by_kind.get("HorizontalPodAutoscaler"))
    if has_hpa != expect.get("hpa", False):
        problems.append(f"HorizontalPodAutoscaler rendered: {has_hpa}, expected {expect.get('hpa', False)}")
    cronjobs = [c["metadata"]["name"] for c in by_kind.get("CronJob", [])]
    has_audit = any(n.endswith("-audit") for n in cronjobs)
    if has_audit != expect.get("audit", True):
        problems.append(f"audit CronJob rendered: {has_audit}, expected {expect.get('audit', True)}")
    deployments = by_kind.get("Deployment", [])
    by_component: dict[str, list[dict]] = {}
    for workload in [*deployments, *by_kind.get("Job", []), *by_kind.get("CronJob", [])]:
        by_component.setdefault(workload["metadata"]["labels"].get("app.kubernetes.io/component"), []).append(workload)
    for component in ("control", "migrate", "agent"):
        rendered, wanted = bool(by_component.get(component)), expect.get(component, component != "agent")
        if rendered != wanted:
            problems.append(f"{component} workloads rendered: {rendered}, expected {wanted}")
    problems += check_workspaces(by_kind, tuple(expect.get("workspaces", ())))
    data = by_component.get("data", [])
    if len(data) != expect.get("data", 1):
        return [*problems, f"expected {expect.get('data', 1)} data-plane Deployment, got {len(data)}"]
    if not data:
        if by_kind.get("Service") and any(
            s["metadata"]["labels"].get("app.kubernetes.io/component") == "data" for s in by_kind["Service"]
        ):
            problems.append("a data-plane Service is rendered without its Deployment")
        return problems
    spool = {v["name"]: v for v in pod_spec("Deployment", data[0])["volumes"]}.get("spool", {})
    claim = spool.get("persistentVolumeClaim", {}).get("claimName")
    if claim != expect.get("spool_claim"):
        problems.append(f"spool claim {claim!r}, expected {expect.get('spool_claim')!r}")
    if has_hpa and "replicas" in data[0]["spec"]:
        problems.append("the data Deployment sets replicas although the HPA owns them")
    return problems


def check_workspaces(by_kind: dict[str, list[dict]], expected: tuple[str, ...]) -> list[str]:
    """Every rendered sidecar.yaml restricts the data plane to the expected workspaces (none: all)."""
    problems = []
    for configmap in sidecar_configmaps(by_kind):
        config = load_configmap_config(configmap, SECRET_ENV)
        if config.server.workspaces != expected:
            name = configmap["metadata"]["name"]
            problems.append(f"ConfigMap {name}: server.workspaces {config.server.workspaces}, expected {expected}")
    return problems


def check_chart(helm: str, chart: str) -> list[str]:
    problems = []
    for value_set in VALUE_SETS:
        sets = [arg for override in value_set.overrides for arg in ("--set", override)]
        try:
            run_helm(helm, ["lint", "--strict", chart, *sets])
            rendered = run_helm(helm, ["template", "release", chart, *sets])
        except ChartCheckError as exc:
            problems.append(f"[{value_set.name}] {exc}")
            continue
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        found = check_schemas(docs) + check_rendered(docs, value_set.expect)
        problems += [f"[{value_set.name}] {p}" for p in found]
        print(f"chart-check [{value_set.name}]: {len(docs)} objects, {'ok' if not found else 'FAILED'}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--helm", default=None, help="default: HELM, else a cached or fetched one")
    parser.add_argument("--chart", default="helm/ai-metering-sidecar")
    args = parser.parse_args(argv)
    from tests.helm_binary import ensure_helm

    problems = check_chart(args.helm or str(ensure_helm()), args.chart)
    for problem in problems:
        print(f"chart-check: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
