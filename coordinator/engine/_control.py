"""Operator and sweeper transitions: cancel, pause, resume, time out, redrive (pure).

Each raises ``FailedPrecondition`` when the state does not allow it (the message says why
and what to do) and ``NotFound`` for an unknown node id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from coordinator.engine._common import (
    Step,
    abort,
    descendants,
    end_unfinished,
    hold,
    holds,
    make_ready,
    release,
    require_node,
    require_unfinished,
    seconds,
    split_item_id,
)
from coordinator.engine._flow import cleanup_run_ended
from coordinator.engine._readiness import evaluate, propagate
from coordinator.engine._routing import maybe_settle
from coordinator.engine._transitions import fail_run
from coordinator.errors import FailedPrecondition
from coordinator.model import (
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

_BEFORE_START = frozenset({NodeStatus.BLOCKED, NodeStatus.READY})
_REDRIVABLE = frozenset({NodeStatus.FAILED, NodeStatus.TIMED_OUT})
_RESTORED = frozenset({NodeStatus.CANCELLED, NodeStatus.SKIPPED})


def cancel_execution(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    reason: str,
    now: datetime,
) -> Transition:
    """Cancel an unfinished execution: every unfinished node run is CANCELLED (leased ones
    keep their lease, so their workers learn it by heartbeat; WAITING workflow nodes' child
    executions go to ``Transition.cancel_children``); no handler or compensation runs.

    A PENDING execution (a delayed start) is CANCELLED before it has any node run.
    """
    if execution.status.terminal:
        raise FailedPrecondition(
            f"cannot cancel execution '{execution.id}': execution is {execution.status}; "
            "only unfinished executions can be cancelled"
        )
    step = Step(defn, execution, nodes, now)
    end_unfinished(step, step.ids(), reason)
    step.execution = replace(step.execution, status=ExecutionStatus.CANCELLED, ended_at=now)
    step.execution_event(EventType.EXECUTION_CANCELLED, {"reason": reason})
    return step.transition()


def cancel_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    reason: str,
    now: datetime,
) -> Transition:
    """Cancel one unfinished node run; its children are evaluated by their trigger rules
    (by default they, and the nodes below them, are SKIPPED); other branches go on.

    Cancelling a WAITING workflow node cancels its child execution; cancelling a map
    element cancels its map node (and the other elements). When nothing is left to run,
    the execution ends (CANCELLED, since a node was). Cancelling a compensation run moves
    on to the next compensation.
    """
    require_unfinished(execution, f"cancel node '{node_id}'")
    node = require_node(execution, nodes, node_id)
    if node.status.terminal:
        raise FailedPrecondition(
            f"cannot cancel node '{node_id}': node is {node.status}; "
            "only an unfinished node can be cancelled"
        )
    step = Step(defn, execution, nodes, now)
    abort(step, node, NodeStatus.CANCELLED, EventType.NODE_CANCELLED, reason)
    if node.role is NodeRole.TASK:
        propagate(step, [node_id])
        maybe_settle(step)
    elif node.role is NodeRole.MAP_ITEM:
        map_id, index = split_item_id(node_id)
        why = f"element {index} ('{node_id}') was cancelled"
        abort(step, step.get(map_id), NodeStatus.CANCELLED, EventType.NODE_CANCELLED, why)
        propagate(step, [map_id])
        maybe_settle(step)
    else:
        cleanup_run_ended(step)
    return step.transition()


def pause_execution(
    defn: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
) -> Transition:
    """RUNNING → PAUSED: every READY node run is held; running attempts may still finish,
    and nodes becoming READY while paused are held too."""
    if execution.status is not ExecutionStatus.RUNNING:
        raise FailedPrecondition(
            f"cannot pause execution '{execution.id}': execution is {execution.status}; "
            "only a RUNNING execution can be paused"
        )
    step = Step(defn, execution, nodes, now)
    step.execution = replace(step.execution, status=ExecutionStatus.PAUSED)
    step.execution_event(EventType.EXECUTION_PAUSED)
    for nid in step.ids():
        node = step.get(nid)
        if node.status is NodeStatus.READY and not node.held:
            hold(step, node)
    return step.transition()


def resume_execution(
    defn: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
) -> Transition:
    """PAUSED → RUNNING: held READY node runs are released, except nodes paused on their own
    (those wait for ``resume_node``)."""
    if execution.status is not ExecutionStatus.PAUSED:
        raise FailedPrecondition(
            f"cannot resume execution '{execution.id}': execution is {execution.status}; "
            "only a PAUSED execution can be resumed"
        )
    step = Step(defn, execution, nodes, now)
    step.execution = replace(step.execution, status=ExecutionStatus.RUNNING)
    step.execution_event(EventType.EXECUTION_RESUMED)
    for nid in step.ids():
        node = step.get(nid)
        if node.status is NodeStatus.READY and node.held and not node.node_paused:
            release(step, node)
    return step.transition()


def pause_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    now: datetime,
) -> Transition:
    """Pause a node before it starts: it is held when READY, until ``resume_node``.

    The event is ``NODE_HELD`` (details ``{"reason": "node paused", "held": <row held>}``),
    also for a BLOCKED node, which will be held when it becomes READY.
    """
    require_unfinished(execution, f"pause node '{node_id}'")
    node = require_node(execution, nodes, node_id)
    if node.status not in _BEFORE_START:
        raise FailedPrecondition(
            f"cannot pause node '{node_id}': node is {node.status}; "
            "a node can only be paused before it starts"
        )
    if node.node_paused:
        raise FailedPrecondition(
            f"cannot pause node '{node_id}': node is already paused; resume it with resume_node"
        )
    step = Step(defn, execution, nodes, now)
    paused = replace(node, node_paused=True)
    if node.status is NodeStatus.READY:
        paused = replace(paused, held=True, schedule_deadline=None)
    step.put(paused, EventType.NODE_HELD, {"reason": "node paused", "held": paused.held})
    return step.transition()


def resume_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    now: datetime,
) -> Transition:
    """Undo ``pause_node``: a READY node is released unless its execution is paused.

    The event is ``NODE_RELEASED`` (details ``{"reason": "node resumed", "held": <row
    held>}``: still held while the execution is paused, and for a BLOCKED node).
    """
    require_unfinished(execution, f"resume node '{node_id}'")
    node = require_node(execution, nodes, node_id)
    if node.status.terminal:
        raise FailedPrecondition(
            f"cannot resume node '{node_id}': node is {node.status}; "
            "only an unfinished node can be resumed"
        )
    if not node.node_paused:
        raise FailedPrecondition(
            f"cannot resume node '{node_id}': node is not paused; only a paused node "
            "can be resumed (a node held by a paused execution resumes with the execution)"
        )
    step = Step(defn, execution, nodes, now)
    resumed = replace(node, node_paused=False)
    if node.status is NodeStatus.READY and not holds(step.execution, resumed):
        release(step, resumed, {"reason": "node resumed", "held": False})
    else:
        step.put(resumed, EventType.NODE_RELEASED, {"reason": "node resumed", "held": resumed.held})
    return step.transition()


def time_out_unstarted(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    now: datetime,
) -> Transition:
    """A READY, unheld node run was not claimed by its schedule deadline: it is TIMED_OUT,
    not retried. A workflow node then fails like after its last attempt (dead letter,
    handled by a child or the failure flow), a map element fails its map node; a handler
    or compensation run just ends and the flow goes on."""
    require_unfinished(execution, f"time out node '{node_id}'")
    node = require_node(execution, nodes, node_id)
    where = f"cannot time out node '{node_id}'"
    if node.status is not NodeStatus.READY:
        raise FailedPrecondition(
            f"{where}: node is {node.status}, not READY; "
            "only a node waiting for a worker can time out unstarted"
        )
    if node.held:
        raise FailedPrecondition(
            f"{where}: node is held (paused); a held node does not time out until released"
        )
    if node.schedule_deadline is None:
        raise FailedPrecondition(
            f"{where}: node has no schedule-to-start deadline (no schedule_to_start_timeout)"
        )
    if node.schedule_deadline > now:
        raise FailedPrecondition(
            f"{where}: its schedule-to-start deadline {node.schedule_deadline.isoformat()} "
            "has not passed yet; try again after it"
        )
    message = (
        f"not started within {seconds(node.schedule_to_start_timeout)} of becoming ready "
        f"(schedule_to_start_timeout); check that workers for task type '{node.task_type}' "
        "are running and have capacity"
    )
    node_error = ErrorInfo(
        type="ScheduleToStartTimeout", message=message, node_id=node_id, attempt=node.attempt
    )
    step = Step(defn, execution, nodes, now)
    execution_error = replace(node_error, message=f"node '{node_id}' was {message}")
    fail_run(step, node, NodeStatus.TIMED_OUT, node_error, execution_error)
    return step.transition()


def time_out_execution(
    defn: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
) -> Transition:
    """An unfinished execution passed its deadline: it is TIMED_OUT with an
    ``ExecutionTimeout`` error and every unfinished node run is CANCELLED (no handler or
    compensation runs)."""
    where = f"cannot time out execution '{execution.id}'"
    if execution.status.terminal:
        raise FailedPrecondition(
            f"{where}: execution is {execution.status}; only unfinished executions can time out"
        )
    if execution.deadline is None:
        raise FailedPrecondition(
            f"{where}: it has no deadline (its workflow sets no execution_timeout)"
        )
    if execution.deadline > now:
        raise FailedPrecondition(
            f"{where}: its deadline {execution.deadline.isoformat()} has not passed yet; "
            "try again after it"
        )
    message = (
        f"execution did not finish within {seconds(defn.execution_timeout)} "
        "(execution_timeout); raise the workflow's execution_timeout or speed up its nodes"
    )
    step = Step(defn, execution, nodes, now)
    end_unfinished(step, step.ids(), "execution timed out")
    step.execution = replace(
        step.execution,
        status=ExecutionStatus.TIMED_OUT,
        ended_at=now,
        error=ErrorInfo(type="ExecutionTimeout", message=message),
    )
    step.execution_event(
        EventType.EXECUTION_TIMED_OUT, {"error_type": "ExecutionTimeout", "message": message}
    )
    return step.transition()


def redrive(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    dead_letter_id: str,
    now: datetime,
) -> Transition:
    """Run a FAILED execution forward again from its dead-lettered node.

    The node is READY again with its input and a fresh retry budget; the workflow nodes
    the failure cancelled, and the SKIPPED nodes below the redriven one, are restored:
    BLOCKED, then evaluated by their trigger rules like after a parent ended (so READY when
    they may run). Handlers are BLOCKED again, compensation runs stay as history and
    succeeded nodes are not touched, so they never run again. The execution is RUNNING
    with no error and, when its workflow has an execution_timeout, a fresh deadline.
    Events: ``EXECUTION_RESUMED`` (details say it is a redrive), then ``NODE_REDRIVEN`` for
    every reset node run, each followed by what happened to it (``NODE_READY`` ...).

    Redriving a map element is not supported (``FailedPrecondition``): the dead letter of
    an element names the element, and its map node failed with it; rerun the execution.
    """
    where = f"cannot redrive node '{node_id}'"
    if execution.status is not ExecutionStatus.FAILED:
        raise FailedPrecondition(
            f"{where}: execution '{execution.id}' is {execution.status}; "
            "only a FAILED execution can be redriven"
        )
    node = require_node(execution, nodes, node_id)
    if node.role is NodeRole.MAP_ITEM:
        raise FailedPrecondition(
            f"{where}: it is an element of a map node; redriving map elements is not "
            "supported, start the workflow again instead"
        )
    if node.role is not NodeRole.TASK:
        raise FailedPrecondition(
            f"{where}: it is a {node.role} run; only workflow nodes can be redriven "
            "(redrive the node that failed)"
        )
    if node.status not in _REDRIVABLE:
        raise FailedPrecondition(
            f"{where}: node is {node.status}; only a FAILED or TIMED_OUT node can be redriven"
        )
    step = Step(defn, execution, nodes, now)
    deadline = execution.deadline
    if defn.execution_timeout is not None:
        deadline = now + defn.execution_timeout
    step.execution = replace(
        step.execution,
        status=ExecutionStatus.RUNNING,
        error=None,
        output=None,
        ended_at=None,
        deadline=deadline,
    )
    step.redriven = dead_letter_id
    step.execution_event(
        EventType.EXECUTION_RESUMED,
        {"reason": "redrive", "node_id": node_id, "dead_letter_id": dead_letter_id},
    )
    target = _reset(node)
    step.node_event(target, EventType.NODE_REDRIVEN, {"dead_letter_id": dead_letter_id})
    make_ready(step, target, input=node.input, available_at=now)

    handlers = defn.handlers
    cancelled = [
        n.id
        for n in defn.nodes
        if n.id != node_id
        and n.id not in handlers
        and step.get(n.id).status is NodeStatus.CANCELLED
    ]
    # SKIPPED nodes below the redriven node or below a restored (cancelled) one were skipped
    # because of what is now undone; others (a switch's untaken branch) stay skipped.
    below = descendants(defn, node_id).union(*(descendants(defn, c) for c in cancelled))
    restored_ids = [
        n.id
        for n in defn.nodes
        if n.id != node_id
        and n.id not in handlers
        and (n.id in cancelled or (n.id in below and step.get(n.id).status is NodeStatus.SKIPPED))
    ]
    # First all BLOCKED, so that each is evaluated against the others' restored state.
    for nid in restored_ids:
        step.put(_reset(step.get(nid)))
    restored = {"dead_letter_id": dead_letter_id, "restored_by": node_id}
    for nid in restored_ids:
        step.node_event(step.get(nid), EventType.NODE_REDRIVEN, restored)
        if step.get(nid).status is NodeStatus.BLOCKED:
            propagate(step, evaluate(step, nid))
    for spec in defn.nodes:
        handler = step.get(spec.id)
        if spec.id in handlers and handler.status is not NodeStatus.BLOCKED:
            step.put(_reset(handler), EventType.NODE_REDRIVEN, restored)
    maybe_settle(step)
    return step.transition()


def _reset(node: NodeRun) -> NodeRun:
    """BLOCKED with no lease, result or error, and a fresh retry budget."""
    return replace(
        node,
        status=NodeStatus.BLOCKED,
        input=None,
        output=None,
        error=None,
        available_at=None,
        worker_id=None,
        lease_deadline=None,
        heartbeat_deadline=None,
        held=False,
        schedule_deadline=None,
        retry_base=node.attempt,
    )
