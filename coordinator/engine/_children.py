"""A workflow node's child execution ended, or could not be started (pure transitions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from coordinator.engine._common import Step, end_node, require_node, require_unfinished
from coordinator.engine._readiness import propagate
from coordinator.engine._routing import fail_for_good, maybe_settle, succeed
from coordinator.errors import FailedPrecondition
from coordinator.model import (
    ErrorInfo,
    EventType,
    Execution,
    ExecutionStatus,
    NodeKind,
    NodeRun,
    NodeStatus,
    Transition,
    WorkflowDef,
)

CHILD_FAILED = "ChildWorkflowFailed"


def child_ended(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    child: Execution,
    now: datetime,
) -> Transition:
    """The child execution of WAITING workflow node ``node_id`` reached a terminal status.

    - SUCCEEDED: the node SUCCEEDS with the child's output (mapped by its output_expr);
    - FAILED or TIMED_OUT: the node fails for good, not retried, with the child's error
      type (``ChildWorkflowFailed`` when it has none) and the message
      ``child execution '<id>' of workflow '<name>' failed: <child's message>``, so that
      nested failures read as a chain; a child with all_done, all_failed or one_success
      handles it, else the execution fails;
    - CANCELLED: the node is CANCELLED (the execution then ends CANCELLED unless it fails).
    Then the node's children are evaluated by their trigger rules.
    """
    node = _waiting_node(execution, nodes, node_id, defn, "end its child execution")
    if node.child_execution_id is not None and node.child_execution_id != child.id:
        raise FailedPrecondition(
            f"node '{node_id}' waits for child execution '{node.child_execution_id}', not "
            f"'{child.id}'; report the end of the node's own child"
        )
    if not child.status.terminal:
        raise FailedPrecondition(
            f"child execution '{child.id}' is {child.status}; report it once it has ended"
        )
    step = Step(defn, execution, nodes, now)
    node = replace(node, child_execution_id=child.id)
    if child.status is ExecutionStatus.SUCCEEDED:
        succeed(step, node, child.output or b"", {"child_execution_id": child.id})
    elif child.status is ExecutionStatus.CANCELLED:
        reason = {"reason": f"child execution '{child.id}' was cancelled"}
        end_node(step, node, NodeStatus.CANCELLED, EventType.NODE_CANCELLED, reason)
    else:
        cause = child.error.message if child.error else f"it ended {child.status}"
        message = (
            f"child execution '{child.id}' of workflow '{child.workflow_name}' failed: {cause}"
        )
        error = ErrorInfo(
            type=child.error.type if child.error else CHILD_FAILED,
            message=message,
            details=child.error.details if child.error else None,
            node_id=node_id,
        )
        execution_error = replace(error, message=f"node '{node_id}' failed: {message}")
        fail_for_good(step, node, NodeStatus.FAILED, error, execution_error, dead_letter=False)
    propagate(step, [node_id])
    maybe_settle(step)
    return step.transition()


def fail_waiting_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    error: ErrorInfo,
    now: datetime,
) -> Transition:
    """The service could not start the child execution of WAITING workflow node
    ``node_id`` (definition not found, nesting too deep ...): the node fails for good with
    ``error`` (handled by a child, or failing the execution)."""
    node = _waiting_node(execution, nodes, node_id, defn, "fail it")
    step = Step(defn, execution, nodes, now)
    node_error = replace(error, node_id=node_id, attempt=node.attempt)
    execution_error = replace(node_error, message=f"node '{node_id}' failed: {error.message}")
    fail_for_good(step, node, NodeStatus.FAILED, node_error, execution_error, dead_letter=False)
    propagate(step, [node_id])
    maybe_settle(step)
    return step.transition()


def _waiting_node(
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    defn: WorkflowDef,
    action: str,
) -> NodeRun:
    require_unfinished(execution, f"{action} for node '{node_id}'")
    node = require_node(execution, nodes, node_id)
    spec = defn.node_map.get(node_id)
    if spec is None or spec.kind != NodeKind.WORKFLOW:
        kind = "a map element" if spec is None else f"a {spec.kind} node"
        raise FailedPrecondition(
            f"cannot {action} for node '{node_id}': it is {kind}, not a workflow node"
        )
    if node.status is not NodeStatus.WAITING:
        raise FailedPrecondition(
            f"cannot {action} for node '{node_id}': node is {node.status}, not WAITING "
            "(it was cancelled or has ended)"
        )
    return node
