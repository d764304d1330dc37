"""Coverage watch: find gaps in each source's coverage ledger and start the backfill that can still close them.

Every 15 minutes ``watch`` reads the ledger (``wildfire.coverage``): a gap about to pass beyond the source's
upstream history is logged as ERROR; a closed gap still within history of a source with a backfill DAG
(FIRMS -> ``firms_archive_backfill``, ERA5 -> ``era5_backfill``) is claimed once in ``coverage_backfills`` and
``start_backfill`` triggers that DAG's run with the gap's dates (one mapped trigger per gap, run id
``coverage__<source>__<gap start>__<gap end>``; an existing run of that id is skipped, not repeated).
NWS and PurpleAir gaps are reported on the operations page and in ``/metrics``, never backfilled.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task

from wildfire.airflow.callbacks import FAILURE_ARGS
from wildfire.airflow.pools import PRIORITY_BATCH


@dag(
    dag_id="coverage_watch",
    schedule=timedelta(minutes=15),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "maintenance", "coverage"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30), "priority_weight": PRIORITY_BATCH,
                  "weight_rule": "absolute", **FAILURE_ARGS},
    doc_md=__doc__,
)
def coverage_watch():
    @task
    def watch() -> list[dict]:
        from datetime import UTC
        from datetime import datetime as dt

        from wildfire import ops_state
        from wildfire.config import load_config
        from wildfire.coverage import claim_backfills

        config = load_config()
        engine = ops_state.engine_for(config, connect_timeout_s=10.0, statement_timeout_s=30.0)
        try:
            return claim_backfills(engine, config, dt.now(UTC))
        finally:
            engine.dispose()

    TriggerDagRunOperator.partial(
        task_id="start_backfill", skip_when_already_exists=True, wait_for_completion=False,
    ).expand_kwargs(watch())


coverage_watch()
