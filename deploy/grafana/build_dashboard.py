"""Builds the Grafana dashboard ``deploy/grafana/dashboards/wildfire.json`` (run ``python deploy/render.py``).

Written as code so panels stay uniform and every PromQL expression is reviewable in one place;
tests/unit/test_dashboard.py checks that each ``wildfire_*`` name used here is declared under plugins/.
Layout, top to bottom: flow (throughput, drops), buffers (queue, spool), control loops (backpressure,
throttling, breaker), Kafka and storage (consumer lag, delivery latency, dead letters).
"""

from __future__ import annotations

import json
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "wildfire-prometheus"}
W, H = 12, 8   # half-width panels on Grafana's 24-column grid

# Value mappings for the state gauges, so panels show names instead of numbers.
BACKPRESSURE_STATES = {0: ("NORMAL", "green"), 1: ("WARNING", "yellow"), 2: ("CRITICAL", "orange"),
                       3: ("LOAD_SHEDDING", "red")}
BREAKER_STATES = {0: ("CLOSED", "green"), 1: ("OPEN", "red"), 2: ("HALF_OPEN", "yellow")}


def _mappings(states: dict[int, tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"type": "value", "options": {str(k): {"text": text, "color": color, "index": k}
                                          for k, (text, color) in states.items()}}]


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


