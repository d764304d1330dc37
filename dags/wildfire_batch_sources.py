"""Batch DAGs for the polling sources: each fetches once per schedule into the durable spool.

Each task publishes what it spooled and succeeds only once Kafka acknowledged it (under the
KubernetesExecutor the task's spool dies with its pod); when the stream worker shares the spool and drains
it, the task leaves the rows to it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from wildfire.airflow.operators.fetch import FetchToSpoolOperator

BATCH_SOURCES = {
    # dag id: (source name in the config, schedule)
    "firms_batch": ("nasa_firms", timedelta(minutes=15)),
    "nws_alerts_batch": ("nws_alerts", timedelta(minutes=5)),
    "nws_observations_batch": ("nws_observations", timedelta(hours=1)),
    "purpleair_batch": ("purpleair", timedelta(minutes=30)),
}

for dag_id, (source, every) in BATCH_SOURCES.items():
    with DAG(
        dag_id=dag_id,
        schedule=every,
        start_date=datetime(2025, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=["wildfire", "batch", source],
        default_args={"retries": 3, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True},
        doc_md=f"Fetch `{source}` once into the spool. {__doc__}",
    ) as dag:
        FetchToSpoolOperator(task_id=f"fetch_{source}", source=source, execution_timeout=timedelta(minutes=10))
    globals()[dag_id] = dag
