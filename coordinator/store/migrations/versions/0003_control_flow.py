"""Control flow: sub-workflow links, delayed starts, dynamic expansions.

- executions.parent_node_id (the parent's workflow node a child runs for), start_at (a
  delayed start, epoch ms) with a partial index for PENDING rows that have one, expansion
  (nodes and edges added at run time, JSON bytes);
- a partial index on executions(parent_execution_id) over unfinished children;
- node_runs.child_execution_id (the child a WAITING workflow node started), with a partial
  index over WAITING rows.

All new columns are nullable, so rows written before (and by the previous release during a
rolling upgrade) read as no parent node, no delay, no expansion, no child. SQLite adds and
(from 3.35) drops such columns in place: no batch mode is needed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the predicates in coordinator/store/_tables.py as of this revision.
_DELAYED = "status = 'PENDING' AND start_at IS NOT NULL"
_LIVE_CHILD = "status IN ('PENDING', 'PAUSED', 'RUNNING') AND parent_execution_id IS NOT NULL"
_WAITING = "status = 'WAITING'"


def _partial_index(name: str, table: str, columns: Sequence[str], predicate: str) -> None:
    op.create_index(
        name,
        table,
        columns,
        postgresql_where=sa.text(predicate),
        sqlite_where=sa.text(predicate),
    )


def upgrade() -> None:
    op.add_column("executions", sa.Column("parent_node_id", sa.Text(), nullable=True))
    op.add_column("executions", sa.Column("start_at", sa.BigInteger(), nullable=True))
    op.add_column("executions", sa.Column("expansion", sa.LargeBinary(), nullable=True))
    _partial_index("ix_executions_start_at", "executions", ["start_at"], _DELAYED)
    _partial_index(
        "ix_executions_parent_execution_id", "executions", ["parent_execution_id"], _LIVE_CHILD
    )
    op.add_column("node_runs", sa.Column("child_execution_id", sa.Text(), nullable=True))
    _partial_index("ix_node_runs_waiting", "node_runs", ["child_execution_id"], _WAITING)


def downgrade() -> None:
    # Plain DROP COLUMN (see 0002): indexes that name a dropped column go first.
    op.drop_index("ix_node_runs_waiting", table_name="node_runs")
    op.drop_column("node_runs", "child_execution_id")
    op.drop_index("ix_executions_parent_execution_id", table_name="executions")
    op.drop_index("ix_executions_start_at", table_name="executions")
    for column in ("expansion", "start_at", "parent_node_id"):
        op.drop_column("executions", column)
