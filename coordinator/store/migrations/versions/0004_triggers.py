"""Triggers: cron schedules and their fires, webhook triggers, event triggers.

- ``webhook_triggers`` (tenant, path): the workflow to start, the HMAC secret or the
  SHA-256 digest of the bearer token, CEL for the idempotency key and the input;
- ``event_triggers``: subscriptions of workflows to named events, with CEL filter/input;
- ``schedules`` (tenant, id): cron, time zone, policies and the scheduler's state
  (``next_fire_at`` is what the scheduler claims on);
- ``schedule_fires`` (tenant, schedule, fire time): one row per fire time acted on; the
  primary key makes a second fire of the same time impossible.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_triggers",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("workflow_name", sa.Text(), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("auth", sa.Text(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("tolerance_ms", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_expr", sa.Text(), nullable=False),
        sa.Column("input_expr", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "path", name="pk_webhook_triggers"),
    )
    op.create_table(
        "event_triggers",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("event_name", sa.Text(), nullable=False),
        sa.Column("workflow_name", sa.Text(), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("filter_expr", sa.Text(), nullable=False),
        sa.Column("input_expr", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_event_triggers"),
    )
    op.create_index(
        "ix_event_triggers_tenant_id_event_name", "event_triggers", ["tenant_id", "event_name"]
    )
    op.create_table(
        "schedules",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("cron", sa.Text(), nullable=False),
        sa.Column("timezone", sa.Text(), nullable=False),
        sa.Column("workflow_name", sa.Text(), nullable=False),
        sa.Column("workflow_version", sa.Integer(), nullable=False),
        sa.Column("input", sa.LargeBinary(), nullable=False),
        sa.Column("overlap", sa.Text(), nullable=False),
        sa.Column("catchup", sa.Text(), nullable=False),
        sa.Column("max_catchup", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_fire_at", sa.BigInteger(), nullable=True),
        sa.Column("last_fire_at", sa.BigInteger(), nullable=True),
        sa.Column("last_execution_id", sa.Text(), nullable=True),
        sa.Column("buffered_fire_at", sa.BigInteger(), nullable=True),
        sa.Column("started_fires", sa.BigInteger(), nullable=False),
        sa.Column("skipped_fires", sa.BigInteger(), nullable=False),
        sa.Column("missed_fires", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_schedules"),
    )
    op.create_index("ix_schedules_next_fire_at", "schedules", ["next_fire_at"])
    op.create_index("ix_schedules_buffered_fire_at", "schedules", ["buffered_fire_at"])
    op.create_table(
        "schedule_fires",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("schedule_id", sa.Text(), nullable=False),
        sa.Column("fire_at", sa.BigInteger(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("execution_id", sa.Text(), nullable=True),
        sa.Column("recorded_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "schedule_id", "fire_at", name="pk_schedule_fires"),
    )


def downgrade() -> None:
    op.drop_table("schedule_fires")
    op.drop_index("ix_schedules_buffered_fire_at", table_name="schedules")
    op.drop_index("ix_schedules_next_fire_at", table_name="schedules")
    op.drop_table("schedules")
    op.drop_index("ix_event_triggers_tenant_id_event_name", table_name="event_triggers")
    op.drop_table("event_triggers")
    op.drop_table("webhook_triggers")
