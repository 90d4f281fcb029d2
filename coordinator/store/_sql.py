"""``SqlStore``: the ``Store`` port on SQLAlchemy Core, for SQLite and PostgreSQL.

Concurrency model:

- PostgreSQL: many replicas share the database. Execution rows are guarded by optimistic
  concurrency (``version``); a transition also re-checks the ``(status, lease_seq)`` of every
  node run it replaces, so a claim that slipped in between load and write makes the
  transition reload and decide again instead of overwriting the lease. Claims take rows with
  ``FOR UPDATE SKIP LOCKED`` in one statement.
- SQLite: one coordinator process per file (see ``ProcessLock``), and inside it one writer: an
  ``asyncio.Lock`` is held around every write transaction. WAL lets reads run beside it.
  An in-memory database has a single connection, so every transaction takes the lock.
  A SQLite file's transactions run on a synchronous engine on the event loop's thread
  (``on_loop``), wrapped as an ``AsyncConnection`` so the store's code is the same for both
  stores: SQLite answers in microseconds, and aiosqlite's thread hand-off per statement
  cost ten times the statement itself. Only a busy database (another process writing the
  file, which the process lock rules out) could block the loop, for at most busy_timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import StaticPool

from coordinator import errors
from coordinator.model import (
    DeadLetter,
    Delivery,
    Event,
    Execution,
    ExecutionStatus,
    NewExecution,
    NodeRun,
    Transition,
    WorkerInfo,
    WorkflowDef,
    WorkflowSummary,
)
from coordinator.service.ports import Decision
from coordinator.store import _control, _dead_letters, _rows
from coordinator.store._leasing import LeasingStoreMixin, touch_worker
from coordinator.store._limits import LimitsStoreMixin
from coordinator.store._lock import ProcessLock
from coordinator.store._notifications import (
    NotificationStoreMixin,
    insert_deliveries,
)
from coordinator.store._on_loop import OnLoopConnection
from coordinator.store._queue import OverflowStoreMixin
from coordinator.store._tables import (
    dead_letters,
    events,
    executions,
    node_runs,
    workers,
    workflow_definitions,
)
from coordinator.store._triggers import TriggerStoreMixin
from coordinator.store._wakeups import CHANNEL, PgListener, payload_for

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger(__name__)

# Bounded retries: optimistic transitions, registrations racing for a version number, and
# creations racing for an idempotency key.
TRANSACT_MAX_TRIES = 50
REGISTER_MAX_TRIES = 10
CREATE_MAX_TRIES = 10

_UNAVAILABLE_ERRORS = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    OSError,
)


_NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")


class _GroupAborted(Exception):
    """A group commit that must be rolled back and run one by one (the reason)."""


class _LostRace(errors.Conflict):
    """PostgreSQL aborted the transaction (deadlock, serialization failure): retryable."""


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _missing_table(exc: sa_exc.DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return sqlstate == "42P01" or "no such table" in str(exc.orig)


def _convert(exc: BaseException) -> errors.TrellisError:
    """A foreign database exception as the coordinator error it means."""
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith("40"):
        # Serialization failure or deadlock: the transaction lost a race, retrying is right.
        return _LostRace(f"concurrent update, retry: {_describe(exc)}")
    return errors.Unavailable(f"database unavailable: {_describe(exc)}; retry")


class SqlStore(
    LeasingStoreMixin,
    OverflowStoreMixin,
    LimitsStoreMixin,
    NotificationStoreMixin,
    TriggerStoreMixin,
):
    """The ``Store`` port on a SQLAlchemy async engine. Build it with ``open_store``."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        process_lock: ProcessLock | None = None,
        priority_aging_ms: int = _rows.DEFAULT_PRIORITY_AGING_MS,
        on_loop: sa.Engine | None = None,
    ) -> None:
        self._engine = engine
        # SQLite file: a synchronous engine run on the loop's thread (see the module doc).
        self._on_loop = on_loop
        # Dispatch order with ageing (see node_runs.dispatch_rank).
        self.priority_aging_ms = priority_aging_ms
        self._process_lock = process_lock
        self.dialect = engine.dialect.name
        self._postgres = self.dialect == "postgresql"
        memory = self.dialect == "sqlite" and isinstance(engine.pool, StaticPool)
        self._writer = asyncio.Lock() if self.dialect == "sqlite" else None
        self._reader = self._writer if memory else None
        self._closed = False
        self._listener: PgListener | None = None

    @property
    def wakeups(self) -> SqlStore:
        return self

    @property
    def workflows(self) -> SqlStore:
        return self

    @property
    def executions(self) -> SqlStore:
        return self

    @property
    def leases(self) -> SqlStore:
        return self

    @property
    def dead_letters(self) -> SqlStore:
        return self

    @property
    def workers(self) -> SqlStore:
        return self

    @property
    def limits(self) -> SqlStore:
        return self

    @property
    def queue(self) -> SqlStore:
        return self

    @property
    def triggers(self) -> SqlStore:
        return self

    @property
    def notifications(self) -> SqlStore:
        return self

    @property
    def group_commit(self) -> bool:
        """Whether workers' results should share transactions (``transact_many``). Yes on
        both: on PostgreSQL a transaction's round trips cost more than its statements; on
        SQLite one writer commits in turn, so results that wait for it go together (bench
        (a) 681 -> 1,268 tasks/s, (c) 361 -> 115 ms with workers' batched results)."""
        return True

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._listener is not None:
                await self._listener.close()
            await self._engine.dispose()
            if self._on_loop is not None:
                self._on_loop.dispose()
        finally:
            if self._process_lock is not None:
                self._process_lock.release()

    # -- wake-ups across replicas ---------------------------------------------------------

    async def publish_wakeups(self, keys: Sequence[str]) -> None:
        if not self._postgres or not keys:
            return  # SQLite serves one process: the in-process notifier is enough
        async with self._tx(write=True) as conn:
            await self._notify(conn, keys)

    async def _notify(self, conn: AsyncConnection, keys: Sequence[str]) -> None:
        """Wake-ups for the other replicas, sent when ``conn``'s transaction commits."""
        if self._postgres and keys:
            await conn.execute(_NOTIFY, {"channel": CHANNEL, "payload": payload_for(keys)})

    @property
    def listening(self) -> bool:
        """True while the cross-replica wake-up listener is connected (PostgreSQL)."""
        return self._listener is not None and self._listener.connected.is_set()

    async def listen_wakeups(self, on_keys: Callable[[list[str]], None]) -> None:
        if not self._postgres or self._listener is not None:
            return
        dsn = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._listener = PgListener(dsn)
        self._listener.start(on_keys)

    # -- transactions ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _tx(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        """A transaction, committed when the block ends; database failures converted."""
        lock = self._writer if write else self._reader
        guard: contextlib.AbstractAsyncContextManager[Any] = (
            lock if lock is not None else contextlib.nullcontext()
        )
        try:
            if self._on_loop is not None:
                async with guard:
                    with self._on_loop.begin() as sync_conn:
                        yield OnLoopConnection(self._engine, sync_conn)
            else:
                async with guard, self._engine.begin() as conn:
                    yield conn
        except sa_exc.DataError as exc:
            # e.g. a NUL character, which PostgreSQL text cannot hold: the caller's input.
            raise errors.InvalidArgument(
                f"the database refused a value ({_describe(exc)}); "
                "remove NUL characters and out-of-range numbers from the request"
            ) from exc
        except (sa_exc.OperationalError, sa_exc.ProgrammingError) as exc:
            if _missing_table(exc):
                raise errors.FailedPrecondition(
                    f"the database has no Trellis schema ({_describe(exc)}): run "
                    "`trellis migrate`, or start the coordinator with TRELLIS_AUTO_MIGRATE=true"
                ) from exc
            if isinstance(exc, sa_exc.ProgrammingError):
                raise
            raise _convert(exc) from exc
        except _UNAVAILABLE_ERRORS as exc:
            raise _convert(exc) from exc

    async def run_sync(self, fn: Callable[[sa.Connection], R], *, write: bool) -> R:
        """Run ``fn`` (e.g. an Alembic upgrade) on a synchronous view of one connection, in
        one transaction."""
        async with self._tx(write=write) as conn:
            return await conn.run_sync(fn)

    # -- definitions ----------------------------------------------------------------------

    async def register_workflow(self, defn: WorkflowDef, now: datetime) -> tuple[WorkflowDef, bool]:
        t = workflow_definitions
        tenant = defn.tenant_id
        for _ in range(REGISTER_MAX_TRIES):
            try:
                async with self._tx(write=True) as conn:
                    same = await conn.execute(
                        sa.select(t).where(
                            t.c.tenant_id == tenant,
                            t.c.name == defn.name,
                            t.c.content_hash == defn.content_hash,
                        )
                    )
                    row = same.mappings().first()
                    if row is not None:
                        return _rows.definition_from_row(row), False
                    latest = await conn.scalar(
                        sa.select(sa.func.max(t.c.version)).where(
                            t.c.tenant_id == tenant, t.c.name == defn.name
                        )
                    )
                    values = _rows.definition_values(
                        defn, version=(latest or 0) + 1, created_at=now
                    )
                    await conn.execute(sa.insert(t).values(values))
                    return _rows.definition_from_row(values), True
            except sa_exc.IntegrityError:
                # A concurrent registration took this version (or stored this content):
                # look again.
                continue
        raise errors.Conflict(f"workflow {defn.name!r}: too many concurrent registrations; retry")

    async def get_workflow(self, tenant_id: str, name: str, version: int | None) -> WorkflowDef:
        params: dict[str, Any] = {"b_tenant_id": tenant_id, "b_name": name}
        if version is None:
            query = _LATEST_WORKFLOW
        else:
            query = _WORKFLOW_VERSION
            params["b_version"] = version
        async with self._tx(write=False) as conn:
            row = (await conn.execute(query, params)).mappings().first()
        if row is None:
            which = f"workflow {name!r}" + ("" if version is None else f" version {version}")
            raise errors.NotFound(f"{which} not found")
        return _rows.definition_from_row(row)

    async def list_workflows(
        self, tenant_id: str, limit: int, after_name: str | None
    ) -> list[WorkflowSummary]:
        t = workflow_definitions
        d = t.alias("d")
        latest = (
            sa.select(sa.func.max(t.c.version))
            .where(t.c.tenant_id == d.c.tenant_id, t.c.name == d.c.name)
            .scalar_subquery()
        )
        query = (
            sa.select(d.c.name, d.c.version, d.c.description)
            .where(d.c.tenant_id == tenant_id, d.c.version == latest)
            .order_by(d.c.name)
            .limit(limit)
        )
        if after_name is not None:
            query = query.where(d.c.name > after_name)
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.summary_from_row(r) for r in rows]

    async def list_workflow_versions(self, tenant_id: str, name: str) -> list[WorkflowDef]:
        t = workflow_definitions
        query = (
            sa.select(t).where(t.c.tenant_id == tenant_id, t.c.name == name).order_by(t.c.version)
        )
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.definition_from_row(r) for r in rows]

    # -- executions -----------------------------------------------------------------------

    async def create_execution(
        self,
        transition: Transition,
        *,
        children: Sequence[Transition] = (),
        idempotency_cutoff: datetime | None = None,
    ) -> tuple[Execution, bool]:
        item = NewExecution(transition, tuple(children))
        [result] = await self.create_executions([item], idempotency_cutoff=idempotency_cutoff)
        return result

    async def create_executions(
        self, items: Sequence[NewExecution], *, idempotency_cutoff: datetime | None = None
    ) -> list[tuple[Execution, bool]]:
        # Idempotency keys stay unique per tenant (the unique index on executions), and the
        # window is applied here: a holder created before ``idempotency_cutoff`` has its key
        # released (set to NULL) in the same transaction that inserts the new execution. Two
        # racing creations with one key both insert; the unique index lets one commit and
        # fails the other, which retries and finds the winner. On PostgreSQL the release's
        # UPDATE re-checks the key after a concurrent release commits, so it never takes the
        # key off the new holder. (The released execution keeps no key.)
        keyed = any(i.transition.execution.idempotency_key for i in items)
        for attempt in range(1, CREATE_MAX_TRIES + 1):
            try:
                async with self._tx(write=True) as conn:
                    return await self._create_all(conn, items, idempotency_cutoff)
            except sa_exc.IntegrityError as exc:
                # Lost a race for an idempotency key (retry: the winner is found), or the
                # id is taken.
                if keyed and attempt < CREATE_MAX_TRIES:
                    continue
                ids = ", ".join(repr(i.transition.execution.id) for i in items[:3])
                raise errors.Conflict(f"execution {ids} already exists") from exc
        raise AssertionError("unreachable")

    async def _create_all(
        self, conn: AsyncConnection, items: Sequence[NewExecution], cutoff: datetime | None
    ) -> list[tuple[Execution, bool]]:
        """``_create`` for many, set-based: the idempotency keys are looked up one by one
        (a key repeated within ``items`` gets the first one's execution), then all the new
        executions, node runs and events go in with one statement per table."""
        results: list[tuple[Execution, bool]] = []
        new: list[tuple[Transition, dict[str, Any]]] = []
        in_batch: dict[tuple[str, str], Execution] = {}
        for item in items:
            execution = item.transition.execution
            key = execution.idempotency_key
            if key is not None:
                first = in_batch.get((execution.tenant_id, key))
                if first is not None:
                    results.append((first, False))
                    continue
                existing = await self._by_idempotency_key(conn, execution.tenant_id, key)
                if existing is not None:
                    if cutoff is None or existing.created_at >= cutoff:
                        results.append((existing, False))
                        continue
                    await conn.execute(_control.release_key(execution.tenant_id, existing.id, key))
            values = _rows.execution_values(execution)
            new.append((item.transition, values))
            new.extend((c, _rows.execution_values(c.execution)) for c in item.children)
            created = _rows.execution_from_row(values)
            if key is not None:
                in_batch[(execution.tenant_id, key)] = created
            results.append((created, True))
        await self._write_executions(conn, new)
        return results

    async def _create(
        self, conn: AsyncConnection, item: NewExecution, cutoff: datetime | None
    ) -> tuple[Execution, bool]:
        execution = item.transition.execution
        tenant = execution.tenant_id
        key = execution.idempotency_key
        if key is not None:
            existing = await self._by_idempotency_key(conn, tenant, key)
            if existing is not None:
                if cutoff is None or existing.created_at >= cutoff:
                    return existing, False
                await conn.execute(_control.release_key(tenant, existing.id, key))
        values = _rows.execution_values(execution)
        await self._write_execution(conn, item.transition, values)
        for child in item.children:
            await self._insert_execution(conn, child)
        return _rows.execution_from_row(values), True

    async def _insert_execution(self, conn: AsyncConnection, transition: Transition) -> None:
        await self._write_execution(conn, transition, _rows.execution_values(transition.execution))

    async def _write_execution(
        self, conn: AsyncConnection, transition: Transition, values: dict[str, Any]
    ) -> None:
        """Insert the execution (its row: ``values``), its node runs and events."""
        await self._write_executions(conn, [(transition, values)])

    async def _write_executions(
        self, conn: AsyncConnection, new: Sequence[tuple[Transition, dict[str, Any]]]
    ) -> None:
        """Insert executions (each a start transition and its row), their node runs and
        their events: one statement per table, parents before children."""
        if not new:
            return
        await conn.execute(_INSERT_EXECUTION, [values for _, values in new])
        nodes = [
            {
                **_rows.node_run_values(r, self.priority_aging_ms),
                "tenant_id": t.execution.tenant_id,
                "execution_id": t.execution.id,
            }
            for t, _ in new
            for r in t.nodes
        ]
        if nodes:
            await conn.execute(_INSERT_NODE_RUNS, nodes)
        events = [
            _rows.event_values(ev, tenant_id=t.execution.tenant_id)
            for t, _ in new
            for ev in t.events
        ]
        if events:
            await conn.execute(_INSERT_EVENTS, events)
        # Notifications for an execution created already ended (none otherwise).
        await insert_deliveries(conn, [d for t, _ in new for d in t.deliveries])

    async def get_executions(self, tenant_id: str, ids: Sequence[str]) -> dict[str, Execution]:
        if not ids:
            return {}  # no transaction for nothing
        async with self._tx(write=False) as conn:
            return await _control.get_executions(conn, tenant_id, ids)

    async def get_node_outputs(
        self, tenant_id: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], bytes | None]:
        if not keys:
            return {}  # roots: no parents, no transaction
        async with self._tx(write=False) as conn:
            return await _control.get_node_outputs(conn, tenant_id, keys)

    async def find_due_executions(self, now: datetime, limit: int) -> list[Execution]:
        async with self._tx(write=False) as conn:
            return await _control.find_due_executions(conn, now, limit)

    async def find_ended_children(self, limit: int) -> list[Execution]:
        async with self._tx(write=False) as conn:
            return await _control.find_ended_children(conn, limit)

    async def find_orphaned_children(self, limit: int) -> list[Execution]:
        async with self._tx(write=False) as conn:
            return await _control.find_orphaned_children(conn, limit)

    async def _by_idempotency_key(
        self, conn: AsyncConnection, tenant_id: str, key: str
    ) -> Execution | None:
        params = {"b_tenant_id": tenant_id, "b_key": key}
        row = (await conn.execute(_BY_IDEMPOTENCY_KEY, params)).mappings().first()
        return None if row is None else _rows.execution_from_row(row)

    async def get_execution(self, tenant_id: str, execution_id: str) -> Execution:
        async with self._tx(write=False) as conn:
            return await self._load_execution(conn, tenant_id, execution_id)

    async def _load_execution(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        execution_id: str,
        *,
        lock: bool = False,
        skip_locked: bool = False,
    ) -> Execution:
        query = _LOAD_EXECUTION[(lock, lock and skip_locked)]
        params = {"b_tenant_id": tenant_id, "b_id": execution_id}
        row = (await conn.execute(query, params)).mappings().first()
        if row is None:
            raise errors.NotFound(f"execution {execution_id!r} not found")
        return _rows.execution_from_row(row)

    async def list_node_runs(self, tenant_id: str, execution_id: str) -> list[NodeRun]:
        async with self._tx(write=False) as conn:
            return await self._load_nodes(conn, tenant_id, execution_id)

    async def _load_nodes(
        self, conn: AsyncConnection, tenant_id: str, execution_id: str
    ) -> list[NodeRun]:
        params = {"b_tenant_id": tenant_id, "b_execution_id": execution_id}
        rows = (await conn.execute(_LOAD_NODES, params)).mappings().all()
        return [_rows.node_run_from_row(r) for r in rows]

    async def list_executions(
        self,
        tenant_id: str,
        *,
        workflow_name: str | None,
        status: ExecutionStatus | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Execution]:
        e = executions
        query = (
            sa.select(e)
            .where(e.c.tenant_id == tenant_id)
            .order_by(e.c.created_at.desc(), e.c.id.desc())
            .limit(limit)
        )
        if workflow_name is not None:
            query = query.where(e.c.workflow_name == workflow_name)
        if status is not None:
            query = query.where(e.c.status == status.value)
        if before is not None:
            at, last_id = _rows.to_ms(before[0]), before[1]
            query = query.where(sa.tuple_(e.c.created_at, e.c.id) < sa.tuple_(at, last_id))
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.execution_from_row(r) for r in rows]

    async def list_events(
        self, tenant_id: str, execution_id: str, after_sequence: int, limit: int
    ) -> list[Event]:
        ev = events
        query = (
            sa.select(ev)
            .where(
                ev.c.tenant_id == tenant_id,
                ev.c.execution_id == execution_id,
                ev.c.sequence > after_sequence,
            )
            .order_by(ev.c.sequence)
            .limit(limit)
        )
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.event_from_row(r) for r in rows]

    async def transact(
        self,
        tenant_id: str,
        execution_id: str,
        decide: Callable[[Execution, Mapping[str, NodeRun]], Decision[T]],
    ) -> T:
        out = await self._transact(tenant_id, execution_id, decide, claim=False)
        assert out is not None  # only a claim skips
        return out[0]

    async def transact_many(
        self,
        items: Sequence[tuple[str, str, Callable[[Execution, Mapping[str, NodeRun]], Decision[T]]]],
    ) -> list[T | errors.TrellisError] | None:
        """Set-based: the group's executions are loaded (and on PostgreSQL locked, in id
        order) with one statement, their node runs with another; each item is decided in
        id order (a later item of the same execution sees the earlier one's result, as a
        reload would); then the writes go out with one statement per table: inserted node
        runs, execution updates and node-run updates (each still fenced by version and by
        (status, lease_seq): any miss rolls the group back), events, then notifications."""
        order = sorted(range(len(items)), key=lambda i: items[i][1])
        # Every index is set below (``order`` is a permutation).
        results: list[Any] = [None] * len(items)
        writes = _GroupWrites()
        try:
            async with self._tx(write=True) as conn:
                state = await self._load_group(conn, [(t, x) for t, x, _ in items])
                for i in order:
                    tenant_id, execution_id, decide = items[i]
                    loaded = state.get((tenant_id, execution_id))
                    if loaded is None:
                        results[i] = errors.NotFound(f"execution {execution_id!r} not found")
                        continue
                    execution, nodes = loaded
                    try:
                        decision = decide(execution, nodes)
                    except errors.TrellisError as exc:
                        results[i] = exc  # decided nothing, wrote nothing
                        continue
                    results[i] = decision.result
                    t = decision.transition
                    if t is None:
                        continue
                    if t.dead_lettered or t.redriven_dead_letter is not None or decision.created:
                        # Rare, and they read or write more than these tables: one by one.
                        raise _GroupAborted("dead letters or child executions")
                    writes.add(self, execution, nodes, t, decision.wake)
                    state[(tenant_id, execution_id)] = (
                        dataclasses.replace(t.execution, version=execution.version + 1),
                        {**nodes, **{r.node_id: r for r in t.nodes}},
                    )
                if not await writes.flush(self, conn):
                    raise _GroupAborted("a row changed since it was loaded")
        except (_GroupAborted, errors.TrellisError, sa_exc.IntegrityError) as exc:
            logger.debug("group commit of %d fell back to one by one: %r", len(items), exc)
            return None
        return results

    async def _load_group(
        self, conn: AsyncConnection, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[Execution, dict[str, NodeRun]]]:
        """The executions ``keys`` (tenant, id) name, with their node runs; locked in id
        order on PostgreSQL. Unknown ones are left out."""
        state: dict[tuple[str, str], tuple[Execution, dict[str, NodeRun]]] = {}
        for tenant_id in sorted({t for t, _ in keys}):
            ids = sorted({x for t, x in keys if t == tenant_id})
            params = {"b_tenant_id": tenant_id, "b_ids": ids}
            rows = (await conn.execute(_GROUP_EXECUTIONS[self._postgres], params)).mappings()
            for row in rows.all():
                execution = _rows.execution_from_row(row)
                state[(tenant_id, execution.id)] = (execution, {})
            nodes = (await conn.execute(_GROUP_NODES[self._postgres], params)).mappings()
            for row in nodes.all():
                run = _rows.node_run_from_row(row)
                loaded = state.get((tenant_id, run.execution_id))
                if loaded is not None:
                    loaded[1][run.node_id] = run
        return state

    async def claim_transact(
        self,
        tenant_id: str,
        execution_id: str,
        decide: Callable[[Execution, Mapping[str, NodeRun]], Decision[T]],
    ) -> T | None:
        try:
            out = await self._transact(tenant_id, execution_id, decide, claim=True)
        except errors.NotFound:
            return None
        return None if out is None else out[0]

    async def _transact(
        self,
        tenant_id: str,
        execution_id: str,
        decide: Callable[[Execution, Mapping[str, NodeRun]], Decision[T]],
        *,
        claim: bool,
    ) -> tuple[T] | None:
        """``(result,)``, or None when ``claim`` found the row locked."""
        for attempt in range(1, TRANSACT_MAX_TRIES + 1):
            try:
                async with self._tx(write=True) as conn:
                    # On PostgreSQL, transitions of one execution queue on its row instead of
                    # racing and retrying (a 100-way fan-in would otherwise retry ~N² times);
                    # the version check below stays as the guard. SQLite has a single writer.
                    # A claim skips a row another transaction holds instead of queueing.
                    try:
                        execution = await self._load_execution(
                            conn, tenant_id, execution_id, lock=self._postgres, skip_locked=claim
                        )
                    except errors.NotFound:
                        if claim and self._postgres:
                            return None
                        raise
                    loaded = {
                        r.node_id: r for r in await self._load_nodes(conn, tenant_id, execution_id)
                    }
                    decision = decide(execution, loaded)
                    transition = decision.transition
                    if transition is None:
                        return (decision.result,)
                    if await self._apply(conn, tenant_id, execution, loaded, transition):
                        try:
                            for child in decision.created:
                                await self._insert_execution(conn, child)
                        except sa_exc.IntegrityError as exc:
                            raise errors.Conflict(
                                f"execution {execution_id!r}: a child execution id is taken; retry"
                            ) from exc
                        await self._notify(conn, decision.wake)
                        return (decision.result,)
                    await conn.rollback()
            except _LostRace:
                # A deadlock or serialization failure reported by PostgreSQL: same as a
                # lost version race.
                if attempt == TRANSACT_MAX_TRIES:
                    raise
            logger.debug(
                "transition conflict, retrying",
                extra={"execution": execution_id, "attempt": attempt},
            )
        raise errors.Conflict(
            f"execution {execution_id!r}: gave up after {TRANSACT_MAX_TRIES} concurrent "
            "update conflicts; retry"
        )

    async def _apply(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        loaded: Execution,
        loaded_nodes: Mapping[str, NodeRun],
        transition: Transition,
    ) -> bool:
        """Write ``transition`` unless another writer changed what it was decided on: the
        same statements as a group commit's (``_GroupWrites``), plus dead letters."""
        writes = _GroupWrites()
        writes.add(self, loaded, loaded_nodes, transition, ())
        if not await writes.flush(self, conn):
            return False
        await _dead_letters.write_dead_letters(conn, tenant_id, loaded_nodes, transition)
        if transition.redriven_dead_letter is not None:
            # Raises FailedPrecondition (not a conflict: no retry) when already redriven,
            # which rolls the whole transition back.
            await _dead_letters.stamp_redriven(
                conn, tenant_id, transition.redriven_dead_letter, transition.execution.updated_at
            )
        return True

    async def _insert_nodes(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        execution_id: str,
        runs: Sequence[NodeRun],
    ) -> None:
        if runs:
            rows = [
                {
                    **_rows.node_run_values(r, self.priority_aging_ms),
                    "tenant_id": tenant_id,
                    "execution_id": execution_id,
                }
                for r in runs
            ]
            await conn.execute(_INSERT_NODE_RUNS, rows)

    async def _insert_events(
        self, conn: AsyncConnection, tenant_id: str, items: Sequence[Event]
    ) -> None:
        if items:
            rows = [_rows.event_values(ev, tenant_id=tenant_id) for ev in items]
            await conn.execute(_INSERT_EVENTS, rows)

    # -- dead letters ---------------------------------------------------------------------

    async def list_dead_letters(
        self,
        tenant_id: str,
        *,
        workflow_name: str | None,
        task_type: str | None,
        include_redriven: bool,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[DeadLetter]:
        d = dead_letters
        query = (
            sa.select(d)
            .where(d.c.tenant_id == tenant_id)
            .order_by(d.c.created_at.desc(), d.c.id.desc())
            .limit(limit)
        )
        if not include_redriven:
            query = query.where(d.c.redriven_at.is_(None))
        if workflow_name is not None:
            query = query.where(d.c.workflow_name == workflow_name)
        if task_type is not None:
            query = query.where(d.c.task_type == task_type)
        if before is not None:
            at, last_id = _rows.to_ms(before[0]), before[1]
            query = query.where(sa.tuple_(d.c.created_at, d.c.id) < sa.tuple_(at, last_id))
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.dead_letter_from_row(r) for r in rows]

    async def get_dead_letter(self, tenant_id: str, dead_letter_id: str) -> DeadLetter:
        d = dead_letters
        query = sa.select(d).where(d.c.tenant_id == tenant_id, d.c.id == dead_letter_id)
        async with self._tx(write=False) as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise errors.NotFound(f"dead letter {dead_letter_id!r} not found")
        return _rows.dead_letter_from_row(row)

    # -- workers --------------------------------------------------------------------------

    async def upsert_worker(self, worker: WorkerInfo) -> None:
        values = _rows.worker_values(worker)
        insert = (postgresql.insert if self._postgres else sqlite.insert)(workers)
        stmt = insert.values(values).on_conflict_do_update(
            index_elements=[workers.c.tenant_id, workers.c.id],
            set_={k: v for k, v in values.items() if k not in ("tenant_id", "id")},
        )
        async with self._tx(write=True) as conn:
            await conn.execute(stmt)

    async def touch_worker(self, tenant_id: str, worker_id: str, now: datetime) -> None:
        async with self._tx(write=True) as conn:
            await touch_worker(conn, tenant_id, worker_id, _rows.to_ms(now))

    async def get_worker(self, tenant_id: str, worker_id: str) -> WorkerInfo:
        """The registered worker. Raises ``NotFound``."""
        query = sa.select(workers).where(
            workers.c.tenant_id == tenant_id, workers.c.id == worker_id
        )
        async with self._tx(write=False) as conn:
            row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise errors.NotFound(f"worker {worker_id!r} not found")
        return _rows.worker_from_row(row)


