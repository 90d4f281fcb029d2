"""Starting an execution and recording the results of attempts (pure functions).

The engine never changes ``attempt`` or ``lease_seq`` (claims do, in the store), never
reads a clock (``now`` is an argument) and never re-parses payloads on the plain path:
inputs of nodes with several parents and outputs of executions with several sinks are
composed with ``model.compose_object`` from the serialized outputs; payloads are parsed
only for the CEL expressions that need them (``_exprs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from coordinator.engine._backoff import retry_delay, should_retry
from coordinator.engine._common import (
    Step,
    end_node,
    make_ready,
    new_run,
    spec_of,
)
from coordinator.engine._expand import Expansion, effective_definition, expand
from coordinator.engine._flow import cleanup_run_ended, end_failed
from coordinator.engine._kinds import item_failed, item_succeeded
from coordinator.engine._readiness import activate, evaluate, propagate
from coordinator.engine._routing import fail_for_good, maybe_settle, succeed
from coordinator.engine._validate import Limits
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound
from coordinator.model import (
    NULL_JSON,
    ErrorInfo,
    EventType,
    Execution,
    ExecutionStatus,
    NodeKind,
    NodeRole,
    NodeRun,
    NodeStatus,
    Transition,
    WorkflowDef,
)


def start_execution(defn: WorkflowDef, execution: Execution, now: datetime) -> Transition:
    """Start a PENDING execution: it becomes RUNNING with a node run for every node.

    Every node run is created BLOCKED (on_failure handlers too); then the entry nodes (no
    parents) are made ready with the execution's input, in definition order (a task node
    READY, held when it pauses before it starts; a switch evaluated at once; see
    ``_readiness.activate``), and their ends are propagated. The execution's deadline is
    ``now + execution_timeout`` when the definition has one.
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
        role = NodeRole.ON_FAILURE if handler else NodeRole.TASK
        step.put(new_run(defn, spec, started, now, role=role))
    ended: list[str] = []
    for spec in defn.nodes:
        if spec.id in defn.handlers or defn.parents[spec.id]:
            continue
        if step.get(spec.id).status is NodeStatus.BLOCKED:
            ended += activate(step, spec.id)
    propagate(step, ended)
    maybe_settle(step)
    return step.transition()


def complete_node(
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    node_id: str,
    output: bytes,
    now: datetime,
    *,
    next: tuple[str, ...] | None = None,
    expansion: Expansion | None = None,
    limits: Limits | None = None,
) -> Transition:
    """A leased node run succeeded with ``output`` (JSON bytes; empty means ``null``).

    The node's output is ``output`` mapped by its ``output_expr`` (an error there fails it
    with ``ExpressionError``). Its BLOCKED children are then evaluated by their trigger
    rules (``_readiness``); when nothing is left to run the execution ends (``settle``).

    ``next`` names the children to take; the others are SKIPPED ("not chosen"). ``None`` or
    empty takes them all. ``expansion`` adds nodes and edges to the execution (see
    ``_expand``; checked against ``limits``, default ``Limits()``); the transition's
    execution then carries the merged expansion document and the new node runs are
    created, BLOCKED, then evaluated like the others. Either raises ``InvalidArgument``
    before anything changes when it does not fit.

    A map element's success moves its map node on (``_kinds``); a handler or
    compensation run that succeeds moves its execution's failure flow on.
    """
    node = _leased_node(execution, nodes, node_id, "completed")
    if node.role is not NodeRole.TASK and (next or expansion):
        raise InvalidArgument(
            f"node '{node_id}' is a {node.role} run; only a workflow's own task nodes can "
            "choose next nodes or expand the workflow"
        )
    new_ids: list[str] = []
    if expansion is not None and (expansion.nodes or expansion.edges):
        defn = effective_definition(defn, execution)
        defn, doc = expand(defn, execution, nodes, node_id, expansion, limits or Limits())
        execution = replace(execution, expansion=doc)
        new_ids = [n.id for n in expansion.nodes]
    children = defn.children[node_id] if node.role is NodeRole.TASK else ()
    if next:
        unknown = [n for n in next if n not in children]
        if unknown:
            names = ", ".join(repr(n) for n in unknown)
            have = ", ".join(repr(c) for c in children) or "none"
            raise InvalidArgument(
                f"next names {names}, not a child of node '{node_id}' (its children: "
                f"{have}); name only children of the node"
            )

    step = Step(defn, execution, nodes, now)
    for nid in new_ids:
        role = NodeRole.ON_FAILURE if nid in defn.handlers else NodeRole.TASK
        step.put(new_run(defn, defn.node_map[nid], step.execution, now, role=role))
    if node.role is NodeRole.MAP_ITEM:
        done = replace(node, output=output or NULL_JSON, error=None)
        end_node(step, done, NodeStatus.SUCCEEDED, EventType.NODE_SUCCEEDED)
        propagate(step, item_succeeded(step, done))
        maybe_settle(step)
        return step.transition()
    if node.role is not NodeRole.TASK:
        done = replace(node, output=output or NULL_JSON, error=None)
        end_node(step, done, NodeStatus.SUCCEEDED, EventType.NODE_SUCCEEDED)
        cleanup_run_ended(step)
        return step.transition()

    succeed(step, node, output, {"expanded": new_ids} if new_ids else None)
    ended = [node_id]
    if next and step.get(node_id).status is NodeStatus.SUCCEEDED:
        for child in sorted(children, key=step.order):
            child_run = step.get(child)
            if child not in next and child_run.status is NodeStatus.BLOCKED:
                reason = {"reason": f"not chosen by '{node_id}'"}
                end_node(step, child_run, NodeStatus.SKIPPED, EventType.NODE_SKIPPED, reason)
                ended.append(child)
    propagate(step, ended)
    # New nodes whose parents had all ended before (or that have none) are evaluated now.
    for nid in new_ids:
        if step.get(nid).status is NodeStatus.BLOCKED and nid not in defn.handlers:
            propagate(step, evaluate(step, nid))
    maybe_settle(step)
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
    backoff (with jitter). Otherwise a workflow node FAILS and is dead-lettered; a child
    with rule all_done, all_failed or one_success handles the failure, else the failure
    flow starts (see ``_routing``, ``_flow``). A map element failing for good fails its
    map node. A handler or compensation run just FAILS and the flow goes on. Handlers use
    their own retry policy, compensations their node's, map elements their map's.
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

    execution_error = ErrorInfo(
        type=error.type,
        message=f"node '{node_id}' failed on attempt {node.attempt}: {error.message}",
        details=error.details,
        node_id=node_id,
        attempt=node.attempt,
        worker_id=node.worker_id,
    )
    fail_run(step, node, NodeStatus.FAILED, recorded, execution_error)
    return step.transition()


def fail_run(
    step: Step,
    node: NodeRun,
    status: NodeStatus,
    node_error: ErrorInfo,
    execution_error: ErrorInfo,
) -> None:
    """A run failed for good (FAILED, or TIMED_OUT unstarted), whatever its role."""
    if node.role is NodeRole.TASK:
        dead_letter = step.defn.node_map[node.node_id].kind == NodeKind.TASK
        fail_for_good(step, node, status, node_error, execution_error, dead_letter=dead_letter)
        propagate(step, [node.node_id])
        maybe_settle(step)
    elif node.role is NodeRole.MAP_ITEM:
        propagate(step, item_failed(step, node, status, node_error))
        maybe_settle(step)
    else:
        end_failed(step, node, status, node_error, dead_letter=False)
        cleanup_run_ended(step)


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
