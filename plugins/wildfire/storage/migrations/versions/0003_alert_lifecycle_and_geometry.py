"""Alert lifecycle tables (alert_links, alert_chains) and, with PostGIS, the geometry for spatial queries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

- ``alert_links`` / ``alert_chains``: see ``wildfire.storage.alerts``. Alerts stored before this revision
  are grouped into chains here (their payloads carry no references: each becomes a chain of one).
- PostgreSQL with PostGIS: the extension is created when it is already installed in the database or the
  migrating role may create it (a superuser); ``fire_detections.geom`` (generated from lat/lon) is added
  with its GiST index if the database was created without PostGIS, and ``alert_chains.area``
  (``geometry(Geometry, 4326)``, generated from the GeoJSON ``geometry`` with ``ST_MakeValid``) gets a
  GiST index. Without PostGIS (or on SQLite) the tables work the same with no geometry column.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def postgis_usable(bind) -> bool:
    """PostGIS is in this database, or can be created by this role; False on SQLite."""
    if bind.dialect.name != "postgresql":
        return False
    if bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'postgis'")).first() is not None:
        return True
    available = bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'postgis'")).first()
    superuser = bind.execute(sa.text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")).scalar()
    if available is None or not superuser:
        return False
    op.execute("CREATE EXTENSION IF NOT EXISTS postgis")
    return True


def _has_column(bind, table: str, column: str) -> bool:
    return bind.execute(sa.text("SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                                "AND table_name = :t AND column_name = :c"), {"t": table, "c": column}).first() is not None


def upgrade() -> None:
    bind = op.get_bind()
    op.create_table(
        "alert_links",
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("ref_id", sa.Text, nullable=False),
        sa.Column("ref_sent", TS),
        sa.PrimaryKeyConstraint("message_id", "ref_id", name="pk_alert_links"),
    )
    op.create_index("ix_alert_links_ref_id", "alert_links", ["ref_id"])
    op.create_table(
        "alert_chains",
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
    )
    op.create_index("ix_alert_chains_state_expires", "alert_chains", ["state", "expires_at"])
    if postgis_usable(bind):
        if not _has_column(bind, "fire_detections", "geom"):
            op.execute(
                "ALTER TABLE fire_detections ADD COLUMN geom geometry(Point, 4326) GENERATED ALWAYS AS "
                "(CASE WHEN lat IS NULL OR lon IS NULL THEN NULL "
                "ELSE ST_SetSRID(ST_MakePoint(lon, lat), 4326) END) STORED"
            )
            op.execute("CREATE INDEX ix_fire_detections_geom ON fire_detections USING gist (geom)")
        # Storage writes only geometries wildfire.geojson.check_geometry accepted, so this cannot fail
        # on a stored value; ST_MakeValid repairs a self-intersecting ring so spatial predicates never raise.
        op.execute(
            "ALTER TABLE alert_chains ADD COLUMN area geometry(Geometry, 4326) GENERATED ALWAYS AS "
            "(CASE WHEN geometry IS NULL THEN NULL "
            "ELSE ST_MakeValid(ST_SetSRID(ST_GeomFromGeoJSON(geometry), 4326)) END) STORED"
        )
        op.execute("CREATE INDEX ix_alert_chains_area ON alert_chains USING gist (area)")
    _backfill(bind)


def _backfill(bind) -> None:
    from wildfire.storage.alerts import refresh_chains

    postgres = bind.dialect.name == "postgresql"

    def run(sql: str, params):
        result = bind.exec_driver_sql(sql.replace("?", "%s") if postgres else sql, tuple(params))
        return result.fetchall() if result.returns_rows else []

    keys = [k for (k,) in bind.execute(sa.text("SELECT key FROM alerts"))]
    for i in range(0, len(keys), 1000):
        refresh_chains(run, keys[i:i + 1000])


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX IF EXISTS ix_alert_chains_area")
    op.drop_table("alert_chains")
    op.drop_table("alert_links")
