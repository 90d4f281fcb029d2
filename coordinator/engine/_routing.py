"""How a node's end is routed: success with its output mapped, failure handled by a child
or failing the execution, and the completion check (pure).

A node that fails for good (after its retries, timed out, its child execution failed, an
expression error) is a *handled* failure when one of its children has the trigger rule
``all_done``, ``all_failed`` or ``one_success``: the node is FAILED (a task node is
dead-lettered), its on_failure handler runs, and the execution goes on; its children are
then evaluated by their rules. Otherwise the failure flow of ``_flow`` runs and the
execution fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from coordinator.engine._cel import ExpressionError
from coordinator.engine._common import Step, end_node, end_unfinished
from coordinator.engine._exprs import NodeVars
from coordinator.engine._flow import end_failed, fail_task_node, settle, trigger_handler
from coordinator.model import (
    NULL_JSON,
    ErrorInfo,
    EventType,
    NodeKind,
    NodeRun,
    NodeStatus,
    TriggerRule,
    WorkflowDef,
)

# Children with these rules run after a failed parent, so its failure is theirs to handle.
HANDLING_RULES = frozenset({TriggerRule.ALL_DONE, TriggerRule.ALL_FAILED, TriggerRule.ONE_SUCCESS})
EXPRESSION_ERROR = "ExpressionError"


def handled(defn: WorkflowDef, node_id: str) -> bool:
    """Whether a failure of ``node_id`` is handled by one of its children."""
    return any(defn.node_map[c].trigger_rule in HANDLING_RULES for c in defn.children[node_id])


def fail_for_good(
    step: Step,
    node: NodeRun,
    status: NodeStatus,
    node_error: ErrorInfo,
    execution_error: ErrorInfo,
    *,
    dead_letter: bool,
) -> None:
    """A definition node failed for good: handled (the execution goes on) or the failure
    flow (the execution fails with ``execution_error``). The caller evaluates its children
    (``_readiness.propagate``) either way."""
    spec = step.defn.node_map[node.node_id]
    if not handled(step.defn, node.node_id):
        fail_task_node(step, node, status, node_error, execution_error, dead_letter=dead_letter)
        return
    failed = end_failed(step, node, status, node_error, dead_letter=dead_letter)
    if spec.kind == NodeKind.MAP:
        end_unfinished(step, step.items(node.node_id), f"map node '{node.node_id}' failed")
    handler = spec.on_failure
    if handler and step.get(handler).status is NodeStatus.BLOCKED:
        trigger_handler(step, handler, failed)


def expression_failed(step: Step, node: NodeRun, exc: ExpressionError) -> None:
    """An expression of ``node`` could not be evaluated: the node fails for good
    (``ExpressionError``, not retried)."""
    nid = node.node_id
    error = ErrorInfo(
        type=EXPRESSION_ERROR,
        message=str(exc),
        node_id=nid,
        attempt=node.attempt,
        worker_id=node.worker_id,
    )
    execution_error = replace(error, message=f"node '{nid}' failed: {exc}")
    dead_letter = step.defn.node_map[nid].kind == NodeKind.TASK
    fail_for_good(step, node, NodeStatus.FAILED, error, execution_error, dead_letter=dead_letter)


def succeed(
    step: Step, node: NodeRun, result: bytes, details: Mapping[str, object] | None = None
) -> None:
    """``node`` (a definition node) SUCCEEDS with ``result`` mapped by its output_expr; an
    error in that expression fails it instead."""
    spec = step.defn.node_map[node.node_id]
    output = result or NULL_JSON
    if spec.output_expr:
        variables = NodeVars(step, spec)
        variables.set_input(node.input or NULL_JSON)
        try:
            output = variables.output(output)
        except ExpressionError as exc:
            expression_failed(step, node, exc)
            return
    done = replace(node, output=output, error=None)
    end_node(step, done, NodeStatus.SUCCEEDED, EventType.NODE_SUCCEEDED, details)


def maybe_settle(step: Step) -> None:
    """Settle when every sink has finished (a cheap check before ``settle``'s full scan)."""
    if all(step.get(s).status.terminal for s in step.defn.sinks):
        settle(step)
