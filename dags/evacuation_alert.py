"""Evacuation alert: runs when a CRITICAL record lands on the alerts topic (event-driven, no polling DAG).

The triggerer watches ``alert_watch.topic`` (config/stream_config.yaml) through the ``kafka_default``
Connection (:class:`wildfire.airflow.triggers.alerts.CriticalAlertTrigger`); each fresh CRITICAL record
updates the ``wildfire_critical_alerts`` Asset, which runs this DAG with the alert in the Asset event.

- ``record``: one ``evacuation.alert`` row per alert in the audit log (the operations page lists it), with
  whether the alert is already in storage (the storage consumer may not have written it yet) and its area.
  An alert seen twice (a watcher restarted before committing its offset) gets no second row.
- ``area_summary``: the fire-activity summary (``wildfire.reports``) within ``alert_watch.area_radius_km``
  of the alert's location over the last 24 h, recorded as an ``evacuation.area_summary`` audit row; an alert
  without a location gets the California-wide summary.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, task

from wildfire.airflow.assets import critical_alerts_asset
from wildfire.airflow.callbacks import FAILURE_ARGS
from wildfire.airflow.pools import PRIORITY_ALERT
from wildfire.config import load_config

CRITICAL_ALERTS = critical_alerts_asset(load_config().alert_watch)

with DAG(
    dag_id="evacuation_alert",
    schedule=[CRITICAL_ALERTS],
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["wildfire", "alerts"],
    default_args={"retries": 3, "retry_delay": timedelta(seconds=10), "priority_weight": PRIORITY_ALERT,
                  "weight_rule": "absolute", **FAILURE_ARGS},
    doc_md=__doc__,
) as dag:

    def _engine() -> Any:
        import sqlalchemy as sa

        from wildfire.airflow.hooks.database import WildfireDbHook
        from wildfire.storage.migrate import sqlalchemy_url

        return sa.create_engine(sqlalchemy_url(WildfireDbHook().database_url()), poolclass=sa.pool.NullPool)

    @task
    def record(triggering_asset_events: Any = None) -> list[dict[str, Any]]:
        from wildfire.airflow.alerts import alerts_from_asset_events, record_alerts

        alerts = alerts_from_asset_events(triggering_asset_events)
        return record_alerts(_engine(), alerts)

    @task
    def area_summary(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from wildfire.airflow.alerts import summarize_alert_areas

        return summarize_alert_areas(_engine(), alerts, radius_km=load_config().alert_watch.area_radius_km)

    area_summary(record())
