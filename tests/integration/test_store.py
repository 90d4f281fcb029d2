"""The SQL store, run against SQLite and PostgreSQL (the ``db_url`` fixture)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import textwrap
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from coordinator import errors
from coordinator.model import (
    ANY_EXECUTION,
    ErrorInfo,
    Event,
    EventType,
    Execution,
    ExecutionFilter,
    ExecutionStatus,
    LeaseKey,
    NodeRun,
    NodeSpec,
    NodeStatus,
    RetryPolicy,
    Transition,
    WorkerInfo,
    WorkflowDef,
)
from coordinator.service.ports import Decision
from coordinator.store import (
    SqlStore,
    StoreLockedError,
    migrate,
    normalize_database_url,
    open_store,
)
from coordinator.store._tables import metadata
from tests.support.store_builders import HEAD, NOW, T, make_execution, make_node, start, started

ROOT = Path(__file__).resolve().parents[2]


# -- builders -----------------------------------------------------------------------------


def make_def(name: str = "wf", *, task_type: str = "work", description: str = "") -> WorkflowDef:
    return WorkflowDef(
        name=name,
        description=description,
        nodes=(
            NodeSpec(id="a", task_type=task_type, config=b'{"x":1}'),
            NodeSpec(
                id="b",
                task_type=task_type,
                retry_policy=RetryPolicy(max_attempts=3),
                heartbeat_timeout=timedelta(seconds=10),
                priority=2,
            ),
        ),
        edges=(("a", "b"),),
    )


async def ready_nodes(store: SqlStore, count: int, *, execution_id: str = "e1") -> None:
    nodes = tuple(make_node(execution_id, f"n{i:04d}") for i in range(count))
    await start(store, make_execution(execution_id), nodes)


# -- opening and migrations ---------------------------------------------------------------


async def test_migrations_are_idempotent(db_url: str) -> None:
    await migrate(db_url)
    for _ in range(2):
        store = await open_store(db_url)
        try:
            async with store.engine.connect() as conn:
                version = await conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
            assert version == HEAD
        finally:
            await store.close()


# The partial indexes the claim and the concurrency limits depend on.
_DISPATCH_INDEXES = {"ix_node_runs_dispatch", "ix_node_runs_leased_type"}


def _comparable(obj: object, name: str | None, type_: str, reflected: bool, other: object) -> bool:
    return True


@pytest.mark.sql_only("the migrated schema against the SQL tables")
async def test_migrated_schema_matches_tables(store: SqlStore) -> None:
    def diff(conn: sa.Connection) -> list[object]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "include_object": _comparable}
        )
        return list(compare_metadata(context, metadata))

    def indexes(conn: sa.Connection) -> set[str]:
        return {str(ix["name"]) for ix in sa.inspect(conn).get_indexes("node_runs")}

    async with store.engine.connect() as conn:
        assert await conn.run_sync(diff) == []
        assert await conn.run_sync(indexes) >= _DISPATCH_INDEXES


async def test_open_without_migrate_refuses_an_old_schema(db_url: str) -> None:
    with pytest.raises(errors.FailedPrecondition, match="run `trellis migrate`"):
        await open_store(db_url, migrate=False)
    await migrate(db_url)
    store = await open_store(db_url, migrate=False)
    try:
        assert await store.workflows.list_workflows(T, 10, None) == []
        # Tables gone behind its back: a clear precondition, not a driver error.
        async with store.engine.begin() as conn:
            await conn.execute(sa.text("DROP TABLE workers"))
        with pytest.raises(errors.FailedPrecondition, match="no Trellis schema"):
            await store.workers.get_worker(T, "w")
    finally:
        await store.close()


@pytest.mark.postgres
async def test_replicas_starting_together_migrate_once(fresh_postgres_url: str) -> None:
    stores = await asyncio.gather(*(open_store(fresh_postgres_url) for _ in range(4)))
    try:
        assert await stores[0].workflows.list_workflows(T, 10, None) == []
    finally:
        for store in stores:
            await store.close()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///trellis.db", "sqlite+aiosqlite:///trellis.db"),
        ("sqlite:////var/lib/trellis.db", "sqlite+aiosqlite:////var/lib/trellis.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
        ("sqlite:///:memory:", "sqlite+aiosqlite:///:memory:"),
        ("postgres://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("mysql+aiomysql://u@h/db", "mysql+aiomysql://u@h/db"),
    ],
)
def test_normalize_database_url(given: str, expected: str) -> None:
    assert normalize_database_url(given) == expected


@pytest.mark.parametrize("bad", ["", "not a url", "://nothing"])
def test_bad_database_url_is_invalid_argument(bad: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"sqlite:///.*postgresql://"):
        normalize_database_url(bad)


async def test_unsupported_database_is_invalid_argument() -> None:
    with pytest.raises(errors.InvalidArgument, match="SQLite or PostgreSQL"):
        await open_store("mysql://u@localhost/db")


async def test_in_memory_sqlite_works() -> None:
    store = await open_store("sqlite://")
    try:
        await ready_nodes(store, 3)
        claimed = await asyncio.gather(
            *(store.leases.claim_tasks(T, f"w{i}", ["work"], 2, NOW) for i in range(3))
        )
        assert sorted(r.node_id for batch in claimed for r in batch) == ["n0000", "n0001", "n0002"]
        assert (await store.executions.get_execution(T, "e1")).id == "e1"
    finally:
        await store.close()


_HOLD_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from coordinator.store import open_store

    async def main():
        store = await open_store(sys.argv[1])
        print("open", flush=True)
        sys.stdin.readline()
        await store.close()

    asyncio.run(main())
    """
)

