"""The Grafana dashboard and Prometheus rules only use metric names the code declares, and alert
thresholds follow config/stream_config.yaml."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from wildfire.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/wildfire.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
PROVISIONING = ROOT / "deploy/grafana/provisioning"

# Declarations under plugins/: prometheus_client metrics and custom collector families.
_DECL = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|BulkHistogram|CounterMetricFamily|GaugeMetricFamily|HistogramMetricFamily)"
    r"\(\s*\"(wildfire_[a-z0-9_]+)\"")
_KIND = {"Counter": "counter", "CounterMetricFamily": "counter", "Gauge": "gauge", "GaugeMetricFamily": "gauge",
         "Histogram": "histogram", "BulkHistogram": "histogram", "HistogramMetricFamily": "histogram",
         "Summary": "summary"}
# What each kind exposes on /metrics (prometheus_client adds `_total` to counters).
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "summary": ("", "_sum", "_count", "_created")}
_REF = re.compile(r"\b(wildfire_[a-z0-9_]+)\b")


def declared_kinds(source: str) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for cls, name in _DECL.findall(source):
        kinds.setdefault(name, set()).add(_KIND[cls])
    return kinds


def exposed_names(kinds: dict[str, set[str]]) -> set[str]:
    return {name + suffix for name, ks in kinds.items() for k in ks for suffix in _SUFFIXES[k]}


def plugin_metrics() -> set[str]:
    source = "\n".join(p.read_text() for p in (ROOT / "plugins").rglob("*.py"))
    return exposed_names(declared_kinds(source))


def expressions(node) -> list[str]:
    """Every PromQL string in a dashboard: panel targets and templating queries, at any depth."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                out.append(value)
            elif key == "query" and isinstance(value, str | dict):
                out.append(value if isinstance(value, str) else value.get("query", ""))
            else:
                out.extend(expressions(value))
    elif isinstance(node, list):
        for item in node:
            out.extend(expressions(item))
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_name_extraction_knows_prometheus_client_exposition():
    # The checker itself: a counter is only visible as *_total, a histogram as *_bucket/_sum/_count.
    kinds = declared_kinds('Counter("wildfire_x", "d")\nHistogram("wildfire_h", "d")\nGauge("wildfire_g_total", "d")')
    names = exposed_names(kinds)
    assert {"wildfire_x_total", "wildfire_h_bucket", "wildfire_g_total"} <= names
    assert "wildfire_x" not in names and "wildfire_h" not in names


def test_plugins_declare_the_core_metrics():
    names = plugin_metrics()
    assert {"wildfire_queue_depth", "wildfire_records_dropped_total", "wildfire_consumer_lag_total",
            "wildfire_spool_depth_records", "wildfire_publish_delivered_records_total"} <= names


def test_dashboard_uses_only_declared_metrics():
    refs = {m for e in expressions(dashboard()) for m in _REF.findall(e)}
    assert len(refs) >= 15, refs
    missing = refs - plugin_metrics()
    assert not missing, f"dashboard uses metrics no code declares: {sorted(missing)}"


def test_alert_rules_use_only_declared_metrics():
    refs = {m for r in alert_rules() for m in _REF.findall(r["expr"])}
    assert refs
    missing = refs - plugin_metrics()
    assert not missing, f"alert rules use metrics no code declares: {sorted(missing)}"


@pytest.mark.parametrize("topic", [
    "throughput", "queue depth", "spool depth", "backpressure", "breaker", "throttle", "consumer lag", "drops"])
def test_dashboard_covers_the_issue_topics(topic):
    titles = [p["title"].lower() for p in dashboard()["panels"] if p["type"] != "row"]
    assert any(topic in t for t in titles), (topic, titles)


def test_panels_are_well_formed():
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    ds_uid = yaml.safe_load((PROVISIONING / "datasources/prometheus.yaml").read_text())["datasources"][0]["uid"]
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == ds_uid
            assert p["targets"] and all(t["expr"] for t in p["targets"])
            # Per-source panels follow the $source selector.
    assert any("$source" in e for e in expressions(d))


def test_alert_thresholds_follow_the_config():
    cfg = load_config(ROOT / "config/stream_config.yaml", environ={})
    rules = {r["alert"]: r["expr"] for r in alert_rules()}
    assert rules["WildfireSpoolFilling"].endswith(f"> {cfg.spool.utilization_alert}")
    assert rules["WildfireConsumerLagCritical"].endswith(f"> {cfg.throttling.critical_consumer_lag}")


def test_prometheus_scrapes_worker_and_consumer_ports():
    cfg = load_config(ROOT / "config/stream_config.yaml", environ={})
    prom = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"]: [t for s in j["static_configs"] for t in s["targets"]] for j in prom["scrape_configs"]}
    assert f"stream-worker:{cfg.worker.metrics_port}" in jobs["wildfire-worker"]
    assert "storage-consumer:9109" in jobs["wildfire-consumer"]
    assert "/etc/prometheus/alerts.yml" in prom["rule_files"]


def test_grafana_provisioning_points_at_the_dashboard_folder():
    provider = yaml.safe_load((PROVISIONING / "dashboards/wildfire.yaml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
