"""Kafka to database for a bounded time: the ``storage_consumer`` DAG's task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator


class StorageConsumerOperator(BaseOperator):
    """Consume the source topics (and the dead-letter topic) for ``seconds`` into the wildfire database.

    The database URL comes from the ``wildfire_db`` Connection. Returns the stored counts by kind, so
    downstream tasks can announce new fire detections as an Asset event.
    """

    template_fields: Sequence[str] = ("seconds",)

    def __init__(self, *, seconds: Any = 300, db_conn_id: str = "wildfire_db", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds
        self.db_conn_id = db_conn_id
        self._stop: Any = None

    def execute(self, context: Any) -> dict[str, Any]:
        import threading

        from wildfire.airflow.hooks.database import WildfireDbHook
        from wildfire.airflow.params import param_float
        from wildfire.config import load_config
        from wildfire.storage.consumer import StorageConsumer
        from wildfire.storage.migrate import upgrade

        seconds = param_float(self.seconds, "seconds", minimum=1)
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
