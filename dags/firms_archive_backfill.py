"""Historical FIRMS (standard-processing archive) for a date range into the spool, LOW priority, then published
to Kafka: the task succeeds once the broker acknowledged every record, and the date range is then recorded in the
coverage ledger (``wildfire.coverage``). Started by hand, or by ``coverage_watch`` for a gap in FIRMS coverage."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param, task

with DAG(
    dag_id="firms_archive_backfill",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["wildfire", "backfill", "nasa_firms"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    doc_md=__doc__,
    params={
        "start_date": Param("2024-08-01", type="string", format="date"),
        "end_date": Param("2024-08-05", type="string", format="date"),
        "sources": Param(["VIIRS_SNPP_SP", "MODIS_SP"], type="array",
                         items={"type": "string", "enum": [
                             "VIIRS_SNPP_SP", "VIIRS_NOAA20_SP", "MODIS_SP", "LANDSAT_NRT",
                             # Recent days (coverage_watch's gaps) exist only as NRT until the SP archive has them.
                             "VIIRS_SNPP_NRT", "VIIRS_NOAA20_NRT", "VIIRS_NOAA21_NRT", "MODIS_NRT"]}),
    },
) as dag:

    @task(retries=2)
    def backfill(params: dict | None = None) -> dict:
        import asyncio
        from datetime import date

        import httpx

        from wildfire.airflow.operators.fetch import open_pipeline, publish_spool
        from wildfire.config import build_config, load_config
        from wildfire.connectors.firms import FirmsConnector
        from wildfire.sources import Endpoints

        base = load_config()
        # The archive is history: LOW priority, so live detections always go first.
        config = build_config(base.model_dump(mode="json"), {"sources": {"nasa_firms": {
            "record_priority": "LOW", "options": {"sources": list(params["sources"])}}}})
        ep = Endpoints.from_airflow()
        start, end = date.fromisoformat(params["start_date"]), date.fromisoformat(params["end_date"])

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                conn = FirmsConnector(ep.firms_url, ep.firms_key or "", config.source("nasa_firms"),
                                      user_agent=config.http.user_agent, client=client)
                return await conn.backfill(start, end)

        result = asyncio.run(run())
        spool, ingestor = open_pipeline(config)
        try:
            report = ingestor.accept("nasa_firms", result.batch, dead_letters=result.dead_letters)
            # Acknowledged by Kafka before success: under the KubernetesExecutor the spool dies with the pod.
            published = publish_spool(spool, config)
        finally:
            spool.close()
        from wildfire.coverage import day_range, record_safely

        # The range is fetched and acknowledged: the coverage ledger closes the gap (a ledger failure is
        # logged, not the task's; the coverage_watch DAG then still shows the gap).
        covered = record_safely(base, "nasa_firms", *day_range(start, end))
        return {"summary": result.summary.as_dict(), "admission": report.as_dict(), "publish": published,
                "coverage_recorded": covered}

    backfill()
