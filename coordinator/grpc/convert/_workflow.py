"""All proto ↔ domain conversion for the gRPC surface, in one place."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from coordinator import engine
from coordinator.errors import InvalidArgument
from coordinator.model import (
    DeadLetter,
    ErrorInfo,
    Event,
    Execution,
    ExecutionStatus,
    NodeRun,
    NodeSpec,
    OverflowPolicy,
    RetryPolicy,
    SwitchCase,
    TriggerRule,
    WorkflowDef,
    WorkflowSummary,
)
from coordinator.service import Completion, Failure, LeasedTask, StartRequest
from trellis.v1 import common_pb2, worker_service_pb2, workflow_service_pb2

_DEFAULT_RETRY = RetryPolicy()


def timestamp_to_proto(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def duration_to_proto(value: timedelta | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    d = duration_pb2.Duration()
    d.FromTimedelta(value)
    return d


def duration_or_none(msg: object, field: str) -> timedelta | None:
    if not msg.HasField(field):  # type: ignore[attr-defined]
        return None
    value: timedelta = getattr(msg, field).ToTimedelta()
    return value


def _whole_numbers(value: Any) -> Any:
    """Struct numbers are doubles; give integral ones back as ints (3, not 3.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


# -- definitions --------------------------------------------------------------------------


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


def node_from_proto(n: common_pb2.NodeDefinition) -> NodeSpec:
    config = b""
    if n.HasField("config"):
        doc = _whole_numbers(json_format.MessageToDict(n.config))
        # Sorted: a Struct is a map whose iteration order differs between processes, and
        # the config is part of the definition's content hash.
        config = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
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
    )


_OVERFLOW_FROM_PROTO = {
    common_pb2.OVERFLOW_POLICY_UNSPECIFIED: OverflowPolicy.QUEUE,
    common_pb2.OVERFLOW_POLICY_QUEUE: OverflowPolicy.QUEUE,
    common_pb2.OVERFLOW_POLICY_REJECT: OverflowPolicy.REJECT,
}
_OVERFLOW_TO_PROTO = {
    OverflowPolicy.QUEUE: common_pb2.OVERFLOW_POLICY_QUEUE,
    OverflowPolicy.REJECT: common_pb2.OVERFLOW_POLICY_REJECT,
}


def overflow_policy_from_proto(value: common_pb2.OverflowPolicy.ValueType) -> OverflowPolicy:
    try:
        return _OVERFLOW_FROM_PROTO[value]
    except KeyError:
        raise InvalidArgument(
            f"unknown overflow_policy {value}; use OVERFLOW_POLICY_QUEUE or OVERFLOW_POLICY_REJECT"
        ) from None


def _not_negative(msg: common_pb2.WorkflowDefinition, field: str) -> int:
    value: int = getattr(msg, field)
    if value < 0:
        raise InvalidArgument(f"workflow '{msg.name}': {field} {value} is negative; use 0 or more")
    return value


def definition_from_proto(msg: common_pb2.WorkflowDefinition, tenant_id: str) -> WorkflowDef:
    nodes = [node_from_proto(n) for n in msg.nodes]
    defaults = WorkflowDef(name="", nodes=())
    return WorkflowDef(
        name=msg.name,
        nodes=tuple(nodes),
        edges=tuple((e.source, e.target) for e in msg.edges),
        description=msg.description,
        default_retry_policy=retry_from_proto(msg.default_retry_policy)
        if msg.HasField("default_retry_policy")
        else defaults.default_retry_policy,
        default_start_to_close_timeout=duration_or_none(msg, "default_start_to_close_timeout")
        or defaults.default_start_to_close_timeout,
        tenant_id=tenant_id,
        execution_timeout=duration_or_none(msg, "execution_timeout"),
        default_schedule_to_start_timeout=duration_or_none(
            msg, "default_schedule_to_start_timeout"
        ),
        default_heartbeat_timeout=duration_or_none(msg, "default_heartbeat_timeout"),
        max_concurrency=_not_negative(msg, "max_concurrency"),
        max_running_executions=_not_negative(msg, "max_running_executions"),
        overflow_policy=overflow_policy_from_proto(msg.overflow_policy),
    )


