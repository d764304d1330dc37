"""Failure callback of every wildfire DAG task: records the failure where the operations page shows it.

:func:`record_failure` (``on_failure_callback`` through each DAG's ``default_args``, see :data:`FAILURE_ARGS`)
writes one ``task_failures`` row (migration 0005) in the status database (``storage.database_url``, the
database of ``worker_status`` and the audit log): dag, task, run, map index, try number and an exception
summary (type and first line, at most :data:`MAX_SUMMARY` characters) with secrets masked: Airflow's own
secrets masker (every Connection password and Variable it has seen), URL passwords and secret-named query
parameters (``redact_url``), and ``key=value`` pairs whose key is named like a secret. ``/wildfire/status``
returns the newest rows and the operations page lists them.

When the Airflow Variable :data:`NOTIFY_VARIABLE` names a Connection, the failure also goes to
:class:`wildfire.airflow.notifier.WebhookNotifier` on that Connection (a Slack/Teams incoming webhook, or any
endpoint taking a JSON POST).

Guarantee: the callback never fails the task nor raises: a database, Variable or webhook error is logged
(``wildfire.airflow.callbacks`` logger, WARNING) and the callback returns. Each database call is bounded by
``worker.status_connect_timeout_s`` + ``worker.status_statement_timeout_s``.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

NOTIFY_VARIABLE = "wildfire_failure_notify_conn_id"
"""Airflow Variable: id of an ``http`` Connection to POST failures to (unset or empty: no notification)."""
MAX_SUMMARY = 500

_SECRET_PAIR = re.compile(
    r"(?i)\b([\w.-]*(?:password|passwd|pwd|secret|token|api_?key|map_?key|read_?key|auth\w*|credential\w*)"
    r"[\w.-]*)(\s*[=:]\s*)(['\"]?)([^\s&'\",;)]+)")
_URL = re.compile(r"\b[a-zA-Z][\w+.-]*://[^\s'\"<>]+")


def summarize_exception(exc: BaseException | str | None) -> str:
    """``Type: first line`` of ``exc`` with secrets masked, at most :data:`MAX_SUMMARY` characters."""
    from wildfire.config import redact_url

    if exc is None:
        text = "no exception (the task was marked failed, e.g. timed out or killed)"
    elif isinstance(exc, BaseException):
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    else:
        text = (str(exc).strip().splitlines() or [""])[0]
    try:
        from airflow.sdk._shared.secrets_masker import redact

        text = str(redact(text))
    except Exception:  # noqa: BLE001, S110 - the masker is best effort; our own rules below always run
        pass
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    text = _SECRET_PAIR.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3)}***", text)
    return text if len(text) <= MAX_SUMMARY else text[: MAX_SUMMARY - 1] + "…"


def failure_row(context: Any, now: datetime | None = None) -> dict[str, Any]:
    ti = context.get("task_instance") or context.get("ti")
    run = context.get("dag_run")
    dag = context.get("dag")
    map_index = getattr(ti, "map_index", -1)
    return {
        "ts": now or datetime.now(UTC),
        "dag_id": str(getattr(ti, "dag_id", None) or getattr(dag, "dag_id", None) or "?"),
        "task_id": str(getattr(ti, "task_id", None) or "?"),
        "run_id": str(getattr(ti, "run_id", None) or getattr(run, "run_id", None) or "?"),
        "map_index": int(map_index) if isinstance(map_index, int) else -1,
        "try_number": getattr(ti, "try_number", None) if isinstance(getattr(ti, "try_number", None), int) else None,
        "exception": summarize_exception(context.get("exception")),
    }


def store_failure(engine: Any, row: dict[str, Any]) -> None:
    from wildfire.storage.schema import task_failures

    with engine.begin() as conn:
        conn.execute(task_failures.insert().values(**row))


def recent_failures(engine: Any, limit: int = 20) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from wildfire.storage.schema import task_failures

    with engine.connect() as conn:
        rows = conn.execute(sa.select(task_failures).order_by(task_failures.c.id.desc()).limit(limit))
        out = []
        for r in rows:
            d = dict(r._mapping)
            ts = d["ts"]
            d["ts"] = ts if ts is None or ts.tzinfo else ts.replace(tzinfo=UTC)
            out.append(d)
        return out


def _notify_conn_id() -> str | None:
    from airflow.sdk import Variable

    value = Variable.get(NOTIFY_VARIABLE, default=None)
    return str(value).strip() or None if value is not None else None


def record_failure(context: Any, *, engine: Any = None, notify_conn_id: str | None = None) -> None:
    """``on_failure_callback``: record (and notify). Never raises (see the module docstring)."""
    try:
        row = failure_row(context)
    except Exception as exc:  # noqa: BLE001 - a callback must never fail the task
        log.warning("failure callback could not read the task context: %s", exc)
        return
    try:
        if engine is None:
            from wildfire import ops_state
            from wildfire.config import load_config

            cfg = load_config()
            engine = ops_state.engine_for(cfg, connect_timeout_s=cfg.worker.status_connect_timeout_s,
                                          statement_timeout_s=cfg.worker.status_statement_timeout_s)
        store_failure(engine, row)
    except Exception as exc:  # noqa: BLE001
        log.warning("failure of %s.%s (%s) not recorded in task_failures: %s", row["dag_id"], row["task_id"],
                    row["run_id"], summarize_exception(exc))
    try:
        conn_id = notify_conn_id if notify_conn_id is not None else _notify_conn_id()
        if conn_id:
            from wildfire.airflow.notifier import WebhookNotifier

            WebhookNotifier(http_conn_id=conn_id).send(row)
    except Exception as exc:  # noqa: BLE001
        log.warning("failure of %s.%s not notified: %s", row["dag_id"], row["task_id"], summarize_exception(exc))


FAILURE_ARGS: dict[str, Any] = {"on_failure_callback": record_failure}
"""Merge into every DAG's ``default_args``."""
