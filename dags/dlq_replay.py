"""Re-publish dead letters chosen by source, reason and time range (dry run by default); audited."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from wildfire.airflow.callbacks import FAILURE_ARGS
from wildfire.airflow.operators.dlq import DlqReplayOperator
from wildfire.airflow.pools import PRIORITY_BATCH

with DAG(
    dag_id="dlq_replay",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "operations"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30), "priority_weight": PRIORITY_BATCH,
                  "weight_rule": "absolute", **FAILURE_ARGS},
    doc_md=__doc__,
    # Params reach the operator as the trigger form's values (dry_run=False a bool, limit an int).
    render_template_as_native_obj=True,
    params={
        "source": Param("", type="string", title="Source (empty: all)"),
        "reason": Param("", type="string", title="Reason (empty: all)", description="e.g. publisher, bad_latitude"),
        "since": Param("", type="string", title="Created at or after (ISO time; empty: no bound)"),
        "until": Param("", type="string", title="Created before (ISO time; empty: no bound)"),
        "dry_run": Param(True, type="boolean", title="Dry run (count only)"),
        "limit": Param(10000, type="integer", minimum=1, maximum=1_000_000),
    },
) as dag:
    DlqReplayOperator(
        task_id="replay", source="{{ params.source }}", reason="{{ params.reason }}", since="{{ params.since }}",
        until="{{ params.until }}", dry_run="{{ params.dry_run }}", limit="{{ params.limit }}",
    )