# The statements of the hot paths, built once with bound parameters: SQLAlchemy neither
# rebuilds them nor regenerates their cache keys per call (both memoized on the statement).
# Executed with a dict of column values, an INSERT or UPDATE takes its columns (its SET
# clause) from the dict's keys; the b_* keys bind the WHERE clause.

_LATEST_WORKFLOW = (
    sa.select(workflow_definitions)
    .where(
        workflow_definitions.c.tenant_id == sa.bindparam("b_tenant_id"),
        workflow_definitions.c.name == sa.bindparam("b_name"),
    )
    .order_by(workflow_definitions.c.version.desc())
    .limit(1)
)
_WORKFLOW_VERSION = sa.select(workflow_definitions).where(
    workflow_definitions.c.tenant_id == sa.bindparam("b_tenant_id"),
    workflow_definitions.c.name == sa.bindparam("b_name"),
    workflow_definitions.c.version == sa.bindparam("b_version"),
)

_EXECUTION_BY_ID = sa.select(executions).where(
    executions.c.tenant_id == sa.bindparam("b_tenant_id"),
    executions.c.id == sa.bindparam("b_id"),
)
# (lock, skip_locked) -> the execution's row, FOR UPDATE [SKIP LOCKED] when locked.
_LOAD_EXECUTION = {
    (False, False): _EXECUTION_BY_ID,
    (True, False): _EXECUTION_BY_ID.with_for_update(),
    (True, True): _EXECUTION_BY_ID.with_for_update(skip_locked=True),
}
_BY_IDEMPOTENCY_KEY = sa.select(executions).where(
    executions.c.tenant_id == sa.bindparam("b_tenant_id"),
    executions.c.idempotency_key == sa.bindparam("b_key"),
)
_LOAD_NODES = (
    sa.select(node_runs)
    .where(
        node_runs.c.tenant_id == sa.bindparam("b_tenant_id"),
        node_runs.c.execution_id == sa.bindparam("b_execution_id"),
    )
    .order_by(node_runs.c.node_id)
)

