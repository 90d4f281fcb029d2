"""An approval node's decision, or its timeout (pure transitions).

An approval node is WAITING for a person (``_kinds.wait_for_approval``); these end it:

- ``approve_node``: ``NODE_APPROVED`` (details: the decision), then the node SUCCEEDS with
  the decision as its output, ``{"approved": true, "by", "at", "comment"}`` (mapped by its
  output_expr); its children are evaluated by their trigger rules.
- ``reject_node``: ``NODE_REJECTED`` (details: the decision), then the node FAILS for
  good, not retried and not dead-lettered, with error type ``ApprovalRejected``, the
  comment as message and the decision as details. A child with all_done, all_failed or
  one_success handles the failure; otherwise the execution fails (after its on_failure
  handler and compensations).
- ``time_out_approval``: past its approval_timeout the node is TIMED_OUT
  (``ApprovalTimeout``), routed like a rejection.

Who may decide is the service's to check: ``approval_role`` gives the role a node needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from coordinator.engine._common import (
    Step,
    encode,
    require_node,
    require_unfinished,
    rfc3339,
    seconds,
)
from coordinator.engine._readiness import propagate
from coordinator.engine._routing import fail_for_good, maybe_settle, succeed
from coordinator.errors import FailedPrecondition
from coordinator.model import (
    ErrorInfo,
    EventType,
    Execution,
    NodeKind,
    NodeRole,
    NodeRun,
    NodeStatus,
    Transition,
    WorkflowDef,
)

APPROVAL_REJECTED = "ApprovalRejected"
APPROVAL_TIMEOUT = "ApprovalTimeout"

_NOT_WAITING = {
    NodeStatus.BLOCKED: "it has not been reached yet (its parents have not finished)",
    NodeStatus.SUCCEEDED: "it was approved already (its output records the decision)",
    NodeStatus.FAILED: "it was rejected already (its error records the decision)",
    NodeStatus.TIMED_OUT: "it timed out waiting for a decision",
    NodeStatus.SKIPPED: "it was skipped",
    NodeStatus.CANCELLED: "it was cancelled",
}


def approval_role(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    action: str,
) -> str:
    """The role a person needs to ``action`` (approve, reject) approval node ``node_id``.

    Raises ``NotFound`` for an unknown node and ``FailedPrecondition`` when the execution
    has ended or the node is not an approval node."""
    require_unfinished(execution, f"{action} node '{node_id}'")
    node = require_node(execution, nodes, node_id)
    spec = defn.node_map.get(node_id) if node.role is NodeRole.TASK else None
    if spec is None or spec.kind != NodeKind.APPROVAL:
        what = f"a {node.role} run" if spec is None else f"a {spec.kind} node"
        raise FailedPrecondition(
            f"cannot {action} node '{node_id}': it is {what}, not an approval node; only "
            "approval nodes are approved or rejected"
        )
    return spec.required_role


def approve_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    *,
    by: str,
    comment: str,
    now: datetime,
) -> Transition:
    """``by`` approved WAITING approval node ``node_id`` (see the module doc)."""
    node = _waiting(defn, execution, nodes, node_id, "approve")
    step = Step(defn, execution, nodes, now)
    decision = _decision(True, by, comment, now)
    step.node_event(node, EventType.NODE_APPROVED, decision)
    succeed(step, node, json.dumps(decision, separators=(",", ":")).encode())
    propagate(step, [node_id])
    maybe_settle(step)
    return step.transition()


def reject_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    *,
    by: str,
    comment: str,
    now: datetime,
) -> Transition:
    """``by`` rejected WAITING approval node ``node_id`` (see the module doc)."""
    node = _waiting(defn, execution, nodes, node_id, "reject")
    step = Step(defn, execution, nodes, now)
    decision = _decision(False, by, comment, now)
    step.node_event(node, EventType.NODE_REJECTED, decision)
    error = ErrorInfo(
        type=APPROVAL_REJECTED,
        message=comment or f"rejected by {by}, no comment given",
        details=encode(decision),
        node_id=node_id,
        attempt=node.attempt,
    )
    because = f": {comment}" if comment else " (no comment given)"
    execution_error = replace(error, message=f"node '{node_id}' was rejected by {by}{because}")
    fail_for_good(step, node, NodeStatus.FAILED, error, execution_error, dead_letter=False)
    propagate(step, [node_id])
    maybe_settle(step)
    return step.transition()


def time_out_approval(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    now: datetime,
) -> Transition:
    """WAITING approval node ``node_id`` got no decision by its deadline: it is TIMED_OUT
    with an ``ApprovalTimeout`` error, handled by a child or failing the execution."""
    node = _waiting(defn, execution, nodes, node_id, "time out")
    where = f"cannot time out node '{node_id}'"
    deadline = node.schedule_deadline
    if deadline is None:
        raise FailedPrecondition(f"{where}: it has no approval_timeout; it waits for a decision")
    if deadline > now:
        raise FailedPrecondition(
            f"{where}: its approval deadline {deadline.isoformat()} has not passed yet; "
            "try again after it"
        )
    timeout = defn.node_map[node_id].approval_timeout
    message = (
        f"no decision within {seconds(timeout)} of waiting for approval (approval_timeout); "
        "decide sooner, or raise the node's approval_timeout"
    )
    error = ErrorInfo(type=APPROVAL_TIMEOUT, message=message, node_id=node_id, attempt=node.attempt)
    execution_error = replace(error, message=f"node '{node_id}' timed out: {message}")
    step = Step(defn, execution, nodes, now)
    fail_for_good(step, node, NodeStatus.TIMED_OUT, error, execution_error, dead_letter=False)
    propagate(step, [node_id])
    maybe_settle(step)
    return step.transition()


def _waiting(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    action: str,
) -> NodeRun:
    approval_role(defn, execution, nodes, node_id, action)
    node = nodes[node_id]
    if node.status is not NodeStatus.WAITING:
        why = _NOT_WAITING.get(node.status, "it is not waiting for a decision")
        raise FailedPrecondition(
            f"cannot {action} node '{node_id}': node is {node.status}, not WAITING; {why}"
        )
    return node


def _decision(approved: bool, by: str, comment: str, now: datetime) -> dict[str, object]:
    return {"approved": approved, "by": by, "at": rfc3339(now), "comment": comment}
