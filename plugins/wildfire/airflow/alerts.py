"""What the ``evacuation_alert`` DAG does with the CRITICAL alerts its Asset events carry.

- :func:`alerts_from_asset_events`: the alert dicts (built by
  :func:`wildfire.airflow.triggers.alerts.alert_event`) out of the run's triggering Asset events; an event
  without a usable payload (a manual Asset event from the UI) is logged and left out.
- :func:`record_alerts`: one ``evacuation.alert`` audit row per alert (the operations page lists the audit log),
  with whether storage already holds it; an alert key already recorded gets no second row (a watcher that
  restarted before committing its offset fires again for the same record).
- :func:`summarize_alert_areas`: the fire-activity summary (:func:`wildfire.reports.california_fire_activity`)
  in a box of ``radius_km`` around each alert's location, recorded as an ``evacuation.area_summary`` row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from wildfire import ops_state
from wildfire.reports import CALIFORNIA, california_fire_activity
from wildfire.storage.schema import RECORD_TABLES, audit_log

log = logging.getLogger(__name__)

ALERT_ACTION = "evacuation.alert"
SUMMARY_ACTION = "evacuation.area_summary"
ACTOR = "evacuation_alert"


def _payload(event: Any) -> Any:
    extra = event.get("extra") if isinstance(event, Mapping) else getattr(event, "extra", None)
    return extra.get("payload") if isinstance(extra, Mapping) else None


def alerts_from_asset_events(triggering_asset_events: Any) -> list[dict[str, Any]]:
    """Alert dicts from ``{asset: [event, ...]}`` (Airflow's accessor or plain dicts), in event order."""
    alerts: list[dict[str, Any]] = []
    if not triggering_asset_events:
        return alerts
    for events in triggering_asset_events.values():
        for event in events:
            payload = _payload(event)
            if isinstance(payload, Mapping) and isinstance(payload.get("key"), str) and payload["key"]:
                alerts.append(dict(payload))
            else:
                log.warning("asset event without an alert payload left out (a manual event?): %r", payload)
    return alerts


def _recorded(conn: sa.Connection, key: str) -> bool:
    rows = conn.execute(sa.select(audit_log.c.detail).where(audit_log.c.action == ALERT_ACTION)
                        .order_by(audit_log.c.id.desc()).limit(1000)).scalars()
    return any(isinstance(d, Mapping) and d.get("key") == key for d in rows)


def record_alerts(engine: sa.Engine, alerts: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Audit rows for the alerts not recorded before; returns every alert with ``stored`` and ``new`` set."""
    table = RECORD_TABLES["alert"]
    out = []
    for alert in alerts:
        with engine.connect() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(table)
                                  .where(table.c.key == alert["key"])).scalar_one() > 0
            new = not _recorded(conn, alert["key"])
        alert = {**alert, "stored": stored, "new": new}
        if new:
            ops_state.append_audit(engine, ACTOR, ALERT_ACTION, alert)
            log.warning("CRITICAL alert %s (%s): %s; in storage: %s", alert["key"], alert.get("event"),
                        alert.get("headline") or alert.get("area_desc"), stored)
        else:
            log.info("CRITICAL alert %s already recorded: no second row", alert["key"])
        out.append(alert)
    return out


def area_bbox(lat: float, lon: float, radius_km: float) -> tuple[float, float, float, float]:
    """(west, south, east, north) of the box ``radius_km`` around a point (good enough away from the poles)."""
    dlat = radius_km / 111.0
    dlon = radius_km / (111.0 * max(math.cos(math.radians(lat)), 0.01))
    return (lon - dlon, max(lat - dlat, -90.0), lon + dlon, min(lat + dlat, 90.0))


def summarize_alert_areas(engine: sa.Engine, alerts: Iterable[dict[str, Any]], *, radius_km: float,
                          hours: int = 24) -> list[dict[str, Any]]:
    """One fire-activity summary per newly recorded alert, around its location (California if it has none)."""
    out = []
    for alert in alerts:
        if not alert.get("new", True):
            continue
        lat, lon = alert.get("lat"), alert.get("lon")
        located = isinstance(lat, int | float) and isinstance(lon, int | float)
        bbox = area_bbox(float(lat), float(lon), radius_km) if located else CALIFORNIA
        report = california_fire_activity(engine, hours=hours, bbox=bbox)
        summary = {"key": alert["key"], "area": "radius" if located else "california", "radius_km": radius_km
                   if located else None, "bbox": [round(v, 4) for v in bbox], **report}
        ops_state.append_audit(engine, ACTOR, SUMMARY_ACTION, summary)
        log.warning("fire activity near alert %s: %d detections in %d h, %.1f MW total", alert["key"],
                    summary["detections"], hours, summary["total_frp_mw"])
        out.append(summary)
    return out
