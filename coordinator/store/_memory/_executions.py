"""``MemoryExecutions``: the ``ExecutionRepository`` port in memory.

A transition is decided and written under the state's lock, so nothing can change between
the load and the write: the version check (and the node fences) of ``_aggregate.apply``
never trip here, and no transition is decided twice. ``transact_many`` writes its items in
one atomic write: an item whose ``decide`` (or lookup) raises is skipped with its error;
anything else failing rolls the whole group back (None), as the SQL store's group does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from coordinator import errors
from coordinator.model import (
    Event,
    Execution,
    ExecutionFilter,
    ExecutionStatus,
    NewExecution,
    NodeRun,
    NodeStatus,
    Transition,
)
from coordinator.service.ports import Decision
from coordinator.store._memory import _aggregate, _copies
from coordinator.store._memory._state import State, newest_first

T = TypeVar("T")

Decide = Callable[[Execution, Mapping[str, NodeRun]], Decision[T]]

log = logging.getLogger(__name__)

_ENDED = frozenset(s for s in ExecutionStatus if s.terminal)


def _not_found(execution_id: str) -> errors.NotFound:
    return errors.NotFound(f"execution {execution_id!r} not found")


class MemoryExecutions:
    """The ``ExecutionRepository`` port."""

    def __init__(self, state: State) -> None:
        self._state = state

    # -- creating -------------------------------------------------------------------------

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
        async with self._state.write():
            return _aggregate.create_all(self._state, items, idempotency_cutoff)

    # -- reading --------------------------------------------------------------------------

    async def get_execution(self, tenant_id: str, execution_id: str) -> Execution:
        async with self._state.read():
            found = self._state.execution(tenant_id, execution_id)
        if found is None:
            raise _not_found(execution_id)
        return found

    async def get_executions(self, tenant_id: str, ids: Sequence[str]) -> dict[str, Execution]:
        async with self._state.read():
            return {
                i: found
                for i in sorted(set(ids))
                if (found := self._state.execution(tenant_id, i)) is not None
            }

    async def list_node_runs(self, tenant_id: str, execution_id: str) -> list[NodeRun]:
        async with self._state.read():
            rows = self._state.node_rows(execution_id)
        return [r.run for r in rows if r.run.tenant_id == tenant_id]

    async def get_node_outputs(
        self, tenant_id: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], bytes | None]:
        async with self._state.read():
            rows = {key: self._state.nodes.get(key) for key in sorted(set(keys))}
        return {
            key: row.run.output
            for key, row in rows.items()
            if row is not None and row.run.tenant_id == tenant_id
        }

    async def list_executions(
        self,
        tenant_id: str,
        where: ExecutionFilter,
        *,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Execution]:
        async with self._state.read():
            rows = [
                e
                for e in self._state.executions.values()
                if e.tenant_id == tenant_id and where.matches(e)
            ]
        return newest_first(rows, before, limit)

    async def list_events(
        self, tenant_id: str, execution_id: str, after_sequence: int, limit: int
    ) -> list[Event]:
        async with self._state.read():
            out: list[Event] = []
            for sequence in self._state.event_seqs.get(execution_id, ()):
                if len(out) >= limit:
                    break
                event = self._state.events.get(sequence)
                if sequence > after_sequence and event is not None and event.tenant_id == tenant_id:
                    out.append(event)
        return out

    # -- transitions ----------------------------------------------------------------------

    async def transact(self, tenant_id: str, execution_id: str, decide: Decide[T]) -> T:
        async with self._state.write():
            return self._transact(tenant_id, execution_id, decide)

    async def claim_transact(
        self, tenant_id: str, execution_id: str, decide: Decide[T]
    ) -> T | None:
        # No other transaction can hold the row here: only an unknown execution is skipped.
        async with self._state.write():
            if self._state.execution(tenant_id, execution_id) is None:
                return None
            return self._transact(tenant_id, execution_id, decide)

    def _transact(self, tenant_id: str, execution_id: str, decide: Decide[T]) -> T:
        state = self._state
        execution = state.execution(tenant_id, execution_id)
        if execution is None:
            raise _not_found(execution_id)
        nodes = _aggregate.loaded_nodes(state, execution_id)
        decision = decide(execution, nodes)
        if decision.transition is not None:
            _aggregate.apply(state, tenant_id, execution, nodes, decision.transition)
            for child in decision.created:
                _aggregate.insert_execution(
                    state,
                    child,
                    taken=f"execution {execution_id!r}: a child execution id is taken; retry",
                )
        return decision.result

    async def transact_many(
        self, items: Sequence[tuple[str, str, Decide[T]]]
    ) -> list[T | errors.TrellisError] | None:
        """Each item decided in execution id order (a later item of one execution sees the
        earlier one's writes), all written in one atomic write."""
        order = sorted(range(len(items)), key=lambda i: items[i][1])
        results: list[Any] = [None] * len(items)
        try:
            async with self._state.write():
                for i in order:
                    tenant_id, execution_id, decide = items[i]
                    results[i] = self._group_item(tenant_id, execution_id, decide)
        except errors.TrellisError as exc:
            log.debug("group of %d rolled back: %r", len(items), exc)
            return None
        return results

    def _group_item(
        self, tenant_id: str, execution_id: str, decide: Decide[T]
    ) -> T | errors.TrellisError:
        """One item of a group: the error of its lookup or its ``decide`` is its result (it
        wrote nothing); an error of its writes propagates (the group rolls back)."""
        state = self._state
        execution = state.execution(tenant_id, execution_id)
        if execution is None:
            return _not_found(execution_id)
        nodes = _aggregate.loaded_nodes(state, execution_id)
        try:
            decision = decide(execution, nodes)
        except errors.TrellisError as exc:
            return exc
        if decision.transition is not None:
            _aggregate.apply(state, tenant_id, execution, nodes, decision.transition)
            for child in decision.created:
                _aggregate.insert_execution(
                    state, child, taken=f"execution {execution_id!r}: a child id is taken"
                )
        return decision.result

    # -- sweeps ---------------------------------------------------------------------------

    async def find_due_executions(self, now: datetime, limit: int) -> list[Execution]:
        at = _copies.ms(now)
        async with self._state.read():
            due = [
                e
                for e in self._state.executions_in(frozenset({ExecutionStatus.PENDING}))
                if e.start_at is not None and e.start_at <= at and not e.queued
            ]
        due.sort(key=lambda e: (e.start_at, e.id))
        return due[:limit]

    async def find_ended_children(self, limit: int) -> list[Execution]:
        state = self._state
        async with state.read():
            ended: list[Execution] = []
            for key in state.waiting:
                row = state.nodes.get(key)
                if row is None or row.run.child_execution_id is None:
                    continue
                child = state.executions.get(row.run.child_execution_id)
                if (
                    child is not None
                    and child.tenant_id == row.run.tenant_id
                    and child.parent_execution_id == row.run.execution_id
                    and child.status in _ENDED
                ):
                    ended.append(child)
        ended.sort(key=lambda e: (e.updated_at, e.id))
        return ended[:limit]

    async def find_orphaned_children(self, limit: int) -> list[Execution]:
        state = self._state
        async with state.read():
            orphans = [
                child
                for child in state.executions_in()
                if child.parent_execution_id is not None and not self._waited_on(child)
            ]
        orphans.sort(key=lambda e: (e.created_at, e.id))
        return orphans[:limit]

    def _waited_on(self, child: Execution) -> bool:
        assert child.parent_execution_id is not None
        row = self._state.nodes.get((child.parent_execution_id, child.parent_node_id or ""))
        return (
            row is not None
            and row.run.tenant_id == child.tenant_id
            and row.run.status is NodeStatus.WAITING
            and row.run.child_execution_id == child.id
        )

    async def find_overdue_executions(self, now: datetime, limit: int) -> list[Execution]:
        at = _copies.ms(now)
        async with self._state.read():
            overdue = [
                e for e in self._state.executions_in() if e.deadline is not None and e.deadline < at
            ]
        overdue.sort(key=lambda e: (e.deadline, e.id))
        return overdue[:limit]

    async def find_waiting_overdue(self, now: datetime, limit: int) -> list[NodeRun]:
        at = _copies.ms(now)
        state = self._state
        async with state.read():
            overdue = [
                row.run
                for key in state.waiting
                if (row := state.nodes.get(key)) is not None
                and row.run.schedule_deadline is not None
                and row.run.schedule_deadline < at
            ]
        overdue.sort(key=lambda r: (r.schedule_deadline, r.execution_id, r.node_id))
        return overdue[:limit]