def expansion_from_proto(msg: worker_service_pb2.DagExpansion) -> engine.Expansion:
    return engine.Expansion(
        nodes=tuple(node_from_proto(n) for n in msg.nodes),
        edges=tuple((e.source, e.target) for e in msg.edges),
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
    )
    if n.config:
        struct = struct_pb2.Struct()
        struct.update(json.loads(n.config))
        node.config.CopyFrom(struct)
    return node


def definition_to_proto(defn: WorkflowDef) -> common_pb2.WorkflowDefinition:
    msg = common_pb2.WorkflowDefinition(
        name=defn.name,
        version=defn.version,
        description=defn.description,
        edges=[common_pb2.Edge(source=s, target=t) for s, t in defn.edges],
        default_retry_policy=retry_to_proto(defn.default_retry_policy),
        default_start_to_close_timeout=duration_to_proto(defn.default_start_to_close_timeout),
        create_time=timestamp_to_proto(defn.created_at),
        execution_timeout=duration_to_proto(defn.execution_timeout),
        default_schedule_to_start_timeout=duration_to_proto(defn.default_schedule_to_start_timeout),
        default_heartbeat_timeout=duration_to_proto(defn.default_heartbeat_timeout),
        max_concurrency=defn.max_concurrency,
        max_running_executions=defn.max_running_executions,
        # As the stored document: the policy only means something with a cap.
        overflow_policy=_OVERFLOW_TO_PROTO[defn.overflow_policy]
        if defn.max_running_executions
        else common_pb2.OVERFLOW_POLICY_UNSPECIFIED,
    )
    msg.nodes.extend(node_to_proto_definition(n) for n in defn.nodes)
    return msg


def summary_to_proto(s: WorkflowSummary) -> workflow_service_pb2.WorkflowSummary:
    return workflow_service_pb2.WorkflowSummary(
        name=s.name, latest_version=s.latest_version, description=s.description
    )


# -- executions ---------------------------------------------------------------------------


def error_to_proto(error: ErrorInfo | None) -> common_pb2.ErrorInfo | None:
    if error is None:
        return None
    return common_pb2.ErrorInfo(
        type=error.type,
        message=error.message,
        details=error.details or b"",
        node_id=error.node_id or "",
        attempt=error.attempt,
        worker_id=error.worker_id or "",
    )


def node_to_proto(node: NodeRun) -> common_pb2.NodeRun:
    return common_pb2.NodeRun(
        node_id=node.node_id,
        task_type=node.task_type,
        status=common_pb2.NodeStatus.Value(f"NODE_STATUS_{node.status.value}"),
        attempt=node.attempt,
        input=node.input or b"",
        output=node.output or b"",
        error=error_to_proto(node.error),
        worker_id=node.worker_id or "",
        update_time=timestamp_to_proto(node.updated_at),
        held=node.held,
        child_execution_id=node.child_execution_id or "",
    )


def execution_to_proto(
    execution: Execution, nodes: tuple[NodeRun, ...] = ()
) -> common_pb2.Execution:
    return common_pb2.Execution(
        id=execution.id,
        workflow_name=execution.workflow_name,
        workflow_version=execution.workflow_version,
        status=execution_status_to_proto(execution.status),
        input=execution.input,
        output=execution.output or b"",
        error=error_to_proto(execution.error),
        priority=execution.priority,
        idempotency_key=execution.idempotency_key or "",
        parent_execution_id=execution.parent_execution_id or "",
        depth=execution.depth,
        create_time=timestamp_to_proto(execution.created_at),
        end_time=timestamp_to_proto(execution.ended_at),
        nodes=[node_to_proto(n) for n in nodes],
        parent_node_id=execution.parent_node_id or "",
        start_time=timestamp_to_proto(execution.start_at),
        max_concurrency=execution.max_concurrency,
        queued=execution.queued,
    )


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


def event_to_proto(event: Event) -> common_pb2.Event:
    return common_pb2.Event(
        sequence=event.sequence,
        execution_id=event.execution_id,
        type=event.type.value,
        node_id=event.node_id or "",
        attempt=event.attempt,
        worker_id=event.worker_id or "",
        time=timestamp_to_proto(event.time),
        details=event.details or b"",
    )


