"""Operations API handlers on real stores (PostgreSQL, Kafka, the spool file, an HTTP metrics endpoint).

Authentication is replaced here by FastAPI dependency overrides so the handlers can be driven
directly; ``test_api_airflow.py`` runs the same app inside a real ``airflow api-server`` with
Airflow's own authentication. Time is a ManualClock: heartbeat ages move by ``clock.advance``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from airflow.api_fastapi.core_api.security import get_user
from fastapi.testclient import TestClient

from tests.plugin.conftest import write_ops_config
from wildfire import ops_state
from wildfire.airflow import api
from wildfire.clock import ManualClock
from wildfire.storage.schema import dead_letters

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ops:
    """A TestClient on create_app() with a config file, a clock and a signed-in user."""

    def __init__(self, tmp_path: Path, *, database_url: str, bootstrap: str, user: str = "ops-tester") -> None:
        self.config = write_ops_config(tmp_path / "stream_config.yaml", database_url=database_url,
                                       bootstrap=bootstrap, spool_path=tmp_path / "spool.db")
        self.spool_path = tmp_path / "spool.db"
        self.clock = ManualClock(wall_start=time.time())
        self.app = api.create_app(config_path=self.config, environ={}, clock=self.clock, kafka_timeout_s=2.0,
                                  scrape_timeout_s=2.0)
        person = SimpleAuthManagerUser(username=user, role="admin")
        self.app.dependency_overrides[get_user] = lambda: person
        self.app.dependency_overrides[api.require_reader] = lambda: None
        self.app.dependency_overrides[api.require_config_writer] = lambda: None
        self.app.dependency_overrides[api.require_config_reader] = lambda: None
        self.client = TestClient(self.app)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.time(), UTC)


@pytest.fixture
def ops(tmp_path: Path, ops_db: str, kafka_bootstrap: str, clean_ops_tables: sa.Engine) -> Iterator[Ops]:
    o = Ops(tmp_path, database_url=ops_db, bootstrap=kafka_bootstrap)
    with o.client:
        yield o


def beat(ops: Ops, engine: sa.Engine, *, breaker: str = "CLOSED", worker_id: str = "w1", **state: object) -> None:
    ops_state.write_worker_status(engine, worker_id, api.STREAM_WORKER,
                                  {"breaker": {"state": breaker, "failures": 0}, **state}, now=ops.now())


# ---------------------------------------------------------------- /health


def test_health_ok_with_fresh_worker_and_closed_breaker(ops: Ops, ops_engine: sa.Engine) -> None:
    beat(ops, ops_engine)
    ops.clock.advance(30)
    resp = ops.client.get("/health")
    assert resp.status_code == 200, resp.json()
    body = resp.json()
    assert body["status"] == "ok" and body["reasons"] == []
    assert body["checks"]["heartbeat"]["age_s"] == 30.0
    assert body["checks"]["kafka"]["ok"] and body["checks"]["database"]["ok"]
    assert body["checks"]["spool"] == {"ok": True, "present": False,
                                       "detail": f"no spool file at {ops.spool_path} (no worker has run on this host)"}


def test_health_no_worker_yet_is_reported_distinctly(ops: Ops) -> None:
    resp = ops.client.get("/health")
    assert resp.status_code == 503
    assert resp.json()["reasons"] == ["heartbeat: no worker yet: no stream_worker heartbeat has ever been written"]


def test_health_stale_heartbeat_after_two_minutes(ops: Ops, ops_engine: sa.Engine) -> None:
    beat(ops, ops_engine)
    ops.clock.advance(120)
    assert ops.client.get("/health").status_code == 200  # exactly at the limit: still fresh
    ops.clock.advance(1)
    resp = ops.client.get("/health")
    assert resp.status_code == 503
    assert resp.json()["reasons"] == ["heartbeat: stream worker w1 silent for 121 s (limit 120 s)"]


def test_health_breaker_open(ops: Ops, ops_engine: sa.Engine) -> None:
    beat(ops, ops_engine, breaker="OPEN")
    resp = ops.client.get("/health")
    assert resp.status_code == 503
    assert resp.json()["reasons"] == ["breaker: circuit breaker OPEN in worker w1 (0 failures)"]


def test_health_only_the_newest_worker_counts(ops: Ops, ops_engine: sa.Engine) -> None:
    beat(ops, ops_engine, breaker="OPEN", worker_id="old")
    ops.clock.advance(10)
    beat(ops, ops_engine, breaker="CLOSED", worker_id="new")
    assert ops.client.get("/health").status_code == 200


def test_health_kafka_unreachable(tmp_path: Path, ops_db: str, clean_ops_tables: sa.Engine) -> None:
    o = Ops(tmp_path, database_url=ops_db, bootstrap=f"127.0.0.1:{_closed_port()}")
    beat(o, clean_ops_tables)
    resp = o.client.get("/health")
    assert resp.status_code == 503
    (reason,) = resp.json()["reasons"]
    assert reason.startswith("kafka: Kafka at 127.0.0.1:") and "unreachable" in reason


def test_health_database_unreachable(tmp_path: Path, kafka_bootstrap: str) -> None:
    url = f"postgresql://wildfire:wildfire@127.0.0.1:{_closed_port()}/wildfire"
    o = Ops(tmp_path, database_url=url, bootstrap=kafka_bootstrap)
    resp = o.client.get("/health")
    assert resp.status_code == 503
    reasons = resp.json()["reasons"]
    assert reasons[0].startswith("database: database unreachable:")
    assert reasons[1] == "heartbeat: unknown: database unreachable"


def test_health_reads_spool_depth_from_the_spool_file(ops: Ops, ops_engine: sa.Engine) -> None:
    from wildfire.config import load_config
    from wildfire.priority import Priority
    from wildfire.records import Record
    from wildfire.spool import BufferManager

    cfg = load_config(ops.config, environ={})
    spool = BufferManager(cfg.spool, cfg.sources, path=ops.spool_path)
    for i, prio in enumerate([Priority.CRITICAL, Priority.LOW, Priority.LOW]):
        spool.put(Record(source="nasa_firms", kind="fire_detection", key=f"k{i}", priority=prio,
                         event_time=datetime(2025, 8, 1, tzinfo=UTC), payload={"frp": 1.0}))
    spool.close()
    beat(ops, ops_engine)
    spool_check = ops.client.get("/health").json()["checks"]["spool"]
    assert spool_check["ok"] and spool_check["present"]
    assert spool_check["depth"] == {"CRITICAL": 1, "LOW": 2}


def test_invalid_config_file_makes_health_unhealthy_naming_the_field(ops: Ops) -> None:
    ops.config.write_text("queue:\n  max_size: 0\n", encoding="utf-8")
    resp = ops.client.get("/health")
    assert resp.status_code == 503
    assert "queue.max_size" in resp.json()["reasons"][0]


# ---------------------------------------------------------------- /config


def test_patch_invalid_is_rejected_with_the_field_named_and_nothing_audited(ops: Ops, ops_engine: sa.Engine) -> None:
    resp = ops.client.patch("/config", json={"throttling": {"target_consumer_lag": -5}})
    assert resp.status_code == 422
    assert resp.json()["detail"]["errors"] == [
        "throttling.target_consumer_lag: Input should be greater than or equal to 0 (got -5)"]
    assert ops_state.recent_audit(ops_engine) == []


def test_patch_cross_field_rule_uses_the_whole_config(ops: Ops, ops_engine: sa.Engine) -> None:
    # 250000 alone is a valid int, but not below the file's critical_consumer_lag (200000 default).
    resp = ops.client.patch("/config", json={"throttling": {"target_consumer_lag": 250000}})
    assert resp.status_code == 422
    assert "target_consumer_lag < critical_consumer_lag" in resp.json()["detail"]["errors"][0]


@pytest.mark.parametrize(("body", "error"), [
    ([1, 2], "<body>: expected a non-empty JSON object of config sections, got list"),
    ({}, "<body>: expected a non-empty JSON object of config sections, got dict"),
    ({"storage": {"batch_size": 10}}, "storage: cannot be overridden at run time"),
    ({"queue": {"max_sise": 10}}, "queue.max_sise: Extra inputs are not permitted (got 10)"),
])
def test_patch_bad_bodies(ops: Ops, body: object, error: str) -> None:
    resp = ops.client.patch("/config", json=body)
    assert resp.status_code == 422
    assert resp.json()["detail"]["errors"][0].startswith(error)


def test_patch_valid_is_merged_applied_and_audited(ops: Ops, ops_engine: sa.Engine) -> None:
    r1 = ops.client.patch("/config", json={"throttling": {"target_consumer_lag": 500}})
    assert r1.status_code == 200, r1.json()
    r2 = ops.client.patch("/config", json={"queue": {"max_size": 2000}, "backpressure": {"fire_season": {"mode": "on"}}})
    assert r2.status_code == 200, r2.json()
    expected = {"throttling": {"target_consumer_lag": 500}, "queue": {"max_size": 2000},
                "backpressure": {"fire_season": {"mode": "on"}}}
    assert r2.json()["overrides"] == expected

    # The newest config.patch row is the full set in force, with what changed and who did it.
    audit_id, overrides = ops_state.current_overrides(ops_engine)
    assert (audit_id, overrides) == (r2.json()["audit_id"], expected)
    row = ops_state.recent_audit(ops_engine, limit=1)[0]
    assert row["actor"] == "ops-tester" and row["action"] == "config.patch"
    assert row["detail"]["changed"] == {"queue": {"max_size": 2000}, "backpressure": {"fire_season": {"mode": "on"}}}
    assert row["detail"]["previous"] == {"throttling": {"target_consumer_lag": 500}}
    assert row["detail"]["base_id"] == r1.json()["audit_id"]

    got = ops.client.get("/config").json()
    assert got["overrides"] == expected and got["error"] is None
    assert got["effective"]["throttling"]["target_consumer_lag"] == 500
    assert got["effective"]["queue"]["max_size"] == 2000
    assert got["effective"]["storage"]["database_url"].startswith("postgresql://wildfire:***@")


def test_patch_null_removes_an_override(ops: Ops, ops_engine: sa.Engine) -> None:
    ops.client.patch("/config", json={"queue": {"max_size": 2000}, "throttling": {"max_level": 3}})
    resp = ops.client.patch("/config", json={"queue": {"max_size": None}})
    assert resp.json()["overrides"] == {"throttling": {"max_level": 3}}
    assert ops.client.get("/config").json()["effective"]["queue"]["max_size"] == 10_000


def test_config_shows_overrides_made_invalid_by_a_file_edit(ops: Ops) -> None:
    assert ops.client.patch("/config", json={"throttling": {"target_consumer_lag": 3000}}).status_code == 200
    ops.config.write_text(ops.config.read_text() + "throttling:\n  target_consumer_lag: 1000\n  critical_consumer_lag: 2000\n",
                          encoding="utf-8")
    got = ops.client.get("/config").json()
    assert "target_consumer_lag < critical_consumer_lag" in got["error"][0]
    assert got["effective"]["throttling"]["target_consumer_lag"] == 1000  # the file's, overrides not applied


def test_merge_overrides_keeps_input_untouched() -> None:
    current = {"a": {"b": 1, "c": 2}}
    assert api.merge_overrides(current, {"a": {"b": None}, "d": {"e": None}}) == {"a": {"c": 2}}
    assert current == {"a": {"b": 1, "c": 2}}


# ---------------------------------------------------------------- /metrics and /status


@pytest.fixture
def worker_metrics_endpoint() -> Iterator[str]:
    """A real Prometheus endpoint, as the worker serves it."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    registry = CollectorRegistry()
    Counter("wildfire_published_records", "acked", ["topic"], registry=registry).labels("wildfire-iot").inc(42)
    Gauge("wildfire_queue_depth", "depth", ["priority"], registry=registry).labels("HIGH").set(7)
    port = _closed_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_metrics_aggregates_worker_endpoint_and_db_gauges(ops: Ops, ops_engine: sa.Engine,
                                                         worker_metrics_endpoint: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    beat(ops, ops_engine, worker_id="w1", metrics_url=worker_metrics_endpoint)
    beat(ops, ops_engine, worker_id="w2", metrics_url=f"http://127.0.0.1:{_closed_port()}/metrics")
    with ops_engine.begin() as conn:
        conn.execute(dead_letters.insert(), [
            {"topic": "t", "partition": 0, "offset": i, "reason": "decode", "error": "bad json"} for i in range(3)])
    ops.clock.advance(12)
    resp = ops.client.get("/metrics")
    assert resp.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(resp.text) for s in fam.samples}
    assert samples[("wildfire_published_records_total", (("topic", "wildfire-iot"), ("worker_id", "w1")))] == 42
    assert samples[("wildfire_queue_depth", (("priority", "HIGH"), ("worker_id", "w1")))] == 7
    assert samples[("wildfire_ops_worker_scrape_up", (("worker_id", "w1"),))] == 1
    assert samples[("wildfire_ops_worker_scrape_up", (("worker_id", "w2"),))] == 0
    assert samples[("wildfire_ops_worker_heartbeat_age_seconds",
                    (("component", "stream_worker"), ("worker_id", "w1")))] == 12
    assert samples[("wildfire_ops_dead_letters", ())] == 3


