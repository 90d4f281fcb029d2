"""Shared pieces of every transition: the step being built, readiness, holding and events.

A ``Step`` starts from the loaded execution and node runs, collects the rows it changes
(whole rows, replaced, stamped ``updated_at = now``) and the events to append, and turns
into one ``Transition``. The execution keeps its loaded ``version``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from coordinator.errors import FailedPrecondition, NotFound
from coordinator.model import (
    COMPENSATION_SUFFIX,
    NULL_JSON,
    ChildStart,
    Event,
    EventType,
    Execution,
    ExecutionStatus,
    NodeKind,
    NodeRole,
    NodeRun,
    NodeSpec,
    NodeStatus,
    Transition,
    WorkflowDef,
    compose_object,
)

ACTIVE = frozenset({NodeStatus.READY, NodeStatus.LEASED})


class Step:
    """One transition being built from the loaded state."""

    def __init__(
        self,
        defn: WorkflowDef,
        execution: Execution,
        nodes: Mapping[str, NodeRun],
        now: datetime,
    ) -> None:
        self.defn = defn
        self.nodes = nodes
        self.now = now
        self.execution = replace(execution, updated_at=now)
        self.changed: dict[str, NodeRun] = {}
        self.events: list[Event] = []
        self.dead_lettered: list[str] = []
        self.redriven: str | None = None
        self.start_children: list[ChildStart] = []
        self.cancel_children: list[str] = []
        # Parsed payloads for expressions: id -> (the payload parsed, its value).
        self.parsed: dict[str, tuple[bytes, Any]] = {}
        self._items: dict[str, list[str]] | None = None
        self._order: dict[str, int] | None = None

    def get(self, node_id: str) -> NodeRun:
        """The node run as this step leaves it."""
        node = self.changed.get(node_id)
        return self.nodes[node_id] if node is None else node

    def put(
        self,
        node: NodeRun,
        type_: EventType | None = None,
        details: Mapping[str, object] | None = None,
    ) -> NodeRun:
        """Record a changed row (stamped ``now``) and, given a type, its event."""
        node = replace(node, updated_at=self.now)
        new = node.node_id not in self.changed and node.node_id not in self.nodes
        if new and node.role is NodeRole.MAP_ITEM and self._items is not None:
            map_id, _ = split_item_id(node.node_id)
            self._items.setdefault(map_id, []).append(node.node_id)
        self.changed[node.node_id] = node
        if type_ is not None:
            self.node_event(node, type_, details)
        return node

    def node_event(
        self, node: NodeRun, type_: EventType, details: Mapping[str, object] | None = None
    ) -> None:
        self.events.append(
            Event(
                execution_id=self.execution.id,
                type=type_,
                time=self.now,
                tenant_id=self.execution.tenant_id,
                node_id=node.node_id,
                attempt=node.attempt,
                worker_id=node.worker_id,
                details=encode(details),
            )
        )

    def execution_event(
        self, type_: EventType, details: Mapping[str, object] | None = None
    ) -> None:
        self.events.append(
            Event(
                execution_id=self.execution.id,
                type=type_,
                time=self.now,
                tenant_id=self.execution.tenant_id,
                details=encode(details),
            )
        )

    def has(self, node_id: str) -> bool:
        return node_id in self.changed or node_id in self.nodes

    def items(self, map_id: str) -> list[str]:
        """The element runs of map node ``map_id`` (``"<id>[<i>]"``), in index order."""
        if self._items is None:
            groups: dict[str, list[tuple[int, str]]] = {}
            for key in self.nodes.keys() | self.changed.keys():
                if key.endswith("]"):
                    base, index = split_item_id(key)
                    groups.setdefault(base, []).append((index, key))
            self._items = {m: [k for _, k in sorted(v)] for m, v in groups.items()}
        return self._items.get(map_id, [])

    def order(self, node_id: str) -> int:
        """The position of a definition node (for worklists in definition order)."""
        if self._order is None:
            self._order = {n.id: i for i, n in enumerate(self.defn.nodes)}
        return self._order[node_id]

    def ids(self) -> list[str]:
        """Every node run id: definition order (each map followed by its elements), then
        compensation runs by id."""
        present = self.nodes.keys() | self.changed.keys()
        ordered: list[str] = []
        for n in self.defn.nodes:
            if n.id in present:
                ordered.append(n.id)
                if n.kind == NodeKind.MAP:
                    ordered.extend(self.items(n.id))
        listed = set(ordered)
        return ordered + sorted(i for i in present if i not in listed)

    def task_ids(self) -> Iterator[str]:
        """The workflow's own nodes (not handlers), in definition order, each map node
        followed by its elements."""
        handlers = self.defn.handlers
        for n in self.defn.nodes:
            if n.id not in handlers:
                yield n.id
                if n.kind == NodeKind.MAP:
                    yield from self.items(n.id)

    def transition(self) -> Transition:
        return Transition(
            execution=self.execution,
            nodes=tuple(self.changed.values()),
            events=tuple(self.events),
            dead_lettered=tuple(self.dead_lettered),
            redriven_dead_letter=self.redriven,
            start_children=tuple(self.start_children),
            cancel_children=tuple(self.cancel_children),
        )


# -- holding and readiness -------------------------------------------------------------------


def holds(execution: Execution, node: NodeRun) -> bool:
    """Whether a node becoming READY now is held back from dispatch.

    Paused nodes are always held; a paused execution holds every node except on_failure
    handlers, which report a failure and so run even while the execution is paused.
    """
    return node.node_paused or (
        execution.status is ExecutionStatus.PAUSED and node.role is not NodeRole.ON_FAILURE
    )


def schedule_deadline(
    node: NodeRun, available_at: datetime | None, now: datetime
) -> datetime | None:
    """When an unheld READY row times out unstarted: the timeout after it becomes claimable."""
    if node.schedule_to_start_timeout is None:
        return None
    start = now if available_at is None else max(now, available_at)
    return start + node.schedule_to_start_timeout


def make_ready(
    step: Step,
    node: NodeRun,
    *,
    input: bytes | None,
    available_at: datetime,
    event: EventType = EventType.NODE_READY,
    details: Mapping[str, object] | None = None,
) -> NodeRun:
    """Make ``node`` READY: held (``NODE_HELD`` after ``event``) or with a schedule deadline."""
    held = holds(step.execution, node)
    ready = step.put(
        replace(
            node,
            status=NodeStatus.READY,
            input=input,
            available_at=available_at,
            held=held,
            schedule_deadline=None if held else schedule_deadline(node, available_at, step.now),
        ),
        event,
        details,
    )
    if held:
        step.node_event(ready, EventType.NODE_HELD)
    return ready


def release(step: Step, node: NodeRun, details: Mapping[str, object] | None = None) -> None:
    """A held READY row becomes claimable again (``NODE_RELEASED``)."""
    released = replace(
        node, held=False, schedule_deadline=schedule_deadline(node, node.available_at, step.now)
    )
    step.put(released, EventType.NODE_RELEASED, details)


def hold(step: Step, node: NodeRun) -> None:
    step.put(replace(node, held=True, schedule_deadline=None), EventType.NODE_HELD)


def end_node(
    step: Step,
    node: NodeRun,
    status: NodeStatus,
    type_: EventType,
    details: Mapping[str, object] | None = None,
) -> NodeRun:
    """Finish a node run. A LEASED row keeps its worker and fencing number, so the worker
    learns from its next heartbeat that the lease was cancelled."""
    ended = replace(
        node,
        status=status,
        lease_deadline=None,
        heartbeat_deadline=None,
        held=False,
        schedule_deadline=None,
    )
    return step.put(ended, type_, details)


def abort(
    step: Step,
    node: NodeRun,
    status: NodeStatus,
    type_: EventType,
    reason: str,
) -> None:
    """End a node run that did not finish on its own (cancelled or skipped). A WAITING
    workflow node's child execution is cancelled (``Transition.cancel_children``); a
    WAITING map node's unfinished elements are CANCELLED."""
    waiting = node.status is NodeStatus.WAITING
    end_node(step, node, status, type_, {"reason": reason})
    if not waiting:
        return
    if node.child_execution_id is not None:
        step.cancel_children.append(node.child_execution_id)
    if node.role is NodeRole.TASK and step.defn.node_map[node.node_id].kind == NodeKind.MAP:
        end_unfinished(step, step.items(node.node_id), reason)


