"""The plugin inside a real ``airflow api-server``: mounted under /wildfire, protected by Airflow's auth.

The server is started once per session by the ``airflow_server`` fixture (own AIRFLOW_HOME, port,
users admin/Admin and viewer/Viewer, a config file pointing at a private PostgreSQL database).
"""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa

from wildfire import ops_state

pytestmark = [pytest.mark.airflow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.slow]

ROUTES = [("GET", "/wildfire/health"), ("GET", "/wildfire/metrics"), ("GET", "/wildfire/config"),
          ("PATCH", "/wildfire/config"), ("GET", "/wildfire/status"), ("GET", "/wildfire/ops")]


def call(server, method: str, path: str, token: str | None = None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_unauthenticated_calls_are_refused(airflow_server, method: str, path: str) -> None:
    resp = call(airflow_server, method, path, json={"queue": {"max_size": 5}} if method == "PATCH" else None)
    assert resp.status_code == 401, resp.text


def test_forged_token_is_refused(airflow_server) -> None:
    resp = call(airflow_server, "GET", "/wildfire/status", token="eyJhbGciOiJIUzUxMiJ9.e30.bm90LWEtc2lnbmF0dXJl")
    assert resp.status_code in (401, 403)


def test_authenticated_reads(airflow_server, clean_ops_tables: sa.Engine) -> None:
    token = airflow_server.token("admin")
    ops_state.write_worker_status(clean_ops_tables, "w-live", "stream_worker",
                                  {"breaker": {"state": "CLOSED", "failures": 0}, "published": 3})
    health = call(airflow_server, "GET", "/wildfire/health", token)
    assert health.status_code == 200, health.json()
    status = call(airflow_server, "GET", "/wildfire/status", token).json()
    assert [w["worker_id"] for w in status["workers"]] == ["w-live"]
    page = call(airflow_server, "GET", "/wildfire/ops", token)
    assert page.status_code == 200 and 'data-metric="published"' in page.text
    metrics = call(airflow_server, "GET", "/wildfire/metrics", token)
    assert metrics.status_code == 200 and "wildfire_ops_worker_heartbeat_age_seconds" in metrics.text


def test_invalid_patch_rejected_with_field_named(airflow_server, clean_ops_tables: sa.Engine) -> None:
    resp = call(airflow_server, "PATCH", "/wildfire/config", airflow_server.token("admin"),
                json={"throttling": {"target_consumer_lag": -5}})
    assert resp.status_code == 422
    assert resp.json()["detail"]["errors"] == [
        "throttling.target_consumer_lag: Input should be greater than or equal to 0 (got -5)"]
    assert ops_state.recent_audit(clean_ops_tables) == []


def test_valid_patch_applied_and_audited_with_the_airflow_user(airflow_server, clean_ops_tables: sa.Engine) -> None:
    token = airflow_server.token("admin")
    resp = call(airflow_server, "PATCH", "/wildfire/config", token, json={"throttling": {"target_consumer_lag": 400}})
    assert resp.status_code == 200, resp.text
    (row,) = ops_state.recent_audit(clean_ops_tables)
    assert (row["actor"], row["action"]) == ("admin", "config.patch")
    assert row["detail"]["overrides"] == {"throttling": {"target_consumer_lag": 400}}
    got = call(airflow_server, "GET", "/wildfire/config", token).json()
    assert got["effective"]["throttling"]["target_consumer_lag"] == 400


def test_viewer_may_read_but_not_patch(airflow_server, clean_ops_tables: sa.Engine) -> None:
    token = airflow_server.token("viewer")
    assert call(airflow_server, "GET", "/wildfire/config", token).status_code == 200
    resp = call(airflow_server, "PATCH", "/wildfire/config", token, json={"queue": {"max_size": 5}})
    assert resp.status_code == 403
    assert ops_state.recent_audit(clean_ops_tables) == []


def test_plugin_registered_with_nav_view(airflow_server) -> None:
    plugins = call(airflow_server, "GET", "/api/v2/plugins", airflow_server.token("admin")).json()["plugins"]
    (ours,) = [p for p in plugins if p["name"] == "wildfire_ops"]
    assert ours["fastapi_apps"][0]["url_prefix"] == "/wildfire"
    (view,) = ours["external_views"]
    assert (view["href"], view["destination"], view["url_route"]) == ("/wildfire/ops", "nav", "wildfire-ops")
