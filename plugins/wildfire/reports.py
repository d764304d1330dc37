"""Reports over the stored tables (kept out of DAG files so they are testable on SQLite and PostgreSQL).

- :func:`california_fire_activity`: detections in the California bounding box over the last N hours.
- :func:`detections_in_alerts`: detections of the last N hours inside the polygon of an alert in force
  now (not cancelled, not expired: ``wildfire.storage.alerts``). Needs PostgreSQL with PostGIS (the
  GiST-indexed ``fire_detections.geom`` and ``alert_chains.area``); elsewhere it says it is unavailable
  and why, instead of answering wrongly. Alerts with no polygon (zone-only, UGC codes) match nothing.
- :func:`fire_activity_summary`: what the ``fire_activity_summary`` DAG reports: the above plus the
  alerts in force.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from wildfire.storage.alerts import IN_FORCE_STATES, alerts_in_force, db_time_text
from wildfire.storage.schema import RECORD_TABLES

CALIFORNIA = (-124.48, 32.53, -114.13, 42.01)


def _at_or_after(column: sa.Column[Any], since: datetime, dialect: str) -> sa.ColumnElement[bool]:
    if dialect == "sqlite":
        # SQLite holds the writer's fixed-format UTC text ('...T..:..:..ffffffZ'); SQLAlchemy would bind
        # 'YYYY-MM-DD HH:MM:SS', which sorts before every stored time of the same day.
        return sa.type_coerce(column, sa.Text) >= db_time_text(since)
    return column >= since


def california_fire_activity(engine: sa.Engine, *, now: datetime | None = None, hours: int = 24,
                             bbox: tuple[float, float, float, float] = CALIFORNIA) -> dict[str, Any]:
    """Detections in ``bbox`` (west, south, east, north; default California) over the last ``hours``: count, total
    FRP, by satellite, hottest."""
    t = RECORD_TABLES["fire_detection"]
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=hours)
    west, south, east, north = bbox
    where = sa.and_(_at_or_after(t.c.event_time, since, engine.dialect.name), t.c.lat.between(south, north),
                    t.c.lon.between(west, east))
    with engine.connect() as conn:
        count, frp = conn.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(t.c.frp), 0.0)).where(where)).one()
        by_sat = dict(conn.execute(sa.select(t.c.satellite, sa.func.count()).where(where).group_by(t.c.satellite)).all())
        hottest = conn.execute(sa.select(t.c.key, t.c.lat, t.c.lon, t.c.frp, t.c.event_time).where(where)
                               .order_by(t.c.frp.desc().nulls_last()).limit(5)).all()
    return {
        "window_hours": hours, "since": since.isoformat(), "detections": int(count), "total_frp_mw": float(frp),
        "by_satellite": {str(k): int(v) for k, v in by_sat.items()},
        "hottest": [{"key": k, "lat": la, "lon": lo, "frp_mw": f, "event_time": str(et)} for k, la, lo, f, et in hottest],
    }


MAX_LISTED = 500  # most detections/alerts a report lists (counts are always complete)


def spatial_available(engine: sa.Engine) -> str | None:
    """None when the spatial query can run, else why not."""
    if engine.dialect.name != "postgresql":
        return f"needs PostgreSQL with PostGIS (this store is {engine.dialect.name})"
    with engine.connect() as conn:
        have = set(conn.execute(sa.text(
            "SELECT table_name || '.' || column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND ((table_name = 'fire_detections' AND column_name = 'geom') "
            "OR (table_name = 'alert_chains' AND column_name = 'area'))")).scalars())
    if have != {"fire_detections.geom", "alert_chains.area"}:
        return "PostGIS geometry columns missing (install PostGIS, then run python -m wildfire.storage.migrate upgrade)"
    return None


# ST_Covers: a detection on the polygon's edge is inside. Both sides use the GiST indexes.
_INSIDE_SQL = sa.text("""
    SELECT d.key, d.lat, d.lon, d.frp, d.event_time, c.root_id, c.event, c.priority
    FROM alert_chains c
    JOIN fire_detections d ON ST_Covers(c.area, d.geom)
    WHERE c.area IS NOT NULL AND c.state IN :states AND (c.expires_at IS NULL OR c.expires_at > :now)
      AND d.event_time >= :since AND d.event_time <= :now
    ORDER BY c.priority, d.event_time DESC, d.key, c.root_id
""").bindparams(sa.bindparam("states", expanding=True))


def detections_in_alerts(engine: sa.Engine, *, now: datetime | None = None, hours: int = 24) -> dict[str, Any]:
    """Detections of the last ``hours`` inside alerts in force at ``now`` (PostgreSQL + PostGIS)."""
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=hours)
    reason = spatial_available(engine)
    if reason is not None:
        return {"available": False, "reason": reason, "window_hours": hours}
    with engine.connect() as conn:
        rows = conn.execute(_INSIDE_SQL, {"states": list(IN_FORCE_STATES), "now": now, "since": since}).all()
    by_alert: dict[str, int] = {}
    for row in rows:
        by_alert[row.root_id] = by_alert.get(row.root_id, 0) + 1
    return {
        "available": True, "window_hours": hours, "since": since.isoformat(),
        "detections": len({r.key for r in rows}), "by_alert": by_alert,
        "matches": [{"key": r.key, "lat": r.lat, "lon": r.lon, "frp_mw": r.frp, "event_time": r.event_time.isoformat(),
                     "alert": r.root_id, "event": r.event} for r in rows[:MAX_LISTED]],
    }


def fire_activity_summary(engine: sa.Engine, *, now: datetime | None = None, hours: int = 24) -> dict[str, Any]:
    """The ``fire_activity_summary`` DAG's report: California activity, alerts in force, detections inside them."""
    now = now or datetime.now(UTC)
    report = california_fire_activity(engine, now=now, hours=hours)
    alerts = alerts_in_force(engine, now=now, limit=MAX_LISTED)
    report["alerts_in_force"] = [
        {k: a[k] for k in ("root_id", "state", "event", "headline", "priority", "sent", "expires_at", "ugc")}
        for a in alerts]
    report["detections_in_alerts"] = detections_in_alerts(engine, now=now, hours=hours)
    return report
