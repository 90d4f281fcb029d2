"""``MemoryLeases``: the ``LeaseRepository`` port in memory — the claim with its dispatch
limits (``ClaimPolicy``), heartbeats, and the sweepers' queries over leases.

The claim follows the SQL store's steps in one atomic write: the candidates of each task
type in dispatch order (``NodeRow.rank``: available_at - priority * ageing), leaving out
executions already at their max_concurrency; the leased rows counted per counted type and
concurrency key and per capped execution; ``policy.admit``; ``policy.take_tokens``; the
lease. If the claim then fails, the tokens are refunded.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from coordinator.model import (
    UNLIMITED,
    Admitted,
    Candidate,
    Event,
    EventType,
    Execution,
    LeasedCounts,
    LeaseKey,
    NodeRun,
    NodeStatus,
)
from coordinator.service.ports import ClaimPolicy
from coordinator.store._memory import _aggregate, _copies
from coordinator.store._memory._state import NodeKey, NodeRow, State


def _sorted_runs(runs: list[NodeRun]) -> list[NodeRun]:
    return sorted(runs, key=lambda r: (-r.priority, r.available_at or r.updated_at, r.node_id))


def touch_worker(state: State, tenant_id: str, worker_id: str, now: datetime) -> None:
    """last_seen = now for a registered worker; never moves it back (replicas' clocks)."""
    worker = state.workers.get((tenant_id, worker_id))
    if worker is not None and worker.last_seen < now:
        state.workers.put((tenant_id, worker_id), dataclasses.replace(worker, last_seen=now))


class MemoryLeases:
    """The ``LeaseRepository`` port."""

    def __init__(self, state: State) -> None:
        self._state = state

    # -- the claim ------------------------------------------------------------------------

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
            async with self._state.write():
                candidates = self._candidates(
                    tenant_id, types, policy.scan(limit), now, policy.needs_input
                )
                if not candidates:
                    return []
                capped = sorted({c.execution_id for c in candidates if c.execution_max_concurrency})
                counts = self._leased_counts(tenant_id, counted, capped)
                taken = await policy.take_tokens(policy.admit(candidates, counts, limit))
                if counted or capped:
                    # The lease starts now, not when the claim began (as the SQL store,
                    # whose claim may have waited for the limits' locks).
                    now += timedelta(seconds=time.monotonic() - began)
                runs = self._lease(tenant_id, worker_id, taken, now)
        except BaseException:
            if taken:
                await policy.refund(taken)
            raise
        return runs

    def _candidates(
        self, tenant_id: str, types: Sequence[str], scan: int, now: datetime, needs_input: bool
    ) -> list[Candidate]:
        """Up to ``scan`` claimable rows in dispatch order; rows of executions already at
        their max_concurrency are left out (the claim counts again before leasing)."""
        state = self._state
        at = _copies.ms(now)
        leased_by_execution = _count_by_execution(state.leased_rows())
        picked: list[tuple[int, str, str, NodeRow, Execution]] = []
        for task_type in types:
            rows: list[tuple[int, str, str, NodeRow, Execution]] = []
            for key in state.ready.get((tenant_id, task_type), ()):
                row = state.nodes.get(key)
                execution = state.executions.get(key[0])
                if row is None or execution is None or row.rank is None:
                    continue
                available_at = row.run.available_at
                if available_at is None or available_at > at:
                    continue
                cap = execution.max_concurrency
                if cap and leased_by_execution.get(execution.id, 0) >= cap:
                    continue
                rows.append((row.rank, key[0], key[1], row, execution))
            rows.sort(key=lambda r: r[:3])
            picked.extend(rows[:scan])
        picked.sort(key=lambda r: r[:3])
        return [
            Candidate(
                execution_id=row.run.execution_id,
                node_id=row.run.node_id,
                task_type=row.run.task_type,
                input=row.run.input if needs_input else None,
                execution_max_concurrency=execution.max_concurrency,
            )
            for _, _, _, row, execution in picked[:scan]
        ]

    def _leased_counts(
        self, tenant_id: str, types: Sequence[str], capped: Sequence[str]
    ) -> LeasedCounts:
        counts = LeasedCounts()
        leased = self._state.leased_rows()
        if types:
            wanted = set(types)
            for row in leased:
                if row.run.tenant_id == tenant_id and row.run.task_type in wanted:
                    key = (row.run.task_type, row.concurrency_key)
                    counts.by_type_key[key] = counts.by_type_key.get(key, 0) + 1
        if capped:
            by_execution = _count_by_execution(leased)
            counts.by_execution = {x: by_execution[x] for x in capped if x in by_execution}
        return counts

    def _lease(
        self, tenant_id: str, worker_id: str, admitted: Sequence[Admitted], now: datetime
    ) -> list[NodeRun]:
        """Lease the admitted rows, with their NODE_LEASED events; the worker is alive."""
        if not admitted:
            return []
        state = self._state
        at = _copies.ms(now)
        runs: list[NodeRun] = []
        for a in admitted:
            key = (a.candidate.execution_id, a.candidate.node_id)
            row = state.nodes.get(key)
            assert row is not None and row.run.status is NodeStatus.READY
            run = dataclasses.replace(
                row.run,
                status=NodeStatus.LEASED,
                attempt=row.run.attempt + 1,
                lease_seq=row.run.lease_seq + 1,
                worker_id=worker_id,
                lease_deadline=_copies.add_ms(at, row.run.start_to_close_timeout),
                # None when the node has no heartbeat timeout.
                heartbeat_deadline=_copies.add_ms(at, row.run.heartbeat_timeout),
                # Started in time: the schedule-to-start deadline no longer applies.
                schedule_deadline=None,
                updated_at=at,
            )
            state.nodes.put(key, NodeRow(run, row.rank, a.concurrency_key))
            runs.append(run)
        runs = _sorted_runs(runs)
        _aggregate.insert_events(
            state,
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
        touch_worker(state, tenant_id, worker_id, at)
        return runs

    async def next_available_at(
        self, tenant_id: str, task_types: Sequence[str], now: datetime
    ) -> datetime | None:
        at = _copies.ms(now)
        state = self._state
        async with state.read():
            later = [
                row.run.available_at
                for task_type in set(task_types)
                for key in state.ready.get((tenant_id, task_type), ())
                if (row := state.nodes.get(key)) is not None
                and row.run.available_at is not None
                and row.run.available_at > at
            ]
        return min(later, default=None)

    # -- heartbeats -----------------------------------------------------------------------

    async def touch_leases(
        self, tenant_id: str, keys: Sequence[LeaseKey], now: datetime
    ) -> dict[LeaseKey, NodeRun | None]:
        if not keys:
            return {}
        at = _copies.ms(now)
        state = self._state
        async with state.write():
            for k in sorted(set(keys), key=lambda k: (k.execution_id, k.node_id, k.lease_seq)):
                node_key = (k.execution_id, k.node_id)
                row = state.nodes.get(node_key)
                if (
                    row is not None
                    and row.run.tenant_id == tenant_id
                    and row.run.lease_seq == k.lease_seq
                    and row.run.status is NodeStatus.LEASED
                ):
                    deadline = _copies.add_ms(at, row.run.heartbeat_timeout)
                    run = dataclasses.replace(row.run, heartbeat_deadline=deadline)
                    state.nodes.put(node_key, dataclasses.replace(row, run=run))
            found = {k: self._run(tenant_id, (k.execution_id, k.node_id)) for k in keys}
        return found

    def _run(self, tenant_id: str, key: NodeKey) -> NodeRun | None:
        row = self._state.nodes.get(key)
        return row.run if row is not None and row.run.tenant_id == tenant_id else None

    # -- sweeps ---------------------------------------------------------------------------

    async def find_expired_leases(self, now: datetime, limit: int) -> list[NodeRun]:
        at = _copies.ms(now)
        async with self._state.read():
            expired = [
                row.run
                for row in self._state.leased_rows()
                if _before(row.run.lease_deadline, at) or _before(row.run.heartbeat_deadline, at)
            ]
        expired.sort(key=lambda r: (_last(r.lease_deadline), r.execution_id, r.node_id))
        return expired[:limit]

    async def find_unstarted_overdue(self, now: datetime, limit: int) -> list[NodeRun]:
        at = _copies.ms(now)
        state = self._state
        async with state.read():
            overdue = [
                row.run
                for keys in state.ready.values()
                for key in keys
                if (row := state.nodes.get(key)) is not None
                and _before(row.run.schedule_deadline, at)
            ]
        overdue.sort(key=lambda r: (_last(r.schedule_deadline), r.execution_id, r.node_id))
        return overdue[:limit]

    async def find_leases_of_lost_workers(self, cutoff: datetime, limit: int) -> list[NodeRun]:
        at = _copies.ms(cutoff)
        state = self._state
        async with state.read():
            lost: list[tuple[datetime, NodeRun]] = []
            for row in state.leased_rows():
                if row.run.worker_id is None:
                    continue
                worker = state.workers.get((row.run.tenant_id, row.run.worker_id))
                if worker is not None and worker.last_seen < at:
                    lost.append((worker.last_seen, row.run))
        lost.sort(key=lambda x: (x[0], x[1].execution_id, x[1].node_id))
        return [run for _, run in lost[:limit]]

    async def list_worker_leases(self, tenant_id: str, worker_id: str) -> list[NodeRun]:
        async with self._state.read():
            runs = [
                row.run
                for row in self._state.leased_rows()
                if row.run.tenant_id == tenant_id and row.run.worker_id == worker_id
            ]
        runs.sort(key=lambda r: (r.execution_id, r.node_id))
        return runs


def _count_by_execution(rows: Sequence[NodeRow]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.run.execution_id] = counts.get(row.run.execution_id, 0) + 1
    return counts


def _before(value: datetime | None, at: datetime) -> bool:
    return value is not None and value < at


def _last(value: datetime | None) -> tuple[bool, datetime]:
    """A sort key putting None last (PostgreSQL's order for NULLs ascending)."""
    return (value is None, value or _EARLIEST)


_EARLIEST = datetime.min.replace(tzinfo=UTC)
