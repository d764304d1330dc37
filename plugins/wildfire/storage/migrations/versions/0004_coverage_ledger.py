"""Coverage ledger: ``coverage`` (merged fetched time ranges per source) and ``coverage_backfills``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

See ``wildfire.coverage``: ``coverage`` holds, per source, the time ranges fetched by successful polls and
backfills (merged, so a source fetched without a gap has one row); ``coverage_backfills`` one row per gap whose
backfill DAG run was started, so a gap starts one run.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "coverage",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("range_start", TS, nullable=False),
        sa.Column("range_end", TS, nullable=False),
        sa.CheckConstraint("range_end >= range_start", name="ck_coverage_order"),
    )
    op.create_index("ix_coverage_source_start", "coverage", ["source", "range_start"])
    op.create_table(
        "coverage_backfills",
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("gap_start", TS, nullable=False),
        sa.Column("gap_end", TS, nullable=False),
        sa.Column("dag_id", sa.Text, nullable=False),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("conf", sa.JSON, nullable=False),
        sa.Column("triggered_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("source", "gap_start", "gap_end", name="pk_coverage_backfills"),
    )


def downgrade() -> None:
    op.drop_table("coverage_backfills")
    op.drop_index("ix_coverage_source_start", table_name="coverage")
    op.drop_table("coverage")
