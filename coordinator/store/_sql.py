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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import StaticPool

from coordinator import errors
from coordinator.dispatch._admit import UNLIMITED
from coordinator.model import (
    DeadLetter,
    Event,
    EventType,
    Execution,
    ExecutionStatus,
    NodeRun,
    Transition,
    WorkerInfo,
    WorkflowDef,
    WorkflowSummary,
)
from coordinator.service.ports import (
    Admitted,
    Candidate,
    ClaimPolicy,
    Decision,
    LeasedCounts,
    LeaseKey,
    NewExecution,
)
from coordinator.store import _control, _dead_letters, _rows
from coordinator.store._limits import LimitsStoreMixin
from coordinator.store._lock import ProcessLock
from coordinator.store._notifications import NotificationStoreMixin, enqueue_deliveries
from coordinator.store._queue import OverflowStoreMixin
from coordinator.store._tables import (
    LIVE_EXECUTION_STATUSES,
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

# Statuses and flags compared in claim and sweep queries are SQL literals, not bound
# parameters, so the planners can match the partial indexes (WHERE status = 'READY' AND
# held = false / status = 'LEASED' / status IN (<live>)).
_READY: sa.ColumnClause[str] = sa.literal_column("'READY'", sa.Text)
_LEASED: sa.ColumnClause[str] = sa.literal_column("'LEASED'", sa.Text)
_NOT_HELD = node_runs.c.held == sa.literal_column("false", sa.Boolean)
_LIVE_EXECUTION = executions.c.status.in_(
    [sa.literal_column(f"'{s}'", sa.Text) for s in LIVE_EXECUTION_STATUSES]
)

_UNAVAILABLE_ERRORS = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    OSError,
)


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


def _sorted_runs(runs: list[NodeRun]) -> list[NodeRun]:
    return sorted(runs, key=lambda r: (-r.priority, r.available_at or r.updated_at, r.node_id))


