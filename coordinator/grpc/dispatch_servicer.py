"""DispatchService over gRPC: task-type limits, circuit breakers and the sharing status.

The servicer decodes, calls ``coordinator.service._limits.LimitsAdmin`` and encodes; the
proto <-> domain conversion of dispatch messages is the section below (it concerns only
this service's messages). ``add_dispatch`` wires the servicer into a server.
"""

from __future__ import annotations

from typing import Any

import grpc

from coordinator.errors import InvalidArgument
from coordinator.grpc.convert import duration_or_none, duration_to_proto
from coordinator.grpc.convert import timestamp_to_proto as _ts
from coordinator.grpc.status import unary
from coordinator.model import (
    DEFAULT_BREAKER_RESET,
    DEFAULT_TENANT,
    BreakerInfo,
    BreakerState,
    TaskTypeLimits,
)
from coordinator.service._limits import LimitsAdmin
from trellis.v1 import dispatch_service_pb2 as dpb
from trellis.v1 import dispatch_service_pb2_grpc as dgrpc

Ctx = grpc.aio.ServicerContext[Any, Any]
# Until authentication exists every call acts in the default tenant (DESIGN §2).
TENANT = DEFAULT_TENANT
SERVICE_NAME = dpb.DESCRIPTOR.services_by_name["DispatchService"].full_name

# -- conversion ----------------------------------------------------------------------------

_STATE = {
    BreakerState.CLOSED: dpb.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: dpb.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: dpb.BREAKER_STATE_HALF_OPEN,
}


def limits_from_proto(msg: dpb.TaskTypeLimits, tenant_id: str) -> TaskTypeLimits:
    """Unset fields mean no limit; an unset reset timeout is the default (30 s)."""
    reset = duration_or_none(msg, "breaker_reset_timeout")
    return TaskTypeLimits(
        task_type=msg.task_type,
        tenant_id=tenant_id,
        rate_per_second=msg.rate_per_second,
        burst=msg.burst,
        rate_key=msg.rate_key,
        max_concurrency=msg.max_concurrency,
        concurrency_key=msg.concurrency_key,
        concurrency_key_limit=msg.concurrency_key_limit,
        breaker_failure_threshold=msg.breaker_failure_threshold,
        breaker_reset_timeout=DEFAULT_BREAKER_RESET if reset is None else reset,
    )


def limits_to_proto(limits: TaskTypeLimits) -> dpb.TaskTypeLimits:
    return dpb.TaskTypeLimits(
        task_type=limits.task_type,
        rate_per_second=limits.rate_per_second,
        burst=limits.burst,
        rate_key=limits.rate_key,
        max_concurrency=limits.max_concurrency,
        concurrency_key=limits.concurrency_key,
        # Only meaningful with a key: 0 (unset) otherwise, so a read-modify-write of the
        # message without a key is accepted back.
        concurrency_key_limit=limits.concurrency_key_limit if limits.concurrency_key else 0,
        breaker_failure_threshold=limits.breaker_failure_threshold,
        breaker_reset_timeout=duration_to_proto(limits.breaker_reset_timeout),
        update_time=_ts(limits.updated_at),
    )


def breaker_to_proto(info: BreakerInfo) -> dpb.Breaker:
    return dpb.Breaker(
        task_type=info.task_type,
        state=_STATE.get(info.state, dpb.BREAKER_STATE_UNSPECIFIED),
        failure_count=info.failure_count,
        failure_threshold=info.failure_threshold,
        reset_timeout=duration_to_proto(info.reset_timeout),
        open_time=_ts(info.opened_at),
        shared=info.shared,
    )


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
        stored = await self._admin.set_task_type_limits(limits_from_proto(request.limits, TENANT))
        return dpb.SetTaskTypeLimitsResponse(limits=limits_to_proto(stored))

    @unary
    async def GetTaskTypeLimits(
        self, request: dpb.GetTaskTypeLimitsRequest, context: Ctx
    ) -> dpb.GetTaskTypeLimitsResponse:
        found = await self._admin.get_task_type_limits(TENANT, request.task_type)
        return dpb.GetTaskTypeLimitsResponse(limits=limits_to_proto(found))

    @unary
    async def ListTaskTypeLimits(
        self, request: dpb.ListTaskTypeLimitsRequest, context: Ctx
    ) -> dpb.ListTaskTypeLimitsResponse:
        rows = await self._admin.list_task_type_limits(TENANT)
        return dpb.ListTaskTypeLimitsResponse(limits=[limits_to_proto(r) for r in rows])

    @unary
    async def DeleteTaskTypeLimits(
        self, request: dpb.DeleteTaskTypeLimitsRequest, context: Ctx
    ) -> dpb.DeleteTaskTypeLimitsResponse:
        await self._admin.delete_task_type_limits(TENANT, request.task_type)
        return dpb.DeleteTaskTypeLimitsResponse()

    @unary
    async def ListBreakers(
        self, request: dpb.ListBreakersRequest, context: Ctx
    ) -> dpb.ListBreakersResponse:
        rows = await self._admin.list_breakers(TENANT)
        return dpb.ListBreakersResponse(breakers=[breaker_to_proto(b) for b in rows])

    @unary
    async def ResetBreaker(
        self, request: dpb.ResetBreakerRequest, context: Ctx
    ) -> dpb.ResetBreakerResponse:
        info = await self._admin.reset_breaker(TENANT, request.task_type)
        return dpb.ResetBreakerResponse(breaker=breaker_to_proto(info))

    @unary
    async def GetDispatchStatus(
        self, request: dpb.GetDispatchStatusRequest, context: Ctx
    ) -> dpb.GetDispatchStatusResponse:
        status = self._admin.get_dispatch_status()
        return dpb.GetDispatchStatusResponse(
            redis_configured=status.configured, shared=status.shared, detail=status.detail
        )


def add_dispatch(server: grpc.aio.Server, admin: LimitsAdmin) -> None:
    """Serve DispatchService on ``server``."""
    dgrpc.add_DispatchServiceServicer_to_server(DispatchServicer(admin), server)
