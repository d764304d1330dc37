"""ERA5 backfill: one mapped task per day of the chosen range, LOW priority (shed first under load).

The days start once the storage consumer group's lag is under ``throttling.target_consumer_lag``
(``wait_for_consumer_lag``, a deferrable ConsumerLagSensor on the ``kafka_default`` Connection).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta

from airflow.sdk import DAG, Param, task

from wildfire.airflow.callbacks import FAILURE_ARGS
from wildfire.airflow.operators.era5 import Era5DayToSpoolOperator
from wildfire.airflow.pools import BACKFILL_POOL, PRIORITY_BACKFILL
from wildfire.airflow.sensors.lag import ConsumerLagSensor

with DAG(
    dag_id="era5_backfill",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "backfill", "era5"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), "priority_weight": PRIORITY_BACKFILL,
                  "weight_rule": "absolute", **FAILURE_ARGS},
    doc_md=__doc__,
    # Params reach the operator as the values the trigger form gave (download=False stays a bool, not "False").
    render_template_as_native_obj=True,
    params={
        "start_date": Param("2017-01-01", type="string", format="date", title="First day"),
        "end_date": Param("2017-01-01", type="string", format="date", title="Last day (inclusive)"),
        "data_dir": Param("include/era5", type="string", title="Folder with era5_YYYY-MM-DD.grib files"),
        "download": Param(False, type="boolean", title="Download missing days with cdsapi"),
    },
) as dag:

    @task(retries=2)
    def days(params: dict | None = None) -> list[str]:
        start = date.fromisoformat(params["start_date"])
        end = date.fromisoformat(params["end_date"])
        if end < start:
            raise ValueError(f"end_date {end} is before start_date {start}")
        if (end - start).days > 366:
            raise ValueError(f"{(end - start).days + 1} days requested; split backfills into at most a year")
        return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]

    # Deferrable (the slot is freed while it waits): no day starts while the storage consumer is behind.
    wait_for_lag = ConsumerLagSensor(task_id="wait_for_consumer_lag", poll_interval_s=30, timeout=6 * 3600)

    wait_for_lag >> Era5DayToSpoolOperator.partial(
        task_id="load_day", data_dir="{{ params.data_dir }}", download="{{ params.download }}",
        max_active_tis_per_dag=2, pool=BACKFILL_POOL,
    ).expand(day=days())
