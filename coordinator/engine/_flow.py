"""The failure flow and the completion check, shared by every transition that ends a node.

A workflow node (role TASK) that fails for good is dead-lettered; the nodes below it are
SKIPPED and every other unfinished workflow node is CANCELLED. Then its ``on_failure``
handler runs, and compensations run one at a time, undoing the succeeded nodes in reverse
order of completion. The execution stays open (``EXECUTION_FAILING``) until they have all
ended, then FAILS with the node's error.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime

from coordinator.engine._common import (
    ACTIVE,
    Step,
    compose,
    end_node,
    end_unfinished,
    make_ready,
    new_run,
    skip_descendants,
)
from coordinator.model import (
    COMPENSATION_SUFFIX,
    ErrorInfo,
    EventType,
    ExecutionStatus,
    NodeRole,
    NodeRun,
    NodeSpec,
    NodeStatus,
    compose_object,
)


def fail_task_node(
    step: Step,
    node: NodeRun,
    status: NodeStatus,
    node_error: ErrorInfo,
    execution_error: ErrorInfo,
    *,
    dead_letter: bool = True,
) -> None:
    """A workflow node failed for good (``FAILED`` after its retries, or ``TIMED_OUT``) and
    no child handles it (see ``_readiness.fail_for_good``). Task nodes are dead-lettered;
    switch, workflow and map nodes are not (a map's failed element is)."""
    failed = end_failed(step, node, status, node_error, dead_letter=dead_letter)
    step.execution = replace(step.execution, error=execution_error)

    nid = failed.node_id
    skip_descendants(step, nid, f"upstream node '{nid}' failed")
    end_unfinished(step, step.task_ids(), f"node '{nid}' failed")

    handler = step.defn.node_map[nid].on_failure
    if handler and step.get(handler).status is not NodeStatus.BLOCKED:
        handler = None  # cancelled by an operator before anything failed
    compensation = _next_compensation(step)
    if handler or compensation:
        step.execution_event(EventType.EXECUTION_FAILING, error_details(execution_error))
    if handler:
        trigger_handler(step, handler, failed)
    if compensation:
        _start_compensation(step, compensation)
    settle(step)


def end_failed(
    step: Step, node: NodeRun, status: NodeStatus, error: ErrorInfo, *, dead_letter: bool
) -> NodeRun:
    """Record a run's failure for good: ``NODE_FAILED``/``NODE_TIMED_OUT``, and, when
    ``dead_letter``, ``NODE_DEAD_LETTERED`` and a dead letter."""
    event = EventType.NODE_FAILED if status is NodeStatus.FAILED else EventType.NODE_TIMED_OUT
    info = {"error_type": error.type, "message": error.message}
    failed = end_node(step, replace(node, error=error), status, event, info)
    if dead_letter:
        step.node_event(failed, EventType.NODE_DEAD_LETTERED, info)
        step.dead_lettered.append(failed.node_id)
    return failed


def cleanup_run_ended(step: Step) -> None:
    """A handler or compensation run ended (any way): start the next compensation, settle."""
    if step.execution.error is not None and not any(
        step.get(i).role is NodeRole.COMPENSATION and step.get(i).status in ACTIVE
        for i in step.ids()
    ):
        compensation = _next_compensation(step)
        if compensation is not None:
            _start_compensation(step, compensation)
    settle(step)


def settle(step: Step) -> None:
    """End the execution when nothing is left to run.

    That is when every workflow node (and map element) is finished and no handler or
    compensation run is READY or LEASED. Handlers never triggered are SKIPPED. The
    execution then FAILS when it has an error, is CANCELLED when a workflow node was
    cancelled, and otherwise SUCCEEDS with its sinks' outputs (a skipped sink gives
    ``null``; nodes whose failure a child handled do not fail it).
    """
    if step.execution.status.terminal:
        return
    if any(not step.get(i).status.terminal for i in step.task_ids()):
        return
    ids = step.ids()
    if any(step.get(i).role is not NodeRole.TASK and step.get(i).status in ACTIVE for i in ids):
        return
    defn = step.defn
    for spec in defn.nodes:
        node = step.get(spec.id)
        if spec.id in defn.handlers and node.status is NodeStatus.BLOCKED:
            reason = {"reason": "no node it handles failed"}
            end_node(step, node, NodeStatus.SKIPPED, EventType.NODE_SKIPPED, reason)

    error = step.execution.error
    cancelled = [
        n.id
        for n in defn.nodes
        if n.id not in defn.handlers and step.get(n.id).status is NodeStatus.CANCELLED
    ]
    if error is not None:
        step.execution = replace(step.execution, status=ExecutionStatus.FAILED, ended_at=step.now)
        step.execution_event(EventType.EXECUTION_FAILED, error_details(error))
    elif cancelled:
        step.execution = replace(
            step.execution, status=ExecutionStatus.CANCELLED, ended_at=step.now
        )
        names = ", ".join(f"'{i}'" for i in cancelled)
        step.execution_event(EventType.EXECUTION_CANCELLED, {"reason": f"cancelled: {names}"})
    else:
        step.execution = replace(
            step.execution,
            status=ExecutionStatus.SUCCEEDED,
            output=compose(defn.sinks, step),
            ended_at=step.now,
        )
        step.execution_event(EventType.EXECUTION_SUCCEEDED)


def error_details(error: ErrorInfo) -> dict[str, object]:
    return {"error_type": error.type, "message": error.message, "node_id": error.node_id}


def trigger_handler(step: Step, handler_id: str, failed: NodeRun) -> None:
    """Make an on_failure handler READY with ``failed``'s failure as its input."""
    error = failed.error
    assert error is not None
    error_doc = {
        "type": error.type,
        "message": error.message,
        "attempt": error.attempt,
        "worker_id": error.worker_id,
    }
    payload = compose_object(
        [
            ("node_id", json.dumps(failed.node_id).encode()),
            ("error", json.dumps(error_doc, separators=(",", ":")).encode()),
            ("input", failed.input),
        ]
    )
    handler = step.get(handler_id)
    # A fresh retry budget each time the handler is triggered (after a redrive, again).
    fresh = replace(handler, retry_base=handler.attempt, error=None, output=None)
    make_ready(step, fresh, input=payload, available_at=step.now)


def _next_compensation(step: Step) -> NodeSpec | None:
    """The succeeded node to undo next: the one that finished last and has no compensation
    run yet (ties: later in definition order)."""
    defn = step.defn
    best: NodeSpec | None = None
    best_key: tuple[datetime, int] | None = None
    for index, spec in enumerate(defn.nodes):
        if not spec.compensation_task_type or spec.id in defn.handlers:
            continue
        node = step.get(spec.id)
        run_id = spec.id + COMPENSATION_SUFFIX
        if (
            node.status is not NodeStatus.SUCCEEDED
            or run_id in step.nodes
            or run_id in step.changed
        ):
            continue
        key = (node.updated_at, index)
        if best_key is None or key > best_key:
            best, best_key = spec, key
    return best


def _start_compensation(step: Step, spec: NodeSpec) -> None:
    done = step.get(spec.id)
    run = replace(
        new_run(step.defn, spec, step.execution, step.now, role=NodeRole.COMPENSATION),
        priority=done.priority,
    )
    payload = compose_object(
        [
            ("node_id", json.dumps(spec.id).encode()),
            ("input", done.input),
            ("output", done.output),
        ]
    )
    make_ready(step, run, input=payload, available_at=step.now)