class _Layout:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y = 0, self.y + H
        self.panels.append({"type": "row", "title": title, "id": self.next_id, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.next_id += 1
        self.y += 1

    def panel(self, title: str, targets: list[tuple[str, str]], *, unit: str = "short", kind: str = "timeseries",
              description: str = "", mappings: list[dict[str, Any]] | None = None, stack: bool = False,
              max_value: float | None = None) -> None:
        defaults: dict[str, Any] = {"unit": unit}
        if mappings:
            defaults["mappings"] = mappings
        if max_value is not None:
            defaults["max"] = max_value
        if kind == "timeseries":
            defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 20 if stack else 0,
                                  "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                                  "lineInterpolation": "stepAfter" if mappings else "linear"}
        self.panels.append({
            "type": kind, "title": title, "id": self.next_id, "description": description, "datasource": DATASOURCE,
            "gridPos": {"h": H, "w": W, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries"
            else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                  "colorMode": "background", "graphMode": "none", "textMode": "value_and_name"},
            "targets": [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
        })
        self.next_id += 1
        self.x += W
        if self.x >= 24:
            self.x, self.y = 0, self.y + H


SRC = 'source=~"$source"'


def _q(expr: str) -> str:
    """PromQL with ``{SRC}`` replaced by the $source selector (f-strings would fight PromQL's braces)."""
    return expr.replace("{SRC}", "{" + SRC + "}")


def build() -> dict[str, Any]:
    d = _Layout()
    d.row("Flow")
    d.panel("Throughput to Kafka per source (records/s)",
            [(f"sum by (source) (rate(wildfire_publish_delivered_records_total{{{SRC}}}[$__rate_interval]))",
              "{{source}}")],
            unit="ops", stack=True,
            description="Records acknowledged by Kafka (acks=all) and deleted from the spool.")
    d.panel("Drops and rejections by reason (records/s)",
            [(_q("sum by (reason) (rate(wildfire_records_dropped_total{SRC}[$__rate_interval]))"), "queue: {{reason}}"),
             (_q("sum by (reason) (rate(wildfire_spool_dropped_records_total{SRC}[$__rate_interval]))"),
              "spool: {{reason}}")],
            unit="ops", description="Every record not delivered is counted here with its reason; "
                                    "CRITICAL is never shed by backpressure.")
    d.panel("Admission decisions (records/s)",
            [(_q("sum by (decision, priority) (rate(wildfire_admission_decisions_total{SRC}[$__rate_interval]))"),
              "{{decision}} {{priority}}")], unit="ops")
    d.panel("Dequeued per source (records/s)",
            [(_q("sum by (source) (rate(wildfire_queue_dequeued_total{SRC}[$__rate_interval]))"), "{{source}}")],
            unit="ops", stack=True)

    d.row("Buffers")
    d.panel("Queue depth per priority",
            [("sum by (priority) (wildfire_queue_depth)", "{{priority}}"),
             ("sum(wildfire_queue_capacity)", "capacity")], unit="short")
    d.panel("Spool depth per priority",
            [(_q("sum by (priority) (wildfire_spool_depth_records{SRC})"), "{{priority}}")], unit="short", stack=True)
    d.panel("Spool utilization per source",
            [(_q("max by (source) (wildfire_spool_utilization{SRC})"), "{{source}}")],
            unit="percentunit", max_value=1.0,
            description="records / capacity; spool.utilization_alert is 0.8")
    d.panel("Oldest spooled record per source",
            [(_q("max by (source) (wildfire_spool_oldest_age_seconds{SRC})"), "{{source}}")], unit="s",
            description="Records older than spool.ttl_seconds (24 h) are expired and archived.")
    d.panel("Queue wait p95 per priority",
            [("histogram_quantile(0.95, sum by (le, priority) (rate(wildfire_queue_wait_seconds_bucket[$__rate_interval])))",
              "{{priority}}")], unit="s")
    d.panel("Starvation promotions (records/s)",
            [("sum by (priority) (rate(wildfire_queue_promoted_total[$__rate_interval]))", "from {{priority}}")],
            unit="ops")

    d.row("Control loops")
    d.panel("Backpressure state", [("max by (instance) (wildfire_backpressure_state)", "{{instance}}")],
            mappings=_mappings(BACKPRESSURE_STATES), max_value=3)
    d.panel("Queue fill and fire season",
            [("max by (instance) (wildfire_backpressure_fill_ratio)", "fill {{instance}}"),
             ("max by (instance) (wildfire_fire_season_active)", "fire season {{instance}}")], unit="percentunit")
    d.panel("Circuit breaker state",
            [("max by (instance, breaker) (wildfire_circuit_state)", "{{breaker}} {{instance}}"),
             ("max by (instance) (wildfire_publish_breaker_state)", "publisher {{instance}}")],
            mappings=_mappings(BREAKER_STATES), max_value=2)
    d.panel("Breaker transitions (per 5 min)",
            [("sum by (breaker, state) (increase(wildfire_circuit_transitions_total[5m]))", "{{breaker}} -> {{state}}")])
    d.panel("Throttle level and delay",
            [("max by (instance) (wildfire_throttle_level)", "level {{instance}}"),
             ("max by (instance) (wildfire_throttle_delay_seconds)", "delay s {{instance}}")])
    d.panel("Allowed send rate per source (records/s)",
            [(_q("min by (source) (wildfire_send_rate_limit{SRC})"), "{{source}}")], unit="ops")

    d.row("Kafka and storage")
    d.panel("Consumer lag per group",
            [("max by (group) (wildfire_consumer_lag_total)", "{{group}}")], unit="short",
            description="throttling.target_consumer_lag 50,000 / critical_consumer_lag 200,000")
    d.panel("Consumer lag per topic",
            [('sum by (group, topic) (wildfire_consumer_lag{topic!=""})', "{{group}} {{topic}}")], unit="short")
    d.panel("Kafka delivery latency p50 / p95",
            [("histogram_quantile(0.5, sum by (le) (rate(wildfire_publish_delivery_latency_seconds_bucket[$__rate_interval])))", "p50"),
             ("histogram_quantile(0.95, sum by (le) (rate(wildfire_publish_delivery_latency_seconds_bucket[$__rate_interval])))", "p95")],
            unit="s")
    d.panel("In flight, retries and dead letters",
            [("sum(wildfire_publish_in_flight_records)", "in flight"),
             ("sum by (reason) (rate(wildfire_publish_retries_total[$__rate_interval]))", "retries/s {{reason}}"),
             (_q("sum by (source) (rate(wildfire_publish_dead_letters_total{SRC}[$__rate_interval]))"),
              "dead letters/s {{source}}"),
             ("max(wildfire_spool_dead_letters)", "spool dead_letters rows")])
    d.panel("Scrape targets up", [('up{job=~"wildfire-(worker|consumer)"}', "{{job}} {{instance}}")], kind="stat",
            mappings=_mappings({0: ("DOWN", "red"), 1: ("UP", "green")}))

    return {
        "uid": "wildfire-ingestion",
        "title": "Wildfire ingestion",
        "description": "Streaming layers, spool, Kafka delivery and storage consumer lag (metrics wildfire_*).",
        "tags": ["wildfire"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{
            "name": "source", "label": "Source", "type": "query", "datasource": DATASOURCE,
            "query": {"query": "label_values(wildfire_spool_utilization, source)", "refId": "source"},
            "definition": "label_values(wildfire_spool_utilization, source)",
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
            "current": {"text": "All", "value": "$__all"},
        }]},
        "annotations": {"list": []},
        "panels": d.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    print(render(), end="")
