"""Batch DAGs for the polling sources: each fetches once per schedule into the durable spool.

Each task publishes what it spooled and succeeds only once Kafka acknowledged it (under the
KubernetesExecutor the task's spool dies with its pod); when the stream worker shares the spool and drains
it, the task leaves the rows to it.

No double polling: a task whose source a live stream worker polls right now (its ``worker_status`` row beat
within 2 minutes and lists the source under ``polling``) is skipped, and its log names the worker and its
heartbeat. An unreadable status database means the task polls (a possible double quota, logged), never that
the data path stops. ``nws_alerts_batch`` has the highest priority weight (alert path); failures are recorded
on the operations page.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from wildfire.airflow.callbacks import FAILURE_ARGS
from wildfire.airflow.operators.fetch import FetchToSpoolOperator
from wildfire.airflow.pools import PRIORITY_ALERT, PRIORITY_BATCH

BATCH_SOURCES = {
    # dag id: (source name in the config, schedule, priority weight)
    "firms_batch": ("nasa_firms", timedelta(minutes=15), PRIORITY_BATCH),
    "nws_alerts_batch": ("nws_alerts", timedelta(minutes=5), PRIORITY_ALERT),
    "nws_observations_batch": ("nws_observations", timedelta(hours=1), PRIORITY_BATCH),
    "purpleair_batch": ("purpleair", timedelta(minutes=30), PRIORITY_BATCH),
}

for dag_id, (source, every, weight) in BATCH_SOURCES.items():
    with DAG(
        dag_id=dag_id,
        schedule=every,
        start_date=datetime(2025, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=["wildfire", "batch", source],
        default_args={"retries": 3, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True,
                      "priority_weight": weight, "weight_rule": "absolute", **FAILURE_ARGS},
        doc_md=f"Fetch `{source}` once into the spool. {__doc__}",
    ) as dag:
        FetchToSpoolOperator(task_id=f"fetch_{source}", source=source, execution_timeout=timedelta(minutes=10))
    globals()[dag_id] = dag
