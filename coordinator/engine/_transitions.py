"""Starting an execution and recording the results of attempts (pure functions).

The engine never changes ``attempt`` or ``lease_seq`` (claims do, in the store), never
reads a clock (``now`` is an argument) and never re-parses payloads: inputs of nodes with
several parents and outputs of executions with several sinks are composed with
``model.compose_object`` from the serialized outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from coordinator.engine._backoff import retry_delay, should_retry
from coordinator.engine._common import (
    Step,
    compose,
    end_node,
    make_ready,
    new_run,
    spec_of,
)
from coordinator.engine._flow import cleanup_run_ended, fail_task_node, settle
from coordinator.errors import FailedPrecondition, NotFound
from coordinator.model import (
    NULL_JSON,
    ErrorInfo,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRole,
    NodeRun,
    NodeStatus,
    Transition,
    WorkflowDef,
)


def start_execution(defn: WorkflowDef, execution: Execution, now: datetime) -> Transition:
    """Start a PENDING execution: it becomes RUNNING with a node run for every node.

    Entry nodes (no parents) are READY with the execution's input, held when they pause
    before they start; the others, and the on_failure handlers, are BLOCKED. The execution's
    deadline is ``now + execution_timeout`` when the definition has one.
    """
    if execution.status is not ExecutionStatus.PENDING:
        raise FailedPrecondition(
            f"execution '{execution.id}' is {execution.status}, not PENDING; "
            "only a pending execution can be started"
        )
    deadline = execution.deadline
    if defn.execution_timeout is not None:
        deadline = now + defn.execution_timeout
    started = replace(execution, status=ExecutionStatus.RUNNING, deadline=deadline)
    step = Step(defn, started, {}, now)
    step.execution_event(EventType.EXECUTION_STARTED)
    for spec in defn.nodes:
        handler = spec.id in defn.handlers
        run = new_run(
            defn, spec, started, now, role=NodeRole.ON_FAILURE if handler else NodeRole.TASK
        )
        if handler or defn.parents[spec.id]:
            step.put(run)
        else:
            make_ready(step, run, input=execution.input or NULL_JSON, available_at=now)
    return step.transition()


def complete_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    output: bytes,
    now: datetime,
) -> Transition:
    """A leased node run succeeded with ``output`` (JSON bytes; empty means ``null``).

    For a workflow node, children whose parents have all succeeded become READY with their
    composed input; when nothing is left to run the execution ends (see ``settle``). A
    handler or compensation run that succeeds moves its execution's failure flow on.
    """
    node = _leased_node(execution, nodes, node_id, "completed")
    step = Step(defn, execution, nodes, now)
    result = replace(node, output=output or NULL_JSON, error=None)
    done = end_node(step, result, NodeStatus.SUCCEEDED, EventType.NODE_SUCCEEDED)
    if done.role is not NodeRole.TASK:
        cleanup_run_ended(step)
        return step.transition()

    children = defn.children[node_id]
    for child_id in children:
        child = step.get(child_id)
        if child.status is not NodeStatus.BLOCKED:
            continue
        parents = defn.parents[child_id]
        if all(step.get(p).status is NodeStatus.SUCCEEDED for p in parents):
            make_ready(step, child, input=compose(parents, step), available_at=now)

    # The execution can only be done when no child is left waiting and every sink has
    # finished; only then pay for the full scan.
    if all(step.get(c).status.terminal for c in children) and all(
        step.get(s).status.terminal for s in defn.sinks
    ):
        settle(step)
    return step.transition()


def fail_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    error: ErrorInfo,
    retryable: bool,
    now: datetime,
) -> Transition:
    """A leased node run's attempt failed: schedule a retry, or fail the node for good.

    A retry happens when ``retryable``, the error type is not listed as non-retryable and
    attempts since the last redrive remain; the node is then READY again after the policy's
    backoff (with jitter). Otherwise a workflow node FAILS, is dead-lettered and starts the
    failure flow (see ``_flow``); a handler or compensation run just FAILS and the flow
    goes on. Handlers use their own retry policy, compensations their node's.
    """
    node = _leased_node(execution, nodes, node_id, "failed")
    step = Step(defn, execution, nodes, now)
    policy = defn.retry_policy_for(spec_of(defn, node))
    recorded = replace(error, node_id=node_id, attempt=node.attempt, worker_id=node.worker_id)
    failure: dict[str, object] = {
        "error_type": error.type,
        "message": error.message,
        "retryable": retryable,
    }
    if error.details:
        # Already validated JSON text (the service checks payloads): kept for dead letters.
        failure["details"] = error.details.decode()
    step.node_event(node, EventType.NODE_ATTEMPT_FAILED, failure)

    if should_retry(policy, error.type, retryable, node.attempt - node.retry_base):
        delay = retry_delay(policy, execution.id, node_id, node.attempt, node.retry_base)
        make_ready(
            step,
            replace(node, error=recorded, lease_deadline=None, heartbeat_deadline=None),
            input=node.input,
            available_at=now + delay,
            event=EventType.NODE_RETRY_SCHEDULED,
            details={
                "delay_seconds": delay.total_seconds(),
                "error_type": error.type,
                "message": error.message,
            },
        )
        return step.transition()

    if node.role is NodeRole.TASK:
        execution_error = ErrorInfo(
            type=error.type,
            message=f"node '{node_id}' failed on attempt {node.attempt}: {error.message}",
            details=error.details,
            node_id=node_id,
            attempt=node.attempt,
            worker_id=node.worker_id,
        )
        fail_task_node(step, node, NodeStatus.FAILED, recorded, execution_error)
    else:
        info = {"error_type": error.type, "message": error.message}
        failed = replace(node, error=recorded)
        end_node(step, failed, NodeStatus.FAILED, EventType.NODE_FAILED, info)
        cleanup_run_ended(step)
    return step.transition()


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
