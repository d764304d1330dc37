"""The long-running stream worker as an Airflow task (a bounded run window; the next run resumes from the spool).

Mode and sources stick (``wildfire.stream_settings``): params ``mode: stored`` and ``sources: []`` (the
defaults, so every scheduled continuous run) use the stored choice; concrete values (the trigger form) are
stored first, then used, so the following runs keep them. While it runs, the worker ends its window early when
the stored choice changes (the operations page) or when a manual ``wildfire_stream`` run waits in the queue
(the trigger form: ``max_active_runs=1`` would otherwise hold it behind the whole window): that run then starts
within one status cycle (about 5 s) plus the shutdown flush.

``execution_timeout`` = run window + :data:`FLUSH_MARGIN` (see :func:`stream_timeout`); a window param longer
than the timeout allows is cut to fit (logged), so the task always ends by itself, flushing, before Airflow
would kill it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator

DEFAULT_RUN_MINUTES = 55
"""Default run window of ``wildfire_stream`` (its ``run_minutes`` param and the timeout derive from it)."""
FLUSH_MARGIN = timedelta(minutes=5)
"""Time after the window for the stop sequence: fetch threads join (10 s), deliveries settle
(``worker.shutdown_flush_s``, at most 600 s; 30 s shipped), the final status write (bounded by the status
timeouts). A window is cut so that window + margin fits the task's ``execution_timeout``."""


def stream_timeout(run_minutes: float = DEFAULT_RUN_MINUTES) -> timedelta:
    """``execution_timeout`` of a stream task: the run window plus :data:`FLUSH_MARGIN`."""
    return timedelta(minutes=run_minutes) + FLUSH_MARGIN


def fit_window(seconds: float, timeout: timedelta | None, margin: timedelta, log: Any, name: str) -> float:
    """``seconds`` cut so that window + ``margin`` fits ``timeout`` (logged when cut)."""
    if timeout is None:
        return seconds
    limit = (timeout - margin).total_seconds()
    if seconds > limit:
        log.warning("%s of %.0f s does not fit execution_timeout %s minus the flush margin %s: cut to %.0f s",
                    name, seconds, timeout, margin, limit)
        return max(1.0, limit)
    return seconds


class StreamWorkerOperator(BaseOperator):
    """Run :class:`wildfire.worker.StreamWorker` for ``run_minutes``.

    On ``on_kill`` (Airflow's SIGTERM) the worker stops fetching, gives in-flight deliveries up to
    ``worker.shutdown_flush_s`` and leaves everything unacknowledged in the spool.
    """

    template_fields: Sequence[str] = ("mode", "sources", "run_minutes", "fire_season")

    def __init__(self, *, mode: str = "stored", sources: Any = None, run_minutes: Any = DEFAULT_RUN_MINUTES,
                 fire_season: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = mode
        self.sources = sources
        self.run_minutes = run_minutes
        self.fire_season = fire_season
        self._worker: Any = None

    def execute(self, context: Any) -> dict[str, Any]:
        import os

        from wildfire.airflow.params import param_float
        from wildfire.config import DEFAULT_CONFIG_PATH, load_config
        from wildfire.sources import Endpoints
        from wildfire.stream_settings import resolve_for_run
        from wildfire.worker import StreamWorker

        sources = self.sources
        if isinstance(sources, str):
            sources = [s.strip() for s in sources.split(",") if s.strip()]
        config_path = os.environ.get("WILDFIRE_CONFIG") or DEFAULT_CONFIG_PATH
        config = load_config(config_path)
        choice = resolve_for_run(config, str(self.mode), list(sources or []), _actor(context),
                                 config_path=config_path)
        self.log.info("stream settings: mode %s, sources %s (%s%s)", choice.mode, choice.sources or "all",
                      choice.origin, f", set by {choice.set_by} at {choice.set_at}" if choice.set_by else "")
        seconds = fit_window(60.0 * param_float(self.run_minutes, "run_minutes", minimum=0.001),
                             self.execution_timeout, FLUSH_MARGIN, self.log, "run window")
        self._worker = StreamWorker(
            config, mode=choice.mode, sources=choice.sources or None,
            run_minutes=seconds / 60.0, fire_season=str(self.fire_season),
            endpoints=Endpoints.from_airflow(), config_path=config_path,
            yield_check=_queued_run_check(self.dag_id),
            settings_seen=(choice.mode, choice.sources) if choice.origin == "override" else None,
        )
        summary = self._worker.run()
        self.log.info("stream worker finished: %s", summary.as_dict())
        return summary.as_dict()

    def on_kill(self) -> None:
        if self._worker is not None:
            self._worker.stop("on_kill")


def _actor(context: Any) -> str:
    run = (context or {}).get("dag_run")
    user = getattr(run, "triggering_user_name", None)
    run_id = getattr(run, "run_id", None) or "?"
    dag_id = getattr(run, "dag_id", None) or "wildfire_stream"
    return f"{user} (airflow {dag_id} {run_id})" if user else f"airflow {dag_id} {run_id}"


def _queued_run_check(dag_id: str) -> Any:
    """A ``yield_check`` for the worker: a queued run of this DAG (``max_active_runs=1``: only a manual trigger
    queues one) gets the window. Through the Task SDK's supervisor channel, which is thread-safe."""

    def check() -> str | None:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        waiting = RuntimeTaskInstance.get_dr_count(dag_id=dag_id, states=["queued"])
        return f"a queued {dag_id} run waits (trigger form): giving it the window" if waiting else None

    return check
