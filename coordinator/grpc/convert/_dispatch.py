"""DispatchService: task-type limits, circuit breakers and the sharing status."""

from __future__ import annotations

from coordinator.grpc.convert._common import duration_or_none, duration_to_proto
from coordinator.grpc.convert._common import timestamp_to_proto as _ts
from coordinator.model import (
    DEFAULT_BREAKER_RESET,
    BreakerInfo,
    BreakerState,
    TaskTypeLimits,
)
from coordinator.service import DispatchStatus
from trellis.v1 import dispatch_service_pb2 as dpb

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


def dispatch_status_to_proto(status: DispatchStatus) -> dpb.GetDispatchStatusResponse:
    return dpb.GetDispatchStatusResponse(
        redis_configured=status.configured, shared=status.shared, detail=status.detail
    )
