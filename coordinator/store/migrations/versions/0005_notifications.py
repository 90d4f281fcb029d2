"""Notifications: channels, rules, the delivery outbox and its attempts.

- notification_channels: where notifications go (kind + JSON settings), unique name per
  tenant;
- notification_rules: a channel attached to a workflow name or one execution, for some
  final statuses; indexed for the lookup made when an execution ends;
- notification_deliveries: the outbox, one row per (rule, execution that ended), inserted
  in the transition's transaction; a partial index on PENDING rows serves the dispatcher;
- notification_attempts: every attempt of every delivery.

Only new tables: a previous release keeps working on the upgraded schema.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copy of the predicate in coordinator/store/_notifications.py as of this revision.
_DUE = "status = 'PENDING'"


def upgrade() -> None:
    op.create_table(
        "notification_channels",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_notification_channels"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_notification_channels_tenant_id_name"),
    )
    op.create_table(
        "notification_rules",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("channel_id", sa.Text(), nullable=False),
        sa.Column("workflow_name", sa.Text(), nullable=True),
        sa.Column("execution_id", sa.Text(), nullable=True),
        sa.Column("statuses", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_notification_rules"),
        sa.ForeignKeyConstraint(
            ["channel_id"],
            ["notification_channels.id"],
            name="fk_notification_rules_channel_id_notification_channels",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name="fk_notification_rules_execution_id_executions",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_notification_rules_tenant_id_workflow_name",
        "notification_rules",
        ["tenant_id", "workflow_name"],
    )
    op.create_index(
        "ix_notification_rules_tenant_id_execution_id",
        "notification_rules",
        ["tenant_id", "execution_id"],
    )
    op.create_index("ix_notification_rules_channel_id", "notification_rules", ["channel_id"])

    op.create_table(
        "notification_deliveries",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("execution_id", sa.Text(), nullable=False),
        sa.Column("workflow_name", sa.Text(), nullable=False),
        sa.Column("execution_status", sa.Text(), nullable=False),
        sa.Column("channel_id", sa.Text(), nullable=False),
        sa.Column("rule_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("next_attempt_at", sa.BigInteger(), nullable=False),
        sa.Column("claimed_until", sa.BigInteger(), nullable=True),
        sa.Column("claim_seq", sa.BigInteger(), nullable=False),
        sa.Column("delivered_at", sa.BigInteger(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_notification_deliveries"),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name="fk_notification_deliveries_execution_id_executions",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_notification_deliveries_due",
        "notification_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text(_DUE),
        sqlite_where=sa.text(_DUE),
    )
    op.create_index(
        "ix_notification_deliveries_tenant_id_created_at_id",
        "notification_deliveries",
        ["tenant_id", "created_at", "id"],
    )
    op.create_index(
        "ix_notification_deliveries_tenant_id_execution_id",
        "notification_deliveries",
        ["tenant_id", "execution_id"],
    )
    op.create_index(
        "ix_notification_deliveries_tenant_id_channel_id_created_at",
        "notification_deliveries",
        ["tenant_id", "channel_id", "created_at"],
    )

    op.create_table(
        "notification_attempts",
        sa.Column("delivery_id", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("delivery_id", "attempt", name="pk_notification_attempts"),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["notification_deliveries.id"],
            name="fk_notification_attempts_delivery_id_notification_deliveries",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("notification_attempts")
    for name in (
        "ix_notification_deliveries_tenant_id_channel_id_created_at",
        "ix_notification_deliveries_tenant_id_execution_id",
        "ix_notification_deliveries_tenant_id_created_at_id",
        "ix_notification_deliveries_due",
    ):
        op.drop_index(name, table_name="notification_deliveries")
    op.drop_table("notification_deliveries")
    for name in (
        "ix_notification_rules_channel_id",
        "ix_notification_rules_tenant_id_execution_id",
        "ix_notification_rules_tenant_id_workflow_name",
    ):
        op.drop_index(name, table_name="notification_rules")
    op.drop_table("notification_rules")
    op.drop_table("notification_channels")
