"""The long-running stream worker as an Airflow task (a bounded run window; the next run resumes from the spool)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator


class StreamWorkerOperator(BaseOperator):
    """Run :class:`wildfire.worker.StreamWorker` for ``run_minutes``.

    On ``on_kill`` (Airflow's SIGTERM) the worker stops fetching, gives in-flight deliveries up to
    ``worker.shutdown_flush_s`` and leaves everything unacknowledged in the spool.
    """

    template_fields: Sequence[str] = ("mode", "sources", "run_minutes", "fire_season")

    def __init__(self, *, mode: str = "continuous_streaming", sources: Any = None, run_minutes: Any = 55,
                 fire_season: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = mode
        self.sources = sources
        self.run_minutes = run_minutes
        self.fire_season = fire_season
        self._worker: Any = None

    def execute(self, context: Any) -> dict[str, Any]:
        import os

        from wildfire.config import DEFAULT_CONFIG_PATH, load_config
        from wildfire.sources import Endpoints
        from wildfire.worker import StreamWorker

        sources = self.sources
        if isinstance(sources, str):
            sources = [s.strip() for s in sources.split(",") if s.strip()]
        config = load_config()
        self._worker = StreamWorker(
            config, mode=str(self.mode), sources=list(sources) if sources else None,
            run_minutes=float(self.run_minutes), fire_season=str(self.fire_season),
            endpoints=Endpoints.from_airflow(),
            config_path=os.environ.get("WILDFIRE_CONFIG") or DEFAULT_CONFIG_PATH,
        )
        summary = self._worker.run()
        self.log.info("stream worker finished: %s", summary.as_dict())
        return summary.as_dict()

    def on_kill(self) -> None:
        if self._worker is not None:
            self._worker.stop("on_kill")
