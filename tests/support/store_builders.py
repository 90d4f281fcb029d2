"""Domain objects for the store tests, and executions started straight in the store.

``NOW`` has whole milliseconds (what the store keeps), so values round-trip unchanged;
``T`` is the default tenant; ``HEAD`` the newest schema revision.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic.script import ScriptDirectory

from coordinator.model import (
    Event,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRun,
    NodeStatus,
    Transition,
)
from coordinator.store import SqlStore
from coordinator.store._open import alembic_config

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()
NOW = datetime(2025, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)  # whole milliseconds: round-trips
T = "default"


def make_execution(
    execution_id: str = "e1",
    *,
    tenant: str = T,
    created_at: datetime = NOW,
    workflow_name: str = "wf",
    status: ExecutionStatus = ExecutionStatus.RUNNING,
    idempotency_key: str | None = None,
) -> Execution:
    return Execution(
        id=execution_id,
        tenant_id=tenant,
        workflow_name=workflow_name,
        workflow_version=1,
        status=status,
        input=b'{"in":true}',
        created_at=created_at,
        updated_at=created_at,
        idempotency_key=idempotency_key,
    )


def make_node(
    execution_id: str,
    node_id: str,
    *,
    tenant: str = T,
    status: NodeStatus = NodeStatus.READY,
    task_type: str = "work",
    priority: int = 0,
    available_at: datetime | None = NOW,
    heartbeat_timeout: timedelta | None = None,
) -> NodeRun:
    return NodeRun(
        execution_id=execution_id,
        node_id=node_id,
        tenant_id=tenant,
        task_type=task_type,
        status=status,
        updated_at=NOW,
        workflow_name="wf",
        workflow_version=1,
        priority=priority,
        available_at=available_at if status is NodeStatus.READY else None,
        start_to_close_timeout=timedelta(seconds=30),
        heartbeat_timeout=heartbeat_timeout,
    )


def started(execution: Execution) -> Event:
    return Event(
        execution_id=execution.id,
        type=EventType.EXECUTION_STARTED,
        time=execution.created_at,
        tenant_id=execution.tenant_id,
    )


async def start(
    store: SqlStore, execution: Execution, nodes: tuple[NodeRun, ...] = ()
) -> Execution:
    created, was_created = await store.executions.create_execution(
        Transition(execution=execution, nodes=nodes, events=(started(execution),))
    )
    assert was_created
    return created
