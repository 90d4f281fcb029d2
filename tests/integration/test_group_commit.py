"""Group commit: workers' results sharing one database transaction (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from coordinator import engine, errors
from coordinator.model import Execution, ExecutionStatus, NodeRun, NodeSpec, WorkflowDef
from coordinator.service import Coordinator
from coordinator.service.ports import Decision
from coordinator.store import SqlStore

TENANT = "default"


def fan(width: int) -> WorkflowDef:
    mids = tuple(NodeSpec(id=f"m{i}", task_type="t") for i in range(width))
    return WorkflowDef(
        name="fan",
        nodes=(NodeSpec(id="head", task_type="t"), *mids, NodeSpec(id="tail", task_type="t")),
        edges=(
            *(("head", m.id) for m in mids),
            *((m.id, "tail") for m in mids),
        ),
    )


@pytest.mark.sql_only("group commit: the memory store commits each result alone")
async def test_concurrent_results_all_land_and_share_commits(store: SqlStore) -> None:
    """Twenty results of one fan-out sent at once: each is recorded once, the fan-in runs,
    and they were committed in groups rather than one transaction each."""
    groups: list[int] = []
    transact_many = store.executions.transact_many

    async def counting(items: Any) -> Any:
        groups.append(len(items))
        return await transact_many(items)

    store.executions.transact_many = counting  # type: ignore[method-assign]
    c = Coordinator(store)
    await c.definitions.register_workflow(fan(20))
    await c.leasing.register_worker(TENANT, "w", ["t"], 100)
    execution, _ = await c.starts.start_execution(TENANT, "fan", None, b"{}")
    (head,) = await c.leasing.poll_tasks(TENANT, "w", ["t"], 10, timedelta(0))
    await c.results.complete_task(TENANT, head.token, b"1", "w")
    mids = await c.leasing.poll_tasks(TENANT, "w", ["t"], 100, timedelta(0))
    assert len(mids) == 20
    duplicates = await asyncio.gather(
        *(c.results.complete_task(TENANT, t.token, b'"ok"', "w") for t in mids)
    )
    assert [duplicate for duplicate, _ in duplicates] == [False] * 20
    (tail,) = await c.leasing.poll_tasks(TENANT, "w", ["t"], 10, timedelta(0))
    assert tail.node.node_id == "tail"
    await c.results.complete_task(TENANT, tail.token, b"2", "w")
    view = await c.executions.get_execution(TENANT, execution.id)
    assert view.execution.status is ExecutionStatus.SUCCEEDED
    events = await store.executions.list_events(TENANT, execution.id, 0, 1000)
    succeeded = [e.node_id for e in events if e.type.value == "NODE_SUCCEEDED"]
    assert sorted(succeeded) == sorted(["head", "tail", *(f"m{i}" for i in range(20))])
    assert groups and max(groups) > 1, groups
    assert sum(groups) <= 22


async def _two_runs(store: SqlStore) -> tuple[WorkflowDef, Execution, Execution]:
    c = Coordinator(store)
    defn, _ = await c.definitions.register_workflow(fan(1))
    a, _ = await c.starts.start_execution(TENANT, "fan", None, b"{}")
    b, _ = await c.starts.start_execution(TENANT, "fan", None, b"{}")
    return defn, a, b


def _cancel(defn: WorkflowDef, **extra: Any) -> Any:
    def decide(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[str]:
        now = datetime.now(UTC)
        t = engine.cancel_execution(defn, execution, nodes, "test", now)
        return Decision(t, execution.id, **extra)

    return decide


def _refuse(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[str]:
    raise errors.InvalidArgument("not this one")


async def test_a_refused_item_writes_nothing_and_the_others_commit(store: SqlStore) -> None:
    defn, a, b = await _two_runs(store)
    results = await store.executions.transact_many(
        [
            (TENANT, b.id, _refuse),
            (TENANT, "no-such-execution", _cancel(defn)),
            (TENANT, a.id, _cancel(defn)),
        ]
    )
    assert results is not None
    assert isinstance(results[0], errors.InvalidArgument)
    assert isinstance(results[1], errors.NotFound)
    assert results[2] == a.id
    assert (await store.executions.get_execution(TENANT, a.id)).status is ExecutionStatus.CANCELLED
    assert (await store.executions.get_execution(TENANT, b.id)).status is ExecutionStatus.RUNNING


async def test_a_group_that_cannot_commit_writes_nothing(store: SqlStore) -> None:
    """One item's child execution reuses a taken id: the whole group rolls back and says
    so (None); the caller then runs each on its own."""
    defn, a, b = await _two_runs(store)
    pending = dataclasses.replace(a, status=ExecutionStatus.PENDING)
    clash = engine.start_execution(defn, pending, datetime.now(UTC))  # a's id is taken
    results = await store.executions.transact_many(
        [(TENANT, a.id, _cancel(defn)), (TENANT, b.id, _cancel(defn, created=(clash,)))]
    )
    assert results is None
    for execution in (a, b):
        assert (
            await store.executions.get_execution(TENANT, execution.id)
        ).status is ExecutionStatus.RUNNING


@pytest.mark.parametrize("size", [1, 3])
async def test_group_of_one_or_more_matches_transact(store: SqlStore, size: int) -> None:
    c = Coordinator(store)
    defn, _ = await c.definitions.register_workflow(fan(1))
    runs = [(await c.starts.start_execution(TENANT, "fan", None, b"{}"))[0] for _ in range(size)]
    results = await store.executions.transact_many([(TENANT, r.id, _cancel(defn)) for r in runs])
    assert results == [r.id for r in runs]


@pytest.mark.sql_only("a stale group load, injected through the SQL store's own loader")
async def test_a_row_moved_since_the_load_rolls_the_group_back(store: SqlStore) -> None:
    """The writes stay fenced by (status, lease_seq): when a claim leased a node between the
    group's load and its write (simulated: the group is handed the rows as they were before
    the claim), the whole group rolls back (None), to be decided again one by one."""
    c = Coordinator(store)
    defn, _ = await c.definitions.register_workflow(fan(1))
    a, _ = await c.starts.start_execution(TENANT, "fan", None, b"{}")
    b, _ = await c.starts.start_execution(TENANT, "fan", None, b"{}")
    async with store.db.tx(write=False) as conn:
        before_claim = await store.executions._load_group(conn, [(TENANT, a.id), (TENANT, b.id)])
    await c.leasing.register_worker(TENANT, "w", ["t"], 10)
    assert len(await c.leasing.poll_tasks(TENANT, "w", ["t"], 10, timedelta(0))) == 2  # both heads
    load_group = store.executions._load_group

    async def stale(conn: Any, keys: Any) -> Any:
        fresh = await load_group(conn, keys)  # takes the locks, as the real one does
        return {k: before_claim[k] for k in fresh}

    store.executions._load_group = stale  # type: ignore[method-assign]
    results = await store.executions.transact_many(
        [(TENANT, a.id, _cancel(defn)), (TENANT, b.id, _cancel(defn))]
    )
    assert results is None
    del store.executions._load_group
    for execution in (a, b):
        assert (
            await store.executions.get_execution(TENANT, execution.id)
        ).status is ExecutionStatus.RUNNING
    assert await store.executions.transact_many([(TENANT, a.id, _cancel(defn))]) == [a.id]


async def test_items_of_one_execution_see_each_other_in_a_group(store: SqlStore) -> None:
    """Two results of one fan-out in one group: the second is decided on the first's
    outcome (as a reload would show it), so the fan-in is not missed."""
    c = Coordinator(store)
    await c.definitions.register_workflow(fan(2))
    await c.leasing.register_worker(TENANT, "w", ["t"], 10)
    execution, _ = await c.starts.start_execution(TENANT, "fan", None, b"{}")
    (head,) = await c.leasing.poll_tasks(TENANT, "w", ["t"], 10, timedelta(0))
    await c.results.complete_task(TENANT, head.token, b"1", "w")
    m0, m1 = sorted(
        await c.leasing.poll_tasks(TENANT, "w", ["t"], 10, timedelta(0)),
        key=lambda t: t.node.node_id,
    )

    def complete(node_id: str) -> Any:
        def decide(ex: Execution, nodes: Mapping[str, NodeRun]) -> Decision[str]:
            t = engine.complete_node(fan_def, ex, nodes, node_id, b'"x"', datetime.now(UTC))
            return Decision(t, node_id)

        return decide

    fan_def = await c.definitions.get_workflow(TENANT, "fan", None)
    results = await store.executions.transact_many(
        [(TENANT, execution.id, complete("m0")), (TENANT, execution.id, complete("m1"))]
    )
    assert results == ["m0", "m1"]
    nodes = {
        n.node_id: n.status.value
        for n in await store.executions.list_node_runs(TENANT, execution.id)
    }
    assert nodes == {"head": "SUCCEEDED", "m0": "SUCCEEDED", "m1": "SUCCEEDED", "tail": "READY"}
    assert (
        await store.executions.get_execution(TENANT, execution.id)
    ).version == execution.version + 3
    del m0, m1
