"""Fetch one source once, spool its records (admission first) and publish them: the batch DAGs' task.

Every batch task that spools records (this operator, ERA5 days, the FIRMS archive backfill, dead-letter
replay) ends with :func:`publish_spool`: it drains the spool into Kafka and waits for the broker's
acknowledgement of every row before the task reports success. Under the KubernetesExecutor each task runs in
its own pod with its own spool, which is gone with the pod: a task that returned with rows still spooled
would lose them. Guarantees:

* **Success means acknowledged.** ``execute()`` returns only when the spool is empty and nothing is in flight
  (every row delivered with ``acks=all``, or moved to the dead-letter path as poison).
* **Bounded, then retried.** Rows not acknowledged within ``publish_timeout_s`` (default
  :data:`DEFAULT_PUBLISH_TIMEOUT_S`) make the task fail with :class:`SpoolNotDrainedError` (retriable), rows
  still in the spool; Airflow retries it. The fetch operator saves its poll cursor only after a successful
  publish, so a retry in a fresh pod fetches the same window again (duplicates are keyed; storage upserts).
* **A live drainer is left alone.** When another process holds the spool's drain lock (the stream worker
  sharing this spool under the Local/Celery executor), the task does not fail: it logs that the holder
  drains the spool and returns with ``published: false``. The flock is released by the kernel when its
  holder dies, so a held lock always means a live drainer.

Not guaranteed: with a shared spool and no stream worker, two batch tasks publishing at the same moment
may leave the later one's rows to the earlier one's drain, which can finish just before they are written;
they then wait in the spool for the next drainer (the next batch task or the stream worker).

No double polling: :class:`FetchToSpoolOperator` first asks the status database which live stream workers poll
its source right now (:func:`stream_poller`, ``ops_state.stream_pollers``: heartbeat within
``ops_state.LIVE_HEARTBEAT``, the source in the worker's ``polling`` list) and raises ``AirflowSkipException``
naming the worker and its heartbeat when one does. A stale heartbeat does not count. An unreachable (or
unmigrated) status database does not stop the task: it polls, accepting a possible double quota, and logs a
warning saying so (a dependency outside the data path never stops the data path).

After a successful publish, every batch task records the time range it fetched in the coverage ledger
(``wildfire.coverage.record_safely``: a ledger failure is logged, never the task's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

from airflow.sdk import BaseOperator

log = logging.getLogger(__name__)

DEFAULT_PUBLISH_TIMEOUT_S = 300.0
"""Seconds a batch task waits for Kafka to acknowledge its spooled rows before it fails (and is retried)."""


class SpoolNotDrainedError(RuntimeError):
    """Rows were still in the spool (or unacknowledged) when the publish bound ran out; Airflow retries."""

    retriable: ClassVar[bool] = True


def publish_spool(spool: Any, config: Any, *, timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S,
                  producer: Any = None, clock: Any = None) -> dict[str, Any]:
    """Publish every row of ``spool`` to Kafka and wait for the acknowledgements (see the module docstring).

    Returns ``{"published": True, "delivered": n, "dead_lettered": n, "seconds": s}``, or
    ``{"published": False, "drained_by": holder, "spool_depth": n}`` when another live process drains this
    spool. Raises :class:`SpoolNotDrainedError` when rows are left after ``timeout_s``.
    """
    import threading

    from wildfire.clock import SYSTEM_CLOCK
    from wildfire.publish import ProducerWrapper, SpoolPublisher
    from wildfire.spool import DrainLockedError
    from wildfire.streaming.breaker import CircuitBreaker

    if timeout_s <= 0:
        raise ValueError(f"publish timeout must be positive, got {timeout_s!r}")
    clock = clock or SYSTEM_CLOCK
    try:
        spool.acquire_drain_lock()
    except DrainLockedError as exc:
        depth = spool.depth()
        log.info("spool %s is drained by another live process (%s): leaving its %d rows to it", spool.path,
                 exc, depth)
        return {"published": False, "drained_by": str(exc), "spool_depth": depth}
    try:
        started = clock.monotonic()
        if producer is None:
            producer = ProducerWrapper(config.kafka, breaker=CircuitBreaker(config.circuit_breaker, clock=clock),
                                       clock=clock)
        publisher = SpoolPublisher(spool, producer, clock=clock)
        totals = publisher.run(threading.Event(), deadline=started + timeout_s, until_empty=True)
        left, in_flight = spool.depth(), totals.in_flight
        seconds = round(clock.monotonic() - started, 3)
    finally:
        spool.release_drain_lock()
    if left or in_flight:
        raise SpoolNotDrainedError(
            f"{left} rows still in spool {spool.path} ({in_flight} sent but unacknowledged) after {seconds} s: "
            f"Kafka at {config.kafka.bootstrap_servers} did not acknowledge them within {timeout_s} s; the rows "
            "stay in the spool and the task fails so that it is retried")
    log.info("published the spool to Kafka: %d rows acknowledged, %d dead-lettered, in %.1f s",
             totals.delivered, totals.dead_lettered, seconds)
    return {"published": True, "delivered": totals.delivered, "dead_lettered": totals.dead_lettered,
            "seconds": seconds}


def stream_poller(config: Any, source: str, *, engine: Any = None, now: Any = None) -> str | None:
    """Why the batch task for ``source`` must not poll (a live stream worker does), or None.

    ``None`` too when the status database cannot be read: the task polls (logged as a warning).
    """
    from wildfire import ops_state

    try:
        engine = engine or ops_state.engine_for(config, connect_timeout_s=config.worker.status_connect_timeout_s,
                                                statement_timeout_s=config.worker.status_statement_timeout_s)
        live = ops_state.stream_pollers(engine, source, now=now)
    except Exception as exc:  # noqa: BLE001 - outside the data path: poll rather than stop
        log.warning("cannot read worker_status to check whether a stream worker polls %s (%s): polling anyway "
                    "(if a stream worker does poll it, this run costs its API quota twice)", source,
                    ops_state.first_line(exc))
        return None
    if not live:
        return None
    w = live[0]
    return (f"stream worker {w['worker_id']} polls {source} (heartbeat {w['heartbeat'].isoformat()}, mode "
            f"{(w['state'] or {}).get('mode')}): skipping this batch poll so the source's quota is not spent twice")


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

    def __init__(self, *, source: str, publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.publish_timeout_s = publish_timeout_s

    def execute(self, context: Any) -> dict[str, Any]:
        import asyncio

        from wildfire.config import load_config
        from wildfire.sources import CursorStore, Endpoints, fetch_once, rewind_cursor

        config = load_config()
        src = config.source(self.source)
        if not src.enabled:
            self.log.info("source %s is disabled in the config; nothing to do", self.source)
            return {"source": self.source, "skipped": "disabled"}
        reason = stream_poller(config, self.source)
        if reason:
            from airflow.sdk.exceptions import AirflowSkipException

            self.log.info("%s", reason)
            raise AirflowSkipException(reason)
        cursors = CursorStore.for_config(config)
        previous = cursors.load(self.source)
        result = asyncio.run(fetch_once(self.source, config, Endpoints.from_airflow(), cursor=previous))
        spool, ingestor = open_pipeline(config)
        try:
            report = ingestor.accept(self.source, result.batch, dead_letters=result.dead_letters)
            published = publish_spool(spool, config, timeout_s=self.publish_timeout_s)
        finally:
            spool.close()
        # Only after the publish: a task that fails there is retried from the same cursor (in a fresh pod
        # its spool is gone). Shed records stay ahead of the cursor, so the next run fetches them again.
        cursors.save(self.source, rewind_cursor(src.source_type, previous, result.cursor, report.not_accepted))
        # The coverage ledger (wildfire.coverage) learns of the successful poll; a failure there is logged,
        # never the task's: the records are already acknowledged.
        from datetime import UTC, datetime, timedelta

        from wildfire.coverage import policy, record_safely

        now = datetime.now(UTC)
        record_safely(config, self.source, now - timedelta(seconds=policy(config, self.source).reach_s), now)
        self.log.info("%s", result.summary.describe() if hasattr(result.summary, "describe") else result.summary)
        self.log.info("admission: %s", report.as_dict())
        return {"summary": result.summary.as_dict(), "admission": report.as_dict(), "publish": published}
