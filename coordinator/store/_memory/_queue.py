"""``MemoryQueue``: the ``QueueRepository`` port in memory — capped starts and the overflow
queue of ``max_running_executions``.

A capped start counts the workflow's running executions in the same atomic write that
stores it, so concurrent starts never exceed the cap (the SQL store takes a per-workflow
lock for this on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

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
from coordinator.store._memory import _aggregate
from coordinator.store._memory._state import State

_RUNNING = frozenset({ExecutionStatus.RUNNING, ExecutionStatus.PAUSED})
_PENDING = frozenset({ExecutionStatus.PENDING})


class MemoryQueue:
    """The ``QueueRepository`` port."""

    def __init__(self, state: State) -> None:
        self._state = state

    # -- creating -------------------------------------------------------------------------

    async def create_capped_executions(
        self, starts: Sequence[CappedStart], *, idempotency_cutoff: datetime | None = None
    ) -> list[tuple[Execution, bool]]:
        async with self._state.write():
            out: list[tuple[Execution, bool]] = []
            for start in starts:
                item = self._admit(start, idempotency_cutoff)
                [result] = _aggregate.create_all(self._state, [item], idempotency_cutoff)
                out.append(result)
            return out

    def _admit(self, start: CappedStart, cutoff: datetime | None) -> NewExecution:
        """The item to create for ``start``: itself, or its queued form; or refuse it."""
        cap = start.cap
        execution = start.item.transition.execution
        if cap is None or execution.status not in _RUNNING:
            return start.item
        key = execution.idempotency_key
        if key is not None:
            holder = _aggregate.by_idempotency_key(self._state, execution.tenant_id, key)
            if holder is not None and (cutoff is None or holder.created_at >= cutoff):
                return start.item  # ``create_all`` returns the holder
        running = self._running(execution.tenant_id, execution.workflow_name)
        if cap.policy is OverflowPolicy.REJECT:
            if running >= cap.max_running:
                raise errors.ResourceExhausted(cap.refusal(execution.workflow_name, running))
        elif running >= cap.max_running or self._any_queued(
            execution.tenant_id, execution.workflow_name
        ):
            # Behind the queue (oldest first), or no room.
            assert start.queued is not None
            return NewExecution(start.queued)
        return start.item

    # -- starting PENDING executions ------------------------------------------------------

    async def start_pending(
        self,
        execution: Execution,
        start: NewExecution,
        cap: RunningCap | None,
        when_full: Transition | None,
    ) -> PendingStart:
        state = self._state
        tenant_id = execution.tenant_id
        async with state.write():
            loaded = state.execution(tenant_id, execution.id)
            if (
                loaded is None
                or loaded.version != execution.version
                or loaded.status is not ExecutionStatus.PENDING
            ):
                return PendingStart.SKIPPED
            if cap is not None:
                full = self._running(tenant_id, execution.workflow_name) >= cap.max_running
                if not full and not loaded.queued and cap.policy is OverflowPolicy.QUEUE:
                    # Behind those already queued.
                    full = self._any_queued(tenant_id, execution.workflow_name)
                if full:
                    if when_full is None:
                        return PendingStart.FULL
                    _aggregate.apply(state, tenant_id, loaded, {}, when_full)
                    return PendingStart.DEFERRED
            _aggregate.apply(state, tenant_id, loaded, {}, start.transition)
            for child in start.children:
                _aggregate.insert_execution(
                    state,
                    child,
                    taken=f"execution {execution.id!r}: a child execution id is taken; retry",
                )
        return PendingStart.STARTED

    # -- queries --------------------------------------------------------------------------

    async def count_running(self, tenant_id: str, workflow_name: str) -> int:
        async with self._state.read():
            return self._running(tenant_id, workflow_name)

    async def find_queued_workflows(
        self, limit: int, after: tuple[str, str] | None = None
    ) -> list[tuple[str, str]]:
        async with self._state.read():
            found = {
                (e.tenant_id, e.workflow_name)
                for e in self._state.executions_in(_PENDING)
                if e.queued and (after is None or (e.tenant_id, e.workflow_name) > after)
            }
        return sorted(found)[:limit]

    async def find_queued_executions(
        self, tenant_id: str, workflow_name: str, limit: int
    ) -> list[Execution]:
        async with self._state.read():
            queued = self._queued(tenant_id, workflow_name)
        queued.sort(key=lambda e: (e.created_at, e.id))
        return queued[:limit]

    def _running(self, tenant_id: str, workflow_name: str) -> int:
        return sum(
            1
            for e in self._state.executions_in(_RUNNING)
            if e.tenant_id == tenant_id and e.workflow_name == workflow_name
        )

    def _queued(self, tenant_id: str, workflow_name: str) -> list[Execution]:
        return [
            e
            for e in self._state.executions_in(_PENDING)
            if e.queued and e.tenant_id == tenant_id and e.workflow_name == workflow_name
        ]

    def _any_queued(self, tenant_id: str, workflow_name: str) -> bool:
        return bool(self._queued(tenant_id, workflow_name))
