"""Conversion that more than one service uses: timestamps and durations, execution
statuses (WorkflowService and NotificationService), and node definitions (registered
with a workflow on WorkflowService, added by a DAG expansion on WorkerService)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from coordinator.errors import InvalidArgument
from coordinator.model import (
    ExecutionFilter,
    ExecutionStatus,
    NodeSpec,
    RetryPolicy,
    SwitchCase,
    TriggerRule,
)
from trellis.v1 import common_pb2

_DEFAULT_RETRY = RetryPolicy()

# -- scalars ------------------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)


def timestamp_to_proto(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """As ``Timestamp.FromDatetime`` (naive means UTC), in a third of its time: event
    histories are converted by the thousand."""
    if value is None:
        return None
    delta = value - (_NAIVE_EPOCH if value.tzinfo is None else _EPOCH)
    return timestamp_pb2.Timestamp(
        seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000
    )


def duration_to_proto(value: timedelta | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


# Longest duration a request may carry (either way): past it, a request is refused before
# it can overflow a date computed from it.
MAX_DURATION = timedelta(days=3650)
# A timestamp's range: years 1 to 9999 (what the protobuf spec and datetime allow).
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def duration_or_none(msg: object, field: str) -> timedelta | None:
    """The Duration ``field`` of ``msg`` (None when unset); ``InvalidArgument`` past
    ``MAX_DURATION`` either way."""
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return None
    value = getattr(msg, field)
    if abs(value.seconds) > MAX_DURATION.total_seconds() or abs(value.nanos) > 999_999_999:
        raise InvalidArgument(
            f"{field} is {value.seconds} s and {value.nanos} ns; a duration is at most "
            f"{MAX_DURATION.days} days either way"
        )
    result: timedelta = value.ToTimedelta()
    return result


def timestamp_or_none(msg: object, field: str) -> datetime | None:
    """The Timestamp ``field`` of ``msg`` as an aware UTC datetime (None when unset);
    ``InvalidArgument`` outside the years 1 to 9999."""
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return None
    value = getattr(msg, field)
    if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos <= 999_999_999):
        raise InvalidArgument(
            f"{field} ({value.seconds} s, {value.nanos} ns) is not a time between the years "
            "1 and 9999"
        )
    result: datetime = value.ToDatetime(tzinfo=UTC)
    return result


def _whole_numbers(value: Any) -> Any:
    """Struct numbers are doubles; give integral ones back as ints (3, not 3.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


# -- execution statuses -------------------------------------------------------------------


def execution_status_to_proto(status: ExecutionStatus) -> common_pb2.ExecutionStatus.ValueType:
    return common_pb2.ExecutionStatus.Value(f"EXECUTION_STATUS_{status.value}")


def execution_status_from_proto(
    value: common_pb2.ExecutionStatus.ValueType,
) -> ExecutionStatus | None:
    if value == common_pb2.EXECUTION_STATUS_UNSPECIFIED:
        return None
    try:
        name = common_pb2.ExecutionStatus.Name(value)
    except ValueError as exc:
        raise InvalidArgument(f"unknown execution status {value}") from exc
    return ExecutionStatus(name.removeprefix("EXECUTION_STATUS_"))


# -- node definitions ---------------------------------------------------------------------


def retry_from_proto(msg: common_pb2.RetryPolicy) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=msg.max_attempts or 1,
        initial_interval=duration_or_none(msg, "initial_interval")
        or _DEFAULT_RETRY.initial_interval,
        backoff_coefficient=msg.backoff_coefficient or _DEFAULT_RETRY.backoff_coefficient,
        max_interval=duration_or_none(msg, "max_interval") or _DEFAULT_RETRY.max_interval,
        non_retryable_error_types=tuple(msg.non_retryable_error_types),
        jitter=msg.jitter,
    )


def retry_to_proto(policy: RetryPolicy) -> common_pb2.RetryPolicy:
    return common_pb2.RetryPolicy(
        max_attempts=policy.max_attempts,
        initial_interval=duration_to_proto(policy.initial_interval),
        backoff_coefficient=policy.backoff_coefficient,
        max_interval=duration_to_proto(policy.max_interval),
        non_retryable_error_types=list(policy.non_retryable_error_types),
        jitter=policy.jitter,
    )


def trigger_rule_from_proto(value: str, node_id: str) -> TriggerRule:
    if not value:
        return TriggerRule.ALL_SUCCESS
    try:
        return TriggerRule(value)
    except ValueError:
        valid = ", ".join(repr(r.value) for r in TriggerRule)
        raise InvalidArgument(
            f"node '{node_id}': unknown trigger_rule {value!r}; use one of {valid}"
        ) from None


def struct_to_json(msg: object, field: str) -> bytes:
    """A Struct field as compact JSON text with sorted keys (empty when unset): a Struct is
    a map whose iteration order differs between processes, and configs and schemas are
    part of the definition's content hash."""
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return b""
    doc = _whole_numbers(json_format.MessageToDict(getattr(msg, field)))
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def json_to_struct(text: bytes) -> struct_pb2.Struct | None:
    if not text:
        return None
    struct = struct_pb2.Struct()
    struct.update(json.loads(text))
    return struct


