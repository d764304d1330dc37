"""Initial schema: record tables, dead letters, audit log, worker status.

Revision ID: 0001
Revises:
Create Date: 2025-06-01

Frozen copy of the tables as first released; later changes go in new revisions, never here.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_TYPED = {
    "fire_detections": [("satellite", sa.Text), ("instrument", sa.Text), ("confidence", sa.Text),
                        ("frp", sa.Float), ("brightness", sa.Float)],
    "weather_observations": [("station_id", sa.Text), ("temperature", sa.Float),
                             ("relative_humidity", sa.Float), ("wind_speed", sa.Float)],
    "alerts": [("event", sa.Text), ("severity", sa.Text), ("expires", TS)],
    "air_quality": [("sensor_id", sa.Text), ("pm2_5", sa.Float)],
    "iot_readings": [("device_id", sa.Text), ("metric", sa.Text), ("value", sa.Float)],
    "era5_grid": [("variable", sa.Text), ("value", sa.Float)],
}


def _has_postgis(bind) -> bool:
    if bind.dialect.name != "postgresql":
        return False
    # Installed already (e.g. from template1), or installable by this role: CREATE EXTENSION postgis needs a
    # superuser, and a database owner without it would fail here instead of falling back to lat/lon.
    if bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'postgis'")).first() is not None:
        return True
    return (bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'")).first() is not None
            and bool(bind.execute(sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()))


def upgrade() -> None:
    bind = op.get_bind()
    postgis = _has_postgis(bind)
    if postgis:
        op.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    for table, typed in _TYPED.items():
        op.create_table(
            table,
            sa.Column("id", ID, primary_key=True, autoincrement=True),
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
            *[sa.Column(name, typ) for name, typ in typed],
            sa.UniqueConstraint("key", name=f"uq_{table}_key"),
        )
        op.create_index(f"ix_{table}_event_time", table, ["event_time"])
        if postgis:
            # Generated from lat/lon so writers never have to know whether PostGIS is there.
            op.execute(
                f"ALTER TABLE {table} ADD COLUMN geom geometry(Point, 4326) GENERATED ALWAYS AS "
                "(CASE WHEN lat IS NULL OR lon IS NULL THEN NULL "
                "ELSE ST_SetSRID(ST_MakePoint(lon, lat), 4326) END) STORED"
            )
            op.execute(f"CREATE INDEX ix_{table}_geom ON {table} USING gist (geom)")

    op.create_table(
        "dead_letters",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
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
    )
    op.create_index("ix_dead_letters_created_at", "dead_letters", ["created_at"])
    op.create_table(
        "audit_log",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("ts", TS, nullable=False, server_default=sa.func.current_timestamp()),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("detail", JSONType, nullable=False),
    )
    op.create_index("ix_audit_log_ts", "audit_log", ["ts"])
    op.create_table(
        "worker_status",
        sa.Column("worker_id", sa.Text, primary_key=True),
        sa.Column("component", sa.Text, nullable=False),
        sa.Column("heartbeat", TS, nullable=False),
        sa.Column("state", JSONType, nullable=False),
    )


def downgrade() -> None:
    for table in ("worker_status", "audit_log", "dead_letters", *reversed(list(_TYPED))):
        op.drop_table(table)
