"""Identity in SQL (docs/security.md): ``SqlIdentity``, the ``IdentityRepository`` port over
the ``tenants``, ``credentials``, ``roles`` and ``server_secrets`` tables (migration 0007),
whose rows become model objects here, the only module that reads or writes them.

Credentials are found by id, or a certificate's subject, across tenants: that is what a
caller presents before its tenant is known. Touching a credential and storing the server
secret are bookkeeping, not a call's effect: their transactions leave the call's pending
audit entry to the call's own writes (``Database.tx(audit=False)``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from coordinator import errors
from coordinator.model import Credential, CredentialKind, Role, Tenant, parse_grants
from coordinator.store._db import Database
from coordinator.store._rows import from_ms, opt_from_ms, opt_to_ms, to_ms
from coordinator.store._tables import credentials, roles, server_secrets, tenants

# The one server secret there is so far.
_SECRET_ID = "main"

# -- rows ---------------------------------------------------------------------------------


def _tenant_values(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "created_at": to_ms(tenant.created_at),
        "created_by": tenant.created_by,
    }


def _tenant_from_row(row: Any) -> Tenant:
    return Tenant(id=row["id"], created_at=from_ms(row["created_at"]), created_by=row["created_by"])


def _credential_values(c: Credential) -> dict[str, Any]:
    return {
        "id": c.id,
        "tenant_id": c.tenant_id,
        "kind": c.kind.value,
        "name": c.name,
        "roles": json.dumps(list(c.roles)),
        "secret_hash": c.secret_hash,
        "hash_key_id": c.hash_key_id,
        "subject": c.subject,
        "created_at": to_ms(c.created_at),
        "created_by": c.created_by,
        "expires_at": opt_to_ms(c.expires_at),
        "last_used_at": opt_to_ms(c.last_used_at),
        "revoked_at": opt_to_ms(c.revoked_at),
    }


def _credential_from_row(row: Any) -> Credential:
    return Credential(
        id=row["id"],
        tenant_id=row["tenant_id"],
        kind=CredentialKind(row["kind"]),
        name=row["name"],
        roles=tuple(json.loads(row["roles"])),
        created_at=from_ms(row["created_at"]),
        created_by=row["created_by"],
        secret_hash=row["secret_hash"],
        hash_key_id=row["hash_key_id"],
        subject=row["subject"],
        expires_at=opt_from_ms(row["expires_at"]),
        last_used_at=opt_from_ms(row["last_used_at"]),
        revoked_at=opt_from_ms(row["revoked_at"]),
    )


def _role_values(role: Role) -> dict[str, Any]:
    return {
        "tenant_id": role.tenant_id,
        "name": role.name,
        "grants": json.dumps(sorted(str(g) for g in role.grants)),
    }


def _role_from_row(row: Any) -> Role:
    return Role(
        tenant_id=row["tenant_id"],
        name=row["name"],
        grants=parse_grants(json.loads(row["grants"])),
    )


# -- messages -----------------------------------------------------------------------------


def _no_credential(tenant_id: str | None, credential_id: str) -> errors.NotFound:
    where = "" if tenant_id is None else f" in tenant {tenant_id!r}"
    return errors.NotFound(
        f"credential {credential_id!r} not found{where}; list the tenant's credentials to "
        "see their ids"
    )


def _subject_taken(subject: str, holder: str) -> errors.AlreadyExists:
    return errors.AlreadyExists(
        f"a certificate credential for subject {subject!r} exists already ({holder}); a "
        "subject maps to one credential: issue the client certificate with another common "
        "name"
    )


class SqlIdentity:
    """The ``IdentityRepository`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _insert(self, table: sa.Table) -> Any:
        return (postgresql.insert if self._db.postgres else sqlite.insert)(table)

    # -- tenants --------------------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant) -> None:
        try:
            async with self._db.tx(write=True) as conn:
                await conn.execute(sa.insert(tenants).values(_tenant_values(tenant)))
        except sa_exc.IntegrityError as exc:
            raise errors.AlreadyExists(
                f"tenant {tenant.id!r} exists already; choose another id"
            ) from exc

    async def list_tenants(self) -> list[Tenant]:
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(sa.select(tenants).order_by(tenants.c.id))).mappings()
            return [_tenant_from_row(r) for r in rows.all()]

    async def tenant_exists(self, tenant_id: str) -> bool:
        query = sa.select(tenants.c.id).where(tenants.c.id == tenant_id)
        async with self._db.tx(write=False) as conn:
            return (await conn.execute(query)).first() is not None

    # -- credentials ----------------------------------------------------------------------

    async def create_credential(self, credential: Credential) -> None:
        c = credentials
        try:
            async with self._db.tx(write=True) as conn:
                if credential.kind is CredentialKind.CERTIFICATE:
                    # The partial unique index decides a race; this names the holder.
                    holder = await conn.scalar(
                        sa.select(c.c.id).where(
                            c.c.kind == CredentialKind.CERTIFICATE.value,
                            c.c.subject == credential.subject,
                        )
                    )
                    if holder is not None:
                        raise _subject_taken(credential.subject, f"credential {holder!r}")
                await conn.execute(sa.insert(c).values(_credential_values(credential)))
        except sa_exc.IntegrityError as exc:
            if credential.kind is CredentialKind.CERTIFICATE:
                raise errors.AlreadyExists(
                    f"credential {credential.id!r}, or a certificate credential for subject "
                    f"{credential.subject!r}, exists already; choose another id or common name"
                ) from exc
            raise errors.AlreadyExists(
                f"credential {credential.id!r} exists already; choose another id"
            ) from exc

    async def get_credential(self, credential_id: str) -> Credential:
        query = sa.select(credentials).where(credentials.c.id == credential_id)
        async with self._db.tx(write=False) as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise _no_credential(None, credential_id)
        return _credential_from_row(row)

    async def find_certificate(self, subject: str) -> Credential:
        c = credentials
        query = sa.select(c).where(
            c.c.kind == CredentialKind.CERTIFICATE.value, c.c.subject == subject
        )
        async with self._db.tx(write=False) as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise errors.NotFound(
                f"no certificate credential for subject {subject!r}; create one for this "
                "common name before the client connects with it"
            )
        return _credential_from_row(row)

    async def list_credentials(self, tenant_id: str) -> list[Credential]:
        c = credentials
        query = sa.select(c).where(c.c.tenant_id == tenant_id).order_by(c.c.created_at, c.c.id)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_credential_from_row(r) for r in rows]

    async def revoke_credential(self, tenant_id: str, credential_id: str, now: datetime) -> None:
        c = credentials
        # A second revocation keeps the first time.
        stmt = (
            sa.update(c)
            .where(c.c.tenant_id == tenant_id, c.c.id == credential_id)
            .values(revoked_at=sa.func.coalesce(c.c.revoked_at, to_ms(now)))
        )
        async with self._db.tx(write=True) as conn:
            result = await conn.execute(stmt)
            if result.rowcount == 0:  # raised inside: the call's audit entry is not taken
                raise _no_credential(tenant_id, credential_id)

    async def touch_credential(self, credential_id: str, now: datetime) -> None:
        c = credentials
        now_ms = to_ms(now)
        # Never moves it back (replicas' clocks); an unknown id changes nothing.
        stmt = (
            sa.update(c)
            .where(
                c.c.id == credential_id,
                sa.or_(c.c.last_used_at.is_(None), c.c.last_used_at < now_ms),
            )
            .values(last_used_at=now_ms)
        )
        async with self._db.tx(write=True, audit=False) as conn:
            await conn.execute(stmt)

    # -- roles ----------------------------------------------------------------------------

    async def put_role(self, role: Role) -> None:
        values = _role_values(role)
        stmt = (
            self._insert(roles)
            .values(values)
            .on_conflict_do_update(
                index_elements=[roles.c.tenant_id, roles.c.name],
                set_={"grants": values["grants"]},
            )
        )
        async with self._db.tx(write=True) as conn:
            await conn.execute(stmt)

    async def list_roles(self, tenant_id: str) -> list[Role]:
        query = sa.select(roles).where(roles.c.tenant_id == tenant_id).order_by(roles.c.name)
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_role_from_row(r) for r in rows]

    async def delete_role(self, tenant_id: str, name: str) -> None:
        stmt = sa.delete(roles).where(roles.c.tenant_id == tenant_id, roles.c.name == name)
        async with self._db.tx(write=True) as conn:
            result = await conn.execute(stmt)
            if result.rowcount == 0:
                raise errors.NotFound(
                    f"role {name!r} not found in tenant {tenant_id!r}; list the tenant's "
                    "roles to see their names (built-in roles cannot be deleted)"
                )

    # -- the server's secret --------------------------------------------------------------

    async def server_secret(self, candidate: str, secret_id: str = _SECRET_ID) -> str:
        # Insert if absent, then read: of replicas racing, the first insert wins and every
        # one reads the winner's (the conflicting inserts wait for it on PostgreSQL).
        s = server_secrets
        insert = (
            self._insert(s)
            .values(id=secret_id, secret=candidate, created_at=to_ms(datetime.now(UTC)))
            .on_conflict_do_nothing(index_elements=[s.c.id])
        )
        async with self._db.tx(write=True, audit=False) as conn:
            await conn.execute(insert)
            secret = await conn.scalar(sa.select(s.c.secret).where(s.c.id == secret_id))
        return str(secret)