def test_status_returns_worker_state_audit_and_dead_letters(ops: Ops, ops_engine: sa.Engine) -> None:
    state = {"queue": {"depth": {"HIGH": 3}, "max_size": 100, "fill": 0.03}, "published": 17}
    beat(ops, ops_engine, **state)
    ops.client.patch("/config", json={"queue": {"max_size": 2000}})
    with ops_engine.begin() as conn:
        conn.execute(dead_letters.insert().values(topic="t", partition=0, offset=1, reason="schema", error="x"))
    ops.clock.advance(5)
    body = ops.client.get("/status").json()
    (w,) = body["workers"]
    assert w["state"]["published"] == 17 and w["state"]["queue"]["depth"] == {"HIGH": 3}
    assert (w["age_s"], w["stale"]) == (5.0, False)
    assert body["audit"][0]["actor"] == "ops-tester"
    assert body["overrides"] == {"queue": {"max_size": 2000}}
    assert body["dead_letters"]["total"] == 1 and body["dead_letters"]["by_reason"] == {"schema": 1}
    assert body["database"] == "ok"


def test_ops_page_is_self_contained(ops: Ops) -> None:
    resp = ops.client.get("/ops")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert 'data-metric="published"' in html and 'fetch(url' in html
    # No external resources: the page must work without internet.
    assert "http://" not in html and "https://" not in html and "<link" not in html