class SqlStore(OverflowStoreMixin, LimitsStoreMixin, NotificationStoreMixin, TriggerStoreMixin):
    """The ``Store`` port on a SQLAlchemy async engine. Build it with ``open_store``."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        process_lock: ProcessLock | None = None,
        priority_aging_ms: int = _rows.DEFAULT_PRIORITY_AGING_MS,
    ) -> None:
        self._engine = engine
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
        finally:
            if self._process_lock is not None:
                self._process_lock.release()

    # -- wake-ups across replicas ---------------------------------------------------------

    async def publish_wakeups(self, keys: Sequence[str]) -> None:
        if not self._postgres or not keys:
            return  # SQLite serves one process: the in-process notifier is enough
        async with self._tx(write=True) as conn:
            await conn.execute(
                sa.text("SELECT pg_notify(:channel, :payload)"),
                {"channel": CHANNEL, "payload": payload_for(keys)},
            )

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
        t = workflow_definitions
        query = sa.select(t).where(t.c.tenant_id == tenant_id, t.c.name == name)
        if version is None:
            query = query.order_by(t.c.version.desc()).limit(1)
        else:
            query = query.where(t.c.version == version)
        async with self._tx(write=False) as conn:
            row = (await conn.execute(query)).mappings().first()
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
                    return [await self._create(conn, i, idempotency_cutoff) for i in items]
            except sa_exc.IntegrityError as exc:
                # Lost a race for an idempotency key (retry: the winner is found), or the
                # id is taken.
                if keyed and attempt < CREATE_MAX_TRIES:
                    continue
                ids = ", ".join(repr(i.transition.execution.id) for i in items[:3])
                raise errors.Conflict(f"execution {ids} already exists") from exc
        raise AssertionError("unreachable")

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
        await self._insert_execution(conn, item.transition)
        for child in item.children:
            await self._insert_execution(conn, child)
        return _rows.execution_from_row(values), True

    async def _insert_execution(self, conn: AsyncConnection, transition: Transition) -> None:
        execution = transition.execution
        await conn.execute(sa.insert(executions).values(_rows.execution_values(execution)))
        await self._insert_nodes(conn, execution.tenant_id, execution.id, transition.nodes)
        await self._insert_events(conn, execution.tenant_id, transition.events)
        # Notifications for an execution created already ended (a no-op otherwise).
        await enqueue_deliveries(conn, None, transition)

    async def get_executions(self, tenant_id: str, ids: Sequence[str]) -> dict[str, Execution]:
        async with self._tx(write=False) as conn:
            return await _control.get_executions(conn, tenant_id, ids)

    async def get_node_outputs(
        self, tenant_id: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], bytes | None]:
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
        query = sa.select(executions).where(
            executions.c.tenant_id == tenant_id, executions.c.idempotency_key == key
        )
        row = (await conn.execute(query)).mappings().first()
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
        query = sa.select(executions).where(
            executions.c.tenant_id == tenant_id, executions.c.id == execution_id
        )
        if lock:
            query = query.with_for_update(skip_locked=skip_locked)
        row = (await conn.execute(query)).mappings().first()
        if row is None:
            raise errors.NotFound(f"execution {execution_id!r} not found")
        return _rows.execution_from_row(row)

    async def list_node_runs(self, tenant_id: str, execution_id: str) -> list[NodeRun]:
        async with self._tx(write=False) as conn:
            return await self._load_nodes(conn, tenant_id, execution_id)

    async def _load_nodes(
        self, conn: AsyncConnection, tenant_id: str, execution_id: str
    ) -> list[NodeRun]:
        n = node_runs
        query = (
            sa.select(n)
            .where(n.c.tenant_id == tenant_id, n.c.execution_id == execution_id)
            .order_by(n.c.node_id)
        )
        rows = (await conn.execute(query)).mappings().all()
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
        """Write ``transition`` unless another writer changed what it was decided on."""
        e = executions
        result = await conn.execute(
            sa.update(e)
            .where(
                e.c.tenant_id == tenant_id,
                e.c.id == loaded.id,
                e.c.version == loaded.version,
            )
            .values(
                **_rows.execution_mutable_values(transition.execution),
                version=loaded.version + 1,
            )
        )
        if result.rowcount != 1:
            return False
        changed = sorted(
            (r for r in transition.nodes if r.node_id in loaded_nodes), key=lambda r: r.node_id
        )
        if changed:
            params = [
                {
                    **_rows.node_run_mutable_values(r, self.priority_aging_ms),
                    "b_tenant_id": tenant_id,
                    "b_execution_id": loaded.id,
                    "b_node_id": r.node_id,
                    "b_status": loaded_nodes[r.node_id].status.value,
                    "b_lease_seq": loaded_nodes[r.node_id].lease_seq,
                }
                for r in changed
            ]
            result = await conn.execute(_NODE_UPDATE, params)
            if result.rowcount != len(changed):
                # A claim or another transition moved one of these rows since we loaded it.
                return False
        added = [r for r in transition.nodes if r.node_id not in loaded_nodes]
        await self._insert_nodes(conn, tenant_id, loaded.id, added)
        await self._insert_events(conn, tenant_id, transition.events)
        # Notifications: an execution this transition ends gets its outbox rows here, in
        # the same transaction (one indexed rule lookup; nothing more without rules).
        await enqueue_deliveries(conn, loaded.status, transition)
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
            await conn.execute(sa.insert(node_runs), rows)

    async def _insert_events(
        self, conn: AsyncConnection, tenant_id: str, items: Sequence[Event]
    ) -> None:
        if items:
            rows = [_rows.event_values(ev, tenant_id=tenant_id) for ev in items]
            await conn.execute(sa.insert(events), rows)

    # -- leasing --------------------------------------------------------------------------

    def _task_type_filter(self, task_types: Sequence[str]) -> sa.ColumnElement[bool]:
        if self._postgres:
            # One statement text whatever the number of types (prepared-statement friendly).
            types = sa.bindparam("task_types", list(task_types), type_=postgresql.ARRAY(sa.Text))
            return node_runs.c.task_type == sa.any_(types)
        return node_runs.c.task_type.in_(list(task_types))

    async def claim_tasks(
        self,
        tenant_id: str,
        worker_id: str,
        task_types: Sequence[str],
        limit: int,
        now: datetime,
        policy: ClaimPolicy | None = None,
    ) -> list[NodeRun]:
        policy = policy or UNLIMITED
        types = sorted(set(task_types) - policy.excluded_types)
        if limit <= 0 or not types:
            return []
        counted = sorted(policy.counted_types & set(types))
        taken: list[Admitted] = []
        began = time.monotonic()
        try:
            async with self._tx(write=True) as conn:
                # Locks in one global order (types, then executions): no deadlock.
                await self._lock_limits(conn, [f"type:{tenant_id}:{t}" for t in counted])
                candidates = await self._candidates(
                    conn, tenant_id, types, policy.scan(limit), now, policy.needs_input
                )
                if not candidates:
                    return []
                capped = sorted({c.execution_id for c in candidates if c.execution_max_concurrency})
                await self._lock_limits(conn, [f"execution:{x}" for x in capped])
                counts = await self._leased_counts(conn, tenant_id, counted, capped)
                taken = await policy.take_tokens(policy.admit(candidates, counts, limit))
                if counted or capped:
                    # The lease starts now, not when the claim began: waiting for the limit
                    # locks may have taken a while, and a lease must not seem to begin
                    # before the end of the one whose slot it takes.
                    now += timedelta(seconds=time.monotonic() - began)
                runs = await self._lease(conn, tenant_id, worker_id, taken, now)
        except BaseException:
            if taken:
                await policy.refund(taken)
            raise
        return runs

    async def _candidates(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        types: Sequence[str],
        scan: int,
        now: datetime,
        needs_input: bool,
    ) -> list[Candidate]:
        """Up to ``scan`` claimable rows in dispatch order, locked (SKIP LOCKED on
        PostgreSQL: concurrent claimers pass over each other's rows; SQLite's writer lock
        serializes claims). Rows of executions already at their max_concurrency are left
        out here (the claim re-counts under a lock before leasing)."""
        n, e = node_runs, executions
        leased = sa.alias(node_runs, "l")
        running = (
            sa.select(sa.func.count())
            .where(leased.c.execution_id == n.c.execution_id, leased.c.status == _LEASED)
            .scalar_subquery()
        )
        columns = [n.c.execution_id, n.c.node_id, n.c.task_type, e.c.max_concurrency]
        if needs_input:
            columns.append(n.c.input)
        query = (
            sa.select(*columns)
            .join(e, e.c.id == n.c.execution_id)
            .where(
                n.c.status == _READY,
                _NOT_HELD,
                n.c.tenant_id == tenant_id,
                self._task_type_filter(types),
                n.c.available_at <= _rows.to_ms(now),
                sa.or_(e.c.max_concurrency == 0, e.c.max_concurrency > running),
            )
            .order_by(n.c.dispatch_rank)
            .limit(scan)
            .with_for_update(of=n, skip_locked=True)
        )
        rows = (await conn.execute(query)).all()
        return [
            Candidate(
                execution_id=r.execution_id,
                node_id=r.node_id,
                task_type=r.task_type,
                input=bytes(r.input) if needs_input and r.input is not None else None,
                execution_max_concurrency=r.max_concurrency,
            )
            for r in rows
        ]

    async def _lock_limits(self, conn: AsyncConnection, keys: Sequence[str]) -> None:
        """Serialize the claims that count leased rows of one task type or execution across
        replicas, so that two cannot both see room for the last slot (PostgreSQL
        transaction-scoped advisory locks, in sorted order; SQLite's writer lock already
        serializes claims)."""
        if not self._postgres:
            return
        for key in sorted(keys):
            lock_id = sa.func.hashtextextended(f"trellis:{key}", 0)
            await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_id)))

    async def _leased_counts(
        self, conn: AsyncConnection, tenant_id: str, types: Sequence[str], capped: Sequence[str]
    ) -> LeasedCounts:
        n = node_runs
        counts = LeasedCounts()
        if types:
            by_key = (
                sa.select(n.c.task_type, n.c.concurrency_key, sa.func.count())
                .where(n.c.status == _LEASED, n.c.tenant_id == tenant_id)
                .where(self._task_type_filter(types))
                .group_by(n.c.task_type, n.c.concurrency_key)
            )
            for task_type, key, count in (await conn.execute(by_key)).all():
                counts.by_type_key[(task_type, key)] = count
        if capped:
            by_execution = (
                sa.select(n.c.execution_id, sa.func.count())
                .where(n.c.status == _LEASED, n.c.execution_id.in_(capped))
                .group_by(n.c.execution_id)
            )
            for execution_id, count in (await conn.execute(by_execution)).all():
                counts.by_execution[execution_id] = count
        return counts

    async def _lease(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        worker_id: str,
        admitted: Sequence[Admitted],
        now: datetime,
    ) -> list[NodeRun]:
        """Lease the admitted rows (locked by ``_candidates``), with their NODE_LEASED events."""
        if not admitted:
            return []
        n = node_runs
        now_ms = _rows.to_ms(now)
        now_param = sa.literal(now_ms, sa.BigInteger)
        lease = (
            sa.update(n)
            .where(n.c.tenant_id == tenant_id)
            .values(
                status=_LEASED,
                attempt=n.c.attempt + 1,
                lease_seq=n.c.lease_seq + 1,
                worker_id=worker_id,
                lease_deadline=now_param + n.c.start_to_close_ms,
                # NULL when the node has no heartbeat timeout.
                heartbeat_deadline=now_param + n.c.heartbeat_timeout_ms,
                # Started in time: the schedule-to-start deadline no longer applies.
                schedule_deadline=None,
                updated_at=now_ms,
            )
            .returning(*n.c)
        )
        runs: list[NodeRun] = []
        # One statement per distinct concurrency key (usually one in all).
        by_key: dict[str | None, list[tuple[str, str]]] = {}
        for a in admitted:
            by_key.setdefault(a.concurrency_key, []).append(
                (a.candidate.execution_id, a.candidate.node_id)
            )
        for key, pks in by_key.items():
            statement = lease.where(sa.tuple_(n.c.execution_id, n.c.node_id).in_(pks)).values(
                concurrency_key=key
            )
            rows = (await conn.execute(statement)).mappings().all()
            runs.extend(_rows.node_run_from_row(r) for r in rows)
        runs = _sorted_runs(runs)
        await self._insert_events(
            conn,
            tenant_id,
            [
                Event(
                    execution_id=r.execution_id,
                    type=EventType.NODE_LEASED,
                    time=now,
                    tenant_id=tenant_id,
                    node_id=r.node_id,
                    attempt=r.attempt,
                    worker_id=worker_id,
                )
                for r in runs
            ],
        )
        # A worker that is handed tasks is alive (as if it had heartbeated).
        await conn.execute(_touch_worker(tenant_id, worker_id, now_ms))
        return runs

    async def next_available_at(
        self, tenant_id: str, task_types: Sequence[str], now: datetime
    ) -> datetime | None:
        if not task_types:
            return None
        n = node_runs
        query = sa.select(sa.func.min(n.c.available_at)).where(
            n.c.status == _READY,
            _NOT_HELD,
            n.c.tenant_id == tenant_id,
            self._task_type_filter(task_types),
            n.c.available_at > _rows.to_ms(now),
        )
        async with self._tx(write=False) as conn:
            value = await conn.scalar(query)
        return _rows.opt_from_ms(value)

    async def touch_leases(
        self, tenant_id: str, keys: Sequence[LeaseKey], now: datetime
    ) -> dict[LeaseKey, NodeRun | None]:
        if not keys:
            return {}
        n = node_runs
        # Lock order (execution_id, node_id), as transitions use, so two never deadlock.
        ordered = sorted(set(keys), key=lambda k: (k.execution_id, k.node_id, k.lease_seq))
        now_param = sa.literal(_rows.to_ms(now), sa.BigInteger)
        params = [
            {
                "b_tenant_id": tenant_id,
                "b_execution_id": k.execution_id,
                "b_node_id": k.node_id,
                "b_lease_seq": k.lease_seq,
            }
            for k in ordered
        ]
        touch = (
            sa.update(n)
            .where(
                n.c.tenant_id == sa.bindparam("b_tenant_id"),
                n.c.execution_id == sa.bindparam("b_execution_id"),
                n.c.node_id == sa.bindparam("b_node_id"),
                n.c.lease_seq == sa.bindparam("b_lease_seq"),
                n.c.status == _LEASED,
            )
            .values(heartbeat_deadline=now_param + n.c.heartbeat_timeout_ms)
        )
        pairs = sorted({(k.execution_id, k.node_id) for k in ordered})
        current = sa.select(n).where(
            n.c.tenant_id == tenant_id,
            sa.tuple_(n.c.execution_id, n.c.node_id).in_(pairs),
        )
        async with self._tx(write=True) as conn:
            await conn.execute(touch, params)
            rows = (await conn.execute(current)).mappings().all()
        found = {(r["execution_id"], r["node_id"]): _rows.node_run_from_row(r) for r in rows}
        return {k: found.get((k.execution_id, k.node_id)) for k in keys}

    async def find_expired_leases(self, now: datetime, limit: int) -> list[NodeRun]:
        n = node_runs
        now_ms = _rows.to_ms(now)
        query = (
            sa.select(n)
            .where(
                n.c.status == _LEASED,
                sa.or_(n.c.lease_deadline < now_ms, n.c.heartbeat_deadline < now_ms),
            )
            .order_by(n.c.lease_deadline, n.c.execution_id, n.c.node_id)
            .limit(limit)
        )
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.node_run_from_row(r) for r in rows]

    async def find_unstarted_overdue(self, now: datetime, limit: int) -> list[NodeRun]:
        n = node_runs
        query = (
            sa.select(n)
            .where(n.c.status == _READY, _NOT_HELD, n.c.schedule_deadline < _rows.to_ms(now))
            .order_by(n.c.schedule_deadline, n.c.execution_id, n.c.node_id)
            .limit(limit)
        )
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.node_run_from_row(r) for r in rows]

    async def find_overdue_executions(self, now: datetime, limit: int) -> list[Execution]:
        e = executions
        query = (
            sa.select(e)
            .where(_LIVE_EXECUTION, e.c.deadline < _rows.to_ms(now))
            .order_by(e.c.deadline, e.c.id)
            .limit(limit)
        )
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.execution_from_row(r) for r in rows]

    async def find_leases_of_lost_workers(self, cutoff: datetime, limit: int) -> list[NodeRun]:
        n, w = node_runs, workers
        query = (
            sa.select(n)
            .join(w, sa.and_(w.c.tenant_id == n.c.tenant_id, w.c.id == n.c.worker_id))
            .where(n.c.status == _LEASED, w.c.last_seen < _rows.to_ms(cutoff))
            .order_by(w.c.last_seen, n.c.execution_id, n.c.node_id)
            .limit(limit)
        )
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.node_run_from_row(r) for r in rows]

    async def list_worker_leases(self, tenant_id: str, worker_id: str) -> list[NodeRun]:
        n = node_runs
        query = sa.select(n).where(
            n.c.tenant_id == tenant_id, n.c.status == _LEASED, n.c.worker_id == worker_id
        )
        async with self._tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.node_run_from_row(r) for r in rows]

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
            await conn.execute(_touch_worker(tenant_id, worker_id, _rows.to_ms(now)))

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


def _touch_worker(tenant_id: str, worker_id: str, now_ms: int) -> sa.Update:
    """last_seen = now for a registered worker; never moves it back (replicas' clocks)."""
    w = workers
    return (
        sa.update(w)
        .where(w.c.tenant_id == tenant_id, w.c.id == worker_id, w.c.last_seen < now_ms)
        .values(last_seen=now_ms)
    )


# A transition's node-run write, executed once for many rows: replaces the row only if its
# (status, lease_seq) is still what the transition was decided on.
_NODE_UPDATE = sa.update(node_runs).where(
    node_runs.c.tenant_id == sa.bindparam("b_tenant_id"),
    node_runs.c.execution_id == sa.bindparam("b_execution_id"),
    node_runs.c.node_id == sa.bindparam("b_node_id"),
    node_runs.c.status == sa.bindparam("b_status"),
    node_runs.c.lease_seq == sa.bindparam("b_lease_seq"),
)
