"""The memory store's identity and audit repositories: tenants, credentials, custom roles,
the server secret, and the hash-chained audit trail (appended by ``State.append_audit``,
also from ``State.write`` for the served call's pending entry)."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from coordinator import errors
from coordinator.model import AuditEntry, AuditRecord, Credential, CredentialKind, Role, Tenant
from coordinator.store import _rows
from coordinator.store._memory import _copies
from coordinator.store._memory._state import State


def _no_credential(tenant_id: str | None, credential_id: str) -> errors.NotFound:
    where = "" if tenant_id is None else f" in tenant {tenant_id!r}"
    return errors.NotFound(
        f"credential {credential_id!r} not found{where}; list the tenant's credentials to "
        "see their ids"
    )


class MemoryIdentity:
    """The ``IdentityRepository`` port."""

    def __init__(self, state: State) -> None:
        self._state = state

    # -- tenants --------------------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant) -> None:
        async with self._state.write():
            if tenant.id in self._state.tenants:
                raise errors.AlreadyExists(
                    f"tenant {tenant.id!r} exists already; choose another id"
                )
            self._state.tenants.put(tenant.id, _copies.truncated(tenant))

    async def list_tenants(self) -> list[Tenant]:
        async with self._state.read():
            found = self._state.tenants.values()
        return sorted(found, key=lambda t: t.id)

    async def tenant_exists(self, tenant_id: str) -> bool:
        async with self._state.read():
            return tenant_id in self._state.tenants

    # -- credentials ----------------------------------------------------------------------

    def _certificate(self, subject: str) -> Credential | None:
        for c in self._state.credentials.values():
            if c.kind is CredentialKind.CERTIFICATE and c.subject == subject:
                return c
        return None

    async def create_credential(self, credential: Credential) -> None:
        state = self._state
        async with state.write():
            if credential.kind is CredentialKind.CERTIFICATE:
                holder = self._certificate(credential.subject)
                if holder is not None:
                    raise errors.AlreadyExists(
                        f"a certificate credential for subject {credential.subject!r} exists "
                        f"already (credential {holder.id!r}); a subject maps to one "
                        "credential: issue the client certificate with another common name"
                    )
            if credential.id in state.credentials:
                raise errors.AlreadyExists(
                    f"credential {credential.id!r} exists already; choose another id"
                )
            stored = _copies.truncated(
                dataclasses.replace(credential, roles=tuple(credential.roles))
            )
            state.credentials.put(credential.id, stored)

    async def get_credential(self, credential_id: str) -> Credential:
        async with self._state.read():
            found = self._state.credentials.get(credential_id)
        if found is None:
            raise _no_credential(None, credential_id)
        return found

    async def find_certificate(self, subject: str) -> Credential:
        async with self._state.read():
            found = self._certificate(subject)
        if found is None:
            raise errors.NotFound(
                f"no certificate credential for subject {subject!r}; create one for this "
                "common name before the client connects with it"
            )
        return found

    async def list_credentials(self, tenant_id: str) -> list[Credential]:
        async with self._state.read():
            found = [c for c in self._state.credentials.values() if c.tenant_id == tenant_id]
        return sorted(found, key=lambda c: (c.created_at, c.id))

    async def revoke_credential(self, tenant_id: str, credential_id: str, now: datetime) -> None:
        state = self._state
        async with state.write():
            found = state.credentials.get(credential_id)
            if found is None or found.tenant_id != tenant_id:
                raise _no_credential(tenant_id, credential_id)
            if found.revoked_at is None:  # a second revocation keeps the first time
                revoked = dataclasses.replace(found, revoked_at=_copies.ms(now))
                state.credentials.put(credential_id, revoked)

    async def touch_credential(self, credential_id: str, now: datetime) -> None:
        state = self._state
        # Bookkeeping, not the call's effect: the pending audit entry waits for that.
        async with state.write(audit=False):
            found = state.credentials.get(credential_id)
            at = _copies.ms(now)
            # Never moves it back; an unknown id changes nothing.
            if found is not None and (found.last_used_at is None or found.last_used_at < at):
                state.credentials.put(credential_id, dataclasses.replace(found, last_used_at=at))

    # -- roles ----------------------------------------------------------------------------

    async def put_role(self, role: Role) -> None:
        async with self._state.write():
            self._state.roles.put((role.tenant_id, role.name), role)

    async def list_roles(self, tenant_id: str) -> list[Role]:
        async with self._state.read():
            found = [r for (tenant, _), r in self._state.roles.items() if tenant == tenant_id]
        return sorted(found, key=lambda r: r.name)

    async def delete_role(self, tenant_id: str, name: str) -> None:
        async with self._state.write():
            if self._state.roles.delete((tenant_id, name)) is None:
                raise errors.NotFound(
                    f"role {name!r} not found in tenant {tenant_id!r}; list the tenant's "
                    "roles to see their names (built-in roles cannot be deleted)"
                )

    # -- the server's secret --------------------------------------------------------------

    async def server_secret(self, candidate: str, secret_id: str = "main") -> str:
        state = self._state
        async with state.write(audit=False):
            stored = state.server_secrets.get(secret_id)
            if stored is None:
                state.server_secrets.put(secret_id, candidate)
                stored = candidate
        return stored


class MemoryAudit:
    """The ``AuditRepository`` port: one hash chain per tenant, as the SQL store keeps it
    (appends are serialized by the state's lock)."""

    def __init__(self, state: State) -> None:
        self._state = state

    async def append(self, entry: AuditEntry, now: datetime) -> None:
        # audit=False: this write appends ``entry`` itself, never the pending one.
        async with self._state.write(audit=False):
            self._state.append_audit(entry, _rows.to_ms(now))
        entry.written = True

    async def list_records(
        self,
        tenant_id: str,
        *,
        since: datetime | None = None,
        actor: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[AuditRecord]:
        since_at = None if since is None else _copies.ms(since)
        async with self._state.read():
            found = [
                r
                for (tenant, seq), r in self._state.audit_records.items()
                if tenant == tenant_id
                and seq > after_seq
                and (since_at is None or r.at >= since_at)
                and (actor is None or r.actor == actor)
            ]
        found.sort(key=lambda r: r.seq)
        return found[: max(limit, 0)]

    async def verify(self, tenant_id: str) -> tuple[int, str | None]:
        async with self._state.read():
            records = [
                r for (tenant, _), r in self._state.audit_records.items() if tenant == tenant_id
            ]
            head = self._state.audit_heads.get(tenant_id)
        check = _rows.AuditChainCheck()
        for record in sorted(records, key=lambda r: r.seq):
            problem = check.add(record)
            if problem is not None:
                return problem
        return check.finish(head)