def test_unauthenticated_is_refused_without_overrides(tmp_path: Path, ops_db: str, kafka_bootstrap: str) -> None:
    # No auth override: Airflow's dependency itself rejects a request with no token or cookie.
    o = Ops(tmp_path, database_url=ops_db, bootstrap=kafka_bootstrap)
    o.app.dependency_overrides.clear()
    for method, path in [("GET", "/health"), ("GET", "/status"), ("GET", "/ops"), ("GET", "/metrics"),
                         ("GET", "/config"), ("PATCH", "/config")]:
        resp = o.client.request(method, path, json={"queue": {"max_size": 5}} if method == "PATCH" else None)
        assert resp.status_code == 401, (method, path, resp.status_code)


# ---------------------------------------------------------------- overrides are safe


@pytest.mark.parametrize(("body", "key"), [
    ({"spool": {"ttl_seconds": 0.001}}, "spool.ttl_seconds: must be at least 3600 s"),
    ({"spool": {"path": "/tmp/elsewhere.db"}}, "spool.path: paths are not overridable"),
    ({"spool": {"archive_expired_path": "/etc/cron.d/x"}}, "spool.archive_expired_path: paths are not overridable"),
    ({"sources": {"nasa_firms": {"enabled": False}}}, "sources.nasa_firms.enabled: is not applied by a running"),
    ({"sources": {"nasa_firms": {"options": {"day_range": 2}}}}, "sources.nasa_firms.options.day_range: is not"),
    ({"kafka": {"linger_ms": 5}}, "kafka: Kafka client settings are read when the producer is built"),
    ({"worker": {"run_minutes": 5}}, "worker.run_minutes: is not applied by a running"),
])
def test_patch_refuses_keys_a_running_worker_does_not_apply(ops: Ops, ops_engine: sa.Engine, body: dict,
                                                            key: str) -> None:
    resp = ops.client.patch("/config", json=body)
    assert resp.status_code == 422, resp.json()
    assert any(e.startswith(key) for e in resp.json()["detail"]["errors"]), resp.json()
    assert ops_state.recent_audit(ops_engine) == []


