"""One day of ERA5 into the spool (LOW priority) and on to Kafka: the ``era5_backfill`` DAG's mapped task.

The day's records are published and acknowledged before the task succeeds
(:func:`wildfire.airflow.operators.fetch.publish_spool`); then the day is recorded in the coverage ledger
(``wildfire.coverage``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from wildfire.airflow.params import param_bool

__all__ = ["Era5DayToSpoolOperator", "param_bool"]


class Era5DayToSpoolOperator(BaseOperator):
    """Load ``{data_dir}/era5_{day}.grib``; if absent and ``download`` is true, fetch it with cdsapi first.

    Without CDS credentials and without a file the day fails with a message saying both options.
    """

    template_fields: Sequence[str] = ("day", "data_dir", "download")

    def __init__(self, *, day: str, data_dir: str = "include/era5", download: bool = False,
                 publish_timeout_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.publish_timeout_s = publish_timeout_s
        self.day = day
        self.data_dir = data_dir
        self.download = download

    def execute(self, context: Any) -> dict[str, Any]:
        from datetime import date

        from wildfire.airflow.operators.fetch import DEFAULT_PUBLISH_TIMEOUT_S, open_pipeline, publish_spool
        from wildfire.config import load_config, resolve_path
        from wildfire.connectors.era5 import download_era5, load_era5_file

        download = param_bool(self.download, "download")
        config = load_config()
        day = date.fromisoformat(str(self.day)[:10])
        folder = resolve_path(self.data_dir)
        path = folder / f"era5_{day.isoformat()}.grib"
        if not path.exists():
            if not download:
                raise FileNotFoundError(
                    f"no ERA5 file {path}: put one there, or set the DAG param download=true with CDS credentials "
                    "(the cds_default Connection, or ~/.cdsapirc / CDSAPI_URL+CDSAPI_KEY)")
            folder.mkdir(parents=True, exist_ok=True)
            from wildfire.settings import cds_client

            download_era5(path, day, client=cds_client())
        src = config.source("era5")
        result = load_era5_file(path, "era5", priority=src.record_priority)
        spool, ingestor = open_pipeline(config)
        try:
            report = ingestor.accept("era5", result.batch, dead_letters=result.dead_letters)
            published = publish_spool(spool, config, timeout_s=self.publish_timeout_s or DEFAULT_PUBLISH_TIMEOUT_S)
        finally:
            spool.close()
        self.log.info("ERA5 %s: %s; admission %s", day, result.summary.as_dict(), report.as_dict())
        from wildfire.coverage import day_range, record_safely

        record_safely(config, "era5", *day_range(day, day))  # logged, never raised: the day is published
        return {"day": day.isoformat(), "summary": result.summary.as_dict(), "admission": report.as_dict(),
                "publish": published}
