"""Task failures: one row per failed Airflow task try, written by the DAGs' ``on_failure_callback``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

See ``wildfire.airflow.callbacks``: dag, task, run, try and an exception summary with secrets masked; the
operations page lists the newest.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "task_failures",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("ts", TS, nullable=False),
        sa.Column("dag_id", sa.Text, nullable=False),
        sa.Column("task_id", sa.Text, nullable=False),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("map_index", sa.Integer, nullable=False, server_default="-1"),
        sa.Column("try_number", sa.Integer, nullable=True),
        sa.Column("exception", sa.Text, nullable=False),
    )
    op.create_index("ix_task_failures_ts", "task_failures", ["ts"])


def downgrade() -> None:
    op.drop_index("ix_task_failures_ts", table_name="task_failures")
    op.drop_table("task_failures")
