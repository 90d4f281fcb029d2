"""Executions with their node runs and events: ``SqlExecutions``.

Every transition goes through ``transact`` (or ``transact_many``, a group commit, or
``claim_transact``, a sweeper's): load the execution and its node runs, let the caller
decide, write the decision fenced by the execution's ``version`` and each replaced node
run's ``(status, lease_seq)`` (``TransitionWrites``), and on a conflict load and decide
again. The queue and trigger repositories write executions through the methods that take
a connection (``create_in``, ``insert_execution``, ``apply``, ...), on their own
transactions.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator import errors
from coordinator.model import (
    Event,
    Execution,
    ExecutionFilter,
    NewExecution,
    NodeRun,
    Transition,
)
from coordinator.service.ports import Decision
from coordinator.store import _control, _dead_letters, _rows
from coordinator.store._db import Database, LostRace
from coordinator.store._tables import events, executions, node_runs
from coordinator.store._writes import TransitionWrites, insert_executions

T = TypeVar("T")

logger = logging.getLogger(__name__)

# Bounded retries: optimistic transitions, and creations racing for an idempotency key.
TRANSACT_MAX_TRIES = 50
CREATE_MAX_TRIES = 10


class _GroupAborted(Exception):
    """A group commit that must be rolled back and run one by one (the reason)."""


# The loads of the hot paths, built once with bound parameters: SQLAlchemy neither rebuilds
# them nor regenerates their cache keys per call (both memoized on the statement).

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


class SqlExecutions:
    """The ``ExecutionRepository`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db

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
                async with self._db.tx(write=True) as conn:
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
        """``create_in`` for many, set-based: the idempotency keys are looked up one by one
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
                existing = await self.by_idempotency_key(conn, execution.tenant_id, key)
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
        await insert_executions(conn, new, self._db.priority_aging_ms)
        return results

    async def create_in(
        self, conn: AsyncConnection, item: NewExecution, cutoff: datetime | None
    ) -> tuple[Execution, bool]:
        """``create_executions`` of one item on ``conn``'s transaction (no retry)."""
        execution = item.transition.execution
        tenant = execution.tenant_id
        key = execution.idempotency_key
        if key is not None:
            existing = await self.by_idempotency_key(conn, tenant, key)
            if existing is not None:
                if cutoff is None or existing.created_at >= cutoff:
                    return existing, False
                await conn.execute(_control.release_key(tenant, existing.id, key))
        values = _rows.execution_values(execution)
        await insert_executions(conn, [(item.transition, values)], self._db.priority_aging_ms)
        for child in item.children:
            await self.insert_execution(conn, child)
        return _rows.execution_from_row(values), True

    async def insert_execution(self, conn: AsyncConnection, transition: Transition) -> None:
        """Insert the execution ``transition`` starts, its node runs and events."""
        values = _rows.execution_values(transition.execution)
        await insert_executions(conn, [(transition, values)], self._db.priority_aging_ms)

    async def get_executions(self, tenant_id: str, ids: Sequence[str]) -> dict[str, Execution]:
        if not ids:
            return {}  # no transaction for nothing
        async with self._db.tx(write=False) as conn:
            return await _control.get_executions(conn, tenant_id, ids)

    async def get_node_outputs(
        self, tenant_id: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], bytes | None]:
        if not keys:
            return {}  # roots: no parents, no transaction
        async with self._db.tx(write=False) as conn:
            return await _control.get_node_outputs(conn, tenant_id, keys)

    async def find_due_executions(self, now: datetime, limit: int) -> list[Execution]:
        async with self._db.tx(write=False) as conn:
            return await _control.find_due_executions(conn, now, limit)

    async def find_ended_children(self, limit: int) -> list[Execution]:
        async with self._db.tx(write=False) as conn:
            return await _control.find_ended_children(conn, limit)

    async def find_orphaned_children(self, limit: int) -> list[Execution]:
        async with self._db.tx(write=False) as conn:
            return await _control.find_orphaned_children(conn, limit)

    async def find_overdue_executions(self, now: datetime, limit: int) -> list[Execution]:
        async with self._db.tx(write=False) as conn:
            return await _control.find_overdue_executions(conn, now, limit)

    async def find_waiting_overdue(self, now: datetime, limit: int) -> list[NodeRun]:
        async with self._db.tx(write=False) as conn:
            return await _control.find_waiting_overdue(conn, now, limit)

    async def by_idempotency_key(
        self, conn: AsyncConnection, tenant_id: str, key: str
    ) -> Execution | None:
        """The execution holding idempotency ``key`` in the tenant (whatever its age)."""
        params = {"b_tenant_id": tenant_id, "b_key": key}
        row = (await conn.execute(_BY_IDEMPOTENCY_KEY, params)).mappings().first()
        return None if row is None else _rows.execution_from_row(row)

    async def get_execution(self, tenant_id: str, execution_id: str) -> Execution:
        async with self._db.tx(write=False) as conn:
            return await self.load_execution(conn, tenant_id, execution_id)

    async def load_execution(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        execution_id: str,
        *,
        lock: bool = False,
        skip_locked: bool = False,
    ) -> Execution:
        """The execution, its row locked when ``lock`` (FOR UPDATE, with SKIP LOCKED when
        ``skip_locked``: then a row another transaction holds is NotFound too)."""
        query = _LOAD_EXECUTION[(lock, lock and skip_locked)]
        params = {"b_tenant_id": tenant_id, "b_id": execution_id}
        row = (await conn.execute(query, params)).mappings().first()
        if row is None:
            raise errors.NotFound(f"execution {execution_id!r} not found")
        return _rows.execution_from_row(row)

    async def list_node_runs(self, tenant_id: str, execution_id: str) -> list[NodeRun]:
        async with self._db.tx(write=False) as conn:
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
        where: ExecutionFilter,
        *,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Execution]:
        e = executions
        query = (
            sa.select(e)
            .where(e.c.tenant_id == tenant_id, *execution_conditions(where))
            .order_by(e.c.created_at.desc(), e.c.id.desc())
            .limit(limit)
        )
        if before is not None:
            at, last_id = _rows.to_ms(before[0]), before[1]
            query = query.where(sa.tuple_(e.c.created_at, e.c.id) < sa.tuple_(at, last_id))
        async with self._db.tx(write=False) as conn:
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
        async with self._db.tx(write=False) as conn:
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
        writes = TransitionWrites(self._db)
        try:
            async with self._db.tx(write=True) as conn:
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
                    writes.add(execution, nodes, t, decision.wake)
                    state[(tenant_id, execution_id)] = (
                        dataclasses.replace(t.execution, version=execution.version + 1),
                        {**nodes, **{r.node_id: r for r in t.nodes}},
                    )
                if not await writes.flush(conn):
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
            rows = (await conn.execute(_GROUP_EXECUTIONS[self._db.postgres], params)).mappings()
            for row in rows.all():
                execution = _rows.execution_from_row(row)
                state[(tenant_id, execution.id)] = (execution, {})
            nodes = (await conn.execute(_GROUP_NODES[self._db.postgres], params)).mappings()
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
                async with self._db.tx(write=True) as conn:
                    # On PostgreSQL, transitions of one execution queue on its row instead of
                    # racing and retrying (a 100-way fan-in would otherwise retry ~N² times);
                    # the version check below stays as the guard. SQLite has a single writer.
                    # A claim skips a row another transaction holds instead of queueing.
                    try:
                        execution = await self.load_execution(
                            conn, tenant_id, execution_id, lock=self._db.postgres, skip_locked=claim
                        )
                    except errors.NotFound:
                        if claim and self._db.postgres:
                            return None
                        raise
                    loaded = {
                        r.node_id: r for r in await self._load_nodes(conn, tenant_id, execution_id)
                    }
                    decision = decide(execution, loaded)
                    transition = decision.transition
                    if transition is None:
                        return (decision.result,)
                    if await self.apply(conn, tenant_id, execution, loaded, transition):
                        try:
                            for child in decision.created:
                                await self.insert_execution(conn, child)
                        except sa_exc.IntegrityError as exc:
                            raise errors.Conflict(
                                f"execution {execution_id!r}: a child execution id is taken; retry"
                            ) from exc
                        await self._db.notify(conn, decision.wake)
                        return (decision.result,)
                    await conn.rollback()
            except LostRace:
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

    async def apply(
        self,
        conn: AsyncConnection,
        tenant_id: str,
        loaded: Execution,
        loaded_nodes: Mapping[str, NodeRun],
        transition: Transition,
    ) -> bool:
        """Write ``transition`` unless another writer changed what it was decided on: the
        same statements as a group commit's (``TransitionWrites``), plus dead letters."""
        writes = TransitionWrites(self._db)
        writes.add(loaded, loaded_nodes, transition, ())
        if not await writes.flush(conn):
            return False
        await _dead_letters.write_dead_letters(conn, tenant_id, loaded_nodes, transition)
        if transition.redriven_dead_letter is not None:
            # Raises FailedPrecondition (not a conflict: no retry) when already redriven,
            # which rolls the whole transition back.
            await _dead_letters.stamp_redriven(
                conn, tenant_id, transition.redriven_dead_letter, transition.execution.updated_at
            )
        return True


def execution_conditions(where: ExecutionFilter) -> list[sa.ColumnElement[bool]]:
    """``where`` as SQL conditions on the executions table (the tenant not included)."""
    e = executions
    out: list[sa.ColumnElement[bool]] = []
    if where.workflow_name is not None:
        out.append(e.c.workflow_name == where.workflow_name)
    if where.workflow_version is not None:
        out.append(e.c.workflow_version == where.workflow_version)
    if where.statuses:
        out.append(e.c.status.in_(sorted(s.value for s in where.statuses)))
    for column, after, before in (
        (e.c.created_at, where.created_after, where.created_before),
        (e.c.ended_at, where.ended_after, where.ended_before),
    ):
        if after is not None:
            out.append(column > _rows.to_ms(after))
        if before is not None:
            out.append(column < _rows.to_ms(before))
    if where.idempotency_key is not None:
        out.append(e.c.idempotency_key == where.idempotency_key)
    if where.parent_execution_id is not None:
        out.append(e.c.parent_execution_id == where.parent_execution_id)
    if where.id_prefix:
        # A range, not LIKE: the prefix may hold '%' or '_', and a range uses the key.
        out.append(e.c.id >= where.id_prefix)
        out.append(e.c.id < where.id_prefix + "\U0010ffff")
    return out
