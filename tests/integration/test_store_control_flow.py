"""The store's control-flow parts on SQLite and PostgreSQL: the new columns, the children a
transition inserts, the idempotency window, and the sweeps' queries."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command

from coordinator import errors
from coordinator.model import (
    ANY_EXECUTION,
    Execution,
    ExecutionStatus,
    NewExecution,
    NodeRun,
    NodeStatus,
    Transition,
)
from coordinator.service.ports import Decision
from coordinator.store import SqlStore, open_store
from coordinator.store._open import alembic_config
from tests.support.store_builders import NOW, T, make_execution, make_node, start, started


def child_of(parent: Execution, child_id: str, node_id: str, **changes: object) -> Execution:
    return dataclasses.replace(
        make_execution(child_id),
        parent_execution_id=parent.id,
        parent_node_id=node_id,
        depth=parent.depth + 1,
        **changes,  # type: ignore[arg-type]
    )


async def test_new_columns_round_trip(store: SqlStore) -> None:
    parent = dataclasses.replace(
        make_execution("p", status=ExecutionStatus.PENDING),
        start_at=NOW + timedelta(hours=1),
        expansion=b'{"nodes":[],"edges":[]}',
    )
    waiting = dataclasses.replace(
        make_node("p", "sub", status=NodeStatus.WAITING), child_execution_id="c"
    )
    child = child_of(parent, "c", "sub")
    created, _ = await store.executions.create_execution(
        Transition(execution=parent, nodes=(waiting,)),
        children=[Transition(execution=child, events=(started(child),))],
    )
    assert created == parent
    assert await store.executions.get_execution(T, "p") == parent
    assert await store.executions.get_execution(T, "c") == child
    assert await store.executions.list_node_runs(T, "p") == [waiting]

    # A transition writes expansion and child_execution_id.
    def decide(e: Execution, nodes: Mapping[str, NodeRun]) -> Decision[None]:
        row = dataclasses.replace(nodes["sub"], child_execution_id="c2")
        changed = dataclasses.replace(e, expansion=b'{"nodes":[1],"edges":[]}')
        return Decision(Transition(execution=changed, nodes=(row,)), None)

    await store.executions.transact(T, "p", decide)
    assert (await store.executions.get_execution(T, "p")).expansion == b'{"nodes":[1],"edges":[]}'
    [row] = await store.executions.list_node_runs(T, "p")
    assert row.child_execution_id == "c2"


async def test_a_transition_inserts_its_children_atomically(store: SqlStore) -> None:
    parent = await start(store, make_execution("p"), (make_node("p", "sub"),))
    child = child_of(parent, "c", "sub")

    def decide(e: Execution, nodes: Mapping[str, NodeRun]) -> Decision[str]:
        row = dataclasses.replace(nodes["sub"], status=NodeStatus.WAITING, child_execution_id="c")
        kid = Transition(execution=child, nodes=(make_node("c", "x"),), events=(started(child),))
        return Decision(Transition(execution=e, nodes=(row,)), "ok", created=(kid,))

    assert await store.executions.transact(T, "p", decide) == "ok"
    assert (await store.executions.get_execution(T, "c")).parent_node_id == "sub"
    assert [n.node_id for n in await store.executions.list_node_runs(T, "c")] == ["x"]
    assert [e.type for e in await store.executions.list_events(T, "c", 0, 10)] == [
        started(child).type
    ]

    # A child that cannot be inserted rolls the parent's transition back too.
    def clash(e: Execution, nodes: Mapping[str, NodeRun]) -> Decision[str]:
        row = dataclasses.replace(nodes["x"], status=NodeStatus.WAITING)
        return Decision(Transition(execution=e, nodes=(row,)), "no", created=(Transition(child),))

    with pytest.raises(errors.TrellisError):
        await store.executions.transact(T, "c", clash)
    [x] = await store.executions.list_node_runs(T, "c")
    assert x.status is NodeStatus.READY


async def test_idempotency_window(store: SqlStore) -> None:
    first = await start(store, make_execution("e1", idempotency_key="k"))
    # Within the window (holder created at or after the cutoff): the holder comes back.
    again, created = await store.executions.create_execution(
        Transition(make_execution("e2", idempotency_key="k")), idempotency_cutoff=NOW
    )
    assert (again, created) == (first, False)
    # Past the window: a new execution takes the key; the old one lets go of it.
    later = make_execution("e3", idempotency_key="k", created_at=NOW + timedelta(days=2))
    new, created = await store.executions.create_execution(
        Transition(later), idempotency_cutoff=NOW + timedelta(days=1)
    )
    assert created and new.id == "e3" and new.idempotency_key == "k"
    assert (await store.executions.get_execution(T, "e1")).idempotency_key is None
    same, created = await store.executions.create_execution(
        Transition(make_execution("e4", idempotency_key="k")),
        idempotency_cutoff=NOW + timedelta(days=1),
    )
    assert (same.id, created) == ("e3", False)


async def test_concurrent_creations_after_the_window_make_one(store: SqlStore) -> None:
    await start(store, make_execution("old", idempotency_key="k"))
    cutoff = NOW + timedelta(hours=1)
    results = await asyncio.gather(
        *(
            store.executions.create_execution(
                Transition(
                    make_execution(
                        f"n{i}", idempotency_key="k", created_at=NOW + timedelta(hours=2)
                    )
                ),
                idempotency_cutoff=cutoff,
            )
            for i in range(12)
        )
    )
    assert sum(created for _, created in results) == 1
    assert len({e.id for e, _ in results}) == 1
    listed = await store.executions.list_executions(T, ANY_EXECUTION, limit=100, before=None)
    assert {e.idempotency_key for e in listed if e.id != "old"} == {"k"}
    assert len(listed) == 2


async def test_batch_creation_is_all_or_nothing(store: SqlStore) -> None:
    await start(store, make_execution("taken"))
    items = [NewExecution(Transition(make_execution(f"b{i}"))) for i in range(3)]
    items.append(NewExecution(Transition(make_execution("taken"))))
    with pytest.raises(errors.Conflict):
        await store.executions.create_executions(items)
    for i in range(3):
        with pytest.raises(errors.NotFound):
            await store.executions.get_execution(T, f"b{i}")
    # A key repeated inside one batch returns the execution its first use created.
    keyed = [
        NewExecution(Transition(make_execution("k1", idempotency_key="same"))),
        NewExecution(Transition(make_execution("k2", idempotency_key="same"))),
    ]
    results = await store.executions.create_executions(keyed)
    assert [(e.id, c) for e, c in results] == [("k1", True), ("k1", False)]


async def test_due_executions(store: SqlStore) -> None:
    def delayed(execution_id: str, at: timedelta) -> Execution:
        return dataclasses.replace(
            make_execution(execution_id, status=ExecutionStatus.PENDING), start_at=NOW + at
        )

    for execution in (delayed("soon", timedelta(0)), delayed("later", timedelta(hours=1))):
        await store.executions.create_execution(Transition(execution))
    await start(store, make_execution("running"))
    assert [e.id for e in await store.executions.find_due_executions(NOW, 10)] == ["soon"]
    due = await store.executions.find_due_executions(NOW + timedelta(hours=1), 10)
    assert [e.id for e in due] == ["soon", "later"]


async def test_children_to_reconcile(store: SqlStore) -> None:
    parent = await start(
        store,
        make_execution("p"),
        (
            dataclasses.replace(
                make_node("p", "w1", status=NodeStatus.WAITING), child_execution_id="done"
            ),
            dataclasses.replace(
                make_node("p", "w2", status=NodeStatus.WAITING), child_execution_id="busy"
            ),
            dataclasses.replace(
                make_node("p", "w3", status=NodeStatus.CANCELLED), child_execution_id="orphan"
            ),
        ),
    )
    ended = child_of(parent, "done", "w1", status=ExecutionStatus.SUCCEEDED)
    await store.executions.create_execution(Transition(ended))
    await store.executions.create_execution(Transition(child_of(parent, "busy", "w2")))
    await store.executions.create_execution(Transition(child_of(parent, "orphan", "w3")))
    assert [e.id for e in await store.executions.find_ended_children(10)] == ["done"]
    assert [e.id for e in await store.executions.find_orphaned_children(10)] == ["orphan"]


async def test_waiting_nodes_past_their_deadline(store: SqlStore) -> None:
    def waiting(node_id: str, deadline: timedelta | None) -> NodeRun:
        return dataclasses.replace(
            make_node("a", node_id, status=NodeStatus.WAITING, available_at=None),
            schedule_deadline=None if deadline is None else NOW + deadline,
        )

    ready = dataclasses.replace(make_node("a", "ready"), schedule_deadline=NOW - timedelta(hours=1))
    await start(
        store,
        make_execution("a"),
        (
            waiting("late", -timedelta(seconds=1)),
            waiting("later", timedelta(seconds=5)),
            waiting("open", None),
            ready,
        ),
    )
    assert [n.node_id for n in await store.executions.find_waiting_overdue(NOW, 10)] == ["late"]
    overdue = await store.executions.find_waiting_overdue(NOW + timedelta(minutes=1), 10)
    assert [n.node_id for n in overdue] == ["late", "later"]
    assert overdue[0].schedule_deadline == NOW - timedelta(seconds=1)
    assert len(await store.executions.find_waiting_overdue(NOW + timedelta(minutes=1), 1)) == 1


async def test_claim_transact_skips_unknown_executions(store: SqlStore) -> None:
    def decide(e: Execution, nodes: Mapping[str, NodeRun]) -> Decision[str]:
        return Decision(None, "decided")

    assert await store.executions.claim_transact(T, "missing", decide) is None
    await start(store, make_execution("e1"))
    assert await store.executions.claim_transact(T, "e1", decide) == "decided"


async def test_claim_transact_skips_a_row_another_transaction_holds(
    fresh_postgres_url: str,
) -> None:
    store = await open_store(fresh_postgres_url)
    try:
        await start(store, make_execution("e1"))
        calls: list[str] = []

        def decide(e: Execution, nodes: Mapping[str, NodeRun]) -> Decision[str]:
            calls.append(e.id)
            return Decision(None, "decided")

        async with store.engine.begin() as conn:
            await conn.execute(sa.text("SELECT 1 FROM executions WHERE id = 'e1' FOR UPDATE"))
            assert await store.executions.claim_transact(T, "e1", decide) is None
        assert calls == []
        assert await store.executions.claim_transact(T, "e1", decide) == "decided"
    finally:
        await store.close()


async def test_migration_0003_downgrades_and_upgrades(db_url: str) -> None:
    store = await open_store(db_url)
    try:
        await start(store, dataclasses.replace(make_execution("e1"), parent_node_id="x"))

        def down_and_up(connection: sa.Connection) -> list[str]:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "0002")
            columns = [c["name"] for c in sa.inspect(connection).get_columns("executions")]
            command.upgrade(config, "head")
            return columns

        columns = await store.run_sync(down_and_up, write=True)
        assert "parent_node_id" not in columns and "start_at" not in columns
        restored = await store.executions.get_execution(T, "e1")
        assert restored.parent_node_id is None and restored.id == "e1"
    finally:
        await store.close()
