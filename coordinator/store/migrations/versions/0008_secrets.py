"""The tenant's secret store.

- secrets: one row per (tenant, name); ``value`` is sealed (AES-256-GCM, see
  ``coordinator/sealing.py``) with its key id, never plaintext.

Webhook trigger secrets and notification channel settings keep their columns; from this
release on they are written sealed, and rows written before it (plaintext) are read as
they are and sealed when the coordinator starts with this schema (and by every
``trellis secrets rotate-key``). Only a new table: a previous release keeps working on the
upgraded schema for rows it wrote itself.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "secrets",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name", name="pk_secrets"),
    )


def downgrade() -> None:
    op.drop_table("secrets")
