"""Reports over the stored tables (kept out of DAG files so they are testable on SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from wildfire.storage.schema import RECORD_TABLES

CALIFORNIA = (-124.48, 32.53, -114.13, 42.01)


def california_fire_activity(engine: sa.Engine, *, now: datetime | None = None, hours: int = 24) -> dict[str, Any]:
    """Detections in the California bbox over the last ``hours``: count, total FRP, by satellite, hottest."""
    t = RECORD_TABLES["fire_detection"]
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=hours)
    west, south, east, north = CALIFORNIA
    where = sa.and_(t.c.event_time >= since, t.c.lat.between(south, north), t.c.lon.between(west, east))
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
