"""Sub-workflows: the child executions a transition starts (pure: no I/O, ``now`` given).

A workflow node that becomes ready is WAITING and asks for a child in
``Transition.start_children``. ``settle_children`` turns each ask into a started child
execution (and, recursively, the children *it* starts), links it on the node row
(``child_execution_id``), or — when the child's definition is unknown or it would nest too
deep — fails the waiting node through the engine. The caller persists the parent's
transition and every created child in one store transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from coordinator import engine
from coordinator.model import (
    ChildStart,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    NodeRun,
    Transition,
    WorkflowDef,
)

# (workflow name, version); version 0 means the latest.
DefKey = tuple[str, int]


@dataclass(frozen=True)
class Settled:
    transition: Transition
    created: tuple[Transition, ...] = ()


def settle_children(
    defn: WorkflowDef,
    transition: Transition,
    nodes: Mapping[str, NodeRun],
    now: datetime,
    known: Mapping[DefKey, WorkflowDef | None],
    max_depth: int,
    new_id: Callable[[], str],
) -> Settled | frozenset[DefKey]:
    """Start the children ``transition`` asks for. ``defn`` is the execution's registered
    definition, ``nodes`` its node runs before ``transition``; ``known`` maps a child
    definition key to the definition (None: not registered). Returns the keys still to look
    up when ``known`` lacks one (call again once they are known)."""
    t = replace(transition, start_children=())
    pending: list[ChildStart] = list(transition.start_children)
    created: list[Transition] = []
    while pending:
        start = pending.pop(0)
        key = (start.workflow_name, start.workflow_version)
        if key not in known:
            return frozenset(
                k
                for k in [key, *((p.workflow_name, p.workflow_version) for p in pending)]
                if k not in known
            )
        child_defn = known[key]
        parent = t.execution
        error = _refusal(start, child_defn, parent, max_depth)
        if error is not None or child_defn is None:
            state = {**nodes, **{n.node_id: n for n in t.nodes}}
            effective = engine.effective_definition(defn, parent)
            failed = engine.fail_waiting_node(
                effective,
                parent,
                state,
                start.node_id,
                error or ErrorInfo("WorkflowNotFound", ""),
                now,
            )
            pending.extend(failed.start_children)
            t = combine(t, failed)
            continue
        shell = Execution(
            id=new_id(),
            tenant_id=parent.tenant_id,
            workflow_name=child_defn.name,
            workflow_version=child_defn.version,
            status=ExecutionStatus.PENDING,
            input=start.input,
            created_at=now,
            updated_at=now,
            priority=start.priority,
            parent_execution_id=parent.id,
            parent_node_id=start.node_id,
            depth=parent.depth + 1,
            max_concurrency=child_defn.max_concurrency,
        )
        if child_defn.max_running_executions > 0:
            # Capped: a start due now; the sweeper starts it within the cap (start_pending).
            created.append(Transition(execution=replace(shell, start_at=now)))
        else:
            effective = engine.effective_definition(child_defn, shell)
            started = engine.start_execution(effective, shell, now)
            sub = settle_children(child_defn, started, {}, now, known, max_depth, new_id)
            if not isinstance(sub, Settled):
                return sub
            created.extend((sub.transition, *sub.created))
        t = _link(t, nodes, start.node_id, shell.id)
    return Settled(t, tuple(created))


def _refusal(
    start: ChildStart, child_defn: WorkflowDef | None, parent: Execution, max_depth: int
) -> ErrorInfo | None:
    if child_defn is None:
        which = f"workflow '{start.workflow_name}'"
        if start.workflow_version:
            which += f" version {start.workflow_version}"
        return ErrorInfo(
            "WorkflowNotFound",
            f"node '{start.node_id}' runs {which}, which is not registered; register it, "
            "then redrive the node or start the execution again",
            node_id=start.node_id,
        )
    depth = parent.depth + 1
    if depth > max_depth:
        return ErrorInfo(
            "WorkflowDepthExceeded",
            f"sub-workflow nesting depth {depth} exceeds the limit of {max_depth} "
            "(TRELLIS_MAX_WORKFLOW_DEPTH)",
            node_id=start.node_id,
        )
    return None


def _link(t: Transition, nodes: Mapping[str, NodeRun], node_id: str, child_id: str) -> Transition:
    """Set ``child_execution_id`` on the workflow node's row in ``t``."""
    changed = {n.node_id: n for n in t.nodes}
    row = changed.get(node_id) or nodes[node_id]
    changed[node_id] = replace(row, child_execution_id=child_id)
    return replace(t, nodes=tuple(changed.values()))


def combine(first: Transition, then: Transition) -> Transition:
    """One transition doing ``first`` and then ``then`` (decided on ``first``'s result)."""
    rows = {n.node_id: n for n in first.nodes}
    rows.update((n.node_id, n) for n in then.nodes)
    return Transition(
        execution=then.execution,
        nodes=tuple(rows.values()),
        events=first.events + then.events,
        dead_lettered=first.dead_lettered
        + tuple(d for d in then.dead_lettered if d not in first.dead_lettered),
        redriven_dead_letter=first.redriven_dead_letter or then.redriven_dead_letter,
        start_children=(),
        cancel_children=first.cancel_children
        + tuple(c for c in then.cancel_children if c not in first.cancel_children),
    )
