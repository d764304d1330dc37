"""Historical FIRMS (standard-processing archive, or the NRT products for recent days) into the spool, LOW
priority: one mapped task per day, then published to Kafka: a day's task succeeds once the broker acknowledged
every record of it, and the day is then recorded in the coverage ledger (``wildfire.coverage``). Started by hand,
or by ``coverage_watch`` for a gap in FIRMS coverage.

A failed day is retried (and can be cleared) on its own; at most two days run at once, so a long backfill
never takes every task slot, and each day's admission report is its task's return value. The days start only
once the storage consumer group's lag is under ``throttling.target_consumer_lag`` (``wait_for_consumer_lag``, a
deferrable ConsumerLagSensor on the ``kafka_default`` Connection), so a backfill does not flood a pipeline that
is already behind.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param, task

from wildfire.airflow.callbacks import FAILURE_ARGS
from wildfire.airflow.pools import BACKFILL_POOL, PRIORITY_BACKFILL
from wildfire.airflow.sensors.lag import ConsumerLagSensor

with DAG(
    dag_id="firms_archive_backfill",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "backfill", "nasa_firms"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5), "priority_weight": PRIORITY_BACKFILL,
                  "weight_rule": "absolute", **FAILURE_ARGS},
    doc_md=__doc__,
    # Params reach the tasks as the trigger form's values (sources a list, not its text).
    render_template_as_native_obj=True,
    params={
        "start_date": Param("2024-08-01", type="string", format="date", title="First day"),
        "end_date": Param("2024-08-05", type="string", format="date", title="Last day (inclusive)"),
        "sources": Param(["VIIRS_SNPP_SP", "MODIS_SP"], type="array",
                         items={"type": "string", "enum": [
                             "VIIRS_SNPP_SP", "VIIRS_NOAA20_SP", "MODIS_SP", "LANDSAT_NRT",
                             # Recent days (coverage_watch's gaps) exist only as NRT until the SP archive has them.
                             "VIIRS_SNPP_NRT", "VIIRS_NOAA20_NRT", "VIIRS_NOAA21_NRT", "MODIS_NRT"]}),
    },
) as dag:

    @task(retries=2)
    def days(params: dict | None = None) -> list[str]:
        from wildfire.airflow.params import day_range

        return day_range(params["start_date"], params["end_date"])

    @task(retries=2, max_active_tis_per_dag=2, pool=BACKFILL_POOL)
    def backfill_day(day: str, params: dict | None = None) -> dict:
        import asyncio
        from datetime import date

        import httpx

        from wildfire import settings
        from wildfire.airflow.operators.fetch import open_pipeline, publish_spool
        from wildfire.config import build_config, load_config
        from wildfire.connectors.firms import FirmsConnector

        sources = params["sources"]
        if isinstance(sources, str) or not all(isinstance(s, str) for s in sources):
            raise ValueError(f"param 'sources' must be a list of FIRMS source names, got {sources!r}")
        base = load_config()
        # The archive is history: LOW priority, so live detections always go first.
        config = build_config(base.model_dump(mode="json"), {"sources": {"nasa_firms": {
            "record_priority": "LOW", "options": {"sources": list(sources)}}}})
        ep = settings.endpoints()
        the_day = date.fromisoformat(day)

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                conn = FirmsConnector(ep.firms_url, ep.firms_key or "", config.source("nasa_firms"),
                                      user_agent=config.http.user_agent, client=client)
                return await conn.backfill(the_day, the_day)

        result = asyncio.run(run())
        spool, ingestor = open_pipeline(config)
        try:
            report = ingestor.accept("nasa_firms", result.batch, dead_letters=result.dead_letters)
            # Acknowledged by Kafka before success: under the KubernetesExecutor the spool dies with the pod.
            published = publish_spool(spool, config)
        finally:
            spool.close()
        from wildfire.coverage import day_range as whole_days
        from wildfire.coverage import record_safely

        # The day is fetched and acknowledged: the coverage ledger closes its part of the gap (a ledger failure is
        # logged, not the task's; the coverage_watch DAG then still shows the gap).
        covered = record_safely(base, "nasa_firms", *whole_days(the_day, the_day))
        return {"day": day, "summary": result.summary.as_dict(), "admission": report.as_dict(), "publish": published,
                "coverage_recorded": covered}

    # Deferrable (the slot is freed while it waits): no day starts while the storage consumer is behind.
    wait_for_lag = ConsumerLagSensor(task_id="wait_for_consumer_lag", poll_interval_s=30, timeout=6 * 3600)
    wait_for_lag >> backfill_day.expand(day=days())
