"""The storage schema as SQLAlchemy Core tables: one table per record kind plus operations tables.

Guarantees:

- Every record table has ``key`` as a unique constraint (the natural key the consumer upserts on)
  and an index on ``event_time``; at-least-once delivery from Kafka therefore ends as one row per key.
- ``payload`` is JSONB on PostgreSQL and JSON text on SQLite (``sa.JSON`` with a variant).
- ``dead_letters`` is unique on (topic, partition, offset), so a replayed poison message is recorded once.
- The same tables are created on PostgreSQL and SQLite by the Alembic migrations in ``migrations/``;
  this module is the single description both the migrations and the writer read.

Geometry columns are *not* declared here: the migrations add ``geom geometry(Point, 4326)`` (record tables)
and ``alert_chains.area`` only when
the PostGIS extension is available, because lat/lon must work on every install.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

metadata = sa.MetaData()

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)

# Record kind (records.KINDS) -> table name.
KIND_TABLES: dict[str, str] = {
    "fire_detection": "fire_detections",
    "weather_observation": "weather_observations",
    "alert": "alerts",
    "air_quality": "air_quality",
    "iot_reading": "iot_readings",
    "era5_grid": "era5_grid",
}


@dataclass(slots=True, frozen=True)
class TypedColumn:
    """A column lifted out of the payload so it can be indexed and queried without JSON operators."""

    name: str
    """Column name in the table."""
    payload_key: str
    """Field of ``Record.payload`` it is read from (missing -> NULL)."""
    type: str
    """``text``, ``float`` or ``time`` (ISO-8601 UTC string in the payload)."""


# Per kind, the few payload fields worth a typed column, read from the field names the connectors write
# (docs/connectors.md, "Payload fields per record kind"). Everything stays in ``payload`` as well.
# iot_reading's metric/value and era5_grid's variable/value have no single payload field (a reading carries
# several values): they stay NULL and the values are in ``payload``.
TYPED_COLUMNS: dict[str, tuple[TypedColumn, ...]] = {
    "fire_detection": (
        TypedColumn("satellite", "satellite", "text"),
        TypedColumn("instrument", "instrument", "text"),
        TypedColumn("confidence", "confidence_class", "text"),
        TypedColumn("frp", "frp_mw", "float"),
        TypedColumn("brightness", "brightness_k", "float"),
    ),
    "weather_observation": (
        TypedColumn("station_id", "station_id", "text"),
        TypedColumn("temperature", "temperature_c", "float"),
        TypedColumn("relative_humidity", "relative_humidity_pct", "float"),
        TypedColumn("wind_speed", "wind_speed_ms", "float"),
    ),
    "alert": (
        TypedColumn("event", "event", "text"),
        TypedColumn("severity", "severity", "text"),
        TypedColumn("expires", "expires", "time"),
    ),
    "air_quality": (
        TypedColumn("sensor_id", "sensor_index", "text"),
        TypedColumn("pm2_5", "pm25_epa_ugm3", "float"),
    ),
    "iot_reading": (
        TypedColumn("device_id", "sensor_id", "text"),
        TypedColumn("metric", "metric", "text"),
        TypedColumn("value", "value", "float"),
    ),
    "era5_grid": (
        TypedColumn("variable", "variable", "text"),
        TypedColumn("value", "value", "float"),
    ),
}

_SA_TYPES = {"text": sa.Text, "float": sa.Float, "time": lambda: TS}

# Columns every record table has, in the order the writer fills them.
COMMON_COLUMNS = (
    "key", "source", "event_time", "ingest_time", "stored_at",
    "priority", "lat", "lon", "quality", "payload", "schema_version",
)


def _record_table(kind: str, table: str) -> sa.Table:
    cols: list[sa.SchemaItem] = [
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("event_time", TS, nullable=False),
        sa.Column("ingest_time", TS, nullable=False),
        sa.Column("stored_at", TS, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("priority", sa.SmallInteger, nullable=False),
        sa.Column("lat", sa.Float),
        sa.Column("lon", sa.Float),
        sa.Column("quality", sa.Float, nullable=False),
        sa.Column("payload", JSONType, nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
    ]
    cols += [sa.Column(c.name, _SA_TYPES[c.type]()) for c in TYPED_COLUMNS[kind]]
    cols += [
        sa.UniqueConstraint("key", name=f"uq_{table}_key"),
        sa.Index(f"ix_{table}_event_time", "event_time"),
    ]
    return sa.Table(table, metadata, *cols)


RECORD_TABLES: dict[str, sa.Table] = {kind: _record_table(kind, name) for kind, name in KIND_TABLES.items()}

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("source", sa.Text),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("partition", sa.Integer, nullable=False),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("key", sa.Text),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("payload", sa.LargeBinary),
    sa.Column("created_at", TS, nullable=False, server_default=sa.func.current_timestamp()),
    sa.UniqueConstraint("topic", "partition", "offset", name="uq_dead_letters_position"),
    sa.Index("ix_dead_letters_created_at", "created_at"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("ts", TS, nullable=False, server_default=sa.func.current_timestamp()),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("detail", JSONType, nullable=False),
    sa.Index("ix_audit_log_ts", "ts"),
)

worker_status = sa.Table(
    "worker_status",
    metadata,
    sa.Column("worker_id", sa.Text, primary_key=True),
    sa.Column("component", sa.Text, nullable=False),
    sa.Column("heartbeat", TS, nullable=False),
    sa.Column("state", JSONType, nullable=False),
)

# One row per failed Airflow task try (wildfire.airflow.callbacks; migration 0005), listed on the ops page.
task_failures = sa.Table(
    "task_failures",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("ts", TS, nullable=False),
    sa.Column("dag_id", sa.Text, nullable=False),
    sa.Column("task_id", sa.Text, nullable=False),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("map_index", sa.Integer, nullable=False, server_default="-1"),
    sa.Column("try_number", sa.Integer, nullable=True),
    sa.Column("exception", sa.Text, nullable=False),
    sa.Index("ix_task_failures_ts", "ts"),
)

# ---------------------------------------------------------------- alert lifecycle (wildfire.storage.alerts)

alert_links = sa.Table(
    "alert_links",
    metadata,
    sa.Column("message_id", sa.Text, nullable=False),
    sa.Column("ref_id", sa.Text, nullable=False),
    sa.Column("ref_sent", TS),
    sa.PrimaryKeyConstraint("message_id", "ref_id", name="pk_alert_links"),
    sa.Index("ix_alert_links_ref_id", "ref_id"),
)
"""One row per (NWS message, earlier message it references): the edges alert chains are built from."""

alert_chains = sa.Table(
    "alert_chains",
    metadata,
    sa.Column("root_id", sa.Text, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("current_id", sa.Text, nullable=False),
    sa.Column("message_type", sa.Text),
    sa.Column("event", sa.Text),
    sa.Column("headline", sa.Text),
    sa.Column("severity", sa.Text),
    sa.Column("area_desc", sa.Text),
    sa.Column("priority", sa.SmallInteger, nullable=False),
    sa.Column("sent", TS),
    sa.Column("expires_at", TS),
    sa.Column("ugc", JSONType, nullable=False),
    sa.Column("geometry", JSONType),
    sa.Column("messages", JSONType, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.Index("ix_alert_chains_state_expires", "state", "expires_at"),
)
"""Per alert (its chain's root message id): the state decided from all its messages, by ``sent``.

``state`` is ``active``/``updated``/``cancelled`` as stored; ``expired`` is applied at read time
(:func:`wildfire.storage.alerts.alerts_in_force`). With PostGIS the migration adds ``area
geometry(Geometry, 4326)`` generated from ``geometry`` and a GiST index on it.
"""
