"""Typed columns filled from the payload fields the connectors really write.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04

The typed columns used to be read from payload keys no connector writes (``frp`` where FIRMS writes
``frp_mw``, ``temperature`` where NWS writes ``temperature_c``, ...), so they were NULL for real data and
the fire-activity summary summed no FRP. The writer now reads the right keys; this revision fills the
columns of rows already stored, where they are NULL and the payload holds a value of the right JSON type.
Downgrade leaves the values (they are correct under either revision).
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# table -> (column, payload key, "float" | "text")
_BACKFILL = {
    "fire_detections": [("confidence", "confidence_class", "text"), ("frp", "frp_mw", "float"),
                        ("brightness", "brightness_k", "float")],
    "weather_observations": [("temperature", "temperature_c", "float"),
                             ("relative_humidity", "relative_humidity_pct", "float"),
                             ("wind_speed", "wind_speed_ms", "float")],
    "air_quality": [("sensor_id", "sensor_index", "text"), ("pm2_5", "pm25_epa_ugm3", "float")],
    "iot_readings": [("device_id", "sensor_id", "text")],
}


def _postgres(column: str, key: str, kind: str) -> tuple[str, str]:
    if kind == "float":
        return f"(payload->>'{key}')::double precision", f"jsonb_typeof(payload->'{key}') = 'number'"
    return f"payload->>'{key}'", f"jsonb_typeof(payload->'{key}') IN ('string', 'number')"


def _sqlite(column: str, key: str, kind: str) -> tuple[str, str]:
    types = "('integer', 'real')" if kind == "float" else "('text', 'integer', 'real')"
    value = f"json_extract(payload, '$.\"{key}\"')"
    if kind == "text":
        value = f"CAST({value} AS TEXT)"
    return value, f"json_type(payload, '$.\"{key}\"') IN {types}"


def upgrade() -> None:
    expr = _postgres if op.get_bind().dialect.name == "postgresql" else _sqlite
    for table, columns in _BACKFILL.items():
        for column, key, kind in columns:
            value, present = expr(column, key, kind)
            op.execute(f"UPDATE {table} SET {column} = {value} WHERE {column} IS NULL AND {present}")


def downgrade() -> None:
    pass
