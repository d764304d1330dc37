"""Fetch one source once and hand its records to the spool (admission first): the batch DAGs' task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator


def open_pipeline(config: Any) -> tuple[Any, Any]:
    """(spool, ingestor) for this process, with fire season as configured."""
    import random

    from wildfire.clock import SYSTEM_CLOCK
    from wildfire.ingest import Ingestor
    from wildfire.spool import BufferManager
    from wildfire.streaming.backpressure import BackpressureManager

    bp = BackpressureManager(config.backpressure, clock=SYSTEM_CLOCK, rng=random.Random())
    spool = BufferManager(config.spool, config.sources, fire_season=bp.fire_season_active())
    return spool, Ingestor(spool, config, backpressure=bp)


class FetchToSpoolOperator(BaseOperator):
    """Poll ``source`` (a name from config ``sources``) once; return the run summary and admission report.

    Endpoints and keys come from the Airflow Connections (``firms_default``, ``nws_default``,
    ``purpleair_default``). A source that fails upstream raises so Airflow retries it; bad rows never fail
    the task: they are counted and dead-lettered.
    """

    template_fields: Sequence[str] = ("source",)

    def __init__(self, *, source: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = source

    def execute(self, context: Any) -> dict[str, Any]:
        import asyncio

        from wildfire.config import load_config
        from wildfire.sources import CursorStore, Endpoints, fetch_once, rewind_cursor

        config = load_config()
        src = config.source(self.source)
        if not src.enabled:
            self.log.info("source %s is disabled in the config; nothing to do", self.source)
            return {"source": self.source, "skipped": "disabled"}
        cursors = CursorStore.for_config(config)
        previous = cursors.load(self.source)
        result = asyncio.run(fetch_once(self.source, config, Endpoints.from_airflow(), cursor=previous))
        spool, ingestor = open_pipeline(config)
        try:
            report = ingestor.accept(self.source, result.batch, dead_letters=result.dead_letters)
        finally:
            spool.close()
        # Shed records stay ahead of the cursor, so the next run fetches them again.
        cursors.save(self.source, rewind_cursor(src.source_type, previous, result.cursor, report.not_accepted))
        self.log.info("%s", result.summary.describe() if hasattr(result.summary, "describe") else result.summary)
        self.log.info("admission: %s", report.as_dict())
        return {"summary": result.summary.as_dict(), "admission": report.as_dict()}