_TRY_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from coordinator import errors
    from coordinator.store import open_store

    async def main():
        try:
            store = await open_store(sys.argv[1])
        except errors.FailedPrecondition as exc:
            print(exc, flush=True)
            sys.exit(3)
        await store.close()
        print("opened", flush=True)

    asyncio.run(main())
    """
)


async def _python(script: str, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )


@pytest.mark.slow
async def test_second_process_on_same_sqlite_file_is_refused(tmp_path: Path) -> None:
    db_file = tmp_path / "trellis.db"
    url = f"sqlite:///{db_file}"
    store = await open_store(url)
    try:
        proc = await _python(_TRY_SCRIPT, url)
        out, _ = await proc.communicate()
        assert proc.returncode == 3, out
        message = out.decode()
        assert f"another coordinator process is using {db_file}" in message
        assert "use PostgreSQL (TRELLIS_DATABASE_URL=postgresql://...)" in message
    finally:
        await store.close()
    # Released on close: another process may open it now.
    proc = await _python(_TRY_SCRIPT, url)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out


@pytest.mark.slow
async def test_sqlite_file_held_by_another_process_is_refused_here(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'trellis.db'}"  # the directory is created
    holder = await _python(_HOLD_SCRIPT, url)
    try:
        assert holder.stdout is not None
        assert (await holder.stdout.readline()).strip() == b"open"
        with pytest.raises(StoreLockedError, match="another coordinator process is using"):
            await open_store(url)
    finally:
        assert holder.stdin is not None
        holder.stdin.write(b"\n")
        await holder.communicate()
    store = await open_store(url)
    await store.close()


async def test_unreachable_postgres_is_unavailable() -> None:
    url = "postgresql://postgres@127.0.0.1:1/test"
    with pytest.raises(errors.Unavailable, match="database unavailable"):
        await open_store(url)
    with pytest.raises(errors.Unavailable, match="database unavailable"):
        await open_store(url, migrate=False)


# -- definitions --------------------------------------------------------------------------


async def test_register_workflow_versions(store: SqlStore) -> None:
    first, created = await store.workflows.register_workflow(make_def(), NOW)
    assert created
    assert first.version == 1
    assert first.created_at == NOW
    assert first.content_hash == make_def().content_hash

    again, created = await store.workflows.register_workflow(make_def(), NOW + timedelta(hours=1))
    assert not created
    assert again == first

    changed, created = await store.workflows.register_workflow(make_def(task_type="other"), NOW)
    assert created
    assert changed.version == 2

    # Back to the first content: that version is returned, no third one.
    back, created = await store.workflows.register_workflow(make_def(), NOW)
    assert (back.version, created) == (1, False)

    latest = await store.workflows.get_workflow(T, "wf", None)
    assert latest.version == 2
    assert latest.nodes[0].task_type == "other"
    loaded = await store.workflows.get_workflow(T, "wf", 1)
    assert loaded == first
    assert loaded.nodes == make_def().nodes
    assert loaded.edges == (("a", "b"),)
    assert [d.version for d in await store.workflows.list_workflow_versions(T, "wf")] == [1, 2]


async def test_get_workflow_not_found(store: SqlStore) -> None:
    with pytest.raises(errors.NotFound, match="workflow 'nope' not found"):
        await store.workflows.get_workflow(T, "nope", None)
    await store.workflows.register_workflow(make_def(), NOW)
    with pytest.raises(errors.NotFound, match="workflow 'wf' version 7 not found"):
        await store.workflows.get_workflow(T, "wf", 7)
    assert await store.workflows.list_workflow_versions(T, "nope") == []


async def test_concurrent_registrations_of_same_content_make_one_version(
    store: SqlStore,
) -> None:
    results = await asyncio.gather(
        *(store.workflows.register_workflow(make_def(), NOW) for _ in range(10))
    )
    assert {d.version for d, _ in results} == {1}
    assert sum(created for _, created in results) == 1
    # Different contents racing: distinct consecutive versions.
    results = await asyncio.gather(
        *(store.workflows.register_workflow(make_def(task_type=f"t{i}"), NOW) for i in range(8))
    )
    assert sorted(d.version for d, _ in results) == list(range(2, 10))


async def test_list_workflows(store: SqlStore) -> None:
    for name in ("c", "a", "b"):
        await store.workflows.register_workflow(make_def(name, description=f"{name}1"), NOW)
    await store.workflows.register_workflow(make_def("a", task_type="x", description="a2"), NOW)
    page = await store.workflows.list_workflows(T, 2, None)
    assert [(s.name, s.latest_version, s.description) for s in page] == [
        ("a", 2, "a2"),
        ("b", 1, "b1"),
    ]
    rest = await store.workflows.list_workflows(T, 2, "b")
    assert [s.name for s in rest] == ["c"]


# -- executions ---------------------------------------------------------------------------


async def test_create_and_get_execution_round_trips(store: SqlStore) -> None:
    execution = dataclasses.replace(
        make_execution(idempotency_key="k"),
        status=ExecutionStatus.FAILED,
        output=b'{"out":1}',
        error=ErrorInfo(
            type="Boom", message="it broke", details=b"[1]", node_id="a", attempt=2, worker_id="w"
        ),
        priority=5,
        parent_execution_id="parent",
        depth=1,
        ended_at=NOW + timedelta(seconds=1),
    )
    node = dataclasses.replace(
        make_node("e1", "a", heartbeat_timeout=timedelta(seconds=3)),
        input=b"{}",
        error=ErrorInfo(type="T", message="m"),
    )
    blocked = make_node("e1", "b", status=NodeStatus.BLOCKED)
    created, was_created = await store.executions.create_execution(
        Transition(execution=execution, nodes=(node, blocked), events=(started(execution),))
    )
    assert was_created
    assert created == execution
    assert await store.executions.get_execution(T, "e1") == execution
    assert await store.executions.list_node_runs(T, "e1") == [node, blocked]
    [event] = await store.executions.list_events(T, "e1", 0, 10)
    assert event.type is EventType.EXECUTION_STARTED
    assert event.sequence > 0
    assert event.time == NOW


async def test_times_are_stored_to_the_millisecond(store: SqlStore) -> None:
    at = NOW + timedelta(microseconds=999)
    created = await start(store, make_execution(created_at=at))
    assert created.created_at == NOW
    assert created.created_at.tzinfo is not None
    assert (await store.executions.get_execution(T, "e1")).created_at == NOW


async def test_get_unknown_execution_is_not_found(store: SqlStore) -> None:
    with pytest.raises(errors.NotFound, match="execution 'missing' not found"):
        await store.executions.get_execution(T, "missing")


async def test_idempotency_key_returns_existing_execution(store: SqlStore) -> None:
    first = await start(store, make_execution("e1", idempotency_key="key"), (make_node("e1", "a"),))
    again, created = await store.executions.create_execution(
        Transition(
            execution=make_execution("e2", idempotency_key="key"),
            nodes=(make_node("e2", "a"),),
            events=(started(make_execution("e2")),),
        )
    )
    assert not created
    assert again == first
    with pytest.raises(errors.NotFound):
        await store.executions.get_execution(T, "e2")
    assert await store.executions.list_node_runs(T, "e2") == []
    # The same key in another tenant is another execution.
    other = make_execution("e3", tenant="other", idempotency_key="key")
    assert (await store.executions.create_execution(Transition(execution=other)))[1]


async def test_concurrent_creations_with_one_idempotency_key(store: SqlStore) -> None:
    results = await asyncio.gather(
        *(
            store.executions.create_execution(
                Transition(execution=make_execution(f"e{i}", idempotency_key="same"))
            )
            for i in range(8)
        )
    )
    assert sum(created for _, created in results) == 1
    assert len({e.id for e, _ in results}) == 1


async def test_duplicate_execution_id_is_conflict(store: SqlStore) -> None:
    await start(store, make_execution("e1"))
    with pytest.raises(errors.Conflict, match="execution 'e1' already exists"):
        await store.executions.create_execution(Transition(execution=make_execution("e1")))


async def test_list_executions_pages_and_filters(store: SqlStore) -> None:
    for i in range(7):
        await start(
            store,
            make_execution(
                f"e{i}",
                created_at=NOW + timedelta(seconds=i // 2),  # pairs share a created_at
                workflow_name="wf" if i % 2 else "other",
                status=ExecutionStatus.SUCCEEDED if i % 3 == 0 else ExecutionStatus.RUNNING,
            ),
        )
    seen: list[str] = []
    cursor: tuple[datetime, str] | None = None
    while True:
        page = await store.executions.list_executions(T, ANY_EXECUTION, limit=3, before=cursor)
        seen += [e.id for e in page]
        if len(page) < 3:
            break
        cursor = (page[-1].created_at, page[-1].id)
    assert seen == ["e6", "e5", "e4", "e3", "e2", "e1", "e0"]

    by_name = await store.executions.list_executions(
        T, ExecutionFilter(workflow_name="wf"), limit=10, before=None
    )
    assert [e.id for e in by_name] == ["e5", "e3", "e1"]
    by_status = await store.executions.list_executions(
        T, ExecutionFilter(statuses=frozenset({ExecutionStatus.SUCCEEDED})), limit=10, before=None
    )
    assert [e.id for e in by_status] == ["e6", "e3", "e0"]
    both = await store.executions.list_executions(
        T,
        ExecutionFilter(workflow_name="wf", statuses=frozenset({ExecutionStatus.SUCCEEDED})),
        limit=10,
        before=None,
    )
    assert [e.id for e in both] == ["e3"]


async def test_list_executions_by_every_filter_field(store: SqlStore) -> None:
    """Each field of ExecutionFilter narrows the listing the same way on every store."""
    rows = [
        dataclasses.replace(
            make_execution(f"ab{i}", created_at=NOW + timedelta(seconds=i)),
            workflow_version=1 + i % 2,
            parent_execution_id="p1" if i < 2 else None,
            idempotency_key=f"key-{i}",
            status=ExecutionStatus.SUCCEEDED if i % 2 else ExecutionStatus.RUNNING,
            ended_at=NOW + timedelta(seconds=10 + i) if i % 2 else None,
        )
        for i in range(5)
    ]
    rows.append(make_execution("zz9", created_at=NOW + timedelta(seconds=9)))
    for row in rows:
        await start(store, row)

    async def ids(where: ExecutionFilter) -> list[str]:
        found = await store.executions.list_executions(T, where, limit=100, before=None)
        return [e.id for e in found]

    assert await ids(ExecutionFilter(workflow_name="wf", workflow_version=2)) == ["ab3", "ab1"]
    assert await ids(
        ExecutionFilter(statuses=frozenset({ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED}))
    ) == ["ab3", "ab1"]
    # Half-open windows: the bounds themselves are left out.
    assert await ids(
        ExecutionFilter(
            created_after=NOW + timedelta(seconds=1), created_before=NOW + timedelta(seconds=4)
        )
    ) == ["ab3", "ab2"]
    assert await ids(ExecutionFilter(ended_before=NOW + timedelta(seconds=12))) == ["ab1"]
    assert await ids(ExecutionFilter(ended_after=NOW + timedelta(seconds=11))) == ["ab3"]
    assert await ids(ExecutionFilter(idempotency_key="key-4")) == ["ab4"]
    assert await ids(ExecutionFilter(parent_execution_id="p1")) == ["ab1", "ab0"]
    assert await ids(ExecutionFilter(id_prefix="ab")) == ["ab4", "ab3", "ab2", "ab1", "ab0"]
    assert await ids(ExecutionFilter(id_prefix="z")) == ["zz9"]
    # A prefix is text, not a pattern.
    assert await ids(ExecutionFilter(id_prefix="a%")) == []
    assert await ids(ExecutionFilter(id_prefix="_b")) == []
    # Another tenant sees none of them.
    assert (
        await store.executions.list_executions("other", ANY_EXECUTION, limit=10, before=None) == []
    )


async def test_list_events_after_sequence(store: SqlStore) -> None:
    execution = make_execution()
    evs = tuple(
        Event(execution_id="e1", type=EventType.NODE_READY, time=NOW, node_id=f"n{i}")
        for i in range(5)
    )
    await store.executions.create_execution(Transition(execution=execution, events=evs))
    first = await store.executions.list_events(T, "e1", 0, 2)
    assert [e.node_id for e in first] == ["n0", "n1"]
    rest = await store.executions.list_events(T, "e1", first[-1].sequence, 10)
    assert [e.node_id for e in rest] == ["n2", "n3", "n4"]
    sequences = [e.sequence for e in first + rest]
    assert sequences == sorted(sequences)
    assert len(set(sequences)) == 5


# -- transitions --------------------------------------------------------------------------


def _succeed_a(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[str]:
    a = dataclasses.replace(nodes["a"], status=NodeStatus.SUCCEEDED, output=b'"done"')
    b = dataclasses.replace(nodes["b"], status=NodeStatus.READY, available_at=NOW)
    later = NOW + timedelta(seconds=1)
    return Decision(
        transition=Transition(
            execution=dataclasses.replace(execution, updated_at=later, priority=9),
            nodes=(a, b),
            events=(
                Event(
                    execution_id=execution.id,
                    type=EventType.NODE_SUCCEEDED,
                    time=later,
                    node_id="a",
                ),
                Event(
                    execution_id=execution.id, type=EventType.NODE_READY, time=later, node_id="b"
                ),
            ),
        ),
        result="applied",
    )


async def test_transact_persists_and_bumps_version(store: SqlStore) -> None:
    await start(
        store,
        make_execution(),
        (make_node("e1", "a"), make_node("e1", "b", status=NodeStatus.BLOCKED)),
    )
    assert await store.executions.transact(T, "e1", _succeed_a) == "applied"
    execution = await store.executions.get_execution(T, "e1")
    assert execution.version == 1
    assert execution.priority == 9
    assert execution.updated_at == NOW + timedelta(seconds=1)
    runs = {r.node_id: r for r in await store.executions.list_node_runs(T, "e1")}
    assert runs["a"].status is NodeStatus.SUCCEEDED
    assert runs["a"].output == b'"done"'
    assert runs["b"].status is NodeStatus.READY
    types = [e.type for e in await store.executions.list_events(T, "e1", 0, 10)]
    assert types == [EventType.EXECUTION_STARTED, EventType.NODE_SUCCEEDED, EventType.NODE_READY]


async def test_transact_without_transition_writes_nothing(store: SqlStore) -> None:
    await start(store, make_execution(), (make_node("e1", "a"),))
    seen: list[tuple[Execution, dict[str, NodeRun]]] = []

    def look(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[int]:
        seen.append((execution, dict(nodes)))
        return Decision(transition=None, result=42)

    assert await store.executions.transact(T, "e1", look) == 42
    assert seen[0][0].id == "e1"
    assert list(seen[0][1]) == ["a"]
    assert (await store.executions.get_execution(T, "e1")).version == 0


async def test_transact_rolls_back_when_decide_raises(store: SqlStore) -> None:
    await start(store, make_execution(), (make_node("e1", "a"),))

    def refuse(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[None]:
        raise errors.FailedPrecondition("stale lease")

    with pytest.raises(errors.FailedPrecondition, match="stale lease"):
        await store.executions.transact(T, "e1", refuse)
    assert (await store.executions.get_execution(T, "e1")).version == 0


async def test_transact_unknown_execution_is_not_found(store: SqlStore) -> None:
    with pytest.raises(errors.NotFound, match="execution 'nope' not found"):
        await store.executions.transact(
            T, "nope", lambda e, n: Decision(transition=None, result=None)
        )


async def test_concurrent_transacts_lose_no_update(store: SqlStore) -> None:
    await start(store, make_execution(), (make_node("e1", "a"),))

    def bump(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[int]:
        count = execution.priority + 1
        node = dataclasses.replace(nodes["a"], attempt=nodes["a"].attempt + 1)
        event = Event(execution_id=execution.id, type=EventType.NODE_READY, time=NOW, attempt=count)
        return Decision(
            transition=Transition(
                execution=dataclasses.replace(execution, priority=count),
                nodes=(node,),
                events=(event,),
            ),
            result=count,
        )

    results = await asyncio.gather(*(store.executions.transact(T, "e1", bump) for _ in range(20)))
    assert sorted(results) == list(range(1, 21))
    execution = await store.executions.get_execution(T, "e1")
    assert (execution.version, execution.priority) == (20, 20)
    [node] = await store.executions.list_node_runs(T, "e1")
    assert node.attempt == 20
    events = await store.executions.list_events(T, "e1", 0, 100)
    assert sorted(e.attempt for e in events[1:]) == list(range(1, 21))


@pytest.mark.postgres
async def test_transact_redecides_when_a_claim_took_the_node(
    fresh_postgres_url: str,
) -> None:
    """PostgreSQL: a claim between load and write must not be overwritten by a transition."""
    store = await open_store(fresh_postgres_url)
    try:
        await start(store, make_execution(), (make_node("e1", "a"),))
        calls: list[NodeStatus] = []

        def cancel(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[None]:
            calls.append(nodes["a"].status)
            if len(calls) == 1:
                # Another replica leases the row after we loaded it.
                with psycopg.connect(fresh_postgres_url, autocommit=True) as conn:
                    conn.execute(
                        "UPDATE node_runs SET status = 'LEASED', lease_seq = lease_seq + 1"
                    )
            node = dataclasses.replace(nodes["a"], status=NodeStatus.CANCELLED)
            return Decision(Transition(execution=execution, nodes=(node,)), None)

        await store.executions.transact(T, "e1", cancel)
        assert calls == [NodeStatus.READY, NodeStatus.LEASED]
        [node] = await store.executions.list_node_runs(T, "e1")
        assert (node.status, node.lease_seq) == (NodeStatus.CANCELLED, 1)
        assert (await store.executions.get_execution(T, "e1")).version == 1
    finally:
        await store.close()


async def test_transact_can_add_node_runs(store: SqlStore) -> None:
    await start(store, make_execution(), (make_node("e1", "a"),))

    def add(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[None]:
        return Decision(Transition(execution=execution, nodes=(make_node("e1", "dyn"),)), None)

    await store.executions.transact(T, "e1", add)
    assert [r.node_id for r in await store.executions.list_node_runs(T, "e1")] == ["a", "dyn"]


# -- leasing ------------------------------------------------------------------------------


async def test_claim_tasks(store: SqlStore) -> None:
    nodes = (
        make_node("e1", "low", priority=0, available_at=NOW - timedelta(seconds=5)),
        make_node("e1", "high", priority=5, heartbeat_timeout=timedelta(seconds=10)),
        make_node("e1", "older", priority=0, available_at=NOW - timedelta(seconds=9)),
        make_node("e1", "later", priority=9, available_at=NOW + timedelta(seconds=30)),
        make_node("e1", "other", priority=9, task_type="other"),
        make_node("e1", "blocked", status=NodeStatus.BLOCKED),
    )
    await start(store, make_execution(), nodes)

    claimed = await store.leases.claim_tasks(T, "w1", ["work"], 2, NOW)
    assert [r.node_id for r in claimed] == ["high", "older"]
    high = claimed[0]
    assert high.status is NodeStatus.LEASED
    assert (high.attempt, high.lease_seq, high.worker_id) == (1, 1, "w1")
    assert high.lease_deadline == NOW + timedelta(seconds=30)
    assert high.heartbeat_deadline == NOW + timedelta(seconds=10)
    assert claimed[1].heartbeat_deadline is None
    assert high == next(
        r for r in await store.executions.list_node_runs(T, "e1") if r.node_id == "high"
    )

    assert [r.node_id for r in await store.leases.claim_tasks(T, "w2", ["work"], 10, NOW)] == [
        "low"
    ]
    assert await store.leases.claim_tasks(T, "w2", ["work"], 10, NOW) == []
    assert await store.leases.next_available_at(T, ["work"], NOW) == NOW + timedelta(seconds=30)
    assert await store.leases.next_available_at(T, ["nothing"], NOW) is None
    later = await store.leases.claim_tasks(
        T, "w2", ["work", "other"], 10, NOW + timedelta(minutes=1)
    )
    assert [r.node_id for r in later] == ["other", "later"]  # same priority: older first

    leased = [
        e
        for e in await store.executions.list_events(T, "e1", 0, 100)
        if e.type is EventType.NODE_LEASED
    ]
    assert [(e.node_id, e.worker_id, e.attempt) for e in leased] == [
        ("high", "w1", 1),
        ("older", "w1", 1),
        ("low", "w2", 1),
        ("other", "w2", 1),
        ("later", "w2", 1),
    ]
    assert leased[0].time == NOW


async def test_claim_again_after_retry_increments_attempt_and_lease_seq(store: SqlStore) -> None:
    await start(store, make_execution(), (make_node("e1", "a"),))
    [first] = await store.leases.claim_tasks(T, "w1", ["work"], 1, NOW)

    def retry(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[None]:
        node = dataclasses.replace(
            nodes["a"],
            status=NodeStatus.READY,
            worker_id=None,
            lease_deadline=None,
            heartbeat_deadline=None,
            available_at=NOW + timedelta(seconds=1),
        )
        return Decision(Transition(execution=execution, nodes=(node,)), None)

    await store.executions.transact(T, "e1", retry)
    assert await store.leases.claim_tasks(T, "w2", ["work"], 1, NOW) == []
    [second] = await store.leases.claim_tasks(T, "w2", ["work"], 1, NOW + timedelta(seconds=1))
    assert (second.attempt, second.lease_seq) == (first.attempt + 1, first.lease_seq + 1)


async def test_concurrent_claims_never_hand_out_a_row_twice(store: SqlStore) -> None:
    await ready_nodes(store, 200)

    async def claimer(worker: str) -> list[str]:
        got: list[str] = []
        while batch := await store.leases.claim_tasks(T, worker, ["work"], 7, NOW):
            got += [r.node_id for r in batch]
        return got

    results = await asyncio.gather(*(claimer(f"w{i}") for i in range(8)))
    everything = [n for got in results for n in got]
    assert len(everything) == 200
    assert len(set(everything)) == 200
    leased = [
        e
        for e in await store.executions.list_events(T, "e1", 0, 1000)
        if e.type is EventType.NODE_LEASED
    ]
    assert len(leased) == 200


async def test_touch_leases(store: SqlStore) -> None:
    await start(
        store,
        make_execution(),
        (
            make_node("e1", "a", heartbeat_timeout=timedelta(seconds=10)),
            make_node("e1", "b", heartbeat_timeout=timedelta(seconds=10)),
        ),
    )
    a, b = await store.leases.claim_tasks(T, "w", ["work"], 2, NOW)
    later = NOW + timedelta(seconds=5)
    good = LeaseKey("e1", a.node_id, a.lease_seq)
    stale = LeaseKey("e1", b.node_id, b.lease_seq - 1)
    unknown = LeaseKey("e1", "zzz", 1)
    touched = await store.leases.touch_leases(T, [good, stale, unknown], later)
    assert set(touched) == {good, stale, unknown}
    extended, kept = touched[good], touched[stale]
    assert extended is not None
    assert extended.heartbeat_deadline == later + timedelta(seconds=10)
    assert kept is not None
    assert kept.heartbeat_deadline == NOW + timedelta(seconds=10)  # stale key: not extended
    assert kept.lease_seq == b.lease_seq
    assert touched[unknown] is None
    # Other tenants see nothing.
    assert await store.leases.touch_leases("other", [good], later) == {good: None}
    assert await store.leases.touch_leases(T, [], later) == {}


async def test_find_expired_leases(store: SqlStore) -> None:
    await start(
        store,
        make_execution(),
        (
            make_node("e1", "hb", heartbeat_timeout=timedelta(seconds=5)),
            make_node("e1", "plain"),
            make_node("e1", "ready", available_at=NOW + timedelta(hours=1)),
        ),
    )
    await start(
        store, make_execution("x1", tenant="other"), (make_node("x1", "n", tenant="other"),)
    )
    await store.leases.claim_tasks(T, "w", ["work"], 10, NOW)
    await store.leases.claim_tasks("other", "w", ["work"], 10, NOW)

    assert await store.leases.find_expired_leases(NOW + timedelta(seconds=4), 10) == []
    by_heartbeat = await store.leases.find_expired_leases(NOW + timedelta(seconds=6), 10)
    assert [r.node_id for r in by_heartbeat] == ["hb"]
    # Heartbeats keep it alive until the start-to-close deadline (30 s) passes.
    await store.leases.touch_leases(T, [LeaseKey("e1", "hb", 1)], NOW + timedelta(seconds=4))
    assert await store.leases.find_expired_leases(NOW + timedelta(seconds=6), 10) == []
    expired = await store.leases.find_expired_leases(NOW + timedelta(seconds=31), 10)
    assert sorted((r.tenant_id, r.node_id) for r in expired) == [
        ("default", "hb"),
        ("default", "plain"),
        ("other", "n"),
    ]
    assert len(await store.leases.find_expired_leases(NOW + timedelta(seconds=31), 2)) == 2


# -- workers and tenants ------------------------------------------------------------------


async def test_upsert_worker(store: SqlStore) -> None:
    worker = WorkerInfo(
        id="w1",
        task_types=("a", "b"),
        capacity=4,
        last_seen=NOW,
        labels={"zone": "eu"},
        sdk_language="python",
        sdk_version="0.1.0",
        identity="host:1",
    )
    await store.workers.upsert_worker(worker)
    assert await store.workers.get_worker(T, "w1") == worker
    updated = dataclasses.replace(worker, capacity=8, last_seen=NOW + timedelta(seconds=1))
    await store.workers.upsert_worker(updated)
    assert await store.workers.get_worker(T, "w1") == updated
    with pytest.raises(errors.NotFound):
        await store.workers.get_worker("other", "w1")


async def test_tenant_isolation(store: SqlStore) -> None:
    await store.workflows.register_workflow(make_def(), NOW)
    await start(store, make_execution(idempotency_key="k"), (make_node("e1", "a"),))
    o = "other"
    with pytest.raises(errors.NotFound):
        await store.workflows.get_workflow(o, "wf", None)
    assert await store.workflows.list_workflows(o, 10, None) == []
    assert await store.workflows.list_workflow_versions(o, "wf") == []
    with pytest.raises(errors.NotFound):
        await store.executions.get_execution(o, "e1")
    with pytest.raises(errors.NotFound):
        await store.executions.transact(
            o, "e1", lambda e, n: Decision(transition=None, result=None)
        )
    assert await store.executions.list_node_runs(o, "e1") == []
    assert await store.executions.list_events(o, "e1", 0, 10) == []
    assert await store.executions.list_executions(o, ANY_EXECUTION, limit=10, before=None) == []
    assert await store.leases.claim_tasks(o, "w", ["work"], 10, NOW) == []
    assert await store.leases.next_available_at(o, ["work"], NOW - timedelta(hours=1)) is None
    # The owner still sees everything.
    assert len(await store.leases.claim_tasks(T, "w", ["work"], 10, NOW)) == 1
