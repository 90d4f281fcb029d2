"""The core every use case shares: definitions, the transaction loop (load → engine →
start children → persist in one store transaction) and what follows a commit (wake-ups,
sub-workflow follow-ups).

This module imports neither grpc nor SQLAlchemy: it talks to the ``Store`` protocol.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from coordinator import engine
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound, TrellisError
from coordinator.model import (
    NULL_JSON,
    EventType,
    Execution,
    NodeRun,
    NodeStatus,
    Transition,
    WorkflowDef,
    WorkflowSummary,
)
from coordinator.service._children import DefKey, Settled, settle_children
from coordinator.service._group import GroupCommit
from coordinator.service._notifier import Notifier, execution_key, task_key
from coordinator.service._references import check_references
from coordinator.service._rules import RuleBook, with_deliveries
from coordinator.service.ports import Decision, Store

if TYPE_CHECKING:
    from coordinator.dispatch import DispatchControl

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# One engine step over a loaded execution: (effective definition, execution, nodes, now) ->
# the transition, or None when there is nothing to do.
Step = Callable[[WorkflowDef, Execution, Mapping[str, NodeRun], datetime], Transition | None]

_EXECUTION_ENDED = frozenset(
    {
        EventType.EXECUTION_SUCCEEDED,
        EventType.EXECUTION_FAILED,
        EventType.EXECUTION_CANCELLED,
        EventType.EXECUTION_TIMED_OUT,
    }
)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ServiceSettings:
    max_payload_bytes: int = 1024 * 1024
    poll_max_wait: timedelta = timedelta(seconds=30)
    heartbeat_interval: timedelta = timedelta(seconds=5)
    # A poll hands out at most as many tasks as fit this reply size at the payload limit.
    max_reply_bytes: int = 64 * 1024 * 1024
    # A worker holding leases that sends no heartbeat (nor claims) for this long is lost:
    # its leases are failed (retryable) at once.
    worker_liveness_timeout: timedelta = timedelta(seconds=15)
    limits: engine.Limits = field(default_factory=engine.Limits)
    # Deepest nesting of sub-workflows (a root execution has depth 0).
    max_workflow_depth: int = 10
    # A repeated idempotency key within this window returns the first execution.
    idempotency_window: timedelta = timedelta(hours=24)


class CoordinatorCore:
    """State and plumbing shared by the use cases (see ``Coordinator``)."""

    def __init__(
        self,
        store: Store,
        settings: ServiceSettings | None = None,
        *,
        notifier: Notifier | None = None,
        clock: Clock = utcnow,
        dispatch: DispatchControl | None = None,
    ) -> None:
        self.store = store
        self.settings = settings or ServiceSettings()
        self.notifier = notifier or Notifier()
        self._clock = clock
        if dispatch is None:
            # Imported here: coordinator.dispatch builds on this package's ports.
            from coordinator.dispatch import DispatchControl, RedisLink

            dispatch = DispatchControl(store.limits, link=RedisLink(""), clock=clock)
        # Limits and breakers per task type; without Redis they are per process.
        self.dispatch = dispatch
        # Workers' results share transactions where a transaction's round trips cost more
        # than its statements (PostgreSQL); SQLite commits in microseconds, on the loop.
        self._group = GroupCommit(store) if getattr(store, "group_commit", False) else None
        self._definitions: dict[tuple[str, str, int], WorkflowDef] = {}
        # Notification rules per tenant: which deliveries an ending execution queues.
        self.rules = RuleBook(store.notifications, clock)
        self._draining = False

    # -- lifecycle ------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop handing out work: waiting polls return empty, new polls are refused."""
        self._draining = True
        self.notifier.close()

    @property
    def draining(self) -> bool:
        return self._draining

    def clock(self) -> datetime:
        return self._clock()

    # -- definitions ----------------------------------------------------------------------

    async def register_workflow(self, defn: WorkflowDef) -> tuple[WorkflowDef, bool]:
        engine.validate_definition(defn, self.settings.limits)
        await check_references(
            defn,
            lambda name, version: self.get_workflow(defn.tenant_id, name, version),
            self.settings.max_workflow_depth,
        )
        stored, created = await self.store.workflows.register_workflow(defn, self._clock())
        self._definitions[(stored.tenant_id, stored.name, stored.version)] = stored
        return stored, created

    async def get_workflow(self, tenant_id: str, name: str, version: int | None) -> WorkflowDef:
        if version is not None:
            cached = self._definitions.get((tenant_id, name, version))
            if cached is not None:
                return cached
        defn = await self.store.workflows.get_workflow(tenant_id, name, version)
        self._definitions[(tenant_id, defn.name, defn.version)] = defn
        return defn

    async def list_workflows(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[WorkflowSummary], str]:
        limit = clamp_page_size(page_size)
        rows = await self.store.workflows.list_workflows(tenant_id, limit + 1, page_token or None)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].name if more else "")

    async def list_workflow_versions(self, tenant_id: str, name: str) -> list[WorkflowDef]:
        versions = await self.store.workflows.list_workflow_versions(tenant_id, name)
        if not versions:
            raise NotFound(f"workflow '{name}' not found; register it first")
        return versions

    async def run_step(self, tenant_id: str, execution_id: str, step: Step) -> Transition | None:
        """Apply one engine step to an execution in a transaction; wake whoever it concerns."""
        return await self._transact(tenant_id, execution_id, step)

    async def _transact(
        self,
        tenant_id: str,
        execution_id: str,
        step: Step,
        *,
        defn: WorkflowDef | None = None,
        claim: bool = False,
        group: bool = False,
    ) -> Transition | None:
        """Load → ``step`` (with the effective definition) → start the children it asks for
        → persist the transition and the children in one store transaction → after commit,
        wake, cancel children, report to a parent. Child definitions are looked up outside
        the transaction: when ``step`` asks for one not yet known, the transaction ends
        without writing, the definition is read, and the step is decided again.

        ``claim``: a sweeper's claim (``Store.claim_transact``); None when skipped.
        ``group``: may share its database transaction with concurrent ones (``GroupCommit``)."""
        if defn is None:
            loaded = await self.store.executions.get_execution(tenant_id, execution_id)
            defn = await self.get_workflow(tenant_id, loaded.workflow_name, loaded.workflow_version)
        base = defn
        known: dict[DefKey, WorkflowDef | None] = {}
        rules = await self.rules.rules(tenant_id)
        while True:

            def decide(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[_Outcome]:
                now = self._clock()
                t = step(engine.effective_definition(base, execution), execution, nodes, now)
                if t is None:
                    return Decision(None, _Outcome())
                settled = settle_children(
                    base, t, nodes, now, known, self.settings.max_workflow_depth, new_id
                )
                if not isinstance(settled, Settled):
                    return Decision(None, _Outcome(missing=settled))
                done = with_deliveries(settled.transition, execution.status, rules)
                created = tuple(with_deliveries(c, None, rules) for c in settled.created)
                return Decision(
                    done,
                    _Outcome(done, created),
                    created=created,
                    # Published with the commit: no transaction of its own afterwards.
                    wake=tuple(self._wake_keys((done, *created))),
                )

            if claim:
                out = await self.store.executions.claim_transact(tenant_id, execution_id, decide)
                if out is None:
                    return None
            elif group and self._group is not None:
                out = await self._group.transact(tenant_id, execution_id, decide)
            else:
                out = await self.store.executions.transact(tenant_id, execution_id, decide)
            if out.missing:
                await self._resolve(tenant_id, out.missing, known)
                continue
            if out.transition is not None:
                await self._after_all([(out.transition, out.created)], published=True)
            return out.transition

    async def _settle(
        self,
        defn: WorkflowDef,
        transition: Transition,
        nodes: Mapping[str, NodeRun],
        now: datetime,
    ) -> Settled:
        """``settle_children`` outside a transaction, looking up definitions as needed."""
        known: dict[DefKey, WorkflowDef | None] = {}
        while True:
            settled = settle_children(
                defn, transition, nodes, now, known, self.settings.max_workflow_depth, new_id
            )
            if isinstance(settled, Settled):
                return settled
            await self._resolve(transition.execution.tenant_id, settled, known)

    async def _resolve(
        self, tenant_id: str, keys: Iterable[DefKey], known: dict[DefKey, WorkflowDef | None]
    ) -> None:
        for name, version in keys:
            try:
                known[(name, version)] = await self.get_workflow(tenant_id, name, version or None)
            except NotFound:
                known[(name, version)] = None

    # -- sub-workflows --------------------------------------------------------------------

    async def report_child_ended(self, child: Execution) -> bool:
        """Tell a child's parent that the child finished (``engine.child_ended``). False
        when the parent's node no longer waits on this child (already told, or cancelled)."""
        parent_id, node_id = child.parent_execution_id, child.parent_node_id
        if parent_id is None or node_id is None:
            return False

        def step(
            d: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
        ) -> Transition | None:
            node = nodes.get(node_id)
            if node is None or node.status is not NodeStatus.WAITING:
                return None
            if node.child_execution_id != child.id:
                return None
            return engine.child_ended(d, execution, nodes, node_id, child, now)

        return await self._transact(child.tenant_id, parent_id, step) is not None

    async def cancel_child(self, tenant_id: str, child_id: str) -> bool:
        """Cancel a child execution whose parent no longer waits on it (and, through its
        own transition, its children). False when it had already ended."""

        def step(
            d: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
        ) -> Transition | None:
            if execution.status.terminal:
                return None
            why = "cancelled because its parent execution no longer waits on it"
            return engine.cancel_execution(d, execution, nodes, why, now)

        return await self._transact(tenant_id, child_id, step) is not None

    # -- helpers --------------------------------------------------------------------------

    def _task_types(self, execution: Execution) -> set[str]:
        """The task types of an execution's definition, when it is cached (it is after any
        transition of the execution on this replica)."""
        defn = self._definitions.get(
            (execution.tenant_id, execution.workflow_name, execution.workflow_version)
        )
        if defn is None:
            return set()
        types = {n.task_type for n in defn.nodes if n.task_type}
        return types | {n.compensation_task_type for n in defn.nodes if n.compensation_task_type}

    def _wake_keys(self, done: Sequence[Transition]) -> list[str]:
        """Who the transitions in ``done`` concern: watchers of their executions, and polls
        for the task types they made ready or whose limited slots they freed."""
        keys = [execution_key(t.execution.id) for t in done]
        woken = {n.task_type for x in done for n in x.ready}
        # A lease that ended frees a slot of a concurrency-limited type (or a breaker's
        # probe): wake the polls waiting for it.
        for x in done:
            ended = [n for n in x.nodes if n.status is not NodeStatus.LEASED]
            woken.update(
                n.task_type
                for n in ended
                if self.dispatch.wakes_on_lease_end(x.execution.tenant_id, n.task_type)
            )
            if ended and x.execution.max_concurrency:
                # A slot of a capped execution may be free: its other READY nodes, of any
                # of its task types, may go now.
                woken.update(self._task_types(x.execution))
        keys.extend(task_key(t) for t in sorted(woken))
        return keys

    def check_payload(self, name: str, payload: bytes) -> bytes:
        """A JSON document within the size limit; empty means null."""
        if not payload:
            return NULL_JSON
        limit = self.settings.max_payload_bytes
        if len(payload) > limit:
            raise InvalidArgument(
                f"{name} is {len(payload)} bytes, over the {limit}-byte limit "
                "(TRELLIS_MAX_PAYLOAD_BYTES); pass large data by reference"
            )
        try:
            json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"{name} is not valid JSON: {exc}") from exc
        return payload

    async def _after(self, transition: Transition, created: Sequence[Transition] = ()) -> None:
        """After a commit: see ``_after_all``."""
        await self._after_all([(transition, tuple(created))])

    async def _after_all(
        self,
        items: Sequence[tuple[Transition, Sequence[Transition]]],
        *,
        published: bool = False,
    ) -> None:
        """After commits (a transition with the child executions it created, each): wake
        pollers for newly ready task types and watchers of the executions, here and (unless
        the transaction ``published`` them already) in one publish for all of ``items``, on
        every other replica; then cancel the children the transitions let go and tell the
        parent of an execution that ended. A failed publish or follow-up is logged (the
        sweepers reconcile sub-workflows after a crash too)."""
        done = [t for transition, created in items for t in (transition, *created)]
        keys = self._wake_keys(done)
        self.notifier.notify(keys)
        if not published:
            try:
                await self.store.wakeups.publish_wakeups(keys)
            except TrellisError as exc:
                log.warning("could not publish wake-ups to other replicas: %s", exc)
        for t in done:
            execution = t.execution
            try:
                for child_id in t.cancel_children:
                    await self.cancel_child(execution.tenant_id, child_id)
                if execution.parent_execution_id and any(
                    e.type in _EXECUTION_ENDED and e.execution_id == execution.id for e in t.events
                ):
                    await self.report_child_ended(execution)
            except (FailedPrecondition, NotFound) as exc:
                log.debug("sub-workflow follow-up settled meanwhile: %s", exc)
            except TrellisError as exc:
                log.warning(
                    "sub-workflow follow-up failed; the sweeper will retry: %s",
                    exc,
                    extra={"execution_id": execution.id},
                )


@dataclass(frozen=True)
class _Outcome:
    """What one ``_transact`` decision produced."""

    transition: Transition | None = None
    created: tuple[Transition, ...] = ()
    # Child definitions to look up before deciding again.
    missing: frozenset[DefKey] = frozenset()


def new_id() -> str:
    return str(uuid.uuid4())


def check_names(**values: str | Sequence[str] | None) -> None:
    """Identifiers from clients must not carry NUL characters (stores differ on them)."""
    for name, value in values.items():
        items = [value] if isinstance(value, str) else list(value or ())
        if any("\x00" in item for item in items):
            raise InvalidArgument(f"{name} contains a NUL character; remove it")


def clamp_page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(requested or 100, 1000)
