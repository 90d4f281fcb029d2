"""An execution driven through the pure engine step by step (``Sim``), with the clock,
definitions and event readers the engine tests share.

``Sim`` applies each transition to its copy of the execution and its node runs, checking
the invariants every transition keeps (versions, times, one row per node, held only when
READY); ``claim`` stands in for the store's lease.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from coordinator.engine import complete_node, fail_node, start_execution
from coordinator.model import (
    COMPENSATION_SUFFIX,
    ErrorInfo,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRun,
    NodeSpec,
    NodeStatus,
    RetryPolicy,
    Transition,
    WorkflowDef,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
SEC = timedelta(seconds=1)
NO_WAIT = RetryPolicy(max_attempts=1, initial_interval=timedelta(0), max_interval=timedelta(0))


def new_execution(defn: WorkflowDef, input: bytes) -> Execution:
    return Execution(
        id="e1",
        workflow_name=defn.name,
        workflow_version=defn.version,
        status=ExecutionStatus.PENDING,
        input=input,
        created_at=T0,
        updated_at=T0,
        tenant_id="acme",
        version=5,
    )


class Sim:
    """An execution's state, changed only through the engine, checked after every step."""

    def __init__(self, defn: WorkflowDef, input: bytes = b'{"x": 1}') -> None:
        self.defn = defn
        self.now = T0
        self.execution = new_execution(defn, input)
        self.nodes: dict[str, NodeRun] = {}
        self.apply(start_execution(defn, self.execution, self.now))

    def apply(self, t: Transition) -> Transition:
        assert t.execution.version == 5
        assert t.execution.updated_at == self.now
        assert len({n.node_id for n in t.nodes}) == len(t.nodes)
        for n in t.nodes:
            assert n.updated_at == self.now
            old = self.nodes.get(n.node_id)
            if old is not None:
                assert (n.attempt, n.lease_seq) == (old.attempt, old.lease_seq)
                assert n != old
            assert n.held is False or n.status is NodeStatus.READY
        for e in t.events:
            assert (e.time, e.tenant_id, e.execution_id) == (self.now, "acme", "e1")
            if e.details is not None:
                json.loads(e.details)
        self.execution = t.execution
        self.nodes.update((n.node_id, n) for n in t.nodes)
        return t

    def do(self, fn: Callable[..., Transition], *args: Any) -> Transition:
        """Call an engine function as ``fn(defn, execution, nodes, *args, now)``."""
        self.now += SEC
        return self.apply(fn(self.defn, self.execution, self.nodes, *args, self.now))

    def claim(self, node_id: str, worker: str = "w1") -> NodeRun:
        n = self.nodes[node_id]
        assert n.status is NodeStatus.READY and not n.held
        assert n.available_at is not None
        self.now = max(self.now, n.available_at)
        leased = replace(
            n,
            status=NodeStatus.LEASED,
            attempt=n.attempt + 1,
            lease_seq=n.lease_seq + 1,
            worker_id=worker,
            lease_deadline=self.now + n.start_to_close_timeout,
        )
        self.nodes[node_id] = leased
        return leased

    def complete(self, node_id: str, output: bytes = b"1", worker: str = "w1") -> Transition:
        self.claim(node_id, worker)
        return self.do(complete_node, node_id, output)

    def fail(
        self,
        node_id: str,
        type: str = "Boom",
        message: str = "broken",
        retryable: bool = True,
        worker: str = "w1",
    ) -> Transition:
        self.claim(node_id, worker)
        return self.do(fail_node, node_id, ErrorInfo(type, message), retryable)

    def status(self, node_id: str) -> NodeStatus:
        return self.nodes[node_id].status


def kinds(t: Transition) -> list[tuple[EventType, str | None]]:
    return [(e.type, e.node_id) for e in t.events]


def details(t: Transition, type_: EventType, node_id: str | None = None) -> Any:
    event = next(e for e in t.events if e.type is type_ and e.node_id == node_id)
    return json.loads(event.details or b"null")


def comp(node_id: str) -> str:
    return node_id + COMPENSATION_SUFFIX


def handler_defn(**handler: Any) -> WorkflowDef:
    return WorkflowDef(
        name="w",
        nodes=(
            NodeSpec("a", "t"),
            NodeSpec("b", "t", on_failure="h"),
            NodeSpec("c", "t"),
            NodeSpec("h", "alert", **handler),
        ),
        edges=(("a", "b"), ("b", "c")),
    )


def saga() -> WorkflowDef:
    slow = RetryPolicy(max_attempts=2, initial_interval=7 * SEC, max_interval=7 * SEC)
    return WorkflowDef(
        name="saga",
        nodes=(
            NodeSpec("reserve", "t", compensation_task_type="unreserve", priority=3),
            NodeSpec("charge", "t", compensation_task_type="refund", retry_policy=slow),
            NodeSpec("plain", "t"),
            NodeSpec("ship", "t", compensation_task_type="unship", heartbeat_timeout=4 * SEC),
            NodeSpec("notify", "t"),
        ),
        edges=(("reserve", "charge"), ("charge", "plain"), ("plain", "ship"), ("ship", "notify")),
    )