def end_unfinished(step: Step, ids: Iterable[str], reason: str) -> None:
    """CANCEL every unfinished node run among ``ids``."""
    for nid in ids:
        node = step.get(nid)
        if not node.status.terminal:
            abort(step, node, NodeStatus.CANCELLED, EventType.NODE_CANCELLED, reason)


def descendants(defn: WorkflowDef, node_id: str) -> set[str]:
    out: set[str] = set()
    stack = list(defn.children[node_id])
    while stack:
        nid = stack.pop()
        if nid not in out:
            out.add(nid)
            stack.extend(defn.children[nid])
    return out


def skip_descendants(step: Step, node_id: str, reason: str) -> None:
    """SKIP the unfinished descendants of ``node_id``, in definition order."""
    below = descendants(step.defn, node_id)
    for nid in step.task_ids():
        if nid in below:
            node = step.get(nid)
            if not node.status.terminal:
                abort(step, node, NodeStatus.SKIPPED, EventType.NODE_SKIPPED, reason)


# -- node runs ---------------------------------------------------------------------------------


def new_run(
    defn: WorkflowDef,
    spec: NodeSpec,
    execution: Execution,
    now: datetime,
    *,
    role: NodeRole = NodeRole.TASK,
) -> NodeRun:
    """A BLOCKED node run for ``spec`` (a compensation run takes its node's settings)."""
    compensation = role is NodeRole.COMPENSATION
    return NodeRun(
        execution_id=execution.id,
        node_id=spec.id + COMPENSATION_SUFFIX if compensation else spec.id,
        task_type=(spec.compensation_task_type or spec.task_type)
        if compensation
        else spec.task_type,
        status=NodeStatus.BLOCKED,
        updated_at=now,
        workflow_name=execution.workflow_name,
        workflow_version=execution.workflow_version,
        tenant_id=execution.tenant_id,
        priority=spec.priority + execution.priority,
        start_to_close_timeout=defn.start_to_close_for(spec),
        heartbeat_timeout=defn.heartbeat_timeout_for(spec),
        schedule_to_start_timeout=defn.schedule_to_start_for(spec),
        node_paused=spec.pause_before and not compensation,
        role=role,
    )


