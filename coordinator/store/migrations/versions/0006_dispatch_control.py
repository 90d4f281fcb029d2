"""Dispatch control: limits per task type, priority ageing, concurrency keys, overflow queue.

- task_type_limits: rate, concurrency and breaker settings per (tenant, task type);
- node_runs.dispatch_rank: the claim order with ageing (available_at - priority * aging),
  backfilled with the default aging of 60 s per priority step; the claim index moves to it;
- node_runs.concurrency_key and an index over leased rows by (type, key) for counting;
- executions.max_concurrency, executions.queued, and indexes for the overflow queue and for
  counting a workflow's running executions.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the predicates in coordinator/store/_tables.py as of this revision.
_CLAIMABLE = "status = 'READY' AND held = false"
_LEASED = "status = 'LEASED'"
_QUEUED = "status = 'PENDING' AND queued = true"
_RUNNING = "status IN ('RUNNING', 'PAUSED')"
_DEFAULT_AGING_MS = 60_000


def _partial_index(name: str, table: str, columns: Sequence[str], predicate: str) -> None:
    op.create_index(
        name,
        table,
        columns,
        postgresql_where=sa.text(predicate),
        sqlite_where=sa.text(predicate),
    )


def upgrade() -> None:
    op.create_table(
        "task_type_limits",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("task_type", sa.Text(), nullable=False),
        sa.Column("rate_per_second", sa.Float(), nullable=False),
        sa.Column("burst", sa.Integer(), nullable=False),
        sa.Column("rate_key", sa.Text(), nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("concurrency_key", sa.Text(), nullable=False),
        sa.Column("concurrency_key_limit", sa.Integer(), nullable=False),
        sa.Column("breaker_failure_threshold", sa.Integer(), nullable=False),
        sa.Column("breaker_reset_ms", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "task_type"),
    )
    op.add_column("node_runs", sa.Column("dispatch_rank", sa.BigInteger(), nullable=True))
    op.add_column("node_runs", sa.Column("concurrency_key", sa.Text(), nullable=True))
    op.execute(
        f"UPDATE node_runs SET dispatch_rank = available_at - priority * {_DEFAULT_AGING_MS} "
        "WHERE available_at IS NOT NULL"
    )
    op.drop_index("ix_node_runs_claim", table_name="node_runs")
    _partial_index(
        "ix_node_runs_dispatch",
        "node_runs",
        ["tenant_id", "task_type", "dispatch_rank"],
        _CLAIMABLE,
    )
    _partial_index(
        "ix_node_runs_leased_type",
        "node_runs",
        ["tenant_id", "task_type", "concurrency_key"],
        _LEASED,
    )
    op.add_column(
        "executions",
        sa.Column("max_concurrency", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column(
        "executions",
        sa.Column("queued", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    _partial_index(
        "ix_executions_queued", "executions", ["tenant_id", "workflow_name", "created_at"], _QUEUED
    )
    _partial_index("ix_executions_running", "executions", ["tenant_id", "workflow_name"], _RUNNING)


def downgrade() -> None:
    # Plain DROP COLUMN (see 0002): indexes that name a dropped column go first.
    op.drop_index("ix_executions_running", table_name="executions")
    op.drop_index("ix_executions_queued", table_name="executions")
    # The previous release knows no overflow queue: its delayed-start sweeper starts
    # queued executions once they have a start time.
    op.execute(
        "UPDATE executions SET start_at = created_at "
        "WHERE status = 'PENDING' AND queued AND start_at IS NULL"
    )
    op.drop_column("executions", "queued")
    op.drop_column("executions", "max_concurrency")
    op.drop_index("ix_node_runs_leased_type", table_name="node_runs")
    op.drop_index("ix_node_runs_dispatch", table_name="node_runs")
    op.create_index(
        "ix_node_runs_claim",
        "node_runs",
        ["tenant_id", "task_type", sa.text("priority DESC"), "available_at"],
        postgresql_where=sa.text(_CLAIMABLE),
        sqlite_where=sa.text(_CLAIMABLE),
    )
    op.drop_column("node_runs", "concurrency_key")
    op.drop_column("node_runs", "dispatch_rank")
    op.drop_table("task_type_limits")
