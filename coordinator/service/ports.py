"""The seam between use cases and storage: the service talks to this protocol only.

``coordinator/store`` implements it with SQLAlchemy for SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from coordinator.errors import TrellisError
from coordinator.model import (
    DeadLetter,
    Event,
    Execution,
    ExecutionStatus,
    NodeRun,
    TaskTypeLimits,
    Transition,
    WorkerInfo,
    WorkflowDef,
    WorkflowSummary,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Decision(Generic[T]):
    """The outcome of a ``decide`` callback: a transition to persist (or none) and a result."""

    transition: Transition | None
    result: T
    # Executions to insert in the same database transaction as ``transition`` (the child
    # executions its workflow nodes start, each with its start transition).
    created: tuple[Transition, ...] = ()
    # Wake-up keys for the other replicas, published in the same database transaction
    # (a PostgreSQL NOTIFY is delivered at commit, and never for a rolled-back one).
    wake: tuple[str, ...] = ()


@dataclass(frozen=True)
class NewExecution:
    """An execution to insert: its start transition (or a PENDING row for a delayed start)
    and the child executions (sub-workflows) that start with it, each a start transition."""

    transition: Transition
    children: tuple[Transition, ...] = ()


@dataclass(frozen=True)
class LeaseKey:
    execution_id: str
    node_id: str
    lease_seq: int


@dataclass(frozen=True)
class Candidate:
    """A READY row a claim may lease, with what the limits need to know about it."""

    execution_id: str
    node_id: str
    task_type: str
    # The node input (only loaded when ``ClaimPolicy.needs_input``).
    input: bytes | None
    # The execution's max_concurrency (0 = none).
    execution_max_concurrency: int


@dataclass
class LeasedCounts:
    """Rows LEASED right now, counted inside the claim's transaction (after its locks)."""

    # (task_type, concurrency_key or None) -> count, for ``ClaimPolicy.counted_types``.
    by_type_key: dict[tuple[str, str | None], int] = field(default_factory=dict)
    # execution_id -> count, for candidates' executions with a max_concurrency.
    by_execution: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Admitted:
    candidate: Candidate
    # Written on the leased row; counted against the type's concurrency_key_limit.
    concurrency_key: str | None = None


class ClaimPolicy(Protocol):
    """The dispatch limits one claim applies (built per poll by DispatchControl.plan).

    The store's claim, in one transaction: select up to ``scan(limit)`` candidates of
    ``task_types - excluded_types`` (SKIP LOCKED); when ``counted_types`` or an execution
    cap is involved, take a lock per counted type and per capped execution (PostgreSQL
    advisory transaction locks, in sorted order; SQLite's writer lock serializes anyway)
    and count LEASED rows; ``admit``; ``take_tokens``; lease what is left. If the
    transaction then fails, ``refund`` is awaited with what ``take_tokens`` returned."""

    excluded_types: frozenset[str]
    counted_types: frozenset[str]
    needs_input: bool

    def scan(self, limit: int) -> int:
        """How many candidates to look at for a claim of ``limit``."""
        ...

    def admit(
        self, candidates: Sequence[Candidate], counts: LeasedCounts, limit: int
    ) -> list[Admitted]:
        """The candidates (in order) that concurrency limits let through, at most limit."""
        ...

    async def take_tokens(self, admitted: Sequence[Admitted]) -> list[Admitted]:
        """Those of ``admitted`` the rate limits let through now (tokens taken)."""
        ...

    async def refund(self, taken: Sequence[Admitted]) -> None: ...

    @property
    def wait_hint(self) -> float | None:
        """After a claim that limits held back: seconds until trying again may succeed
        (a token, a breaker's probe), or None when only a lease ending can help."""
        ...


class LimitsStore(Protocol):
    """Task-type limits (coordinator/store/_limits.py)."""

    async def set_task_type_limits(self, limits: TaskTypeLimits, now: datetime) -> TaskTypeLimits:
        """Create or replace; returns the stored row (updated_at = now)."""
        ...

    async def get_task_type_limits(self, tenant_id: str, task_type: str) -> TaskTypeLimits:
        """Raises ``NotFound``."""
        ...

    async def list_task_type_limits(self, tenant_id: str | None) -> list[TaskTypeLimits]:
        """Ordered by (tenant, task type); every tenant's when ``tenant_id`` is None."""
        ...

    async def delete_task_type_limits(self, tenant_id: str, task_type: str) -> None:
        """Raises ``NotFound``."""
        ...


