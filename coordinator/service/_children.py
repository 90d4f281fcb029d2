"""Sub-workflows: the child executions a transition starts (``settle_children``, pure: no
I/O, ``now`` given), and the follow-ups between parents and children (``SubWorkflows``).

A workflow node that becomes ready is WAITING and asks for a child in
``Transition.start_children``. ``settle_children`` turns each ask into a started child
execution (and, recursively, the children *it* starts), links it on the node row
(``child_execution_id``), or — when the child's definition is unknown or it would nest too
deep — fails the waiting node through the engine. The caller persists the parent's
transition and every created child in one store transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from coordinator import engine
from coordinator.errors import FailedPrecondition, NotFound, TrellisError
from coordinator.model import (
    ChildStart,
    ErrorInfo,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRun,
    NodeStatus,
    Transition,
    WorkflowDef,
)
from coordinator.service._schemas import IN_LOOP_BUDGET, INPUT_SCHEMA_VIOLATION, input_violation

if TYPE_CHECKING:
    from coordinator.service._transactions import Transactions

log = logging.getLogger(__name__)

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
    why = input_violation(child_defn, start.input, IN_LOOP_BUDGET)
    if why is not None:
        return ErrorInfo(
            INPUT_SCHEMA_VIOLATION,
            f"node '{start.node_id}' could not start its child execution: {why}; fix the "
            "node's input (its input expression or its parents' outputs)",
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


_EXECUTION_ENDED = frozenset(
    {
        EventType.EXECUTION_SUCCEEDED,
        EventType.EXECUTION_FAILED,
        EventType.EXECUTION_CANCELLED,
        EventType.EXECUTION_TIMED_OUT,
    }
)


def ends_execution(t: Transition) -> bool:
    """Whether ``t`` ended its execution (it appended the execution's final event)."""
    e = t.execution
    return any(ev.type in _EXECUTION_ENDED and ev.execution_id == e.id for ev in t.events)


class SubWorkflows:
    """The follow-ups between parents and children: a child that ended is reported to its
    parent's waiting node; a child its parent no longer waits on is cancelled. Both run
    after the commit that caused them (``after_commit``) and from the sweeper."""

    def __init__(self, transactions: Transactions) -> None:
        self._tx = transactions

    async def report_child_ended(self, child: Execution) -> bool:
        """Tell a child's parent that the child finished (``engine.child_ended``). False
        when the parent's node no longer waits on this child (already told, or cancelled)."""
        parent_id, node_id = child.parent_execution_id, child.parent_node_id
        if parent_id is None or node_id is None:
            return False

        def step(
            d: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
        ) -> Transition | None:
            node = nodes.get(node_id)
            if node is None or node.status is not NodeStatus.WAITING:
                return None
            if node.child_execution_id != child.id:
                return None
            return engine.child_ended(d, execution, nodes, node_id, child, now)

        return await self._tx.run_step(child.tenant_id, parent_id, step) is not None

    async def cancel_child(self, tenant_id: str, child_id: str) -> bool:
        """Cancel a child execution whose parent no longer waits on it (and, through its
        own transition, its children). False when it had already ended."""

        def step(
            d: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
        ) -> Transition | None:
            if execution.status.terminal:
                return None
            why = "cancelled because its parent execution no longer waits on it"
            return engine.cancel_execution(d, execution, nodes, why, now)

        return await self._tx.run_step(tenant_id, child_id, step) is not None

    async def cancel_released(self, done: Sequence[Transition], *, published: bool) -> None:
        """After a commit: cancel the children the transitions let go."""
        for t in done:
            for child_id in t.cancel_children:
                await self._follow_up(t, self.cancel_child(t.execution.tenant_id, child_id))

    async def report_ended(self, done: Sequence[Transition], *, published: bool) -> None:
        """After a commit: tell the parent of each child execution that ended."""
        for t in done:
            if t.execution.parent_execution_id and ends_execution(t):
                await self._follow_up(t, self.report_child_ended(t.execution))

    async def _follow_up(self, t: Transition, call: Awaitable[bool]) -> None:
        try:
            await call
        except (FailedPrecondition, NotFound) as exc:
            log.debug("sub-workflow follow-up settled meanwhile: %s", exc)
        except TrellisError as exc:
            log.warning(
                "sub-workflow follow-up failed; the sweeper will retry: %s",
                exc,
                extra={"execution_id": t.execution.id},
            )
