"""DispatchService over gRPC: task-type limits, circuit breakers and the sharing status.

The servicer decodes (with ``coordinator.grpc.convert``), calls
``coordinator.service._limits.LimitsAdmin`` and encodes (with ``convert`` again).
``add_dispatch`` wires the servicer into a server.
"""

from __future__ import annotations

from typing import Any

import grpc

from coordinator.errors import InvalidArgument
from coordinator.grpc import convert
from coordinator.grpc.auth import tenant
from coordinator.grpc.status import unary
from coordinator.service import LimitsAdmin
from trellis.v1 import dispatch_service_pb2 as dpb
from trellis.v1 import dispatch_service_pb2_grpc as dgrpc

Ctx = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = dpb.DESCRIPTOR.services_by_name["DispatchService"].full_name

# -- service -------------------------------------------------------------------------------


class DispatchServicer(dgrpc.DispatchServiceServicer):
    def __init__(self, admin: LimitsAdmin) -> None:
        self._admin = admin

    @unary
    async def SetTaskTypeLimits(
        self, request: dpb.SetTaskTypeLimitsRequest, context: Ctx
    ) -> dpb.SetTaskTypeLimitsResponse:
        if not request.HasField("limits"):
            raise InvalidArgument("limits is unset; give the task type and its limits")
        stored = await self._admin.set_task_type_limits(
            convert.limits_from_proto(request.limits, tenant())
        )
        return dpb.SetTaskTypeLimitsResponse(limits=convert.limits_to_proto(stored))

    @unary
    async def GetTaskTypeLimits(
        self, request: dpb.GetTaskTypeLimitsRequest, context: Ctx
    ) -> dpb.GetTaskTypeLimitsResponse:
        found = await self._admin.get_task_type_limits(tenant(), request.task_type)
        return dpb.GetTaskTypeLimitsResponse(limits=convert.limits_to_proto(found))

    @unary
    async def ListTaskTypeLimits(
        self, request: dpb.ListTaskTypeLimitsRequest, context: Ctx
    ) -> dpb.ListTaskTypeLimitsResponse:
        rows = await self._admin.list_task_type_limits(tenant())
        return dpb.ListTaskTypeLimitsResponse(limits=[convert.limits_to_proto(r) for r in rows])

    @unary
    async def DeleteTaskTypeLimits(
        self, request: dpb.DeleteTaskTypeLimitsRequest, context: Ctx
    ) -> dpb.DeleteTaskTypeLimitsResponse:
        await self._admin.delete_task_type_limits(tenant(), request.task_type)
        return dpb.DeleteTaskTypeLimitsResponse()

    @unary
    async def ListBreakers(
        self, request: dpb.ListBreakersRequest, context: Ctx
    ) -> dpb.ListBreakersResponse:
        rows = await self._admin.list_breakers(tenant())
        return dpb.ListBreakersResponse(breakers=[convert.breaker_to_proto(b) for b in rows])

    @unary
    async def ResetBreaker(
        self, request: dpb.ResetBreakerRequest, context: Ctx
    ) -> dpb.ResetBreakerResponse:
        info = await self._admin.reset_breaker(tenant(), request.task_type)
        return dpb.ResetBreakerResponse(breaker=convert.breaker_to_proto(info))

    @unary
    async def GetDispatchStatus(
        self, request: dpb.GetDispatchStatusRequest, context: Ctx
    ) -> dpb.GetDispatchStatusResponse:
        status = self._admin.get_dispatch_status()
        return convert.dispatch_status_to_proto(status)


def add_dispatch(server: grpc.aio.Server, admin: LimitsAdmin) -> None:
    """Serve DispatchService on ``server``."""
    dgrpc.add_DispatchServiceServicer_to_server(DispatchServicer(admin), server)
