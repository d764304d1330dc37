"""Kafka to database for a bounded time: the ``storage_consumer`` DAG's task."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator

DEFAULT_SECONDS = 300
"""Default run window of ``storage_consumer`` (its ``seconds`` param and the timeout derive from it)."""
FLUSH_MARGIN = timedelta(minutes=5)
"""Time after the window for the last batch's commit and offset commit and the consumer's close."""


def consumer_timeout(seconds: float = DEFAULT_SECONDS) -> timedelta:
    """``execution_timeout`` of the consumer task: the run window plus :data:`FLUSH_MARGIN`."""
    return timedelta(seconds=seconds) + FLUSH_MARGIN


class StorageConsumerOperator(BaseOperator):
    """Consume the source topics (and the dead-letter topic) for ``seconds`` into the wildfire database.

    The database URL comes from the ``wildfire_db`` Connection. Returns the stored counts by kind, so
    downstream tasks can announce new fire detections as an Asset event.
    """

    template_fields: Sequence[str] = ("seconds",)

    def __init__(self, *, seconds: Any = DEFAULT_SECONDS, db_conn_id: str = "wildfire_db", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds
        self.db_conn_id = db_conn_id
        self._stop: Any = None

    def execute(self, context: Any) -> dict[str, Any]:
        import threading

        from wildfire.airflow.hooks.database import WildfireDbHook
        from wildfire.airflow.operators.stream import fit_window
        from wildfire.airflow.params import param_float
        from wildfire.config import load_config
        from wildfire.storage.consumer import StorageConsumer
        from wildfire.storage.migrate import upgrade

        seconds = fit_window(param_float(self.seconds, "seconds", minimum=1), self.execution_timeout, FLUSH_MARGIN,
                             self.log, "run window")
        config = load_config()
        url = WildfireDbHook(self.db_conn_id).database_url()
        upgrade(url)
        self._stop = threading.Event()
        consumer = StorageConsumer(config, url=url)
        try:
            stats = consumer.run(self._stop, max_seconds=seconds)
        finally:
            consumer.close()
        result = stats.as_dict() if hasattr(stats, "as_dict") else dict(vars(stats))
        self.log.info("storage consumer: %s", result)
        return result

    def on_kill(self) -> None:
        if self._stop is not None:
            self._stop.set()
