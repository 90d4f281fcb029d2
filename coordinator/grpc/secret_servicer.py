"""SecretService: decode, call ``SecretsAdmin``, encode. Values go in, never out."""

from __future__ import annotations

from typing import Any

import grpc

from coordinator.grpc import convert
from coordinator.grpc.auth import tenant
from coordinator.grpc.status import unary
from coordinator.service import SecretsAdmin
from trellis.v1 import secret_service_pb2 as spb
from trellis.v1 import secret_service_pb2_grpc as sgrpc

Ctx = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = spb.DESCRIPTOR.services_by_name["SecretService"].full_name


class SecretServicer(sgrpc.SecretServiceServicer):
    def __init__(self, admin: SecretsAdmin) -> None:
        self._admin = admin

    @unary
    async def SetSecret(self, request: spb.SetSecretRequest, context: Ctx) -> spb.SetSecretResponse:
        info, created = await self._admin.set_secret(tenant(), request.name, request.value)
        return spb.SetSecretResponse(secret=convert.secret_to_proto(info), created=created)

    @unary
    async def ListSecrets(
        self, request: spb.ListSecretsRequest, context: Ctx
    ) -> spb.ListSecretsResponse:
        found = await self._admin.list_secrets(tenant())
        return spb.ListSecretsResponse(secrets=[convert.secret_to_proto(s) for s in found])

    @unary
    async def DeleteSecret(
        self, request: spb.DeleteSecretRequest, context: Ctx
    ) -> spb.DeleteSecretResponse:
        await self._admin.delete_secret(tenant(), request.name)
        return spb.DeleteSecretResponse()

    @unary
    async def RotateKey(self, request: spb.RotateKeyRequest, context: Ctx) -> spb.RotateKeyResponse:
        kid, counts = await self._admin.rotate_key()
        return convert.rotation_to_proto(kid, counts)


def add_secrets(server: grpc.aio.Server, admin: SecretsAdmin) -> None:
    sgrpc.add_SecretServiceServicer_to_server(SecretServicer(admin), server)
