"""Check the Helm chart with a real helm binary: lint, render several value sets, and load every rendered
sidecar.yaml with the sidecar's own loader (`make chart-check`).

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
    ValueSet(
        "custom-ports+spool-dir",
        (
            "config.server.port=8181",
            "config.server.ops_port=9191",
            "config.holds.spool_dir=/data/spool",
            "control.enabled=false",
            "migrations.cronJob.enabled=false",
        ),
        {"hpa": False, "audit": True, "spool_claim": None},
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


def check_rendered(docs: list[dict], expect: dict[str, object]) -> list[str]:
    """The problems of one render (empty: good)."""
    problems: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    configs: dict[str, Config] = {}
    for configmap in by_kind.get("ConfigMap", []):
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
    for container in spec["containers"]:
        args = container.get("args", [])
        command = args[0] if args else ""
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


def check_expectations(by_kind: dict[str, list[dict]], expect: dict[str, object]) -> list[str]:
    problems = []
    has_hpa = bool(by_kind.get("HorizontalPodAutoscaler"))
    if has_hpa != expect["hpa"]:
        problems.append(f"HorizontalPodAutoscaler rendered: {has_hpa}, expected {expect['hpa']}")
    cronjobs = [c["metadata"]["name"] for c in by_kind.get("CronJob", [])]
    has_audit = any(n.endswith("-audit") for n in cronjobs)
    if has_audit != expect["audit"]:
        problems.append(f"audit CronJob rendered: {has_audit}, expected {expect['audit']}")
    deployments = by_kind.get("Deployment", [])
    data = [d for d in deployments if d["metadata"]["labels"].get("app.kubernetes.io/component") == "data"]
    if len(data) != 1:
        return [*problems, f"expected one data-plane Deployment, got {len(data)}"]
    spool = {v["name"]: v for v in pod_spec("Deployment", data[0])["volumes"]}.get("spool", {})
    claim = spool.get("persistentVolumeClaim", {}).get("claimName")
    if claim != expect["spool_claim"]:
        problems.append(f"spool claim {claim!r}, expected {expect['spool_claim']!r}")
    if has_hpa and "replicas" in data[0]["spec"]:
        problems.append("the data Deployment sets replicas although the HPA owns them")
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
        found = check_rendered(docs, value_set.expect)
        problems += [f"[{value_set.name}] {p}" for p in found]
        print(f"chart-check [{value_set.name}]: {len(docs)} objects, {'ok' if not found else 'FAILED'}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--helm", default="helm")
    parser.add_argument("--chart", default="helm/ai-metering-sidecar")
    args = parser.parse_args(argv)
    problems = check_chart(args.helm, args.chart)
    for problem in problems:
        print(f"chart-check: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
