"""Fault tolerance: execution deadlines, schedule-to-start, holds, redrives, dead letters.

- executions.deadline, and a partial index for the execution-timeout sweeper;
- node_runs: schedule_deadline / schedule_to_start_ms, held, node_paused, retry_base, role;
  the claim index now leaves held rows out, and a partial index serves the schedule-to-start
  sweeper;
- workers(last_seen) for the lost-worker sweeper;
- the dead_letters table.

New columns are nullable or have a server default, so rows written before (and by a
previous release during a rolling upgrade) read as not held, role 'task', retry_base 0.
SQLite adds (and, from 3.35, drops) such columns in place: no batch mode is needed.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the predicates in coordinator/store/_tables.py as of this revision.
_CLAIMABLE = "status = 'READY' AND held = false"
_LIVE_WITH_DEADLINE = "status IN ('PENDING', 'PAUSED', 'RUNNING') AND deadline IS NOT NULL"
_CLAIM_COLUMNS: list[str | sa.TextClause] = [
    "tenant_id",
    "task_type",
    sa.text("priority DESC"),
    "available_at",
]


def _partial_index(
    name: str, table: str, columns: Sequence[str | sa.TextClause], predicate: str
) -> None:
    op.create_index(
        name,
        table,
        columns,
        postgresql_where=sa.text(predicate),
        sqlite_where=sa.text(predicate),
    )


def upgrade() -> None:
    op.add_column("executions", sa.Column("deadline", sa.BigInteger(), nullable=True))
    _partial_index("ix_executions_deadline", "executions", ["deadline"], _LIVE_WITH_DEADLINE)

    op.add_column("node_runs", sa.Column("schedule_deadline", sa.BigInteger(), nullable=True))
    op.add_column("node_runs", sa.Column("schedule_to_start_ms", sa.BigInteger(), nullable=True))
    op.add_column(
        "node_runs", sa.Column("held", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column(
        "node_runs",
        sa.Column("node_paused", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column(
        "node_runs",
        sa.Column("retry_base", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column("node_runs", sa.Column("role", sa.Text(), nullable=False, server_default="task"))
    op.drop_index("ix_node_runs_claim", table_name="node_runs")
    _partial_index("ix_node_runs_claim", "node_runs", _CLAIM_COLUMNS, _CLAIMABLE)
    _partial_index(
        "ix_node_runs_schedule_deadline",
        "node_runs",
        ["schedule_deadline"],
        f"{_CLAIMABLE} AND schedule_deadline IS NOT NULL",
    )

    op.create_index("ix_workers_last_seen", "workers", ["last_seen"])

    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("execution_id", sa.Text(), nullable=False),
        sa.Column("workflow_name", sa.Text(), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Text(), nullable=False),
        sa.Column("task_type", sa.Text(), nullable=False),
        sa.Column("input", sa.LargeBinary(), nullable=True),
        sa.Column("attempts", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("redriven_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name="fk_dead_letters_execution_id_executions",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_dead_letters_tenant_id_created_at_id",
        "dead_letters",
        ["tenant_id", "created_at", "id"],
    )
    _partial_index(
        "ix_dead_letters_unredriven",
        "dead_letters",
        ["tenant_id", "created_at", "id"],
        "redriven_at IS NULL",
    )
    op.create_index("ix_dead_letters_execution_id", "dead_letters", ["execution_id"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_execution_id", table_name="dead_letters")
    op.drop_index("ix_dead_letters_unredriven", table_name="dead_letters")
    op.drop_index("ix_dead_letters_tenant_id_created_at_id", table_name="dead_letters")
    op.drop_table("dead_letters")

    op.drop_index("ix_workers_last_seen", table_name="workers")

    # Plain DROP COLUMN (SQLite >= 3.35), not batch mode: rebuilding executions would drop
    # the table, and with foreign keys on that cascades to node_runs and events. Indexes
    # that name a dropped column go first.
    op.drop_index("ix_node_runs_schedule_deadline", table_name="node_runs")
    op.drop_index("ix_node_runs_claim", table_name="node_runs")
    for column in (
        "role",
        "retry_base",
        "node_paused",
        "held",
        "schedule_to_start_ms",
        "schedule_deadline",
    ):
        op.drop_column("node_runs", column)
    _partial_index("ix_node_runs_claim", "node_runs", _CLAIM_COLUMNS, "status = 'READY'")

    op.drop_index("ix_executions_deadline", table_name="executions")
    op.drop_column("executions", "deadline")
