"""Start options of an execution (delayed starts, max_concurrency), the request shape batch
starts share, and the store seam of max_running_executions (the overflow queue)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from coordinator.errors import InvalidArgument
from coordinator.model import Execution, OverflowPolicy, Transition, WorkflowDef
from coordinator.service.ports import NewExecution

# The furthest ahead a start may be scheduled.
MAX_START_DELAY = timedelta(days=3650)
# The most executions one BatchStartExecutions call may start.
MAX_BATCH_START = 1000
# The highest max_concurrency a start may ask for.
MAX_EXECUTION_CONCURRENCY = 10_000


@dataclass(frozen=True)
class StartRequest:
    """One execution to start, as a client asks for it."""

    workflow_name: str
    workflow_version: int | None = None
    input: bytes = b""
    idempotency_key: str | None = None
    priority: int = 0
    # Delayed start: at this time, or after this delay (at most one of them).
    start_time: datetime | None = None
    delay: timedelta | None = None
    # Most nodes of the execution leased at once; 0 = the definition's max_concurrency.
    max_concurrency: int = 0


def start_at(request: StartRequest, now: datetime) -> datetime | None:
    """When a delayed start is due, or None to start now (no delay, or a time passed)."""
    if request.start_time is not None and request.delay is not None:
        raise InvalidArgument("set at most one of start_time and delay, not both")
    if request.delay is not None:
        if request.delay < timedelta(0):
            raise InvalidArgument(f"delay {request.delay} is negative; pass a delay of 0 or more")
        at = now + request.delay
    elif request.start_time is not None:
        at = request.start_time
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
    else:
        return None
    if at - now > MAX_START_DELAY:
        raise InvalidArgument(
            f"start time {at.isoformat()} is more than {MAX_START_DELAY.days} days ahead; "
            "schedule it closer"
        )
    return at if at > now else None


def execution_concurrency(request: StartRequest, defn: WorkflowDef) -> int:
    """The max_concurrency an execution gets: the request's, else the definition's."""
    value = request.max_concurrency
    if not 0 <= value <= MAX_EXECUTION_CONCURRENCY:
        raise InvalidArgument(
            f"max_concurrency {value} is out of range; use 1 to {MAX_EXECUTION_CONCURRENCY}, "
            "or 0 for the workflow definition's max_concurrency"
        )
    return value or defn.max_concurrency


# -- max_running_executions ---------------------------------------------------------------


@dataclass(frozen=True)
class RunningCap:
    """A workflow's max_running_executions (> 0) and what a start beyond it does."""

    max_running: int
    policy: OverflowPolicy

    def refusal(self, workflow_name: str, running: int) -> str:
        return (
            f"workflow '{workflow_name}' has {running} running executions "
            f"(max_running_executions {self.max_running}); retry later or raise the limit"
        )


def running_cap(defn: WorkflowDef) -> RunningCap | None:
    """The cap of ``defn``'s executions, or None when it has none (no counting at all)."""
    if defn.max_running_executions <= 0:
        return None
    return RunningCap(defn.max_running_executions, defn.overflow_policy)


@dataclass(frozen=True)
class CappedStart:
    """An execution to create now, under its workflow's cap when ``cap`` is set."""

    item: NewExecution
    cap: RunningCap | None = None
    # What is stored instead when the workflow is full and the policy is QUEUE: the
    # execution PENDING with ``queued`` set, no node runs.
    queued: Transition | None = None


class PendingStart(enum.Enum):
    """What ``OverflowStore.start_pending`` did."""

    # The execution is RUNNING (or ended at once).
    STARTED = "started"
    # The workflow was full; ``when_full`` was written (queued, or refused).
    DEFERRED = "deferred"
    # The workflow was full and nothing was written (an already queued execution).
    FULL = "full"
    # The row changed since it was read, is gone, or another replica holds it.
    SKIPPED = "skipped"


@runtime_checkable
class OverflowStore(Protocol):
    """The store side of max_running_executions (coordinator/store/_queue.py).

    "Running" means RUNNING or PAUSED executions of the workflow name (every version) in
    the tenant. A capped start counts them in the transaction that writes it; on
    PostgreSQL that transaction first takes a per-workflow advisory lock, so concurrent
    starts on any replica never exceed the cap."""

    async def create_capped_executions(
        self, starts: Sequence[CappedStart], *, idempotency_cutoff: datetime | None = None
    ) -> list[tuple[Execution, bool]]:
        """``Store.create_executions`` with the caps applied, all in one transaction. A
        capped start is created as is when its workflow has room (and, for QUEUE, nothing
        queued before it), else its ``queued`` transition is (QUEUE), or the whole call
        raises ``ResourceExhausted`` and nothing is stored (REJECT). A start whose
        idempotency key is held returns the holder, as ``create_executions`` does."""
        ...

    async def start_pending(
        self,
        execution: Execution,
        start: NewExecution,
        cap: RunningCap | None,
        when_full: Transition | None,
    ) -> PendingStart:
        """Write ``start`` (the start transition of the PENDING ``execution`` and its
        children) if the row is unchanged (same version, not held by another transaction)
        and, with a ``cap``, the workflow has room (for an execution not yet queued: and
        nothing is queued before it). When it has none, write ``when_full`` if given."""
        ...

    async def count_running(self, tenant_id: str, workflow_name: str) -> int:
        """RUNNING and PAUSED executions of the workflow (all versions)."""
        ...

    async def find_queued_workflows(
        self, limit: int, after: tuple[str, str] | None = None
    ) -> list[tuple[str, str]]:
        """(tenant, workflow name) pairs, any tenant, with queued executions."""
        ...

    async def find_queued_executions(
        self, tenant_id: str, workflow_name: str, limit: int
    ) -> list[Execution]:
        """The workflow's queued executions, oldest (created_at) first."""
        ...