def dead_letter_to_proto(letter: DeadLetter) -> common_pb2.DeadLetter:
    return common_pb2.DeadLetter(
        id=letter.id,
        execution_id=letter.execution_id,
        workflow_name=letter.workflow_name,
        workflow_version=letter.workflow_version,
        node_id=letter.node_id,
        task_type=letter.task_type,
        input=letter.input or b"",
        attempts=[
            common_pb2.AttemptFailure(
                attempt=a.attempt,
                error=error_to_proto(a.error),
                worker_id=a.worker_id or "",
                time=timestamp_to_proto(a.time),
            )
            for a in letter.attempts
        ],
        create_time=timestamp_to_proto(letter.created_at),
        redrive_time=timestamp_to_proto(letter.redriven_at),
    )


# -- worker protocol ----------------------------------------------------------------------


def task_to_proto(task: LeasedTask) -> worker_service_pb2.Task:
    node = task.node
    return worker_service_pb2.Task(
        lease_token=task.token,
        execution_id=node.execution_id,
        node_id=node.node_id,
        task_type=node.task_type,
        attempt=node.attempt,
        input=node.input or b"",
        config=task.config,
        idempotency_key=f"{node.execution_id}:{node.node_id}",
        workflow_name=node.workflow_name,
        workflow_version=node.workflow_version,
        lease_deadline=timestamp_to_proto(node.lease_deadline),
        heartbeat_timeout=duration_to_proto(node.heartbeat_timeout),
        execution_start_time=timestamp_to_proto(task.execution_start_time),
        execution_input=task.execution_input,
        parent_outputs=task.parent_outputs,
        map_index=map_index(node.node_id),
    )


_MAP_ELEMENT = re.compile(r"^.+\[(\d+)\]$")


def map_index(node_id: str) -> int:
    """The index of a map element run (id ``"<map id>[<i>]"``), else -1."""
    m = _MAP_ELEMENT.match(node_id)
    return int(m.group(1)) if m else -1


def start_request_from_proto(msg: workflow_service_pb2.StartExecutionRequest) -> StartRequest:
    return StartRequest(
        workflow_name=msg.workflow_name,
        workflow_version=msg.workflow_version or None,
        input=msg.input,
        idempotency_key=msg.idempotency_key or None,
        priority=msg.priority,
        start_time=msg.start_time.ToDatetime(tzinfo=UTC) if msg.HasField("start_time") else None,
        delay=duration_or_none(msg, "delay"),
        max_concurrency=msg.max_concurrency,
    )


def complete_options_from_proto(
    msg: worker_service_pb2.CompleteTaskRequest,
) -> tuple[tuple[str, ...] | None, engine.Expansion | None]:
    """``next`` (None when empty: every child) and ``expansion`` (None when unset)."""
    taken = tuple(msg.next) or None
    expansion = expansion_from_proto(msg.expansion) if msg.HasField("expansion") else None
    return taken, expansion


def result_from_proto(msg: worker_service_pb2.TaskResult, index: int) -> Completion | Failure:
    """One result of a ReportResults batch (``index`` names it in errors)."""
    kind = msg.WhichOneof("result")
    if kind == "completed":
        taken, expansion = complete_options_from_proto(msg.completed)
        return Completion(msg.completed.lease_token, msg.completed.output, taken, expansion)
    if kind == "failed":
        error, retryable = task_error_from_proto(msg.failed.error)
        return Failure(msg.failed.lease_token, error, retryable)
    raise InvalidArgument(f"results[{index}] is empty; set 'completed' or 'failed'")


def task_error_from_proto(msg: worker_service_pb2.TaskError) -> tuple[ErrorInfo, bool]:
    """The reported error and whether it may be retried."""
    error = ErrorInfo(
        type=msg.type or "Error",
        message=msg.message,
        details=msg.details or None,
    )
    return error, not msg.non_retryable


__all__ = [
    "complete_options_from_proto",
    "dead_letter_to_proto",
    "definition_from_proto",
    "definition_to_proto",
    "event_to_proto",
    "execution_status_from_proto",
    "execution_to_proto",
    "expansion_from_proto",
    "map_index",
    "node_from_proto",
    "node_to_proto",
    "node_to_proto_definition",
    "overflow_policy_from_proto",
    "result_from_proto",
    "start_request_from_proto",
    "summary_to_proto",
    "task_error_from_proto",
    "task_to_proto",
    "trigger_rule_from_proto",
]
