"""Initial schema: definitions, executions, node runs, events, workers.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the shapes in coordinator/store/_tables.py as of this revision.
_BIGINT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _error_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("error_type", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_details", sa.LargeBinary(), nullable=True),
        sa.Column("error_node_id", sa.Text(), nullable=True),
        sa.Column("error_attempt", sa.Integer(), nullable=True),
        sa.Column("error_worker_id", sa.Text(), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "workflow_definitions",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name", "version", name="pk_workflow_definitions"),
        sa.UniqueConstraint(
            "tenant_id",
            "name",
            "content_hash",
            name="uq_workflow_definitions_tenant_id_name_content_hash",
        ),
    )

    op.create_table(
        "executions",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("workflow_name", sa.Text(), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("input", sa.LargeBinary(), nullable=False),
        sa.Column("output", sa.LargeBinary(), nullable=True),
        *_error_columns(),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("parent_execution_id", sa.Text(), nullable=True),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("ended_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_executions"),
        sa.UniqueConstraint(
            "tenant_id", "idempotency_key", name="uq_executions_tenant_id_idempotency_key"
        ),
    )
    op.create_index(
        "ix_executions_tenant_id_created_at_id", "executions", ["tenant_id", "created_at", "id"]
    )
    op.create_index(
        "ix_executions_tenant_id_workflow_name_created_at",
        "executions",
        ["tenant_id", "workflow_name", "created_at"],
    )

    op.create_table(
        "node_runs",
        sa.Column("execution_id", sa.Text(), nullable=False),
        sa.Column("node_id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("workflow_name", sa.Text(), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("task_type", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("input", sa.LargeBinary(), nullable=True),
        sa.Column("output", sa.LargeBinary(), nullable=True),
        *_error_columns(),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("available_at", sa.BigInteger(), nullable=True),
        sa.Column("start_to_close_ms", sa.BigInteger(), nullable=False),
        sa.Column("heartbeat_timeout_ms", sa.BigInteger(), nullable=True),
        sa.Column("lease_seq", sa.BigInteger(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("lease_deadline", sa.BigInteger(), nullable=True),
        sa.Column("heartbeat_deadline", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("execution_id", "node_id", name="pk_node_runs"),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name="fk_node_runs_execution_id_executions",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_node_runs_claim",
        "node_runs",
        ["tenant_id", "task_type", sa.text("priority DESC"), "available_at"],
        postgresql_where=sa.text("status = 'READY'"),
        sqlite_where=sa.text("status = 'READY'"),
    )
    op.create_index(
        "ix_node_runs_lease_deadline",
        "node_runs",
        ["lease_deadline"],
        postgresql_where=sa.text("status = 'LEASED'"),
        sqlite_where=sa.text("status = 'LEASED'"),
    )
    op.create_index(
        "ix_node_runs_heartbeat_deadline",
        "node_runs",
        ["heartbeat_deadline"],
        postgresql_where=sa.text("status = 'LEASED'"),
        sqlite_where=sa.text("status = 'LEASED'"),
    )

    op.create_table(
        "events",
        sa.Column("sequence", _BIGINT_ID, autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("execution_id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("node_id", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.Text(), nullable=True),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("details", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("sequence", name="pk_events"),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name="fk_events_execution_id_executions",
            ondelete="CASCADE",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_events_execution_id_sequence", "events", ["execution_id", "sequence"])

    op.create_table(
        "workers",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("task_types", sa.Text(), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("labels", sa.Text(), nullable=False),
        sa.Column("sdk_language", sa.Text(), nullable=False),
        sa.Column("sdk_version", sa.Text(), nullable=False),
        sa.Column("identity", sa.Text(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_workers"),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_events_execution_id_sequence", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_node_runs_heartbeat_deadline", table_name="node_runs")
    op.drop_index("ix_node_runs_lease_deadline", table_name="node_runs")
    op.drop_index("ix_node_runs_claim", table_name="node_runs")
    op.drop_table("node_runs")
    op.drop_index("ix_executions_tenant_id_workflow_name_created_at", table_name="executions")
    op.drop_index("ix_executions_tenant_id_created_at_id", table_name="executions")
    op.drop_table("executions")
    op.drop_table("workflow_definitions")
