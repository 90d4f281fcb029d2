"""WorkerService: leased tasks out; completions (their options and DAG expansions),
failures and batched results in."""

from __future__ import annotations

import re
from datetime import timedelta

import grpc

from coordinator import engine
from coordinator.errors import InvalidArgument, TrellisError
from coordinator.grpc.convert._common import (
    duration_to_proto,
    node_from_proto,
    timestamp_to_proto,
)
from coordinator.grpc.status import retry_hint, status_for
from coordinator.model import ErrorInfo
from coordinator.service import Completion, Failure, LeasedTask, ResultOutcome
from trellis.v1 import worker_service_pb2

# -- tasks --------------------------------------------------------------------------------


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


# -- results ------------------------------------------------------------------------------


def expansion_from_proto(msg: worker_service_pb2.DagExpansion) -> engine.Expansion:
    return engine.Expansion(
        nodes=tuple(node_from_proto(n) for n in msg.nodes),
        edges=tuple((e.source, e.target) for e in msg.edges),
    )


def complete_options_from_proto(
    msg: worker_service_pb2.CompleteTaskRequest,
) -> tuple[tuple[str, ...] | None, engine.Expansion | None]:
    """``next`` (None when empty: every child) and ``expansion`` (None when unset)."""
    taken = tuple(msg.next) or None
    expansion = expansion_from_proto(msg.expansion) if msg.HasField("expansion") else None
    return taken, expansion


def task_error_from_proto(msg: worker_service_pb2.TaskError) -> tuple[ErrorInfo, bool]:
    """The reported error and whether it may be retried."""
    error = ErrorInfo(
        type=msg.type or "Error",
        message=msg.message,
        details=msg.details or None,
    )
    return error, not msg.non_retryable


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


def result_status_to_proto(outcome: ResultOutcome) -> worker_service_pb2.ResultStatus:
    """One result of a batch: accepted, or refused with the status its own call would get."""
    status = worker_service_pb2.ResultStatus(
        duplicate=outcome.duplicate, will_retry=outcome.will_retry
    )
    exc = outcome.error
    if isinstance(exc, TrellisError):
        status.code = status_for(exc).value[0]
        status.message = str(exc)
        hint = retry_hint(exc)
        if hint is not None:
            status.retry_after.FromTimedelta(timedelta(seconds=hint))
    elif exc is not None:
        status.code = grpc.StatusCode.INTERNAL.value[0]
        status.message = "internal error; see the coordinator's log"
    return status