def spec_of(defn: WorkflowDef, node: NodeRun) -> NodeSpec:
    """The spec that configures a run: a compensation run uses its compensated node's, a
    map element its map node's."""
    if node.role is NodeRole.COMPENSATION:
        return defn.node_map[node.node_id.removesuffix(COMPENSATION_SUFFIX)]
    if node.role is NodeRole.MAP_ITEM:
        return defn.node_map[split_item_id(node.node_id)[0]]
    return defn.node_map[node.node_id]


def item_id(map_id: str, index: int) -> str:
    return f"{map_id}[{index}]"


def split_item_id(node_id: str) -> tuple[str, int]:
    """``"m[3]"`` -> ``("m", 3)`` (node ids cannot contain ``[``)."""
    base, _, rest = node_id.partition("[")
    return base, int(rest.removesuffix("]"))


def compose(ids: tuple[str, ...], step: Step) -> bytes:
    """One id: its output as is; several: ``{id: output, ...}`` in the given order."""
    if len(ids) == 1:
        return step.get(ids[0]).output or NULL_JSON
    return compose_object([(i, step.get(i).output) for i in ids])


def encode(doc: Mapping[str, object] | None) -> bytes | None:
    return None if doc is None else json.dumps(doc, separators=(",", ":")).encode()


def seconds(value: timedelta | None) -> str:
    return "?" if value is None else f"{value.total_seconds():g}s"


def rfc3339(value: datetime) -> str:
    """``2030-01-31T09:00:00.000Z``: a time in UTC, to the millisecond (as stored)."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- preconditions -----------------------------------------------------------------------------


def require_unfinished(execution: Execution, action: str) -> None:
    if execution.status.terminal:
        raise FailedPrecondition(
            f"cannot {action}: execution '{execution.id}' is {execution.status}; "
            "only an unfinished execution can change"
        )


def require_node(execution: Execution, nodes: Mapping[str, NodeRun], node_id: str) -> NodeRun:
    node = nodes.get(node_id)
    if node is None:
        raise NotFound(f"execution '{execution.id}' has no node '{node_id}'; check the node id")
    return node