def test_patch_a_layer_would_refuse_is_refused_before_reaching_the_worker(ops: Ops, ops_engine: sa.Engine) -> None:
    # Valid field by field, but BackpressureManager.reconfigure raises on it inside a running worker.
    resp = ops.client.patch("/config", json={"backpressure": {"shedding_threshold": 0.97,
                                                              "fire_season": {"critical_threshold": 0.99}}})
    assert resp.status_code == 422
    assert "fire_season.critical_threshold <= shedding_threshold" in resp.json()["detail"]["errors"][0]
    assert ops_state.recent_audit(ops_engine) == []


def test_patch_names_every_refused_key_at_once(ops: Ops) -> None:
    resp = ops.client.patch("/config", json={"spool": {"ttl_seconds": 1, "path": "/x"}, "queue": {"max_size": 5},
                                             "sources": {"purpleair": {"enabled": False}}})
    assert resp.status_code == 422
    assert sorted(e.split(":", 1)[0] for e in resp.json()["detail"]["errors"]) == [
        "sources.purpleair.enabled", "spool.path", "spool.ttl_seconds"]


def test_patch_live_keys_within_bounds_are_accepted(ops: Ops) -> None:
    body = {"spool": {"ttl_seconds": 7200, "capacity_per_source": 5000},
            "sources": {"nasa_firms": {"capacity": 50_000, "overflow_strategy": "drop_oldest"}},
            "worker": {"config_reload_s": 2}}
    resp = ops.client.patch("/config", json=body)
    assert resp.status_code == 200, resp.json()
    eff = ops.client.get("/config").json()["effective"]
    assert eff["spool"]["ttl_seconds"] == 7200 and eff["sources"]["nasa_firms"]["capacity"] == 50_000