# A transition's execution write: only if the version is still the one it was decided on.
_EXECUTION_UPDATE = sa.update(executions).where(
    executions.c.tenant_id == sa.bindparam("b_tenant_id"),
    executions.c.id == sa.bindparam("b_id"),
    executions.c.version == sa.bindparam("b_version"),
)
_INSERT_EXECUTION = sa.insert(executions)
_INSERT_NODE_RUNS = sa.insert(node_runs)
_INSERT_EVENTS = sa.insert(events)

# A transition's node-run write, executed once for many rows: replaces the row only if its
# (status, lease_seq) is still what the transition was decided on.
_NODE_UPDATE = sa.update(node_runs).where(
    node_runs.c.tenant_id == sa.bindparam("b_tenant_id"),
    node_runs.c.execution_id == sa.bindparam("b_execution_id"),
    node_runs.c.node_id == sa.bindparam("b_node_id"),
    node_runs.c.status == sa.bindparam("b_status"),
    node_runs.c.lease_seq == sa.bindparam("b_lease_seq"),
)


def _group_ids_in(column: sa.ColumnElement[str], postgres: bool) -> sa.ColumnElement[bool]:
    if postgres:
        return column == sa.any_(sa.bindparam("b_ids", type_=postgresql.ARRAY(sa.Text)))
    return column.in_(sa.bindparam("b_ids", expanding=True))


