"""Webhook replays: the signed deliveries seen inside their signature's tolerance window.

- webhook_replays: one row per signed webhook delivery admitted, keyed by the tenant and a
  digest of the path, timestamp and body, until ``expires_at`` (epoch ms); a second
  delivery with the same signature finds the row and is refused. Expired rows are swept.

Only a new table: a previous release keeps working on the upgraded schema (it does not
refuse replays).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_replays",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("digest", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "digest", name="pk_webhook_replays"),
    )
    op.create_index("ix_webhook_replays_expires_at", "webhook_replays", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_replays_expires_at", table_name="webhook_replays")
    op.drop_table("webhook_replays")