def test_a_stored_refused_override_blocks_patches_until_removed(ops: Ops, ops_engine: sa.Engine) -> None:
    # Written before the allow-list existed (or straight into the database).
    ops_state.append_audit(ops_engine, "old", ops_state.CONFIG_PATCH,
                           {"overrides": {"sources": {"nasa_firms": {"enabled": False}}}})
    resp = ops.client.patch("/config", json={"queue": {"max_size": 2000}})
    assert resp.status_code == 422
    assert resp.json()["detail"]["errors"][0].startswith("sources.nasa_firms.enabled:")
    resp = ops.client.patch("/config", json={"sources": {"nasa_firms": {"enabled": None}}, "queue": {"max_size": 2000}})
    assert resp.status_code == 200, resp.json()
    assert resp.json()["overrides"] == {"queue": {"max_size": 2000}}


# ---------------------------------------------------------------- secrets and access


def test_config_masks_secrets_in_query_strings_and_source_options(tmp_path: Path, ops_db: str, kafka_bootstrap: str,
                                                                   clean_ops_tables: sa.Engine) -> None:
    import yaml

    o = Ops(tmp_path, database_url=ops_db, bootstrap=kafka_bootstrap)
    data = yaml.safe_load(o.config.read_text())
    data["storage"]["database_url"] = ops_db + "?password=wildfire&application_name=ops-test"
    data["sources"] = {"nasa_firms": {"options": {"map_key": "MAPKEY-SECRET-1", "day_range": 1,
                                                  "mirror": "https://firms.example/api?api_key=APIKEY-SECRET-2&x=1",
                                                  "proxy": "http://bob:PROXY-SECRET-3@proxy:3128"}}}
    o.config.write_text(yaml.safe_dump(data))
    ops_state.append_audit(clean_ops_tables, "t", ops_state.CONFIG_PATCH,
                           {"overrides": {"throttling": {"max_level": 3}}})
    resp = o.client.get("/config")
    assert resp.status_code == 200, resp.json()
    text = resp.text
    for secret in ("MAPKEY-SECRET-1", "APIKEY-SECRET-2", "PROXY-SECRET-3", "password=wildfire"):
        assert secret not in text
    eff = resp.json()["effective"]
    assert eff["storage"]["database_url"].startswith("postgresql://wildfire:***@127.0.0.1:")
    assert "password=***" in eff["storage"]["database_url"]
    opts = eff["sources"]["nasa_firms"]["options"]
    assert opts["map_key"] == "***" and opts["day_range"] == 1
    assert opts["mirror"] == "https://firms.example/api?api_key=***&x=1"
    assert opts["proxy"] == "http://bob:***@proxy:3128"


