"""The memory store's one shared state: tables of rows, their indexes, the lock and the
journal that makes a write all or nothing.

Every repository method runs under ``State.lock`` (an ``asyncio.Lock``), so each is atomic
as a database transaction is: only the claim awaits inside it (its policy's tokens), and
nothing else runs meanwhile. A write runs in ``State.write()``: each ``Table.put`` or
``Table.delete`` records how to undo itself, and an exception rolls every change of the
method back before it propagates (a refused redrive, a taken id, a full workflow under
REJECT), as a rolled-back transaction would.

Rows are frozen dataclasses, stored as converted by ``_copies`` (times truncated to the
millisecond, as the SQL store stores them), so callers never hold a reference into the
state that they could change.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from coordinator.model import (
    DEFAULT_TENANT,
    AuditEntry,
    AuditRecord,
    Channel,
    Credential,
    DeadLetter,
    Delivery,
    Event,
    EventTrigger,
    Execution,
    ExecutionStatus,
    NodeRun,
    NodeStatus,
    NotificationRule,
    Role,
    Schedule,
    ScheduleFire,
    SecretEntry,
    TaskTypeLimits,
    Tenant,
    WebhookTrigger,
    WorkerInfo,
    WorkflowDef,
)
from coordinator.service.ports import PENDING_AUDIT, take_pending_audit
from coordinator.store import _rows

K = TypeVar("K")
V = TypeVar("V")

# (execution id, node id)
NodeKey = tuple[str, str]


class Journal:
    """Undo records of the write under way (None outside a write)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] | None = None

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """All the changes made inside, or (on an exception) none of them."""
        if self._undo is not None:
            yield  # part of the enclosing write
            return
        self._undo = []
        try:
            yield
        except BaseException:
            for undo in reversed(self._undo):
                undo()
            raise
        finally:
            self._undo = None

    def record(self, undo: Callable[[], None]) -> None:
        if self._undo is not None:
            self._undo.append(undo)


class Table(Generic[K, V]):
    """Rows by primary key. Changes are journaled, and reported to ``on_change`` (old row,
    new row; None for none) so that the state keeps its indexes."""

    def __init__(
        self, journal: Journal, on_change: Callable[[K, V | None, V | None], None] | None = None
    ) -> None:
        self._rows: dict[K, V] = {}
        self._journal = journal
        self._on_change = on_change

    def get(self, key: K) -> V | None:
        return self._rows.get(key)

    def __contains__(self, key: K) -> bool:
        return key in self._rows

    def values(self) -> list[V]:
        return list(self._rows.values())

    def items(self) -> list[tuple[K, V]]:
        return list(self._rows.items())

    def put(self, key: K, row: V) -> None:
        old = self._rows.get(key)
        self._set(key, row)
        self._journal.record(lambda: self._set(key, old))

    def delete(self, key: K) -> V | None:
        old = self._rows.get(key)
        if old is not None:
            self._set(key, None)
            self._journal.record(lambda: self._set(key, old))
        return old

    def _set(self, key: K, row: V | None) -> None:
        old = self._rows.pop(key, None)
        if row is not None:
            self._rows[key] = row
        if self._on_change is not None:
            self._on_change(key, old, row)


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A node run with the columns the model does not carry: its dispatch rank (available_at
    - priority * ageing, in ms; None unless READY-able) and the concurrency key written when
    it was last leased."""

    run: NodeRun
    rank: int | None
    concurrency_key: str | None = None


@dataclass(frozen=True, slots=True)
class DefinitionRow:
    """A registered definition and the content hash it was registered with (the SQL store
    keeps the registering definition's hash in a column, not the stored copy's)."""

    defn: WorkflowDef
    content_hash: str


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    """A delivery (its ``history``: the attempts recorded) and its claim's lease."""

    delivery: Delivery
    updated_at: datetime
    claimed_until: datetime | None = None


R = TypeVar("R", bound="_Listed")


class _Listed(Protocol):
    @property
    def created_at(self) -> datetime: ...
    @property
    def id(self) -> str: ...


