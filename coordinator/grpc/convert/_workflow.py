"""WorkflowService: definitions, starts, executions (with their node runs and events) and
dead letters."""

from __future__ import annotations

from coordinator.errors import InvalidArgument
from coordinator.grpc.convert._common import (
    duration_or_none,
    duration_to_proto,
    execution_status_to_proto,
    json_to_struct,
    node_from_proto,
    node_to_proto_definition,
    retry_from_proto,
    retry_to_proto,
    struct_to_json,
    timestamp_or_none,
    timestamp_to_proto,
)
from coordinator.model import (
    DeadLetter,
    ErrorInfo,
    Event,
    Execution,
    NodeRun,
    OverflowPolicy,
    WorkflowDef,
    WorkflowSummary,
)
from coordinator.service import ExecutionView, StartRequest
from trellis.v1 import common_pb2, workflow_service_pb2

# -- definitions --------------------------------------------------------------------------

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
        input_schema=struct_to_json(msg, "input_schema"),
    )


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
        input_schema=json_to_struct(defn.input_schema),
    )
    msg.nodes.extend(node_to_proto_definition(n) for n in defn.nodes)
    return msg


def summary_to_proto(s: WorkflowSummary) -> workflow_service_pb2.WorkflowSummary:
    return workflow_service_pb2.WorkflowSummary(
        name=s.name, latest_version=s.latest_version, description=s.description
    )


# -- starts -------------------------------------------------------------------------------


def start_request_from_proto(msg: workflow_service_pb2.StartExecutionRequest) -> StartRequest:
    return StartRequest(
        workflow_name=msg.workflow_name,
        workflow_version=msg.workflow_version or None,
        input=msg.input,
        idempotency_key=msg.idempotency_key or None,
        priority=msg.priority,
        start_time=timestamp_or_none(msg, "start_time"),
        delay=duration_or_none(msg, "delay"),
        max_concurrency=msg.max_concurrency,
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


# -- dead letters -------------------------------------------------------------------------


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


def execution_view_to_proto(view: ExecutionView) -> common_pb2.Execution:
    """An execution with its node runs, in definition order."""
    return execution_to_proto(view.execution, view.nodes)