# A group commit's loads: its executions (locked in id order on PostgreSQL) and their nodes.
_GROUP_EXECUTIONS = {
    postgres: sa.select(executions)
    .where(
        executions.c.tenant_id == sa.bindparam("b_tenant_id"),
        _group_ids_in(executions.c.id, postgres),
    )
    .order_by(executions.c.id)
    .with_for_update()
    for postgres in (False, True)
}
_GROUP_NODES = {
    postgres: sa.select(node_runs)
    .where(
        node_runs.c.tenant_id == sa.bindparam("b_tenant_id"),
        _group_ids_in(node_runs.c.execution_id, postgres),
    )
    .order_by(node_runs.c.execution_id, node_runs.c.node_id)
    for postgres in (False, True)
}


@dataclasses.dataclass
class _GroupWrites:
    """A group commit's writes, gathered per table (see ``SqlStore.transact_many``)."""

    execution_updates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    node_updates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    node_inserts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    deliveries: list[Delivery] = dataclasses.field(default_factory=list)
    wake: list[str] = dataclasses.field(default_factory=list)

    def add(
        self,
        store: SqlStore,
        loaded: Execution,
        nodes: Mapping[str, NodeRun],
        t: Transition,
        wake: Sequence[str],
    ) -> None:
        tenant_id = loaded.tenant_id
        self.execution_updates.append(
            {
                **_rows.execution_mutable_values(t.execution),
                "version": loaded.version + 1,
                "b_tenant_id": tenant_id,
                "b_id": loaded.id,
                "b_version": loaded.version,
            }
        )
        for r in sorted(t.nodes, key=lambda r: r.node_id):
            before = nodes.get(r.node_id)
            if before is None:
                self.node_inserts.append(
                    {
                        **_rows.node_run_values(r, store.priority_aging_ms),
                        "tenant_id": tenant_id,
                        "execution_id": loaded.id,
                    }
                )
                continue
            self.node_updates.append(
                {
                    **_rows.node_run_mutable_values(r, store.priority_aging_ms),
                    "b_tenant_id": tenant_id,
                    "b_execution_id": loaded.id,
                    "b_node_id": r.node_id,
                    "b_status": before.status.value,
                    "b_lease_seq": before.lease_seq,
                }
            )
        self.events.extend(_rows.event_values(ev, tenant_id=tenant_id) for ev in t.events)
        self.deliveries.extend(t.deliveries)
        self.wake.extend(wake)

    async def flush(self, store: SqlStore, conn: AsyncConnection) -> bool:
        """Write it all, with the notifications to send at commit. False when a claim or
        another transition moved a row since it was loaded: then roll back (part of it
        may be written)."""
        if not await _fenced(conn, _EXECUTION_UPDATE, self.execution_updates):
            return False
        # Inserted rows before updated ones: a later item of a group may update a node an
        # earlier one added (an expansion, a map element).
        if self.node_inserts:
            await conn.execute(_INSERT_NODE_RUNS, self.node_inserts)
        if not await _fenced(conn, _NODE_UPDATE, self.node_updates):
            return False
        if self.events:
            await conn.execute(_INSERT_EVENTS, self.events)
        await insert_deliveries(conn, self.deliveries)
        await store._notify(conn, self.wake)
        return True


async def _fenced(conn: AsyncConnection, statement: Any, params: list[dict[str, Any]]) -> bool:
    """Run a fenced UPDATE for each of ``params``; False unless every one matched a row."""
    return not params or (await conn.execute(statement, params)).rowcount == len(params)