class Store(LimitsStore, Protocol):
    """Persistent state. Every method is tenant-scoped except the cross-tenant sweeps."""

    async def close(self) -> None: ...

    # -- wake-ups across replicas ---------------------------------------------------------
    async def publish_wakeups(self, keys: Sequence[str]) -> None:
        """Tell every replica (this one included) that work for these notifier keys may be
        ready. A store serving one process may do nothing."""
        ...

    async def listen_wakeups(self, on_keys: Callable[[list[str]], None]) -> None:
        """Start handing keys published by any replica to ``on_keys`` (``"*"`` means wake
        every listener) until the store closes."""
        ...

    # -- definitions ----------------------------------------------------------------------
    async def register_workflow(self, defn: WorkflowDef, now: datetime) -> tuple[WorkflowDef, bool]:
        """Store ``defn`` as the next version of its name, or return the existing version
        whose ``content_hash`` is equal (``created`` False). Safe under concurrency."""
        ...

    async def get_workflow(self, tenant_id: str, name: str, version: int | None) -> WorkflowDef:
        """The given version, or the latest when ``version`` is None. Raises ``NotFound``."""
        ...

    async def list_workflows(
        self, tenant_id: str, limit: int, after_name: str | None
    ) -> list[WorkflowSummary]: ...

    async def list_workflow_versions(self, tenant_id: str, name: str) -> list[WorkflowDef]: ...

    # -- executions -----------------------------------------------------------------------
    async def create_execution(
        self,
        transition: Transition,
        *,
        children: Sequence[Transition] = (),
        idempotency_cutoff: datetime | None = None,
    ) -> tuple[Execution, bool]:
        """Insert the execution, all its node runs and events, and ``children`` (child
        executions with theirs), in one transaction. When the execution's idempotency key is
        already used in its tenant by an execution created at or after
        ``idempotency_cutoff`` (any time when None), insert nothing and return that
        execution with ``created`` False; an older holder releases the key. Race-free."""
        ...

    async def create_executions(
        self, items: Sequence[NewExecution], *, idempotency_cutoff: datetime | None = None
    ) -> list[tuple[Execution, bool]]:
        """``create_execution`` for each item, in order, all in one transaction (a key
        repeated within ``items`` returns the execution its first use created)."""
        ...

    async def get_executions(self, tenant_id: str, ids: Sequence[str]) -> dict[str, Execution]:
        """The executions among ``ids`` that exist, by id."""
        ...

    async def get_node_outputs(
        self, tenant_id: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], bytes | None]:
        """The output of each existing node run ``(execution_id, node_id)`` in ``keys``."""
        ...

    async def get_execution(self, tenant_id: str, execution_id: str) -> Execution:
        """Raises ``NotFound``."""
        ...

    async def list_node_runs(self, tenant_id: str, execution_id: str) -> list[NodeRun]: ...

    async def list_executions(
        self,
        tenant_id: str,
        *,
        workflow_name: str | None,
        status: ExecutionStatus | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Execution]:
        """Newest first (created_at, id descending), strictly before the cursor when given."""
        ...

    async def list_events(
        self, tenant_id: str, execution_id: str, after_sequence: int, limit: int
    ) -> list[Event]: ...

    async def transact(
        self,
        tenant_id: str,
        execution_id: str,
        decide: Callable[[Execution, Mapping[str, NodeRun]], Decision[T]],
    ) -> T:
        """Load the execution and its node runs, call ``decide`` (pure), persist its transition
        atomically, including its ``dead_lettered`` nodes (a DeadLetter row each, with the
        node's input and its failures since its last redrive, from NODE_ATTEMPT_FAILED and
        NODE_TIMED_OUT events) and its ``redriven_dead_letter`` (stamped redriven_at; one
        already redriven raises ``FailedPrecondition``). On a version conflict, reload and
        call ``decide`` again (bounded). Raises ``NotFound`` for an unknown execution."""
        ...

    async def transact_many(
        self,
        items: Sequence[tuple[str, str, Callable[[Execution, Mapping[str, NodeRun]], Decision[T]]]],
    ) -> list[T | TrellisError] | None:
        """Group commit: ``transact`` for several (tenant, execution id, decide) in one
        database transaction, one commit for all. Per item, the result of its ``decide``, or
        the ``TrellisError`` it (or the execution lookup) raised, in which case that item
        wrote nothing. None when the group could not commit as one (a conflict, a lost
        race, the database): nothing was written, and the caller runs each on its own."""
        ...

    async def claim_transact(
        self,
        tenant_id: str,
        execution_id: str,
        decide: Callable[[Execution, Mapping[str, NodeRun]], Decision[T]],
    ) -> T | None:
        """``transact`` for a sweeper's claim: on PostgreSQL, when another transaction holds
        the execution row (``FOR UPDATE SKIP LOCKED``), or the execution does not exist,
        return None without calling ``decide``."""
        ...

    # -- control flow sweeps (any tenant) -------------------------------------------------
    async def find_due_executions(self, now: datetime, limit: int) -> list[Execution]:
        """PENDING executions whose ``start_at <= now`` (delayed starts now due)."""
        ...

    async def find_ended_children(self, limit: int) -> list[Execution]:
        """Finished child executions whose parent's workflow node still WAITs on them."""
        ...

    async def find_orphaned_children(self, limit: int) -> list[Execution]:
        """Unfinished child executions whose parent's workflow node no longer waits on them
        (the parent ended, or the node was cancelled or skipped)."""
        ...

    # -- leasing --------------------------------------------------------------------------
    async def claim_tasks(
        self,
        tenant_id: str,
        worker_id: str,
        task_types: Sequence[str],
        limit: int,
        now: datetime,
        policy: ClaimPolicy | None = None,
    ) -> list[NodeRun]:
        """Atomically lease up to ``limit`` READY, not held node runs of ``task_types`` whose
        ``available_at <= now``, in dispatch_rank order (priority with ageing), within the
        limits of ``policy`` and of each execution's max_concurrency (see ClaimPolicy).
        Claiming clears schedule_deadline and sets the worker's last_seen = now.
        Each becomes LEASED with attempt + 1, lease_seq + 1, worker_id, lease_deadline
        = now + start_to_close_timeout, heartbeat_deadline = now + heartbeat_timeout;
        a NODE_LEASED event is appended for each. Returns the leased rows."""
        ...

    async def next_available_at(
        self, tenant_id: str, task_types: Sequence[str], now: datetime
    ) -> datetime | None:
        """Earliest ``available_at`` in the future among READY rows of these types."""
        ...

    async def touch_leases(
        self, tenant_id: str, keys: Sequence[LeaseKey], now: datetime
    ) -> dict[LeaseKey, NodeRun | None]:
        """Extend heartbeat_deadline (now + heartbeat_timeout) of each key still LEASED with
        the same lease_seq; return the current row for every key (None if unknown)."""
        ...

    async def find_expired_leases(self, now: datetime, limit: int) -> list[NodeRun]:
        """LEASED rows (any tenant) whose lease_deadline or heartbeat_deadline < now."""
        ...

    async def find_unstarted_overdue(self, now: datetime, limit: int) -> list[NodeRun]:
        """READY, not held rows (any tenant) whose schedule_deadline < now."""
        ...

    async def find_overdue_executions(self, now: datetime, limit: int) -> list[Execution]:
        """Non-terminal executions (any tenant) whose deadline < now."""
        ...

    async def find_leases_of_lost_workers(self, cutoff: datetime, limit: int) -> list[NodeRun]:
        """LEASED rows (any tenant) whose worker (same tenant, registered) has
        last_seen < cutoff."""
        ...

    async def list_worker_leases(self, tenant_id: str, worker_id: str) -> list[NodeRun]:
        """LEASED rows currently held by this worker."""
        ...

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
        """Newest first (created_at, id descending), strictly before the cursor when given."""
        ...

    async def get_dead_letter(self, tenant_id: str, dead_letter_id: str) -> DeadLetter:
        """Raises ``NotFound``."""
        ...

    # -- workers --------------------------------------------------------------------------
    async def upsert_worker(self, worker: WorkerInfo) -> None: ...

    async def get_worker(self, tenant_id: str, worker_id: str) -> WorkerInfo:
        """The registered worker. Raises ``NotFound``."""
        ...

    async def touch_worker(self, tenant_id: str, worker_id: str, now: datetime) -> None:
        """Record that the worker is alive (last_seen = now); unknown workers are ignored."""
        ...
