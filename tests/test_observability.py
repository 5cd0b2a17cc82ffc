"""The dashboard and the alert rules shipped with the chart read metrics that exist: every metric a
panel or a rule names is in a live /metrics (or in `sidecar audit`'s export), with the labels the
expression uses; the rules file has the Prometheus rule shape; the Redis safety gauges say the truth."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import orjson
import redis.asyncio as aioredis
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import RedisError
from support.harness import Sidecar, chat_body, start_sidecar, stop_sidecar
from support.promql import reads

from sidecar.audit import Report, export_metrics
from sidecar.devtools import mock_provider
from sidecar.devtools.embedded import find_redis_server, free_port
from sidecar.observability.metrics import Metrics, RedisCheck
from sidecar.ops import build_ops_app, check_redis_safety

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "ai-metering-sidecar"
DASHBOARD = CHART / "dashboards" / "sidecar.json"
RULES = CHART / "alerts" / "rules.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
# Labels Prometheus adds to every scraped series (target labels), which no /metrics shows.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_]\w*)\s*\)\s*$")
_DURATION = re.compile(r"^(\d+(ms|[smhdwy]))+$")
# The topics issue 12 asks alerts for, by the metric each must read.
ALERTED_METRICS = {
    "sidecar_ledger_stream_lag",
    "sidecar_ledger_dead_letters_total",
    "sidecar_ledger_flush_failures_total",
    "sidecar_holds_expired_total",
    "sidecar_redis_noeviction",
    "sidecar_redis_aof_enabled",
    "sidecar_upstream_attempts_total",
    "sidecar_byok_fallbacks_total",
    "sidecar_settlements_lost_total",
    "sidecar_settlements_spooled_total",
    "sidecar_audit_findings",
}


def exposed(text: str) -> tuple[dict[str, set[str]], set[str]]:
    """Series names a Prometheus scraping `text` stores -> the labels seen on them; and the family
    names. A family with no sample yet (a labelled metric never touched) still names its series."""
    series: dict[str, set[str]] = {}
    families = set()
    parsed = list(text_string_to_metric_families(text))
    names = {family.name for family in parsed}
    for family in parsed:
        if family.name.removesuffix("_created") not in names - {family.name}:  # X_created: X's creation time
            families.add(family.name)
        for suffix in _SUFFIXES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series, families


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    found = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels += panel.get("panels", [])
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            metric, label = _LABEL_VALUES.match(query).groups()
            found.append((f"variable {variable['name']!r}", f"count by ({label}) ({metric})"))
    return found


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def rule_expressions() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in rules()]


def check_reads(where: str, expr: str, series: dict[str, set[str]], audit_series: dict[str, set[str]]) -> list[str]:
    """What is wrong with `expr`, as sentences (none when every name and label it uses exists)."""
    problems = []
    found = reads(expr)
    known_labels = set(TARGET_LABELS)
    for name, matched in found.metrics.items():
        labels = series.get(name, audit_series.get(name))
        if labels is None:
            problems.append(f"{where}: {name} is in neither /metrics nor the audit's export ({expr})")
            continue
        known_labels |= labels
        if labels and not matched <= labels | TARGET_LABELS:  # labels is empty only for an untouched family
            problems.append(f"{where}: {name} has no label {sorted(matched - labels - TARGET_LABELS)}")
    if not found.metrics:
        problems.append(f"{where}: reads no metric ({expr})")
    unknown = found.grouping_labels - known_labels - {"le"}
    if unknown and all(series.get(n) or audit_series.get(n) for n in found.metrics):
        problems.append(f"{where}: groups by {sorted(unknown)}, which none of its metrics has ({expr})")
    return problems


async def scrape(sidecar: Sidecar) -> str:
    ops = TestServer(build_ops_app(sidecar.svc))
    await ops.start_server()
    try:
        async with sidecar.http.get(ops.make_url("/metrics")) as r:
            assert r.status == 200
            return await r.text()
    finally:
        await ops.close()


async def test_every_metric_a_panel_or_an_alert_reads_exists(sidecar: Sidecar) -> None:
    # Calls that make the labelled series appear: a 402, a 200, a 429, a stream, an upstream 500,
    # and a customer key the provider refuses (a BYOK fallback).
    ws = await sidecar.workspace(credits_micro=10, rpm=1)
    assert (await sidecar.chat(ws, chat_body()))[0] == 402
    assert (await sidecar.chat(ws, chat_body(model="mock-free")))[0] == 200
    assert (await sidecar.chat(ws, chat_body(model="mock-free")))[0] == 429
    rich = await sidecar.workspace(credits_micro=1_000_000)
    assert (await sidecar.chat(rich, chat_body(stream=True)))[0] == 200
    assert (await sidecar.chat(rich, chat_body(), headers={"x-mock-status": "500"}))[0] == 500
    byok = await sidecar.workspace(credits_micro=1_000_000)
    customer_key = "sk-customer-refused-0001"
    key_body = {"provider": "mock", "key": customer_key}
    status, _ = await sidecar.admin("POST", f"/workspaces/{byok.id}/byok-keys", key_body)
    assert status == 201
    sidecar.provider.app[mock_provider.REJECTED_KEYS].add(customer_key)
    assert (await sidecar.chat(byok, chat_body()))[0] == 200
    await sidecar.flush()

    series, families = exposed(await scrape(sidecar))
    audit_series, _ = exposed(generate_latest(export_metrics(Report())).decode())
    for name in ("sidecar_requests_total", "sidecar_upstream_attempts_total", "sidecar_byok_fallbacks_total"):
        assert series[name], f"the calls above should have made {name} series"

    expressions = dashboard_expressions() + rule_expressions()
    assert len(expressions) > 40
    problems = [p for where, expr in expressions for p in check_reads(where, expr, series, audit_series)]
    assert not problems, "\n".join(problems)

    # The other way round: every metric the sidecar exports is on the dashboard (a new metric gets a panel).
    on_dashboard = {name for _, expr in dashboard_expressions() for name in reads(expr).metrics}
    missing = sorted(f for f in families if f.startswith("sidecar_") and not any(n.startswith(f) for n in on_dashboard))
    assert not missing, f"exported but on no dashboard panel: {missing}"


def test_a_misspelt_metric_or_label_is_reported() -> None:
    series = {"sidecar_requests_total": {"route", "model", "status"}, "sidecar_byok_fallbacks_total": set()}
    assert check_reads("t", "sum by (status) (rate(sidecar_requests_total[5m]))", series, {}) == []
    assert check_reads("t", "rate(sidecar_byok_fallbacks_total{reason='x'}[5m])", series, {}) == []  # labels unseen
    assert "neither" in check_reads("t", "rate(sidecar_request_total[5m])", series, {})[0]
    assert "no label ['code']" in check_reads("t", 'sidecar_requests_total{code="500"}', series, {})[0]
    assert "groups by ['statuss']" in check_reads("t", "sum by (statuss) (sidecar_requests_total)", series, {})[0]
    assert check_reads("t", "sidecar_audit_ok == 0", series, {"sidecar_audit_ok": set()}) == []


def test_rules_file_has_the_prometheus_rule_shape_and_a_runbook_per_alert() -> None:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"} and document["groups"]
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("#")
    }
    names = []
    for group in document["groups"]:
        assert set(group) == {"name", "rules"} and isinstance(group["name"], str) and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Sidecar[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
            names.append(rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert _DURATION.match(rule.get("for", "0m")), rule
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule
            annotations = rule["annotations"]
            assert annotations["summary"] and annotations["description"], rule["alert"]
            page, anchor = annotations["runbook"].split("#")
            assert page == "docs/operations.md" and anchor == rule["alert"].lower(), rule["alert"]
            assert anchor in headings, f"docs/operations.md has no section for {rule['alert']}"
    assert len(names) == len(set(names)), "alert names repeat"
    alerted = {name for _, expr in rule_expressions() for name in reads(expr).metrics}
    assert ALERTED_METRICS <= alerted, f"no alert reads {sorted(ALERTED_METRICS - alerted)}"


async def test_redis_safety_gauges_follow_the_redis_settings(private_redis, migrated_database_url) -> None:
    probe = aioredis.Redis.from_url(private_redis.url)
    sc = await start_sidecar(private_redis.url, migrated_database_url)
    try:
        assert private_redis.persistent  # started with appendonly yes and noeviction
        series = await scrape(sc)
        assert "sidecar_redis_noeviction 1.0" in series and "sidecar_redis_aof_enabled 1.0" in series
        await probe.config_set("maxmemory-policy", "allkeys-lru")
        await probe.config_set("appendonly", "no")
        series = await scrape(sc)
        assert "sidecar_redis_noeviction 0.0" in series and "sidecar_redis_aof_enabled 0.0" in series
    finally:
        await stop_sidecar(sc)
        await probe.aclose()


async def test_redis_safety_gauges_say_unknown_where_redis_refuses_config_and_info(tmp_path) -> None:
    port = free_port()
    argv = [str(find_redis_server()), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
    argv += ["--rename-command", "CONFIG", "", "--rename-command", "INFO", ""]  # as some managed services do
    server = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = aioredis.Redis(port=port)
    metrics = Metrics()
    try:
        for _ in range(100):
            try:
                await client.ping()
                break
            except (OSError, RedisError):
                await asyncio.sleep(0.05)
        metrics.redis_noeviction.set(RedisCheck.ON)  # a value read earlier must not survive an unreadable one
        metrics.redis_aof_enabled.set(RedisCheck.OFF)
        assert await check_redis_safety(client, metrics) == (None, None)
        text = generate_latest(metrics.registry).decode()
        assert "sidecar_redis_noeviction -1.0" in text and "sidecar_redis_aof_enabled -1.0" in text
    finally:
        await client.aclose()
        server.terminate()
        await asyncio.wait_for(server.wait(), 10)