def newest_first(rows: list[R], before: tuple[datetime, str] | None, limit: int) -> list[R]:
    """A page of ``rows``: newest first (created_at, id descending), strictly before the
    cursor when given."""
    if before is not None:
        cursor = (_rows.from_ms(_rows.to_ms(before[0])), before[1])
        rows = [r for r in rows if (r.created_at, r.id) < cursor]
    rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    return rows[:limit]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


_LIVE = frozenset({ExecutionStatus.PENDING, ExecutionStatus.RUNNING, ExecutionStatus.PAUSED})


class State:
    """Every table of the store and the indexes its queries use, behind one lock."""

    def __init__(self, priority_aging_ms: int = _rows.DEFAULT_PRIORITY_AGING_MS) -> None:
        self.lock = asyncio.Lock()
        self.journal = Journal()
        # Dispatch order with ageing: a priority step is worth this much waiting.
        self.priority_aging_ms = priority_aging_ms
        self._sequence = itertools.count(1)
        j = self.journal
        # -- indexes (kept by the tables' change hooks) --
        # (tenant, name) -> version -> content hash
        self.versions: dict[tuple[str, str], dict[int, str]] = {}
        # (tenant, idempotency key) -> execution id
        self.idempotency: dict[tuple[str, str], str] = {}
        # status -> execution ids
        self.by_status: dict[ExecutionStatus, set[str]] = {s: set() for s in ExecutionStatus}
        # execution id -> its node ids
        self.node_ids: dict[str, set[str]] = {}
        # (tenant, task type) -> READY rows that are not held
        self.ready: dict[tuple[str, str], set[NodeKey]] = {}
        self.leased: set[NodeKey] = set()
        self.waiting: set[NodeKey] = set()
        # execution id -> its event sequences, increasing
        self.event_seqs: dict[str, list[int]] = {}
        # -- tables --
        self.workflows: Table[tuple[str, str, int], DefinitionRow] = Table(j, self._on_workflow)
        self.executions: Table[str, Execution] = Table(j, self._on_execution)
        self.nodes: Table[NodeKey, NodeRow] = Table(j, self._on_node)
        self.events: Table[int, Event] = Table(j, self._on_event)
        self.dead_letters: Table[str, DeadLetter] = Table(j)
        self.workers: Table[tuple[str, str], WorkerInfo] = Table(j)
        self.limits: Table[tuple[str, str], TaskTypeLimits] = Table(j)
        self.webhooks: Table[tuple[str, str], WebhookTrigger] = Table(j)
        # (tenant, delivery digest) -> when the record expires
        self.webhook_replays: Table[tuple[str, str], datetime] = Table(j)
        self.event_triggers: Table[str, EventTrigger] = Table(j)
        self.schedules: Table[tuple[str, str], Schedule] = Table(j)
        # (tenant, schedule id, fire time)
        self.fires: Table[tuple[str, str, datetime], ScheduleFire] = Table(j)
        self.channels: Table[str, Channel] = Table(j)
        self.rules: Table[str, NotificationRule] = Table(j)
        self.deliveries: Table[str, DeliveryRow] = Table(j)
        self.tenants: Table[str, Tenant] = Table(j)
        self.credentials: Table[str, Credential] = Table(j)
        self.roles: Table[tuple[str, str], Role] = Table(j)
        self.server_secrets: Table[str, str] = Table(j)
        self.secrets: Table[tuple[str, str], SecretEntry] = Table(j)
        # (tenant, seq) -> record; tenant -> its chain's head: (last seq, last hash)
        self.audit_records: Table[tuple[str, int], AuditRecord] = Table(j)
        self.audit_heads: Table[str, tuple[int, str]] = Table(j)
        # The tenant every call acted in before authentication (the SQL store's migration
        # 0007 inserts it too).
        self.tenants.put(DEFAULT_TENANT, Tenant(DEFAULT_TENANT, _rows.from_ms(_now_ms())))

    # -- transactions ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        """A consistent view: no write is half done while it lasts."""
        async with self.lock:
            yield

    @contextlib.asynccontextmanager
    async def write(self, *, audit: bool = True) -> AsyncIterator[None]:
        """An atomic write: on an exception every change made inside is undone.

        A write that completes also appends the served call's pending audit entry
        (``PENDING_AUDIT``, see ``AuditRepository``), as part of the same atomic change, as
        the SQL store does just before a commit. ``audit=False``: leave it to another write
        (an append of its own, bookkeeping that is not the call's effect)."""
        async with self.lock:
            with self.journal.atomic():
                yield
                # One ContextVar lookup when no call is being audited.
                if audit and PENDING_AUDIT.get() is not None:
                    entry = take_pending_audit()
                    if entry is not None:
                        self.append_audit(entry, _now_ms())

    def append_audit(self, entry: AuditEntry, at_ms: int) -> AuditRecord:
        """Append ``entry`` to its tenant's chain (inside a write)."""
        seq, prev_hash = self.audit_heads.get(entry.tenant_id) or (0, "")
        record = _rows.audit_record(entry, seq=seq + 1, prev_hash=prev_hash, at_ms=at_ms)
        self.audit_records.put((entry.tenant_id, record.seq), record)
        self.audit_heads.put(entry.tenant_id, (record.seq, record.hash))
        return record

    def next_sequence(self) -> int:
        """The next event sequence number (never reused, even by a rolled-back write)."""
        return next(self._sequence)

    # -- lookups --------------------------------------------------------------------------

    def execution(self, tenant_id: str, execution_id: str) -> Execution | None:
        found = self.executions.get(execution_id)
        return found if found is not None and found.tenant_id == tenant_id else None

    def node_rows(self, execution_id: str) -> list[NodeRow]:
        """The execution's node runs, by node id."""
        ids = sorted(self.node_ids.get(execution_id, ()))
        return [row for i in ids if (row := self.nodes.get((execution_id, i))) is not None]

    def executions_in(self, statuses: frozenset[ExecutionStatus] = _LIVE) -> list[Execution]:
        return [
            e
            for status in statuses
            for i in self.by_status[status]
            if (e := self.executions.get(i)) is not None
        ]

    def leased_rows(self) -> list[NodeRow]:
        return [row for key in self.leased if (row := self.nodes.get(key)) is not None]

    # -- index hooks ----------------------------------------------------------------------

    def _on_workflow(
        self, key: tuple[str, str, int], old: DefinitionRow | None, new: DefinitionRow | None
    ) -> None:
        tenant, name, version = key
        versions = self.versions.setdefault((tenant, name), {})
        if new is None:
            versions.pop(version, None)
        else:
            versions[version] = new.content_hash

    def _on_execution(self, key: str, old: Execution | None, new: Execution | None) -> None:
        if old is not None:
            self.by_status[old.status].discard(key)
            if old.idempotency_key is not None:
                ref = (old.tenant_id, old.idempotency_key)
                if self.idempotency.get(ref) == key:
                    del self.idempotency[ref]
        if new is not None:
            self.by_status[new.status].add(key)
            if new.idempotency_key is not None:
                self.idempotency[(new.tenant_id, new.idempotency_key)] = key

    def _on_node(self, key: NodeKey, old: NodeRow | None, new: NodeRow | None) -> None:
        if old is not None:
            self._unindex_node(key, old.run)
        if new is not None:
            run = new.run
            self.node_ids.setdefault(key[0], set()).add(key[1])
            if run.status is NodeStatus.READY and not run.held:
                self.ready.setdefault((run.tenant_id, run.task_type), set()).add(key)
            elif run.status is NodeStatus.LEASED:
                self.leased.add(key)
            elif run.status is NodeStatus.WAITING:
                self.waiting.add(key)

    def _unindex_node(self, key: NodeKey, run: NodeRun) -> None:
        ids = self.node_ids.get(key[0])
        if ids is not None:
            ids.discard(key[1])
        ready = self.ready.get((run.tenant_id, run.task_type))
        if ready is not None:
            ready.discard(key)
        self.leased.discard(key)
        self.waiting.discard(key)

    def _on_event(self, key: int, old: Event | None, new: Event | None) -> None:
        if old is not None:
            self.event_seqs[old.execution_id].remove(key)
        if new is not None:
            # Sequences are handed out increasing, and an undo removes the newest first.
            self.event_seqs.setdefault(new.execution_id, []).append(key)
