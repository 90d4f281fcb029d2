"""max_running_executions in SQL: capped starts and the overflow queue.

``SqlQueue`` is the ``QueueRepository`` port; it writes executions through its
``SqlExecutions`` collaborator, on its own transactions. A capped start counts the
workflow's running executions (``ix_executions_running``) in the transaction that writes
it. On PostgreSQL that transaction first takes ``pg_advisory_xact_lock`` per (tenant,
workflow), in sorted order, so two replicas never both see room for the last slot; the
lock uses the two-key form with its own first key, apart from the one-key locks of the
claim. SQLite has one writer per process and one process per file, which serializes these
transactions anyway.

Statuses and flags are SQL literals so the planners match the partial indexes
``ix_executions_running`` and ``ix_executions_queued``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator import errors
from coordinator.model import (
    CappedStart,
    Execution,
    ExecutionStatus,
    NewExecution,
    OverflowPolicy,
    PendingStart,
    RunningCap,
    Transition,
)
from coordinator.store import _rows
from coordinator.store._db import Database
from coordinator.store._executions import CREATE_MAX_TRIES, SqlExecutions
from coordinator.store._tables import executions

_RUNNING = [sa.literal_column("'RUNNING'", sa.Text), sa.literal_column("'PAUSED'", sa.Text)]
_PENDING = sa.literal_column("'PENDING'", sa.Text)
_QUEUED = executions.c.queued == sa.literal_column("true", sa.Boolean)
_LIVE = (ExecutionStatus.RUNNING, ExecutionStatus.PAUSED)

# (tenant, workflow name)
Workflow = tuple[str, str]

_LOCK = sa.text("SELECT pg_advisory_xact_lock(hashtext('trellis/running'), hashtext(:key))")


def _running(tenant_id: str, workflow_name: str) -> sa.Select[Any]:
    e = executions
    return (
        sa.select(sa.func.count())
        .select_from(e)
        .where(
            e.c.tenant_id == tenant_id, e.c.workflow_name == workflow_name, e.c.status.in_(_RUNNING)
        )
    )


def _queued(tenant_id: str, workflow_name: str) -> sa.Select[Any]:
    e = executions
    return (
        sa.select(e.c.id)
        .where(
            e.c.tenant_id == tenant_id,
            e.c.workflow_name == workflow_name,
            e.c.status == _PENDING,
            _QUEUED,
        )
        .limit(1)
    )


class SqlQueue:
    """The ``QueueRepository`` port, with the executions repository that writes the starts."""

    def __init__(self, db: Database, executions: SqlExecutions) -> None:
        self._db = db
        self._executions = executions

    async def _lock_workflows(self, conn: AsyncConnection, workflows: Iterable[Workflow]) -> None:
        if not self._db.postgres:
            return  # one writer per process, one process per file
        for tenant_id, name in sorted(set(workflows)):
            await conn.execute(_LOCK, {"key": f"{tenant_id}/{name}"})

    # -- creating -------------------------------------------------------------------------

    async def create_capped_executions(
        self, starts: Sequence[CappedStart], *, idempotency_cutoff: datetime | None = None
    ) -> list[tuple[Execution, bool]]:
        keyed = any(s.item.transition.execution.idempotency_key for s in starts)
        capped = [_workflow(s.item.transition.execution) for s in starts if s.cap is not None]
        for attempt in range(1, CREATE_MAX_TRIES + 1):
            try:
                async with self._db.tx(write=True) as conn:
                    await self._lock_workflows(conn, capped)
                    room = _Room(conn)
                    out = []
                    for start in starts:
                        item = await self._admit(conn, start, room, idempotency_cutoff)
                        out.append(await self._executions.create_in(conn, item, idempotency_cutoff))
                    return out
            except sa_exc.IntegrityError as exc:
                # Lost a race for an idempotency key: the retry finds the winner.
                if keyed and attempt < CREATE_MAX_TRIES:
                    continue
                ids = ", ".join(repr(s.item.transition.execution.id) for s in starts[:3])
                raise errors.Conflict(f"execution {ids} already exists") from exc
        raise AssertionError("unreachable")

    async def _admit(
        self, conn: AsyncConnection, start: CappedStart, room: _Room, cutoff: datetime | None
    ) -> NewExecution:
        """The item to create for ``start``: itself, or its queued form; or refuse it."""
        cap = start.cap
        execution = start.item.transition.execution
        if cap is None or execution.status not in _LIVE:
            return start.item
        key = execution.idempotency_key
        if key is not None:
            holder = await self._executions.by_idempotency_key(conn, execution.tenant_id, key)
            if holder is not None and (cutoff is None or holder.created_at >= cutoff):
                return start.item  # ``create_in`` returns the holder
        workflow = _workflow(execution)
        running = await room.running(workflow)
        if cap.policy is OverflowPolicy.REJECT:
            if running >= cap.max_running:
                raise errors.ResourceExhausted(cap.refusal(execution.workflow_name, running))
        elif running >= cap.max_running or await room.queued(workflow):
            # Behind the queue (oldest first), or no room.
            assert start.queued is not None
            room.queue(workflow)
            return NewExecution(start.queued)
        room.start(workflow)
        return start.item

    # -- starting PENDING executions ------------------------------------------------------

    async def start_pending(
        self,
        execution: Execution,
        start: NewExecution,
        cap: RunningCap | None,
        when_full: Transition | None,
    ) -> PendingStart:
        tenant_id = execution.tenant_id
        async with self._db.tx(write=True) as conn:
            if cap is not None:
                await self._lock_workflows(conn, [_workflow(execution)])
            try:
                loaded = await self._executions.load_execution(
                    conn, tenant_id, execution.id, lock=self._db.postgres, skip_locked=True
                )
            except errors.NotFound:
                return PendingStart.SKIPPED  # gone, or another transaction holds it
            if loaded.version != execution.version or loaded.status is not ExecutionStatus.PENDING:
                return PendingStart.SKIPPED
            if cap is not None:
                room = _Room(conn)
                workflow = _workflow(execution)
                full = await room.running(workflow) >= cap.max_running
                if not full and not loaded.queued and cap.policy is OverflowPolicy.QUEUE:
                    full = await room.queued(workflow)  # behind those already queued
                if full:
                    if when_full is None:
                        return PendingStart.FULL
                    if not await self._executions.apply(conn, tenant_id, loaded, {}, when_full):
                        await conn.rollback()
                        return PendingStart.SKIPPED
                    return PendingStart.DEFERRED
            if not await self._executions.apply(conn, tenant_id, loaded, {}, start.transition):
                await conn.rollback()
                return PendingStart.SKIPPED
            try:
                for child in start.children:
                    await self._executions.insert_execution(conn, child)
            except sa_exc.IntegrityError as exc:
                raise errors.Conflict(
                    f"execution {execution.id!r}: a child execution id is taken; retry"
                ) from exc
        return PendingStart.STARTED

    # -- queries --------------------------------------------------------------------------

    async def count_running(self, tenant_id: str, workflow_name: str) -> int:
        async with self._db.tx(write=False) as conn:
            return int(await conn.scalar(_running(tenant_id, workflow_name)) or 0)

    async def find_queued_workflows(
        self, limit: int, after: tuple[str, str] | None = None
    ) -> list[tuple[str, str]]:
        e = executions
        query = (
            sa.select(e.c.tenant_id, e.c.workflow_name)
            .where(e.c.status == _PENDING, _QUEUED)
            .where(
                sa.tuple_(e.c.tenant_id, e.c.workflow_name) > sa.tuple_(*after)
                if after
                else sa.true()
            )
            .distinct()
            .order_by(e.c.tenant_id, e.c.workflow_name)
            .limit(limit)
        )
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).all()
        return [(r[0], r[1]) for r in rows]

    async def find_queued_executions(
        self, tenant_id: str, workflow_name: str, limit: int
    ) -> list[Execution]:
        e = executions
        query = (
            sa.select(e)
            .where(
                e.c.tenant_id == tenant_id,
                e.c.workflow_name == workflow_name,
                e.c.status == _PENDING,
                _QUEUED,
            )
            .order_by(e.c.created_at, e.c.id)
            .limit(limit)
        )
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.execution_from_row(r) for r in rows]


def _workflow(execution: Execution) -> Workflow:
    return execution.tenant_id, execution.workflow_name


class _Room:
    """Running counts and queue state of capped workflows within one transaction (read
    once each, then kept up to date with what the transaction itself writes)."""

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self._running: dict[Workflow, int] = {}
        self._queued: dict[Workflow, bool] = {}

    async def running(self, workflow: Workflow) -> int:
        if workflow not in self._running:
            count = await self._conn.scalar(_running(*workflow))
            self._running[workflow] = int(count or 0)
        return self._running[workflow]

    async def queued(self, workflow: Workflow) -> bool:
        if workflow not in self._queued:
            found = await self._conn.scalar(_queued(*workflow))
            self._queued[workflow] = found is not None
        return self._queued[workflow]

    def start(self, workflow: Workflow) -> None:
        self._running[workflow] = self._running.get(workflow, 0) + 1

    def queue(self, workflow: Workflow) -> None:
        self._queued[workflow] = True
