"""Execution filters: indexes for listing and bulk-selecting executions by status and by
parent (ListExecutions' filter).

Only new indexes: a previous release keeps working on the upgraded schema.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_executions_tenant_id_status_created_at",
        "executions",
        ["tenant_id", "status", "created_at"],
    )
    op.create_index(
        "ix_executions_tenant_id_parent_execution_id_created_at",
        "executions",
        ["tenant_id", "parent_execution_id", "created_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_executions_tenant_id_parent_execution_id_created_at", table_name="executions")
    op.drop_index("ix_executions_tenant_id_status_created_at", table_name="executions")
