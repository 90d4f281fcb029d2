"""Leasing: ``SqlLeases``, the claim (with dispatch limits), lease heartbeats and the
sweepers' queries over leases and deadlines — the store's dispatch hot path."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.model import (
    UNLIMITED,
    Admitted,
    Candidate,
    Event,
    EventType,
    LeasedCounts,
    LeaseKey,
    NodeRun,
)
from coordinator.service.ports import ClaimPolicy
from coordinator.store import _control, _rows
from coordinator.store._db import Database
from coordinator.store._tables import executions, node_runs, workers
from coordinator.store._workers import touch_worker
from coordinator.store._writes import insert_events

# Statuses and flags compared in claim and sweep queries are SQL literals, not bound
# parameters, so the planners can match the partial indexes (WHERE status = 'READY' AND
# held = false / status = 'LEASED').
_READY: sa.ColumnClause[str] = sa.literal_column("'READY'", sa.Text)
_LEASED: sa.ColumnClause[str] = sa.literal_column("'LEASED'", sa.Text)
_NOT_HELD = node_runs.c.held == sa.literal_column("false", sa.Boolean)


def _sorted_runs(runs: list[NodeRun]) -> list[NodeRun]:
    return sorted(runs, key=lambda r: (-r.priority, r.available_at or r.updated_at, r.node_id))


# The hot-path statements are built once, here, with bound parameters: SQLAlchemy then
# neither rebuilds them nor regenerates their cache keys per call (both memoized on the
# statement), which cost more than SQLite's own work. Variants differ by dialect where
# PostgreSQL binds arrays (one statement text whatever the number of values, so psycopg's
# prepared statements apply) and SQLite expands an IN list.


def _task_types_in(postgres: bool) -> sa.ColumnElement[bool]:
    """task_type among the ``task_types`` parameter (a list)."""
    if postgres:
        types = sa.bindparam("task_types", type_=postgresql.ARRAY(sa.Text))
        return node_runs.c.task_type == sa.any_(types)
    return node_runs.c.task_type.in_(sa.bindparam("task_types", expanding=True))


def _candidates_statement(needs_input: bool) -> sa.Select[tuple[object, ...]]:
    """The claimable rows of one task type in dispatch order. One type per statement, bound
    by equality: the planners then walk ix_node_runs_dispatch (tenant, type, rank) in order
    and stop at the LIMIT, whatever the backlog. (With ``task_type = ANY(:types)``
    PostgreSQL fetched and sorted every READY row of the types: 74 ms per claim at 20,000.)"""
    n, e = node_runs, executions
    leased = sa.alias(node_runs, "l")
    running = (
        sa.select(sa.func.count())
        .where(leased.c.execution_id == n.c.execution_id, leased.c.status == _LEASED)
        .scalar_subquery()
    )
    columns = [
        n.c.execution_id,
        n.c.node_id,
        n.c.task_type,
        n.c.dispatch_rank,
        e.c.max_concurrency,
    ]
    if needs_input:
        columns.append(n.c.input)
    return (
        sa.select(*columns)
        .join(e, e.c.id == n.c.execution_id)
        .where(
            n.c.status == _READY,
            _NOT_HELD,
            n.c.tenant_id == sa.bindparam("b_tenant_id"),
            n.c.task_type == sa.bindparam("b_task_type"),
            n.c.available_at <= sa.bindparam("b_now_ms", type_=sa.BigInteger),
            sa.or_(e.c.max_concurrency == 0, e.c.max_concurrency > running),
        )
        .order_by(n.c.dispatch_rank)
        .limit(sa.bindparam("b_scan", type_=sa.Integer))
        .with_for_update(of=n, skip_locked=True)
    )


# needs_input -> the claim's candidate scan (of one task type).
_CANDIDATES = {needs_input: _candidates_statement(needs_input) for needs_input in (False, True)}


def _lease_statement(postgres: bool) -> sa.Update:
    """Lease the rows keyed by the parameters (see ``node_keys_in``) for one concurrency key."""
    n = node_runs
    now = sa.bindparam("b_now_ms", type_=sa.BigInteger)
    return (
        sa.update(n)
        .where(n.c.tenant_id == sa.bindparam("b_tenant_id"), _control.node_keys_in(postgres))
        .values(
            status=_LEASED,
            attempt=n.c.attempt + 1,
            lease_seq=n.c.lease_seq + 1,
            worker_id=sa.bindparam("b_worker_id"),
            lease_deadline=now + n.c.start_to_close_ms,
            # NULL when the node has no heartbeat timeout.
            heartbeat_deadline=now + n.c.heartbeat_timeout_ms,
            # Started in time: the schedule-to-start deadline no longer applies.
            schedule_deadline=None,
            updated_at=now,
            concurrency_key=sa.bindparam("b_concurrency_key"),
        )
        .returning(*n.c)
    )


_LEASE = {postgres: _lease_statement(postgres) for postgres in (False, True)}


def _execution_ids_in(postgres: bool) -> sa.ColumnElement[bool]:
    if postgres:
        ids = sa.bindparam("b_execution_ids", type_=postgresql.ARRAY(sa.Text))
        return node_runs.c.execution_id == sa.any_(ids)
    return node_runs.c.execution_id.in_(sa.bindparam("b_execution_ids", expanding=True))


# Leased rows of some task types by concurrency key, and of some executions.
_LEASED_BY_TYPE_KEY = {
    postgres: sa.select(node_runs.c.task_type, node_runs.c.concurrency_key, sa.func.count())
    .where(
        node_runs.c.status == _LEASED,
        node_runs.c.tenant_id == sa.bindparam("b_tenant_id"),
        _task_types_in(postgres),
    )
    .group_by(node_runs.c.task_type, node_runs.c.concurrency_key)
    for postgres in (False, True)
}
_LEASED_BY_EXECUTION = {
    postgres: sa.select(node_runs.c.execution_id, sa.func.count())
    .where(node_runs.c.status == _LEASED, _execution_ids_in(postgres))
    .group_by(node_runs.c.execution_id)
    for postgres in (False, True)
}

# When the next row of these types (not yet available) becomes claimable.
_NEXT_AVAILABLE = {
    postgres: sa.select(sa.func.min(node_runs.c.available_at)).where(
        node_runs.c.status == _READY,
        _NOT_HELD,
        node_runs.c.tenant_id == sa.bindparam("b_tenant_id"),
        _task_types_in(postgres),
        node_runs.c.available_at > sa.bindparam("b_now_ms", type_=sa.BigInteger),
    )
    for postgres in (False, True)
}

# A heartbeat, executed once for many leases: pushes the heartbeat deadline of a lease
# still held (same lease_seq); then the rows are read back by key.
_TOUCH_LEASE = (
    sa.update(node_runs)
    .where(
        node_runs.c.tenant_id == sa.bindparam("b_tenant_id"),
        node_runs.c.execution_id == sa.bindparam("b_execution_id"),
        node_runs.c.node_id == sa.bindparam("b_node_id"),
        node_runs.c.lease_seq == sa.bindparam("b_lease_seq"),
        node_runs.c.status == _LEASED,
    )
    .values(
        heartbeat_deadline=sa.bindparam("b_now_ms", type_=sa.BigInteger)
        + node_runs.c.heartbeat_timeout_ms
    )
)
_NODE_RUNS_BY_KEY = {
    postgres: sa.select(node_runs).where(
        node_runs.c.tenant_id == sa.bindparam("b_tenant_id"), _control.node_keys_in(postgres)
    )
    for postgres in (False, True)
}


class SqlLeases:
    """The ``LeaseRepository`` port."""

    def __init__(self, db: Database) -> None:
        self._db = db

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
            async with self._db.tx(write=True) as conn:
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
        """Up to ``scan`` claimable rows in dispatch order (one indexed scan per task type),
        locked (SKIP LOCKED on
        PostgreSQL: concurrent claimers pass over each other's rows; SQLite's writer lock
        serializes claims). Rows of executions already at their max_concurrency are left
        out here (the claim re-counts under a lock before leasing)."""
        query = _CANDIDATES[needs_input]
        params = {"b_tenant_id": tenant_id, "b_now_ms": _rows.to_ms(now), "b_scan": scan}
        rows: list[sa.Row[Any]] = []
        for task_type in types:
            rows.extend((await conn.execute(query, {**params, "b_task_type": task_type})).all())
        if len(types) > 1:
            # Merged in dispatch order. Rows past the first ``scan`` stay locked until the
            # claim commits; other claimers skip them meanwhile (SKIP LOCKED), no more.
            rows = sorted(rows, key=lambda r: r.dispatch_rank)[:scan]
        return [_rows.candidate_from_row(r, needs_input) for r in rows]

    async def _lock_limits(self, conn: AsyncConnection, keys: Sequence[str]) -> None:
        """Serialize the claims that count leased rows of one task type or execution across
        replicas, so that two cannot both see room for the last slot (PostgreSQL
        transaction-scoped advisory locks, in sorted order; SQLite's writer lock already
        serializes claims)."""
        if not self._db.postgres:
            return
        for key in sorted(keys):
            lock_id = sa.func.hashtextextended(f"trellis:{key}", 0)
            await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_id)))

    async def _leased_counts(
        self, conn: AsyncConnection, tenant_id: str, types: Sequence[str], capped: Sequence[str]
    ) -> LeasedCounts:
        counts = LeasedCounts()
        if types:
            by_key = _LEASED_BY_TYPE_KEY[self._db.postgres]
            params = {"b_tenant_id": tenant_id, "task_types": list(types)}
            for task_type, key, count in (await conn.execute(by_key, params)).all():
                counts.by_type_key[(task_type, key)] = count
        if capped:
            by_execution = _LEASED_BY_EXECUTION[self._db.postgres]
            params = {"b_execution_ids": list(capped)}
            for execution_id, count in (await conn.execute(by_execution, params)).all():
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
        now_ms = _rows.to_ms(now)
        statement = _LEASE[self._db.postgres]
        runs: list[NodeRun] = []
        # One statement per distinct concurrency key (usually one in all).
        by_key: dict[str | None, list[tuple[str, str]]] = {}
        for a in admitted:
            by_key.setdefault(a.concurrency_key, []).append(
                (a.candidate.execution_id, a.candidate.node_id)
            )
        for key, pks in by_key.items():
            params = {
                **_control.node_keys_params(self._db.postgres, pks),
                "b_tenant_id": tenant_id,
                "b_worker_id": worker_id,
                "b_now_ms": now_ms,
                "b_concurrency_key": key,
            }
            rows = (await conn.execute(statement, params)).mappings().all()
            runs.extend(_rows.node_run_from_row(r) for r in rows)
        runs = _sorted_runs(runs)
        await insert_events(
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
        await touch_worker(conn, tenant_id, worker_id, now_ms)
        return runs

    async def next_available_at(
        self, tenant_id: str, task_types: Sequence[str], now: datetime
    ) -> datetime | None:
        if not task_types:
            return None
        query = _NEXT_AVAILABLE[self._db.postgres]
        params = {
            "b_tenant_id": tenant_id,
            "task_types": list(task_types),
            "b_now_ms": _rows.to_ms(now),
        }
        async with self._db.tx(write=False) as conn:
            value = await conn.scalar(query, params)
        return _rows.opt_from_ms(value)

    async def touch_leases(
        self, tenant_id: str, keys: Sequence[LeaseKey], now: datetime
    ) -> dict[LeaseKey, NodeRun | None]:
        if not keys:
            return {}
        # Lock order (execution_id, node_id), as transitions use, so two never deadlock.
        ordered = sorted(set(keys), key=lambda k: (k.execution_id, k.node_id, k.lease_seq))
        now_ms = _rows.to_ms(now)
        params = [
            {
                "b_tenant_id": tenant_id,
                "b_execution_id": k.execution_id,
                "b_node_id": k.node_id,
                "b_lease_seq": k.lease_seq,
                "b_now_ms": now_ms,
            }
            for k in ordered
        ]
        pairs = sorted({(k.execution_id, k.node_id) for k in ordered})
        current = _NODE_RUNS_BY_KEY[self._db.postgres]
        current_params = {
            "b_tenant_id": tenant_id,
            **_control.node_keys_params(self._db.postgres, pairs),
        }
        async with self._db.tx(write=True) as conn:
            await conn.execute(_TOUCH_LEASE, params)
            rows = (await conn.execute(current, current_params)).mappings().all()
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
        async with self._db.tx(write=False) as conn:
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
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.node_run_from_row(r) for r in rows]

    async def find_leases_of_lost_workers(self, cutoff: datetime, limit: int) -> list[NodeRun]:
        n, w = node_runs, workers
        query = (
            sa.select(n)
            .join(w, sa.and_(w.c.tenant_id == n.c.tenant_id, w.c.id == n.c.worker_id))
            .where(n.c.status == _LEASED, w.c.last_seen < _rows.to_ms(cutoff))
            .order_by(w.c.last_seen, n.c.execution_id, n.c.node_id)
            .limit(limit)
        )
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.node_run_from_row(r) for r in rows]

    async def list_worker_leases(self, tenant_id: str, worker_id: str) -> list[NodeRun]:
        n = node_runs
        query = sa.select(n).where(
            n.c.tenant_id == tenant_id, n.c.status == _LEASED, n.c.worker_id == worker_id
        )
        async with self._db.tx(write=False) as conn:
            rows = (await conn.execute(query)).mappings().all()
        return [_rows.node_run_from_row(r) for r in rows]
