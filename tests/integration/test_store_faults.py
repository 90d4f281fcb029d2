"""The SQL store's fault-tolerance state (migration 0002), on SQLite and PostgreSQL: holds,
schedule-to-start and execution deadlines, lost workers, dead letters and redrives."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from coordinator import errors
from coordinator.model import (
    DeadLetter,
    ErrorInfo,
    Event,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRole,
    NodeRun,
    NodeStatus,
    Transition,
    WorkerInfo,
)
from coordinator.service.ports import Decision
from coordinator.store import SqlStore, normalize_database_url, open_store
from coordinator.store._open import alembic_config
from coordinator.store._tables import LIVE_EXECUTION_STATUSES, metadata
from tests.support.store_builders import HEAD, NOW, T, make_execution, make_node, start

S = timedelta(seconds=1)


# -- builders -----------------------------------------------------------------------------


def worker(worker_id: str, last_seen: datetime, *, tenant: str = T) -> WorkerInfo:
    return WorkerInfo(
        id=worker_id, tenant_id=tenant, task_types=("work",), capacity=1, last_seen=last_seen
    )


def node_event(
    type_: EventType,
    node_id: str,
    attempt: int,
    *,
    at: datetime = NOW,
    execution_id: str = "e1",
    worker_id: str | None = "w1",
    details: object = None,
) -> Event:
    return Event(
        execution_id=execution_id,
        type=type_,
        time=at,
        node_id=node_id,
        attempt=attempt,
        worker_id=worker_id,
        details=None if details is None else json.dumps(details).encode(),
    )


def failed(
    node_id: str, attempt: int, message: str, *, at: datetime = NOW, **extra: object
) -> Event:
    details = {"error_type": "Boom", "message": message, "retryable": True, **extra}
    return node_event(EventType.NODE_ATTEMPT_FAILED, node_id, attempt, at=at, details=details)


def step(
    *,
    nodes: Mapping[str, Mapping[str, object]] | None = None,
    events: tuple[Event, ...] = (),
    at: datetime = NOW,
    dead_lettered: tuple[str, ...] = (),
    redriven: str | None = None,
    calls: list[int] | None = None,
) -> Callable[[Execution, Mapping[str, NodeRun]], Decision[None]]:
    """A ``decide`` that replaces fields of the given nodes and appends ``events``."""

    def decide(execution: Execution, loaded: Mapping[str, NodeRun]) -> Decision[None]:
        if calls is not None:
            calls.append(execution.version)
        changed = tuple(
            dataclasses.replace(loaded[node_id], updated_at=at, **fields)  # type: ignore[arg-type]
            for node_id, fields in (nodes or {}).items()
        )
        return Decision(
            Transition(
                execution=dataclasses.replace(execution, updated_at=at),
                nodes=changed,
                events=events,
                dead_lettered=dead_lettered,
                redriven_dead_letter=redriven,
            ),
            None,
        )

    return decide


async def dead_letter(
    store: SqlStore,
    execution_id: str,
    node_id: str = "a",
    *,
    at: datetime = NOW,
    tenant: str = T,
    task_type: str = "work",
    workflow_name: str = "wf",
) -> DeadLetter:
    """Start an execution whose node fails once and is dead-lettered at ``at``."""
    execution = dataclasses.replace(
        make_execution(execution_id, tenant=tenant), workflow_name=workflow_name
    )
    node = dataclasses.replace(
        make_node(execution_id, node_id, tenant=tenant, task_type=task_type), input=b'{"n":1}'
    )
    await start(store, execution, (node,))
    event = dataclasses.replace(
        failed(node_id, 1, "no", at=at), execution_id=execution_id, tenant_id=tenant
    )
    decide = step(
        nodes={node_id: {"status": NodeStatus.FAILED, "attempt": 1}},
        events=(event,),
        at=at,
        dead_lettered=(node_id,),
    )
    await store.executions.transact(tenant, execution_id, decide)
    [letter] = [
        d
        for d in await store.dead_letters.list_dead_letters(
            tenant,
            workflow_name=None,
            task_type=None,
            include_redriven=True,
            limit=1000,
            before=None,
        )
        if d.execution_id == execution_id
    ]
    return letter


# -- schema -------------------------------------------------------------------------------


def _alembic(connection: sa.Connection, verb: str, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    getattr(command, verb)(config, revision)


async def _at_revision(db_url: str, verb: str, revision: str, *sql: str) -> None:
    engine = create_async_engine(normalize_database_url(db_url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_alembic, verb, revision)
            for statement in sql:
                # Payload columns are binary: bound as bytes on both databases.
                await conn.execute(sa.text(statement), {"payload": b"{}"})
    finally:
        await engine.dispose()


_ROWS_AT_0001 = (
    "INSERT INTO executions (id, tenant_id, workflow_name, workflow_version, status, input,"
    " priority, depth, version, created_at, updated_at)"
    " VALUES ('old', 'default', 'wf', 1, 'RUNNING', :payload, 0, 0, 3, 1000, 2000)",
    *(
        "INSERT INTO node_runs (execution_id, node_id, tenant_id, workflow_name,"
        " workflow_version, task_type, status, attempt, priority, available_at,"
        f" start_to_close_ms, lease_seq, worker_id, updated_at)"
        f" VALUES ('old', '{node}', 'default', 'wf', 1, 'work', '{status}', {attempt}, 0,"
        f" {available}, 30000, {attempt}, {worker}, 2000)"
        for node, status, attempt, available, worker in (
            ("ready", "READY", 0, 1000, "NULL"),
            ("leased", "LEASED", 1, "NULL", "'w-old'"),
        )
    ),
    "INSERT INTO workers (tenant_id, id, task_types, capacity, labels, sdk_language,"
    " sdk_version, identity, last_seen) VALUES ('default', 'w-old', '[\"work\"]', 1, '{}',"
    " 'python', '1', 'h', 1000)",
)


async def test_migration_0002_upgrades_a_database_at_0001(db_url: str) -> None:
    await _at_revision(db_url, "upgrade", "0001", *_ROWS_AT_0001)
    store = await open_store(db_url)
    try:
        async with store.engine.connect() as conn:
            assert await conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == HEAD
        execution = await store.executions.get_execution(T, "old")
        assert (execution.version, execution.deadline) == (3, None)
        ready, leased = await store.executions.list_node_runs(T, "old")
        for run in (ready, leased):
            assert (run.held, run.node_paused, run.retry_base, run.role) == (
                False,
                False,
                0,
                NodeRole.TASK,
            )
            assert (run.schedule_deadline, run.schedule_to_start_timeout) == (None, None)
        # The old READY row is in the rebuilt claim index; the old lease is swept.
        lost = await store.leases.find_leases_of_lost_workers(NOW, 10)
        assert [r.node_id for r in lost] == ["leased"]
        [claimed] = await store.leases.claim_tasks(T, "w-new", ["work"], 10, NOW)
        assert claimed.node_id == "ready"
        assert (
            await store.dead_letters.list_dead_letters(
                T, workflow_name=None, task_type=None, include_redriven=True, limit=10, before=None
            )
            == []
        )
    finally:
        await store.close()


def _schema_diff(conn: sa.Connection) -> list[object]:
    context = MigrationContext.configure(
        conn,
        opts={
            "compare_type": True,
        },
    )
    return list(compare_metadata(context, metadata))


def _index_sql(conn: sa.Connection, name: str) -> str:
    if conn.dialect.name == "sqlite":
        query = sa.text("SELECT sql FROM sqlite_master WHERE name = :name")
    else:
        query = sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = :name")
    return str(conn.execute(query, {"name": name}).scalar_one())


def _claim_index_sql(conn: sa.Connection) -> str:
    """The claim index before revision 0006."""
    return _index_sql(conn, "ix_node_runs_claim")


def _dispatch_index_sql(conn: sa.Connection) -> str:
    """The claim index from revision 0006 on."""
    return _index_sql(conn, "ix_node_runs_dispatch")


async def test_migration_0002_downgrades_and_upgrades_keeping_rows(db_url: str) -> None:
    store = await open_store(db_url)
    try:
        await dead_letter(store, "e1")
        await start(store, make_execution("e2"), (make_node("e2", "a"),))
    finally:
        await store.close()
    await _at_revision(db_url, "downgrade", "0001")
    engine = create_async_engine(normalize_database_url(db_url))
    try:
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in sa.inspect(c).get_columns("node_runs")}
            )
            claim_index = await conn.run_sync(_claim_index_sql)
            count = await conn.scalar(sa.text("SELECT count(*) FROM node_runs"))
    finally:
        await engine.dispose()
    assert "dead_letters" not in tables
    assert not {"held", "role", "retry_base", "schedule_deadline"} & columns
    assert "held" not in claim_index
    assert count == 2  # dropping columns kept every row (no table rebuild, no cascade)

    store = await open_store(db_url)
    try:
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
            assert "held = false" in await conn.run_sync(_dispatch_index_sql)
        assert [r.node_id for r in await store.leases.claim_tasks(T, "w", ["work"], 10, NOW)] == [
            "a"
        ]
    finally:
        await store.close()


def test_live_execution_statuses_are_the_non_terminal_ones() -> None:
    assert set(LIVE_EXECUTION_STATUSES) == {s.value for s in ExecutionStatus if not s.terminal}


# -- round trips --------------------------------------------------------------------------


async def test_new_fields_round_trip(store: SqlStore) -> None:
    execution = dataclasses.replace(make_execution(), deadline=NOW + timedelta(hours=1))
    runs = (
        dataclasses.replace(
            make_node("e1", "a"),
            schedule_deadline=NOW + 5 * S,
            schedule_to_start_timeout=timedelta(seconds=5, milliseconds=250),
            held=True,
            node_paused=True,
            retry_base=3,
            role=NodeRole.COMPENSATION,
        ),
        dataclasses.replace(
            make_node("e1", "h", status=NodeStatus.BLOCKED), role=NodeRole.ON_FAILURE
        ),
    )
    created, _ = await store.executions.create_execution(
        Transition(execution=execution, nodes=runs)
    )
    assert created == execution
    assert await store.executions.get_execution(T, "e1") == execution
    assert await store.executions.list_node_runs(T, "e1") == list(runs)

    # A transition rewrites every one of them.
    decide = step(
        nodes={
            "a": {
                "schedule_deadline": None,
                "schedule_to_start_timeout": None,
                "held": False,
                "node_paused": False,
                "retry_base": 0,
                "role": NodeRole.TASK,
            },
            "h": {"held": True, "retry_base": 1},
        },
        at=NOW + S,
    )
    await store.executions.transact(T, "e1", decide)
    a, h = await store.executions.list_node_runs(T, "e1")
    assert (a.schedule_deadline, a.schedule_to_start_timeout, a.held, a.node_paused) == (
        None,
        None,
        False,
        False,
    )
    assert (a.retry_base, a.role) == (0, NodeRole.TASK)
    assert (h.held, h.retry_base, h.role) == (True, 1, NodeRole.ON_FAILURE)

    def clear_deadline(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[None]:
        return Decision(Transition(execution=dataclasses.replace(execution, deadline=None)), None)

    await store.executions.transact(T, "e1", clear_deadline)
    assert (await store.executions.get_execution(T, "e1")).deadline is None


# -- claims and workers -------------------------------------------------------------------


async def test_claim_never_leases_more_than_the_limit(store: SqlStore) -> None:
    # Equal priority and availability: on PostgreSQL, a pick subquery rescanned by the
    # UPDATE's join leased every row (regression).
    await start(store, make_execution(), tuple(make_node("e1", f"n{i}") for i in range(6)))
    assert len(await store.leases.claim_tasks(T, "w", ["work"], 2, NOW)) == 2
    assert len(await store.leases.claim_tasks(T, "w", ["work"], 3, NOW)) == 3
    leased = [
        r for r in await store.executions.list_node_runs(T, "e1") if r.status is NodeStatus.LEASED
    ]
    assert len(leased) == 5


async def test_claims_skip_held_rows_and_clear_schedule_deadline(store: SqlStore) -> None:
    await start(
        store,
        make_execution(),
        (
            dataclasses.replace(make_node("e1", "held", priority=9), held=True),
            dataclasses.replace(make_node("e1", "free"), schedule_deadline=NOW + 5 * S),
            dataclasses.replace(
                make_node("e1", "held-later", available_at=NOW + S), held=True, node_paused=True
            ),
        ),
    )
    [claimed] = await store.leases.claim_tasks(T, "w1", ["work"], 10, NOW)
    assert claimed.node_id == "free"
    assert claimed.schedule_deadline is None
    assert claimed == next(
        r for r in await store.executions.list_node_runs(T, "e1") if r.node_id == "free"
    )
    assert await store.leases.claim_tasks(T, "w1", ["work"], 10, NOW + timedelta(hours=1)) == []
    # Held rows do not wake pollers either.
    assert await store.leases.next_available_at(T, ["work"], NOW) is None

    def release(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[None]:
        runs = tuple(
            dataclasses.replace(nodes[n], held=False, node_paused=False)
            for n in ("held", "held-later")
        )
        return Decision(Transition(execution=execution, nodes=runs), None)

    await store.executions.transact(T, "e1", release)
    assert await store.leases.next_available_at(T, ["work"], NOW) == NOW + S
    claimed_now = await store.leases.claim_tasks(T, "w1", ["work"], 10, NOW + S)
    assert [r.node_id for r in claimed_now] == ["held", "held-later"]


async def test_claim_marks_the_worker_alive(store: SqlStore) -> None:
    early = NOW - 2 * S
    await start(
        store,
        make_execution(),
        (make_node("e1", "a", available_at=early), make_node("e1", "b", available_at=early)),
    )
    await start(
        store, make_execution("x1", tenant="other"), (make_node("x1", "a", tenant="other"),)
    )
    long_ago = NOW - timedelta(hours=1)
    await store.workers.upsert_worker(worker("w1", long_ago))
    await store.workers.upsert_worker(worker("w1", long_ago, tenant="other"))

    # Nothing claimed: not a sign of life the store records.
    assert await store.leases.claim_tasks(T, "w1", ["nothing"], 10, NOW) == []
    assert (await store.workers.get_worker(T, "w1")).last_seen == long_ago

    assert len(await store.leases.claim_tasks(T, "w1", ["work"], 1, NOW)) == 1
    assert (await store.workers.get_worker(T, "w1")).last_seen == NOW
    assert (
        await store.workers.get_worker("other", "w1")
    ).last_seen == long_ago  # same id, other tenant
    # An older clock (another replica) never moves it back.
    assert len(await store.leases.claim_tasks(T, "w1", ["work"], 1, NOW - S)) == 1
    assert (await store.workers.get_worker(T, "w1")).last_seen == NOW
    # A worker that never registered can still claim.
    assert len(await store.leases.claim_tasks("other", "unregistered", ["work"], 1, NOW)) == 1


async def test_touch_worker(store: SqlStore) -> None:
    await store.workers.upsert_worker(worker("w1", NOW))
    await store.workers.upsert_worker(worker("w1", NOW, tenant="other"))
    await store.workers.touch_worker(T, "w1", NOW + S)
    assert (await store.workers.get_worker(T, "w1")).last_seen == NOW + S
    assert (await store.workers.get_worker("other", "w1")).last_seen == NOW
    await store.workers.touch_worker(T, "w1", NOW)  # never moves back
    assert (await store.workers.get_worker(T, "w1")).last_seen == NOW + S
    await store.workers.touch_worker(T, "unknown", NOW)  # ignored
    with pytest.raises(errors.NotFound):
        await store.workers.get_worker(T, "unknown")


# -- sweeps -------------------------------------------------------------------------------


async def test_find_unstarted_overdue(store: SqlStore) -> None:
    def run(node_id: str, deadline: datetime | None, **fields: object) -> NodeRun:
        node = make_node("e1", node_id, status=fields.pop("status", NodeStatus.READY))  # type: ignore[arg-type]
        return dataclasses.replace(node, schedule_deadline=deadline, **fields)  # type: ignore[arg-type]

    await start(
        store,
        make_execution(),
        (
            run("late", NOW - 2 * S),
            run("later", NOW - S),
            run("on-time", NOW),  # not yet: strictly before now
            run("no-deadline", None),
            run("held", NOW - 5 * S, held=True),
            run("blocked", NOW - 5 * S, status=NodeStatus.BLOCKED),
            run("leased", NOW - 5 * S, status=NodeStatus.LEASED),
        ),
    )
    await start(
        store,
        make_execution("x1", tenant="other"),
        (dataclasses.replace(make_node("x1", "x", tenant="other"), schedule_deadline=NOW - 3 * S),),
    )
    overdue = await store.leases.find_unstarted_overdue(NOW, 10)
    assert [(r.tenant_id, r.node_id) for r in overdue] == [
        ("other", "x"),
        (T, "late"),
        (T, "later"),
    ]
    assert overdue[1] == next(
        r for r in await store.executions.list_node_runs(T, "e1") if r.node_id == "late"
    )
    assert len(await store.leases.find_unstarted_overdue(NOW, 2)) == 2
    assert await store.leases.find_unstarted_overdue(NOW - 5 * S, 10) == []
    # Claimed in time: the deadline is gone with the READY status.
    await store.leases.claim_tasks(T, "w", ["work"], 10, NOW)
    assert [r.node_id for r in await store.leases.find_unstarted_overdue(NOW, 10)] == ["x"]


async def test_find_overdue_executions(store: SqlStore) -> None:
    cases = {
        "running": (ExecutionStatus.RUNNING, NOW - 2 * S),
        "pending": (ExecutionStatus.PENDING, NOW - S),
        "paused": (ExecutionStatus.PAUSED, NOW - 3 * S),
        "on-time": (ExecutionStatus.RUNNING, NOW),
        "future": (ExecutionStatus.RUNNING, NOW + S),
        "none": (ExecutionStatus.RUNNING, None),
        **{s.value: (s, NOW - 9 * S) for s in ExecutionStatus if s.terminal},
    }
    for execution_id, (status, deadline) in cases.items():
        execution = make_execution(execution_id, status=status)
        await start(store, dataclasses.replace(execution, deadline=deadline))
    other = make_execution("x", tenant="other")
    await start(store, dataclasses.replace(other, deadline=NOW - 2 * S))

    overdue = await store.executions.find_overdue_executions(NOW, 10)
    assert [(e.tenant_id, e.id) for e in overdue] == [
        (T, "paused"),
        (T, "running"),
        ("other", "x"),
        (T, "pending"),
    ]
    assert overdue[0] == await store.executions.get_execution(T, "paused")
    assert [e.id for e in await store.executions.find_overdue_executions(NOW, 1)] == ["paused"]
    assert await store.executions.find_overdue_executions(NOW - 3 * S, 10) == []


async def test_find_leases_of_lost_workers(store: SqlStore) -> None:
    cutoff = NOW - timedelta(seconds=15)
    await start(store, make_execution(), tuple(make_node("e1", n) for n in ("a", "b", "c", "d")))
    await start(
        store,
        make_execution("x1", tenant="other"),
        tuple(make_node("x1", n, tenant="other") for n in ("a", "b")),
    )
    await store.workers.upsert_worker(worker("silent", cutoff - S))
    await store.workers.upsert_worker(worker("alive", cutoff))
    await store.workers.upsert_worker(worker("silent", NOW, tenant="other"))  # same id, alive there
    await store.workers.upsert_worker(worker("gone", cutoff - S, tenant="other"))
    await store.leases.claim_tasks(T, "silent", ["work"], 2, NOW)  # a, b
    await store.leases.claim_tasks(T, "alive", ["work"], 1, NOW)  # c
    await store.leases.claim_tasks(T, "unregistered", ["work"], 1, NOW)  # d
    await store.leases.claim_tasks("other", "silent", ["work"], 1, NOW)  # x1/a
    await store.leases.claim_tasks("other", "gone", ["work"], 1, NOW)  # x1/b
    # Claims set last_seen = NOW: put it back where the test needs it.
    await store.workers.upsert_worker(worker("silent", cutoff - S))
    await store.workers.upsert_worker(worker("alive", cutoff))
    await store.workers.upsert_worker(worker("silent", NOW, tenant="other"))
    await store.workers.upsert_worker(worker("gone", cutoff - S, tenant="other"))

    lost = await store.leases.find_leases_of_lost_workers(cutoff, 10)
    assert sorted((r.tenant_id, r.execution_id, r.node_id, r.worker_id) for r in lost) == [
        (T, "e1", "a", "silent"),
        (T, "e1", "b", "silent"),
        ("other", "x1", "b", "gone"),
    ]
    assert all(r.status is NodeStatus.LEASED for r in lost)
    assert len(await store.leases.find_leases_of_lost_workers(cutoff, 2)) == 2
    assert await store.leases.find_leases_of_lost_workers(cutoff - S, 10) == []
    # A heartbeat brings the worker back; a lease that ended is no longer its concern.
    await store.workers.touch_worker(T, "silent", NOW)

    def finish_b(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[None]:
        done = dataclasses.replace(nodes["b"], status=NodeStatus.SUCCEEDED, worker_id="gone")
        return Decision(Transition(execution=execution, nodes=(done,)), None)

    await store.executions.transact("other", "x1", finish_b)
    assert await store.leases.find_leases_of_lost_workers(cutoff, 10) == []


# -- dead letters -------------------------------------------------------------------------


async def test_transact_writes_dead_letters_with_attempts_since_last_redrive(
    store: SqlStore,
) -> None:
    node = dataclasses.replace(make_node("e1", "a"), input=b'{"order":7}')
    await start(store, make_execution(), (node, make_node("e1", "b")))
    history = (
        node_event(EventType.NODE_LEASED, "a", 1),
        failed("a", 1, "first", at=NOW + S, details='{"trace":[1]}'),
        node_event(EventType.NODE_RETRY_SCHEDULED, "a", 1, details={"error_type": "Boom"}),
        failed("b", 1, "another node"),
    )
    await store.executions.transact(T, "e1", step(events=history, at=NOW + S))

    # The exhausting failure is part of the dead-lettering transition itself.
    calls: list[int] = []
    exhaust = step(
        nodes={"a": {"status": NodeStatus.FAILED, "attempt": 2}},
        events=(failed("a", 2, "second", at=NOW + 2 * S, details={"k": "v"}),),
        at=NOW + 2 * S,
        dead_lettered=("a",),
        calls=calls,
    )
    await store.executions.transact(T, "e1", exhaust)
    assert calls == [1]
    [letter] = await store.dead_letters.list_dead_letters(
        T, workflow_name=None, task_type=None, include_redriven=False, limit=10, before=None
    )
    assert (letter.execution_id, letter.node_id, letter.task_type) == ("e1", "a", "work")
    assert (letter.workflow_name, letter.workflow_version, letter.tenant_id) == ("wf", 1, T)
    assert (letter.input, letter.created_at, letter.redriven_at) == (
        b'{"order":7}',
        NOW + 2 * S,
        None,
    )
    assert [(a.attempt, a.error.message, a.time, a.worker_id) for a in letter.attempts] == [
        (1, "first", NOW + S, "w1"),
        (2, "second", NOW + 2 * S, "w1"),
    ]
    first, second = letter.attempts
    assert first.error == ErrorInfo(
        type="Boom",
        message="first",
        details=b'{"trace":[1]}',
        node_id="a",
        attempt=1,
        worker_id="w1",
    )
    assert second.error.details == b'{"k":"v"}'
    assert await store.dead_letters.get_dead_letter(T, letter.id) == letter

    # Redrive: the letter is stamped, the node starts a fresh budget past retry_base.
    redrive = step(
        nodes={"a": {"status": NodeStatus.READY, "retry_base": 2, "available_at": NOW + 3 * S}},
        events=(node_event(EventType.NODE_REDRIVEN, "a", 2, worker_id=None),),
        at=NOW + 3 * S,
        redriven=letter.id,
    )
    await store.executions.transact(T, "e1", redrive)
    stamped = await store.dead_letters.get_dead_letter(T, letter.id)
    assert stamped == dataclasses.replace(letter, redriven_at=NOW + 3 * S)
    assert (
        await store.dead_letters.list_dead_letters(
            T, workflow_name=None, task_type=None, include_redriven=False, limit=10, before=None
        )
        == []
    )

    # Attempt 3 fails, then the node times out unstarted (its event carries attempt 3
    # again): only these two make the second letter.
    again = step(
        nodes={"a": {"status": NodeStatus.TIMED_OUT, "attempt": 3}},
        events=(
            failed("a", 3, "third", at=NOW + 4 * S),
            node_event(
                EventType.NODE_TIMED_OUT,
                "a",
                3,
                at=NOW + 5 * S,
                worker_id=None,
                details={"error_type": "ScheduleToStartTimeout", "message": "not started"},
            ),
        ),
        at=NOW + 5 * S,
        dead_lettered=("a",),
    )
    await store.executions.transact(T, "e1", again)
    newest, older = await store.dead_letters.list_dead_letters(
        T, workflow_name=None, task_type=None, include_redriven=True, limit=10, before=None
    )
    assert older == stamped
    assert newest.id != letter.id
    assert [(a.attempt, a.error.type, a.error.message, a.worker_id) for a in newest.attempts] == [
        (3, "Boom", "third", "w1"),
        (3, "ScheduleToStartTimeout", "not started", None),
    ]


async def test_dead_letter_attempts_use_retry_base_without_a_redrive_event(
    store: SqlStore,
) -> None:
    await start(store, make_execution(), (dataclasses.replace(make_node("e1", "a"), retry_base=1),))
    events = (
        failed("a", 1, "before the redrive"),
        failed("a", 2, "after it"),
        node_event(EventType.NODE_TIMED_OUT, "a", 2, details={"message": "slow"}),
    )
    await store.executions.transact(T, "e1", step(events=events, dead_lettered=("a",)))
    [letter] = await store.dead_letters.list_dead_letters(
        T, workflow_name=None, task_type=None, include_redriven=False, limit=10, before=None
    )
    assert [(a.attempt, a.error.type, a.error.message) for a in letter.attempts] == [
        (2, "Boom", "after it"),
        (2, EventType.NODE_TIMED_OUT.value, "slow"),  # no error_type: typed by the event
    ]
    assert letter.input is None


async def test_list_dead_letters_filters_and_pages(store: SqlStore) -> None:
    specs = [
        # id, created at, workflow, task type
        ("e0", NOW, "wf", "work"),
        ("e1", NOW + S, "wf", "mail"),
        ("e2", NOW + S, "other", "work"),
        ("e3", NOW + 2 * S, "wf", "work"),
        ("e4", NOW + 2 * S, "other", "mail"),
        ("e5", NOW + 3 * S, "wf", "work"),
    ]
    letters = {
        e: await dead_letter(store, e, at=at, workflow_name=wf, task_type=tt)
        for e, at, wf, tt in specs
    }
    await dead_letter(store, "x0", tenant="other")
    # e3's letter is redriven.
    redrive = step(
        nodes={"a": {"status": NodeStatus.READY, "retry_base": 1}},
        at=NOW + 9 * S,
        redriven=letters["e3"].id,
    )
    await store.executions.transact(T, "e3", redrive)

    def newest_first(ids: list[str]) -> list[str]:
        return sorted(ids, key=lambda e: (letters[e].created_at, letters[e].id), reverse=True)

    async def pages(size: int, **filters: object) -> list[str]:
        seen: list[str] = []
        cursor: tuple[datetime, str] | None = None
        while True:
            page = await store.dead_letters.list_dead_letters(
                T,
                workflow_name=filters.get("workflow_name"),  # type: ignore[arg-type]
                task_type=filters.get("task_type"),  # type: ignore[arg-type]
                include_redriven=bool(filters.get("include_redriven", False)),
                limit=size,
                before=cursor,
            )
            seen += [d.execution_id for d in page]
            if len(page) < size:
                return seen
            cursor = (page[-1].created_at, page[-1].id)

    everything = ["e0", "e1", "e2", "e3", "e4", "e5"]
    assert await pages(2, include_redriven=True) == newest_first(everything)
    assert await pages(2) == newest_first([e for e in everything if e != "e3"])
    assert await pages(10, workflow_name="other") == newest_first(["e2", "e4"])
    assert await pages(10, task_type="work", include_redriven=True) == newest_first(
        ["e0", "e2", "e3", "e5"]
    )
    assert await pages(10, task_type="work", workflow_name="wf") == newest_first(["e0", "e5"])
    assert await pages(10, workflow_name="nope") == []


async def test_get_dead_letter_is_tenant_scoped(store: SqlStore) -> None:
    letter = await dead_letter(store, "e1")
    assert await store.dead_letters.get_dead_letter(T, letter.id) == letter
    with pytest.raises(errors.NotFound, match=f"dead letter '{letter.id}' not found"):
        await store.dead_letters.get_dead_letter("other", letter.id)
    with pytest.raises(errors.NotFound, match="dead letter 'nope' not found"):
        await store.dead_letters.get_dead_letter(T, "nope")
    assert (
        await store.dead_letters.list_dead_letters(
            "other",
            workflow_name=None,
            task_type=None,
            include_redriven=True,
            limit=10,
            before=None,
        )
        == []
    )


async def test_redriving_a_dead_letter_twice_rolls_the_transition_back(store: SqlStore) -> None:
    letter = await dead_letter(store, "e1")
    first = step(
        nodes={"a": {"status": NodeStatus.READY, "retry_base": 1}}, at=NOW + S, redriven=letter.id
    )
    await store.executions.transact(T, "e1", first)
    before = await store.executions.get_execution(T, "e1")
    nodes_before = await store.executions.list_node_runs(T, "e1")
    events_before = await store.executions.list_events(T, "e1", 0, 100)

    calls: list[int] = []
    second = step(
        nodes={"a": {"status": NodeStatus.CANCELLED, "retry_base": 5}},
        events=(node_event(EventType.NODE_REDRIVEN, "a", 1),),
        at=NOW + 2 * S,
        dead_lettered=("a",),
        redriven=letter.id,
        calls=calls,
    )
    with pytest.raises(
        errors.FailedPrecondition, match=f"dead letter '{letter.id}' was already redriven"
    ):
        await store.executions.transact(T, "e1", second)
    assert calls == [before.version]  # refused, not retried as a conflict
    assert await store.executions.get_execution(T, "e1") == before
    assert await store.executions.list_node_runs(T, "e1") == nodes_before
    assert await store.executions.list_events(T, "e1", 0, 100) == events_before
    assert await store.dead_letters.list_dead_letters(
        T, workflow_name=None, task_type=None, include_redriven=True, limit=10, before=None
    ) == [dataclasses.replace(letter, redriven_at=NOW + S)]

    # Another tenant cannot redrive it, and an unknown letter is not found (both roll back).
    await start(
        store, make_execution("x1", tenant="other"), (make_node("x1", "a", tenant="other"),)
    )
    with pytest.raises(errors.NotFound, match=f"dead letter '{letter.id}' not found"):
        await store.executions.transact("other", "x1", step(redriven=letter.id))
    with pytest.raises(errors.NotFound, match="dead letter 'nope' not found"):
        await store.executions.transact(T, "e1", step(redriven="nope"))
    assert (await store.executions.get_execution(T, "e1")).version == before.version
    assert (await store.executions.get_execution("other", "x1")).version == 0
