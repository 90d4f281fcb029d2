"""IdentityService: tenants, credentials, roles, audit records, the caller."""

from __future__ import annotations

from coordinator.grpc.convert._common import timestamp_to_proto
from coordinator.model import BUILTIN_ROLES, AuditRecord, Credential, Principal, Role, Tenant
from trellis.v1 import identity_service_pb2 as ipb


def tenant_to_proto(tenant: Tenant) -> ipb.Tenant:
    return ipb.Tenant(
        id=tenant.id, created_at=timestamp_to_proto(tenant.created_at), created_by=tenant.created_by
    )


def credential_to_proto(c: Credential) -> ipb.Credential:
    return ipb.Credential(
        id=c.id,
        tenant=c.tenant_id,
        kind=c.kind.value,
        name=c.name,
        roles=list(c.roles),
        subject=c.subject,
        created_at=timestamp_to_proto(c.created_at),
        created_by=c.created_by,
        expires_at=timestamp_to_proto(c.expires_at),
        last_used_at=timestamp_to_proto(c.last_used_at),
        revoked_at=timestamp_to_proto(c.revoked_at),
    )


def role_to_proto(role: Role) -> ipb.Role:
    return ipb.Role(
        name=role.name,
        permissions=sorted(str(g) for g in role.grants),
        builtin=role.name in BUILTIN_ROLES,
    )


def principal_to_proto(p: Principal) -> ipb.WhoAmIResponse:
    return ipb.WhoAmIResponse(
        tenant=p.tenant_id,
        subject=p.subject,
        credential=p.credential,
        roles=sorted(p.roles),
        permissions=sorted(str(g) for g in p.grants if p.holds(g.permission)),
    )


def audit_record_to_proto(r: AuditRecord) -> ipb.AuditRecord:
    return ipb.AuditRecord(
        seq=r.seq,
        time=timestamp_to_proto(r.at),
        actor=r.actor,
        credential=r.credential,
        action=r.action,
        target=r.target,
        outcome=r.outcome,
        request_id=r.request_id,
        prev_hash=r.prev_hash,
        hash=r.hash,
    )
