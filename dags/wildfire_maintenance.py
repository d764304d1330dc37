"""Daily upkeep: the Kafka topics from the config (idempotent) and the dead-letter retention.

- ``ensure_topics``: creates missing topics, grows partition counts (never shrinks).
- ``prune_dead_letters``: deletes ``dead_letters`` rows older than ``storage.dead_letter_retention_days``
  (null: keeps every row) in batches of 10,000 rows per transaction (``wildfire.storage.retention``). The
  ``dlq_replay`` DAG reads that table: a dead letter is replayable for the retention, not after.

Runs daily and on demand; safe to re-run at any time (a prune stopped part-way is finished by the next run).
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

    @task
    def prune_dead_letters() -> dict:
        from wildfire.config import load_config
        from wildfire.storage.migrate import database_url
        from wildfire.storage.retention import prune_dead_letters as _prune

        cfg = load_config()
        # Inside Airflow the wildfire_db Connection; the URL (and its password) is never logged.
        result = _prune(database_url(cfg.storage), cfg.storage.dead_letter_retention_days)
        return result.as_dict()  # a handful of numbers: a small XCom

    ensure_topics()
    prune_dead_letters()


wildfire_maintenance()