def test_config_read_needs_configuration_access_from_the_auth_manager(tmp_path: Path, ops_db: str,
                                                                       kafka_bootstrap: str) -> None:
    # Airflow's own SimpleAuthManager decides (not an override): a user with no role has no configuration
    # access; a Viewer has read access only.
    from airflow.api_fastapi.app import create_auth_manager

    create_auth_manager()
    o = Ops(tmp_path, database_url=ops_db, bootstrap=kafka_bootstrap)
    del o.app.dependency_overrides[api.require_config_reader]
    del o.app.dependency_overrides[api.require_config_writer]
    nobody = SimpleAuthManagerUser(username="nobody", role=None)
    o.app.dependency_overrides[get_user] = lambda: nobody
    assert o.client.get("/config").status_code == 403
    assert o.client.patch("/config", json={"queue": {"max_size": 5}}).status_code == 403
    assert o.client.get("/status").status_code == 200  # a login is enough for the page's data
    viewer = SimpleAuthManagerUser(username="viewer", role="viewer")
    o.app.dependency_overrides[get_user] = lambda: viewer
    assert o.client.get("/config").status_code == 200
    assert o.client.patch("/config", json={"queue": {"max_size": 5}}).status_code == 403


# ---------------------------------------------------------------- worker_status is bounded


def test_status_lists_only_recent_workers_and_prune_deletes_old_rows(ops: Ops, ops_engine: sa.Engine) -> None:
    now = ops.now()
    for i in range(3):
        ops_state.write_worker_status(ops_engine, f"stream_worker-dead-{i}", api.STREAM_WORKER, {},
                                      now=now - timedelta(days=2 + i))
    beat(ops, ops_engine, worker_id="live")
    body = ops.client.get("/status").json()
    assert [w["worker_id"] for w in body["workers"]] == ["live"]  # default retention 24 h
    assert ops_state.prune_worker_status(ops_engine, timedelta(hours=24), now=now) == 3
    assert [r["worker_id"] for r in ops_state.read_worker_status(ops_engine)] == ["live"]


def test_status_returns_at_most_max_workers(ops: Ops, ops_engine: sa.Engine) -> None:
    now = ops.now()
    with ops_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO worker_status (worker_id, component, heartbeat, state) "
                             "SELECT 'w' || g, 'stream_worker', :now - g * interval '1 second', '{}' "
                             "FROM generate_series(1, :n) g"), {"now": now, "n": api.MAX_WORKERS + 50})
    workers = ops.client.get("/status").json()["workers"]
    assert len(workers) == api.MAX_WORKERS
    assert workers[0]["worker_id"] == "w1"  # newest first
