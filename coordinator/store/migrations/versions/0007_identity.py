"""Identity and audit: tenants, credentials, custom roles, the server's secrets, the audit
trail.

- tenants: one row per tenant; the ``default`` tenant (every call's tenant until
  authentication existed, and the system tenant) is inserted here;
- credentials: API keys (a keyed hash of the secret) and client-certificate subjects, by
  a globally unique id; at most one certificate credential per subject (a partial unique
  index);
- roles: custom roles per tenant, their grants as a JSON list of text;
- server_secrets: secrets the coordinator generates for itself, stored by the first
  replica;
- audit_records and audit_heads: one hash chain per tenant, and its head (last seq and
  hash), which an append locks;
- workers.credential: the credential that registered the worker ('' for existing rows).

Only new tables and a column with a default: a previous release keeps working on the
upgraded schema.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the values in coordinator/store/_tables.py and coordinator/model as of
# this revision.
_CERTIFICATE = "kind = 'certificate'"
_DEFAULT_TENANT = "default"


def upgrade() -> None:
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
    )
    assert tenants is not None
    op.bulk_insert(
        tenants,
        [{"id": _DEFAULT_TENANT, "created_at": int(time.time() * 1000), "created_by": ""}],
    )
    op.create_table(
        "credentials",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("roles", sa.Text(), nullable=False),
        sa.Column("secret_hash", sa.Text(), nullable=False),
        sa.Column("hash_key_id", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("last_used_at", sa.BigInteger(), nullable=True),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_credentials"),
    )
    op.create_index("ix_credentials_tenant_id", "credentials", ["tenant_id"])
    op.create_index(
        "ix_credentials_certificate_subject",
        "credentials",
        ["subject"],
        unique=True,
        postgresql_where=sa.text(_CERTIFICATE),
        sqlite_where=sa.text(_CERTIFICATE),
    )
    op.create_table(
        "roles",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("grants", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "name", name="pk_roles"),
    )
    op.create_table(
        "server_secrets",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_server_secrets"),
    )
    op.create_table(
        "audit_records",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("credential", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.Text(), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "seq", name="pk_audit_records"),
    )
    op.create_index(
        "ix_audit_records_tenant_id_actor_seq", "audit_records", ["tenant_id", "actor", "seq"]
    )
    op.create_table(
        "audit_heads",
        sa.Column("tenant_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_audit_heads"),
    )
    op.add_column(
        "workers",
        sa.Column("credential", sa.Text(), nullable=False, server_default=""),
    )


def downgrade() -> None:
    # Plain DROP COLUMN (see 0002).
    op.drop_column("workers", "credential")
    op.drop_table("audit_heads")
    op.drop_index("ix_audit_records_tenant_id_actor_seq", table_name="audit_records")
    op.drop_table("audit_records")
    op.drop_table("server_secrets")
    op.drop_table("roles")
    op.drop_index("ix_credentials_certificate_subject", table_name="credentials")
    op.drop_index("ix_credentials_tenant_id", table_name="credentials")
    op.drop_table("credentials")
    op.drop_table("tenants")
