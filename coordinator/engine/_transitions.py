"""Execution and node transitions: pure functions from loaded state to a ``Transition``.

The engine never changes ``attempt`` or ``lease_seq`` (claims do, in the store), never
reads a clock (``now`` is an argument) and never re-parses payloads: inputs of nodes with
several parents and outputs of executions with several sinks are composed with
``model.compose_object`` from the serialized outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime

from coordinator.engine._backoff import backoff_delay, should_retry
from coordinator.errors import FailedPrecondition, NotFound
from coordinator.model import (
    NULL_JSON,
    ErrorInfo,
    Event,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRun,
    NodeSpec,
    NodeStatus,
    Transition,
    WorkflowDef,
    compose_object,
)

_Lookup = Callable[[str], NodeRun]


def start_execution(defn: WorkflowDef, execution: Execution, now: datetime) -> Transition:
    """Start a PENDING execution: it becomes RUNNING with a node run for every node.

    Entry nodes (no parents) are READY with the execution's input; the others BLOCKED.
    """
    if execution.status is not ExecutionStatus.PENDING:
        raise FailedPrecondition(
            f"execution '{execution.id}' is {execution.status}, not PENDING; "
            "only a pending execution can be started"
        )
    started = replace(execution, status=ExecutionStatus.RUNNING, updated_at=now)
    events = [_event(started, EventType.EXECUTION_STARTED, now)]
    runs: list[NodeRun] = []
    for spec in defn.nodes:
        entry = not defn.parents[spec.id]
        run = _new_run(
            defn,
            spec,
            started,
            status=NodeStatus.READY if entry else NodeStatus.BLOCKED,
            input=(execution.input or NULL_JSON) if entry else None,
            available_at=now if entry else None,
            now=now,
        )
        runs.append(run)
        if entry:
            events.append(_node_event(started, run, EventType.NODE_READY, now))
    return Transition(execution=started, nodes=tuple(runs), events=tuple(events))


def complete_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    output: bytes,
    now: datetime,
) -> Transition:
    """A leased node succeeded with ``output`` (JSON bytes; empty means ``null``).

    Children whose parents have all succeeded become READY with their composed input;
    when every node has succeeded, the execution succeeds with its sinks' output.
    """
    node = _leased_node(execution, nodes, node_id, "completed")
    done = replace(
        node,
        status=NodeStatus.SUCCEEDED,
        output=output or NULL_JSON,
        error=None,
        updated_at=now,
        lease_deadline=None,
        heartbeat_deadline=None,
    )
    changed: dict[str, NodeRun] = {node_id: done}
    events = [_node_event(execution, done, EventType.NODE_SUCCEEDED, now)]

    def current(nid: str) -> NodeRun:
        return changed.get(nid) or nodes[nid]

    for child_id in defn.children[node_id]:
        child = current(child_id)
        if child.status is not NodeStatus.BLOCKED:
            continue
        parents = defn.parents[child_id]
        if all(current(p).status is NodeStatus.SUCCEEDED for p in parents):
            ready = replace(
                child,
                status=NodeStatus.READY,
                input=_compose(parents, current),
                available_at=now,
                updated_at=now,
            )
            changed[child_id] = ready
            events.append(_node_event(execution, ready, EventType.NODE_READY, now))

    updated = replace(execution, updated_at=now)
    # Every node is an ancestor of a sink, so the execution can only have finished when a
    # sink just succeeded; only then pay for the full scan.
    if (
        not defn.children[node_id]
        and _all_succeeded(defn.sinks, current)
        and _all_succeeded((n.id for n in defn.nodes), current)
    ):
        updated = replace(
            updated,
            status=ExecutionStatus.SUCCEEDED,
            output=_compose(defn.sinks, current),
            ended_at=now,
        )
        events.append(_event(updated, EventType.EXECUTION_SUCCEEDED, now))
    return Transition(execution=updated, nodes=tuple(changed.values()), events=tuple(events))


def fail_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    error: ErrorInfo,
    retryable: bool,
    now: datetime,
) -> Transition:
    """A leased node's attempt failed: schedule a retry, or fail the node and the execution.

    A retry happens when ``retryable``, the error type is not listed as non-retryable and
    attempts remain; the node is then READY again after the policy's backoff. Otherwise the
    node FAILS, every other unfinished node is CANCELLED and the execution FAILS.
    """
    node = _leased_node(execution, nodes, node_id, "failed")
    spec = defn.node_map[node_id]
    policy = defn.retry_policy_for(spec)
    recorded = replace(error, node_id=node_id, attempt=node.attempt, worker_id=node.worker_id)
    attempt_failed = _node_event(
        execution,
        node,
        EventType.NODE_ATTEMPT_FAILED,
        now,
        {"error_type": error.type, "message": error.message, "retryable": retryable},
    )

    if should_retry(policy, error.type, retryable, node.attempt):
        delay = backoff_delay(policy, node.attempt)
        retry = replace(
            node,
            status=NodeStatus.READY,
            error=recorded,
            available_at=now + delay,
            updated_at=now,
            lease_deadline=None,
            heartbeat_deadline=None,
        )
        scheduled = _node_event(
            execution,
            retry,
            EventType.NODE_RETRY_SCHEDULED,
            now,
            {
                "delay_seconds": delay.total_seconds(),
                "error_type": error.type,
                "message": error.message,
            },
        )
        return Transition(
            execution=replace(execution, updated_at=now),
            nodes=(retry,),
            events=(attempt_failed, scheduled),
        )

    failed = replace(
        node,
        status=NodeStatus.FAILED,
        error=recorded,
        updated_at=now,
        lease_deadline=None,
        heartbeat_deadline=None,
    )
    exec_error = ErrorInfo(
        type=error.type,
        message=f"node '{node_id}' failed on attempt {node.attempt}: {error.message}",
        details=error.details,
        node_id=node_id,
        attempt=node.attempt,
        worker_id=node.worker_id,
    )
    ended = replace(
        execution,
        status=ExecutionStatus.FAILED,
        error=exec_error,
        updated_at=now,
        ended_at=now,
    )
    changed = [failed]
    events = [attempt_failed, _node_event(execution, failed, EventType.NODE_FAILED, now)]
    reason = {"reason": f"node '{node_id}' failed"}
    for spec_ in defn.nodes:
        other = nodes.get(spec_.id)
        if other is None or spec_.id == node_id or other.status.terminal:
            continue
        cancelled = replace(
            other,
            status=NodeStatus.CANCELLED,
            updated_at=now,
            lease_deadline=None,
            heartbeat_deadline=None,
        )
        changed.append(cancelled)
        events.append(_node_event(execution, cancelled, EventType.NODE_CANCELLED, now, reason))
    events.append(
        _event(
            ended,
            EventType.EXECUTION_FAILED,
            now,
            {"error_type": error.type, "message": exec_error.message, "node_id": node_id},
        )
    )
    return Transition(execution=ended, nodes=tuple(changed), events=tuple(events))


# -- helpers ------------------------------------------------------------------------------


def _leased_node(
    execution: Execution, nodes: Mapping[str, NodeRun], node_id: str, verb: str
) -> NodeRun:
    if execution.status.terminal:
        raise FailedPrecondition(
            f"execution '{execution.id}' is already {execution.status}; "
            f"its node '{node_id}' can no longer be {verb}"
        )
    node = nodes.get(node_id)
    if node is None:
        raise NotFound(f"execution '{execution.id}' has no node '{node_id}'; check the node id")
    if node.status is not NodeStatus.LEASED:
        raise FailedPrecondition(
            f"node '{node_id}' of execution '{execution.id}' is {node.status}, not LEASED; "
            f"only a leased node can be {verb}"
        )
    return node


def _new_run(
    defn: WorkflowDef,
    spec: NodeSpec,
    execution: Execution,
    *,
    status: NodeStatus,
    input: bytes | None,
    available_at: datetime | None,
    now: datetime,
) -> NodeRun:
    return NodeRun(
        execution_id=execution.id,
        node_id=spec.id,
        task_type=spec.task_type,
        status=status,
        updated_at=now,
        workflow_name=execution.workflow_name,
        workflow_version=execution.workflow_version,
        tenant_id=execution.tenant_id,
        input=input,
        priority=spec.priority + execution.priority,
        available_at=available_at,
        start_to_close_timeout=defn.start_to_close_for(spec),
        heartbeat_timeout=spec.heartbeat_timeout,
    )


def _compose(ids: tuple[str, ...], current: _Lookup) -> bytes:
    """One id: its output as is; several: ``{id: output, ...}`` in the given order."""
    if len(ids) == 1:
        return current(ids[0]).output or NULL_JSON
    return compose_object([(i, current(i).output) for i in ids])


def _all_succeeded(ids: Iterable[str], current: _Lookup) -> bool:
    return all(current(i).status is NodeStatus.SUCCEEDED for i in ids)


def _details(doc: Mapping[str, object] | None) -> bytes | None:
    return None if doc is None else json.dumps(doc, separators=(",", ":")).encode()


def _event(
    execution: Execution,
    type_: EventType,
    now: datetime,
    details: Mapping[str, object] | None = None,
) -> Event:
    return Event(
        execution_id=execution.id,
        type=type_,
        time=now,
        tenant_id=execution.tenant_id,
        details=_details(details),
    )


def _node_event(
    execution: Execution,
    node: NodeRun,
    type_: EventType,
    now: datetime,
    details: Mapping[str, object] | None = None,
) -> Event:
    return Event(
        execution_id=execution.id,
        type=type_,
        time=now,
        tenant_id=execution.tenant_id,
        node_id=node.node_id,
        attempt=node.attempt,
        worker_id=node.worker_id,
        details=_details(details),
    )
