"""Fire-activity summary: daily at 06:00 UTC, and again whenever new fire detections land.

Schedule: ``AssetOrTimeSchedule``: a daily run (cron ``0 6 * * *``, UTC), so the day's summary exists even
on a day without detections, or, during a fire, each time the ``fire_detections`` Asset is updated by the
storage consumer (one run at a time; updates that arrive while a run is going are served by the next one).

Reports (``wildfire.reports.fire_activity_summary``): detections in California over the last ``hours``
(count, total FRP, by satellite, hottest), the NWS alerts in force now (cancelled and expired ones left
out), and the detections of the window inside the polygon of an alert in force (PostgreSQL with
PostGIS; on other stores the report says it is unavailable).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param, task
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable

from wildfire.airflow.assets import FIRE_DETECTIONS
from wildfire.airflow.callbacks import FAILURE_ARGS
from wildfire.airflow.pools import PRIORITY_BATCH

DAILY_AT = "0 6 * * *"

with DAG(
    dag_id="fire_activity_summary",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(DAILY_AT, timezone="UTC"), assets=[FIRE_DETECTIONS]),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "reporting"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1), "priority_weight": PRIORITY_BATCH,
                  "weight_rule": "absolute", **FAILURE_ARGS},
    doc_md=__doc__,
    params={"hours": Param(24, type="integer", minimum=1, maximum=24 * 366 * 20, title="Window (hours)")},
) as dag:

    @task(retries=2)
    def summarize(params: dict | None = None) -> dict:
        import sqlalchemy as sa

        from wildfire.airflow.hooks.database import WildfireDbHook
        from wildfire.reports import fire_activity_summary
        from wildfire.storage.migrate import sqlalchemy_url

        engine = sa.create_engine(sqlalchemy_url(WildfireDbHook().database_url()))
        return fire_activity_summary(engine, hours=int(params["hours"]))

    summarize()
