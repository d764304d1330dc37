"""Set-up the pipeline needs before anything flows: Kafka topics from the config (idempotent).

Runs daily and on demand; safe to re-run at any time.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

from wildfire.airflow.callbacks import FAILURE_ARGS
from wildfire.airflow.pools import PRIORITY_BATCH


@dag(
    dag_id="wildfire_maintenance",
    schedule="@daily",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "maintenance"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30), "priority_weight": PRIORITY_BATCH,
                  "weight_rule": "absolute", **FAILURE_ARGS},
    doc_md=__doc__,
)
def wildfire_maintenance():
    @task
    def ensure_topics() -> dict:
        from wildfire.config import load_config
        from wildfire.topics import ensure_topics as _ensure

        report = _ensure(load_config())
        return {"created": list(report.created), "existing": list(report.existing), "grown": list(report.grown)}

    ensure_topics()


wildfire_maintenance()
