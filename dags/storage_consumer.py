"""Kafka to the wildfire database, in bounded runs on a continuous schedule.

When a run stores fire detections it updates the ``fire_detections`` Asset, so DAGs scheduled on that
asset (the daily California fire-activity summary) run when new detections land.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param, task

from wildfire.airflow.assets import FIRE_DETECTIONS
from wildfire.airflow.operators.storage import StorageConsumerOperator

with DAG(
    dag_id="storage_consumer",
    schedule="@continuous",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "storage"],
    default_args={"retries": 3, "retry_delay": timedelta(seconds=30)},
    doc_md=__doc__,
    # Params reach the operator as the trigger form's values (dry_run=False a bool, limit an int).
    render_template_as_native_obj=True,
    params={"seconds": Param(300, type="integer", minimum=1, maximum=86_400, title="Run window (seconds)")},
) as dag:
    consume = StorageConsumerOperator(task_id="consume", seconds="{{ params.seconds }}",
                                      execution_timeout=timedelta(hours=25))

    @task.short_circuit(retries=2)
    def stored_fire_detections(stats: dict) -> bool:
        return int((stats.get("stored_by_kind") or {}).get("fire_detection", 0)) > 0

    @task(outlets=[FIRE_DETECTIONS], retries=2)
    def announce_new_detections(stats: dict) -> int:
        return int(stats["stored_by_kind"]["fire_detection"])

    gate = stored_fire_detections(consume.output)
    gate >> announce_new_detections(consume.output)
