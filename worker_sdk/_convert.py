"""Every conversion between the wire (protobuf, JSON bytes) and the SDK's own types."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from trellis.v1 import common_pb2, worker_service_pb2, workflow_service_pb2
from worker_sdk._duration import Duration, parse_duration
from worker_sdk._task import TaskContext, _LeaseSignals
from worker_sdk._types import (
    AttemptFailure,
    DeadLetter,
    ErrorDetails,
    Event,
    Execution,
    NodeState,
)

_EXECUTION_PREFIX = "EXECUTION_STATUS_"
_NODE_PREFIX = "NODE_STATUS_"


# JSON payloads -------------------------------------------------------------


def encode_json(value: Any) -> bytes:
    """Encodes a JSON document; raises TypeError or ValueError (NaN, cycles) when it is not one."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_input(value: Any) -> bytes:
    """An input for the wire: bytes pass through as raw JSON text; None is empty (null)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if value is None:
        return b""
    try:
        return encode_json(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"input is not JSON-serializable: {exc}") from exc


def decode_json(data: bytes) -> Any:
    """Decodes a JSON document; empty means None. Raises ValueError when it is not JSON."""
    if not data:
        return None
    return json.loads(data)


def decode_json_lenient(data: bytes) -> Any:
    """Like ``decode_json`` but returns undecodable payloads as the raw bytes."""
    try:
        return decode_json(data)
    except ValueError:
        return data


# Well-known types ----------------------------------------------------------


def timestamp_from_proto(msg: Any, field: str) -> datetime | None:
    """The Timestamp ``field`` of ``msg`` as an aware UTC datetime, or None when unset."""
    if not msg.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, field)
    return ts.ToDatetime(tzinfo=UTC)


def duration_to_proto(value: timedelta) -> duration_pb2.Duration:
    msg = duration_pb2.Duration()
    msg.FromTimedelta(value)
    return msg


def duration_from_proto(msg: duration_pb2.Duration) -> timedelta:
    return msg.ToTimedelta()


def _enum_name(name_of: Callable[[Any], str], value: int, prefix: str) -> str:
    try:
        name = name_of(value)
    except ValueError:  # a status this SDK does not know yet
        return str(value)
    return name.removeprefix(prefix)


def execution_status_name(value: int) -> str:
    return _enum_name(common_pb2.ExecutionStatus.Name, value, _EXECUTION_PREFIX)


def node_status_name(value: int) -> str:
    return _enum_name(common_pb2.NodeStatus.Name, value, _NODE_PREFIX)


def execution_status_from_name(name: str) -> common_pb2.ExecutionStatus.ValueType:
    """Maps "FAILED" (any case, prefix optional) to EXECUTION_STATUS_FAILED, or ValueError."""
    key = name.strip().upper()
    if not key.startswith(_EXECUTION_PREFIX):
        key = _EXECUTION_PREFIX + key
    try:
        return common_pb2.ExecutionStatus.Value(key)
    except ValueError:
        known = ", ".join(
            n.removeprefix(_EXECUTION_PREFIX)
            for n, _ in common_pb2.ExecutionStatus.items()
            if not n.endswith("UNSPECIFIED")
        )
        raise ValueError(f"unknown execution status {name!r}; expected one of {known}") from None


def start_request(
    workflow_name: str,
    input: Any,
    *,
    version: int | None,
    idempotency_key: str | None,
    priority: int,
    delay: Duration | None,
    start_at: datetime | None,
    max_concurrency: int = 0,
) -> workflow_service_pb2.StartExecutionRequest:
    """A StartExecutionRequest; raises ValueError on a bad delay, start time or
    max_concurrency."""
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
        raise ValueError(f"max_concurrency must be an int, got {max_concurrency!r}")
    if max_concurrency < 0:
        raise ValueError(
            f"max_concurrency must be 0 (the workflow's) or more, got {max_concurrency}"
        )
    request = workflow_service_pb2.StartExecutionRequest(
        workflow_name=workflow_name,
        workflow_version=version or 0,
        input=encode_input(input),
        idempotency_key=idempotency_key or "",
        priority=priority,
        max_concurrency=max_concurrency,
    )
    if delay is not None and start_at is not None:
        raise ValueError("give either delay or start_at, not both")
    if delay is not None:
        request.delay.CopyFrom(duration_to_proto(parse_duration(delay, what="delay")))
    if start_at is not None:
        if not isinstance(start_at, datetime) or start_at.utcoffset() is None:
            raise ValueError(
                f"start_at must be a timezone-aware datetime (e.g. datetime.now(UTC)), "
                f"got {start_at!r}"
            )
        request.start_time.FromDatetime(start_at.astimezone(UTC))
    return request


# Client types --------------------------------------------------------------


def error_from_proto(msg: Any, field: str = "error") -> ErrorDetails | None:
    if not msg.HasField(field):
        return None
    err: common_pb2.ErrorInfo = getattr(msg, field)
    return ErrorDetails(
        type=err.type,
        message=err.message,
        node_id=err.node_id,
        attempt=err.attempt,
        worker_id=err.worker_id,
        details=decode_json_lenient(err.details),
    )


def node_from_proto(msg: common_pb2.NodeRun) -> NodeState:
    return NodeState(
        node_id=msg.node_id,
        task_type=msg.task_type,
        status=node_status_name(msg.status),
        attempt=msg.attempt,
        output=decode_json_lenient(msg.output),
        error=error_from_proto(msg),
        worker_id=msg.worker_id,
        held=msg.held,
        child_execution_id=msg.child_execution_id,
    )


def dead_letter_from_proto(msg: common_pb2.DeadLetter) -> DeadLetter:
    return DeadLetter(
        id=msg.id,
        execution_id=msg.execution_id,
        workflow_name=msg.workflow_name,
        workflow_version=msg.workflow_version,
        node_id=msg.node_id,
        task_type=msg.task_type,
        input=decode_json_lenient(msg.input),
        attempts=tuple(
            AttemptFailure(
                attempt=a.attempt,
                error=error_from_proto(a),
                worker_id=a.worker_id,
                time=timestamp_from_proto(a, "time"),
            )
            for a in msg.attempts
        ),
        create_time=timestamp_from_proto(msg, "create_time"),
        redrive_time=timestamp_from_proto(msg, "redrive_time"),
    )


def execution_from_proto(msg: common_pb2.Execution) -> Execution:
    return Execution(
        id=msg.id,
        workflow_name=msg.workflow_name,
        workflow_version=msg.workflow_version,
        status=execution_status_name(msg.status),
        input=decode_json_lenient(msg.input),
        output=decode_json_lenient(msg.output),
        error=error_from_proto(msg),
        nodes=tuple(node_from_proto(n) for n in msg.nodes),
        priority=msg.priority,
        idempotency_key=msg.idempotency_key,
        create_time=timestamp_from_proto(msg, "create_time"),
        end_time=timestamp_from_proto(msg, "end_time"),
        parent_execution_id=msg.parent_execution_id,
        parent_node_id=msg.parent_node_id,
        depth=msg.depth,
        start_time=timestamp_from_proto(msg, "start_time"),
        max_concurrency=msg.max_concurrency,
        queued=msg.queued,
    )


def event_from_proto(msg: common_pb2.Event) -> Event:
    return Event(
        sequence=msg.sequence,
        type=msg.type,
        execution_id=msg.execution_id,
        node_id=msg.node_id,
        attempt=msg.attempt,
        worker_id=msg.worker_id,
        time=timestamp_from_proto(msg, "time"),
        details=decode_json_lenient(msg.details),
    )


# Worker types --------------------------------------------------------------


def context_from_proto(
    msg: worker_service_pb2.Task, *, worker_id: str, signals: _LeaseSignals
) -> TaskContext:
    """The handler's view of a leased task. Raises ValueError when its config is not JSON."""
    return TaskContext(
        execution_id=msg.execution_id,
        node_id=msg.node_id,
        task_type=msg.task_type,
        attempt=msg.attempt,
        idempotency_key=msg.idempotency_key,
        workflow_name=msg.workflow_name,
        workflow_version=msg.workflow_version,
        config=decode_json(msg.config),
        lease_deadline=timestamp_from_proto(msg, "lease_deadline"),
        worker_id=worker_id,
        metadata=dict(msg.metadata),
        execution_start_time=timestamp_from_proto(msg, "execution_start_time"),
        map_index=map_index(msg.node_id),
        _signals=signals,
        _execution_input=msg.execution_input,
        _parent_outputs=msg.parent_outputs,
    )


_MAP_ELEMENT = re.compile(r".+\[(\d+)\]")


def map_index(node_id: str) -> int | None:
    """The index of a map element from its run id ("<map id>[<index>]"); None otherwise."""
    match = _MAP_ELEMENT.fullmatch(node_id)
    return int(match.group(1)) if match else None
