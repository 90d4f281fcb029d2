"""IdentityService: decode, call ``IdentityAdmin`` (or the audit trail), encode."""

from __future__ import annotations

from typing import Any

import grpc

from coordinator.grpc import convert
from coordinator.grpc.auth import caller
from coordinator.grpc.status import unary
from coordinator.service import Coordinator
from trellis.v1 import identity_service_pb2 as ipb
from trellis.v1 import identity_service_pb2_grpc as igrpc

Ctx = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = ipb.DESCRIPTOR.services_by_name["IdentityService"].full_name


class IdentityServicer(igrpc.IdentityServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self._admin = coordinator.identity

    @unary
    async def WhoAmI(self, request: ipb.WhoAmIRequest, context: Ctx) -> ipb.WhoAmIResponse:
        return convert.principal_to_proto(caller())

    @unary
    async def CreateTenant(
        self, request: ipb.CreateTenantRequest, context: Ctx
    ) -> ipb.CreateTenantResponse:
        tenant = await self._admin.create_tenant(caller(), request.id)
        return ipb.CreateTenantResponse(tenant=convert.tenant_to_proto(tenant))

    @unary
    async def ListTenants(
        self, request: ipb.ListTenantsRequest, context: Ctx
    ) -> ipb.ListTenantsResponse:
        tenants = await self._admin.list_tenants()
        return ipb.ListTenantsResponse(tenants=[convert.tenant_to_proto(t) for t in tenants])

    @unary
    async def CreateApiKey(
        self, request: ipb.CreateApiKeyRequest, context: Ctx
    ) -> ipb.CreateApiKeyResponse:
        expires_in = convert.duration_or_none(request, "expires_in")
        created = await self._admin.create_api_key(
            caller(), request.tenant, request.name, list(request.roles), expires_in
        )
        return ipb.CreateApiKeyResponse(
            credential=convert.credential_to_proto(created.credential), key=created.key
        )

    @unary
    async def AddCertificateIdentity(
        self, request: ipb.AddCertificateIdentityRequest, context: Ctx
    ) -> ipb.AddCertificateIdentityResponse:
        credential = await self._admin.add_certificate(
            caller(), request.tenant, request.subject, list(request.roles)
        )
        return ipb.AddCertificateIdentityResponse(
            credential=convert.credential_to_proto(credential)
        )

    @unary
    async def ListCredentials(
        self, request: ipb.ListCredentialsRequest, context: Ctx
    ) -> ipb.ListCredentialsResponse:
        found = await self._admin.list_credentials(caller(), request.tenant)
        return ipb.ListCredentialsResponse(
            credentials=[convert.credential_to_proto(c) for c in found]
        )

    @unary
    async def RevokeCredential(
        self, request: ipb.RevokeCredentialRequest, context: Ctx
    ) -> ipb.RevokeCredentialResponse:
        await self._admin.revoke(caller(), request.tenant, request.id)
        return ipb.RevokeCredentialResponse()

    @unary
    async def PutRole(self, request: ipb.PutRoleRequest, context: Ctx) -> ipb.PutRoleResponse:
        role = await self._admin.put_role(
            caller(), request.tenant, request.name, list(request.permissions)
        )
        return ipb.PutRoleResponse(role=convert.role_to_proto(role))

    @unary
    async def ListRoles(self, request: ipb.ListRolesRequest, context: Ctx) -> ipb.ListRolesResponse:
        roles = await self._admin.list_roles(caller(), request.tenant)
        return ipb.ListRolesResponse(roles=[convert.role_to_proto(r) for r in roles])

    @unary
    async def DeleteRole(
        self, request: ipb.DeleteRoleRequest, context: Ctx
    ) -> ipb.DeleteRoleResponse:
        await self._admin.delete_role(caller(), request.tenant, request.name)
        return ipb.DeleteRoleResponse()

    @unary
    async def ListAuditRecords(
        self, request: ipb.ListAuditRecordsRequest, context: Ctx
    ) -> ipb.ListAuditRecordsResponse:
        records = await self._admin.audit_records(
            caller(),
            request.tenant,
            since=convert.timestamp_or_none(request, "since"),
            actor=request.actor or None,
            after_seq=request.after_seq,
            page_size=request.page_size,
        )
        return ipb.ListAuditRecordsResponse(
            records=[convert.audit_record_to_proto(r) for r in records]
        )

    @unary
    async def VerifyAudit(
        self, request: ipb.VerifyAuditRequest, context: Ctx
    ) -> ipb.VerifyAuditResponse:
        seq, problem = await self._admin.verify_audit(caller(), request.tenant)
        return ipb.VerifyAuditResponse(ok=problem is None, seq=seq, problem=problem or "")
