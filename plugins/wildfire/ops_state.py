"""Operational state shared across processes through the database, never through module globals.

Airflow runs every component (api-server, scheduler, task runners, triggerer) in its own process,
so the stream worker and the operations plugin meet here:

- ``worker_status``: one row per worker (``worker_id``), its heartbeat and a JSON ``state`` snapshot
  (see :data:`STATE_FIELDS`), written every few seconds by the worker, read by ``/health`` and the page.
- ``audit_log``: every operator action. A ``config.patch`` row carries the *complete* set of runtime
  overrides in ``detail["overrides"]``; the newest such row is the set in force (event-sourced, so the
  history of every change and who made it is kept).

The database is the storage layer's (``storage.database_url``, SQLite file when unset). Its schema is
applied by ``make db-upgrade`` (``python -m wildfire.storage.migrate upgrade``), never by a reader or writer
here. ``worker_status`` rows older than ``worker.status_retention_s`` are deleted by the stream worker's
status thread (:func:`prune_worker_status`) and left out of :func:`read_worker_status` with ``since``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from wildfire.storage.schema import audit_log, worker_status

CONFIG_PATCH = "config.patch"
DLQ_REPLAY = "dlq.replay"

# Keys of a stream worker's state snapshot (all optional; the page shows what it finds).
STATE_FIELDS = (
    "mode",            # batch | real_time | continuous_streaming
    "sources",         # sources this run handles
    "polling",         # sources this worker polls right now (batch DAGs skip them: see stream_pollers)
    "queue",           # {"depth": {priority: n}, "max_size": n, "fill": 0..1}
    "spool",           # {"depth": {priority: n}, "by_source": {...}, "bytes": n, "oldest_age_s": s}
    "backpressure",    # {"state": name, "fill": 0..1, "fire_season": bool}
    "breaker",         # {"state": name, "failures": n}
    "throttle",        # {"level": n, "delay_s": s, "lag": n}
    "published",       # records acknowledged by Kafka this run
    "dropped",         # {"<reason>/<priority>": n}
    "recent_drops",    # [{"ts", "source", "priority", "reason", "count"}]
    "config",          # {"version": str, "error": str | None}
    "metrics_url",     # the worker's own Prometheus endpoint
)


def _utc(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def write_worker_status(engine: sa.Engine, worker_id: str, component: str, state: dict[str, Any],
                        *, now: datetime | None = None) -> None:
    now = now or datetime.now(UTC)
    with engine.begin() as conn:
        updated = conn.execute(
            worker_status.update().where(worker_status.c.worker_id == worker_id)
            .values(component=component, heartbeat=now, state=state)
        ).rowcount
        if not updated:
            conn.execute(worker_status.insert().values(worker_id=worker_id, component=component, heartbeat=now,
                                                       state=state))


def read_worker_status(engine: sa.Engine, component: str | None = None, *, since: datetime | None = None,
                       limit: int | None = None) -> list[dict[str, Any]]:
    """Workers newest heartbeat first; only those that beat at or after ``since``, at most ``limit`` of them."""
    query = sa.select(worker_status).order_by(worker_status.c.heartbeat.desc())
    if component:
        query = query.where(worker_status.c.component == component)
    if since is not None:
        query = query.where(worker_status.c.heartbeat >= since)
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        return [
            {"worker_id": r.worker_id, "component": r.component, "heartbeat": _utc(r.heartbeat), "state": r.state}
            for r in conn.execute(query)
        ]


def prune_worker_status(engine: sa.Engine, older_than: timedelta, *, now: datetime | None = None) -> int:
    """Delete ``worker_status`` rows whose heartbeat is older than ``older_than``; returns how many.

    Every worker process writes its own row (host and pid in the id), so without this the table grows by one
    row per restart, forever.
    """
    cutoff = (now or datetime.now(UTC)) - older_than
    with engine.begin() as conn:
        return conn.execute(worker_status.delete().where(worker_status.c.heartbeat < cutoff)).rowcount or 0


def latest_heartbeat(engine: sa.Engine, component: str) -> datetime | None:
    with engine.connect() as conn:
        value = conn.execute(
            sa.select(sa.func.max(worker_status.c.heartbeat)).where(worker_status.c.component == component)
        ).scalar()
    return _utc(value)


def append_audit(engine: sa.Engine, actor: str, action: str, detail: dict[str, Any],
                 *, now: datetime | None = None) -> None:
    with engine.begin() as conn:
        conn.execute(audit_log.insert().values(ts=now or datetime.now(UTC), actor=actor, action=action,
                                               detail=detail))


def recent_audit(engine: sa.Engine, limit: int = 50, action: str | None = None) -> list[dict[str, Any]]:
    query = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if action:
        query = query.where(audit_log.c.action == action)
    with engine.connect() as conn:
        return [{"id": r.id, "ts": _utc(r.ts), "actor": r.actor, "action": r.action, "detail": r.detail}
                for r in conn.execute(query)]


def current_overrides(engine: sa.Engine) -> tuple[int | None, dict[str, Any]]:
    """(audit id, overrides) of the newest ``config.patch``; ``(None, {})`` when none was ever made."""
    rows = recent_audit(engine, limit=1, action=CONFIG_PATCH)
    if not rows:
        return None, {}
    return rows[0]["id"], dict(rows[0]["detail"].get("overrides") or {})


def is_stale(heartbeat: datetime | None, *, max_age: timedelta, now: datetime | None = None) -> bool:
    if heartbeat is None:
        return True
    return (now or datetime.now(UTC)) - heartbeat > max_age


LIVE_HEARTBEAT = timedelta(minutes=2)
"""A worker whose heartbeat is older than this is stale: it no longer counts as polling anything."""


def stream_pollers(engine: sa.Engine, source: str, *, max_age: timedelta = LIVE_HEARTBEAT,
                   now: datetime | None = None) -> list[dict[str, Any]]:
    """Live stream workers (heartbeat within ``max_age``) whose status says they poll ``source`` now.

    Only the ``polling`` field counts (set while the worker's poll loop for that source runs), so a worker in
    ``batch`` mode, one whose connector could not start, or one written before the field existed never makes
    a batch DAG skip its source.
    """
    now = now or datetime.now(UTC)
    out = []
    for w in read_worker_status(engine, "stream_worker", since=now - max_age):
        polling = (w["state"] or {}).get("polling") or []
        if isinstance(polling, list) and source in polling:
            out.append(w)
    return out


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def engine_for(config: Any, *, connect_timeout_s: float | None = None,
               statement_timeout_s: float | None = None) -> sa.Engine:
    """Engine on the storage database of a :class:`~wildfire.config.StreamConfig`.

    With timeouts (the stream worker's status thread), no call on it waits on the database for much longer
    than ``connect_timeout_s`` + ``statement_timeout_s``: PostgreSQL gets ``connect_timeout``, a server-side
    ``statement_timeout`` and ``tcp_user_timeout`` (a peer that stops answering mid-statement); SQLite gets a
    busy timeout.
    """
    from wildfire.storage.migrate import database_url, sqlalchemy_url

    url = sqlalchemy_url(database_url(config.storage))
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        if connect_timeout_s is not None:
            connect_args["connect_timeout"] = max(1, round(connect_timeout_s))  # libpq: whole seconds
        if statement_timeout_s is not None:
            connect_args["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
            connect_args["tcp_user_timeout"] = int((statement_timeout_s + (connect_timeout_s or 0)) * 1000)
    elif url.startswith("sqlite") and connect_timeout_s is not None:
        connect_args["timeout"] = connect_timeout_s
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def missing_schema(exc: BaseException) -> bool:
    """True when ``exc`` says the operations tables do not exist (the database was never migrated)."""
    text = str(exc).lower()
    return "no such table" in text or ("relation" in text and "does not exist" in text) or "undefinedtable" in text
