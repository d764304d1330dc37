"""Kafka to the wildfire database, in bounded runs on a continuous schedule.

When a run stores fire detections it updates the ``fire_detections`` Asset, so DAGs scheduled on that
asset (the California fire-activity summary) run when new detections land.

Pool ``wildfire_streaming``; ``execution_timeout`` = the default window + a 5-minute flush margin (a longer
``seconds`` is cut to fit). Failures are recorded on the operations page.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param, task

from wildfire.airflow.assets import FIRE_DETECTIONS
from wildfire.airflow.callbacks import FAILURE_ARGS
from wildfire.airflow.operators.storage import DEFAULT_SECONDS, StorageConsumerOperator, consumer_timeout
from wildfire.airflow.pools import PRIORITY_STREAM, STREAMING_POOL

with DAG(
    dag_id="storage_consumer",
    schedule="@continuous",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "storage"],
    default_args={"retries": 3, "retry_delay": timedelta(seconds=30), "priority_weight": PRIORITY_STREAM,
                  "weight_rule": "absolute", **FAILURE_ARGS},
    doc_md=__doc__,
    # Params reach the operator as the trigger form's values (dry_run=False a bool, limit an int).
    render_template_as_native_obj=True,
    params={"seconds": Param(DEFAULT_SECONDS, type="integer", minimum=1, maximum=DEFAULT_SECONDS,
                           title="Run window (seconds)")},
) as dag:
    consume = StorageConsumerOperator(task_id="consume", seconds="{{ params.seconds }}",
                                      execution_timeout=consumer_timeout(), pool=STREAMING_POOL)

    @task.short_circuit(retries=2)
    def stored_fire_detections(stats: dict) -> bool:
        return int((stats.get("stored_by_kind") or {}).get("fire_detection", 0)) > 0

    @task(outlets=[FIRE_DETECTIONS], retries=2)
    def announce_new_detections(stats: dict) -> int:
        return int(stats["stored_by_kind"]["fire_detection"])

    gate = stored_fire_detections(consume.output)
    gate >> announce_new_detections(consume.output)