def node_from_proto(n: common_pb2.NodeDefinition) -> NodeSpec:
    config = struct_to_json(n, "config")
    return NodeSpec(
        id=n.id,
        kind=n.kind or "task",
        task_type=n.task_type,
        config=config,
        retry_policy=retry_from_proto(n.retry_policy) if n.HasField("retry_policy") else None,
        start_to_close_timeout=duration_or_none(n, "start_to_close_timeout"),
        heartbeat_timeout=duration_or_none(n, "heartbeat_timeout"),
        priority=n.priority,
        schedule_to_start_timeout=duration_or_none(n, "schedule_to_start_timeout"),
        on_failure=n.on_failure or None,
        compensation_task_type=n.compensation_task_type or None,
        pause_before=n.pause_before,
        trigger_rule=trigger_rule_from_proto(n.trigger_rule, n.id),
        skip_if=n.skip_if,
        input_expr=n.input,
        output_expr=n.output,
        cases=tuple(SwitchCase(c.condition, tuple(c.targets)) for c in n.cases),
        default_targets=tuple(n.default_targets),
        match_all=n.match_all,
        workflow_name=n.workflow_name,
        workflow_version=n.workflow_version,
        items_expr=n.items,
        max_concurrency=n.max_concurrency,
        required_role=n.required_role,
        approval_timeout=duration_or_none(n, "approval_timeout"),
        prompt=n.prompt,
        output_schema=struct_to_json(n, "output_schema"),
    )


def node_to_proto_definition(n: NodeSpec) -> common_pb2.NodeDefinition:
    node = common_pb2.NodeDefinition(
        id=n.id,
        kind=n.kind,
        task_type=n.task_type,
        retry_policy=retry_to_proto(n.retry_policy) if n.retry_policy else None,
        start_to_close_timeout=duration_to_proto(n.start_to_close_timeout),
        heartbeat_timeout=duration_to_proto(n.heartbeat_timeout),
        priority=n.priority,
        schedule_to_start_timeout=duration_to_proto(n.schedule_to_start_timeout),
        on_failure=n.on_failure or "",
        compensation_task_type=n.compensation_task_type or "",
        pause_before=n.pause_before,
        # The default rule is left unset, as a definition that does not name one says.
        trigger_rule="" if n.trigger_rule is TriggerRule.ALL_SUCCESS else n.trigger_rule.value,
        skip_if=n.skip_if,
        input=n.input_expr,
        output=n.output_expr,
        cases=[common_pb2.SwitchCase(condition=c.condition, targets=c.targets) for c in n.cases],
        default_targets=n.default_targets,
        match_all=n.match_all,
        workflow_name=n.workflow_name,
        workflow_version=n.workflow_version,
        items=n.items_expr,
        max_concurrency=n.max_concurrency,
        required_role=n.required_role,
        approval_timeout=duration_to_proto(n.approval_timeout),
        prompt=n.prompt,
        output_schema=json_to_struct(n.output_schema),
    )
    if n.config:
        struct = struct_pb2.Struct()
        struct.update(json.loads(n.config))
        node.config.CopyFrom(struct)
    return node


# -- execution filters --------------------------------------------------------------------


def execution_filter_from_proto(
    msg: common_pb2.ExecutionFilter,
    *,
    workflow_name: str = "",
    status: common_pb2.ExecutionStatus.ValueType = common_pb2.EXECUTION_STATUS_UNSPECIFIED,
) -> ExecutionFilter:
    """``msg`` as a domain filter; ``workflow_name`` and ``status`` (a request's older
    fields) narrow it when given. ``InvalidArgument`` names a filter that cannot match by
    construction (a version without a name, an empty time range, ...)."""
    statuses = {s for s in map(execution_status_from_proto, msg.statuses) if s is not None}
    legacy = execution_status_from_proto(status)
    if legacy is not None:
        statuses = statuses & {legacy} if statuses else {legacy}
        if not statuses:
            raise InvalidArgument("status and filter.statuses name different statuses")
    if workflow_name and msg.workflow_name and workflow_name != msg.workflow_name:
        raise InvalidArgument("workflow_name and filter.workflow_name name different workflows")
    where = ExecutionFilter(
        workflow_name=msg.workflow_name or workflow_name or None,
        workflow_version=msg.workflow_version or None,
        statuses=frozenset(statuses),
        created_after=timestamp_or_none(msg, "created_after"),
        created_before=timestamp_or_none(msg, "created_before"),
        ended_after=timestamp_or_none(msg, "ended_after"),
        ended_before=timestamp_or_none(msg, "ended_before"),
        idempotency_key=msg.idempotency_key or None,
        parent_execution_id=msg.parent_execution_id or None,
        id_prefix=msg.id_prefix or None,
    )
    problems = where.problems()
    if problems:
        raise InvalidArgument("filter: " + "; ".join(problems))
    return where


def execution_filter_to_proto(where: ExecutionFilter) -> common_pb2.ExecutionFilter:
    return common_pb2.ExecutionFilter(
        workflow_name=where.workflow_name or "",
        workflow_version=where.workflow_version or 0,
        statuses=[execution_status_to_proto(s) for s in sorted(where.statuses)],
        created_after=timestamp_to_proto(where.created_after),
        created_before=timestamp_to_proto(where.created_before),
        ended_after=timestamp_to_proto(where.ended_after),
        ended_before=timestamp_to_proto(where.ended_before),
        idempotency_key=where.idempotency_key or "",
        parent_execution_id=where.parent_execution_id or "",
        id_prefix=where.id_prefix or "",
    )
