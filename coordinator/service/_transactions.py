"""The one owner of "load → engine → persist": every transition of an execution goes
through ``Transactions.run``, and everything that follows a commit runs from the ordered
list ``Transactions.after_commit`` (wired in the composition root, ``Coordinator``).

``run`` loads the execution and its node runs in a store transaction, calls the step (the
engine, with ``now`` and the effective definition), starts the child executions the
transition asks for (``settle_children``), adds the notifications of an execution it ends
(``with_deliveries``), and persists all of it in that one transaction with the wake-ups
for other replicas. Child definitions are looked up outside the transaction: when the step
asks for one not yet known, the transaction ends without writing, the definition is read,
and the step is decided again. The step's own result comes back as a value (``Verdict``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from coordinator import engine
from coordinator.errors import NotFound, TrellisError
from coordinator.model import (
    Execution,
    NewExecution,
    NodeRun,
    NodeStatus,
    Transition,
    WorkflowDef,
)
from coordinator.service._children import DefKey, Settled, settle_children
from coordinator.service._common import Clock, ServiceSettings, new_id
from coordinator.service._definitions import Definitions
from coordinator.service._group import GroupCommit
from coordinator.service._notifier import Notifier, execution_key, task_key
from coordinator.service._rules import RuleBook, with_deliveries
from coordinator.service.ports import Decision, DispatchPolicy, ExecutionRepository, WakeupChannel

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Verdict(Generic[T]):
    """What a step decided: the transition to persist (None: nothing to do) and a value
    for its caller (a duplicate result, the task type that was held ...)."""

    transition: Transition | None
    value: T


# One engine step over a loaded execution: (effective definition, execution, nodes, now).
Step = Callable[[WorkflowDef, Execution, Mapping[str, NodeRun], datetime], Verdict[T]]
TransitionStep = Callable[
    [WorkflowDef, Execution, Mapping[str, NodeRun], datetime], Transition | None
]


@dataclass(frozen=True)
class Applied(Generic[T]):
    """A committed (or empty) run: the transition, the child executions it created, and the
    step's value."""

    transition: Transition | None
    value: T
    created: tuple[Transition, ...] = ()


class AfterCommit(Protocol):
    """One step of what follows a commit, given the transitions just committed (each
    transition, then the child executions it created). ``published``: the wake-ups for
    other replicas went with the commit already."""

    async def __call__(self, done: Sequence[Transition], *, published: bool) -> None: ...


@dataclass
class _Pending:
    """What one decision in ``run`` produced (the store hands back the decision's result)."""

    applied: Applied[object] | None = None
    missing: frozenset[DefKey] = field(default_factory=frozenset)


class WakeKeys:
    """Who the transitions concern: watchers of their executions, and polls for the task
    types they made ready or whose limited slots they freed."""

    def __init__(self, definitions: Definitions, dispatch: DispatchPolicy) -> None:
        self._definitions = definitions
        self._dispatch = dispatch

    def __call__(self, done: Sequence[Transition]) -> list[str]:
        keys = [execution_key(t.execution.id) for t in done]
        woken = {n.task_type for x in done for n in x.ready}
        # A lease that ended frees a slot of a concurrency-limited type (or a breaker's
        # probe): wake the polls waiting for it.
        for x in done:
            ended = [n for n in x.nodes if n.status is not NodeStatus.LEASED]
            woken.update(
                n.task_type
                for n in ended
                if self._dispatch.wakes_on_lease_end(x.execution.tenant_id, n.task_type)
            )
            if ended and x.execution.max_concurrency:
                # A slot of a capped execution may be free: its other READY nodes, of any
                # of its task types, may go now.
                woken.update(self._definitions.task_types(x.execution))
        keys.extend(task_key(t) for t in sorted(woken))
        return keys


class WakeUp:
    """After a commit: wake pollers and watchers here, and (unless the transaction carried
    them) on every other replica in one publish."""

    def __init__(self, keys: WakeKeys, notifier: Notifier, wakeups: WakeupChannel) -> None:
        self._keys = keys
        self._notifier = notifier
        self._wakeups = wakeups

    async def __call__(self, done: Sequence[Transition], *, published: bool) -> None:
        keys = self._keys(done)
        self._notifier.notify(keys)
        if not published:
            try:
                await self._wakeups.publish_wakeups(keys)
            except TrellisError as exc:
                log.warning("could not publish wake-ups to other replicas: %s", exc)


class Transactions:
    def __init__(
        self,
        store: ExecutionRepository,
        definitions: Definitions,
        rules: RuleBook,
        wake_keys: WakeKeys,
        settings: ServiceSettings,
        clock: Clock,
        *,
        group: GroupCommit | None = None,
    ) -> None:
        self._store = store
        self._definitions = definitions
        self._rules = rules
        self._wake_keys = wake_keys
        self._settings = settings
        self._clock = clock
        self._group = group
        # What follows every commit, in order (the composition root sets it).
        self.after_commit: tuple[AfterCommit, ...] = ()

    async def run(
        self,
        tenant_id: str,
        execution_id: str,
        step: Step[T],
        *,
        defn: WorkflowDef | None = None,
        claim: bool = False,
        group: bool = False,
    ) -> Applied[T] | None:
        """Load → ``step`` → persist, then ``after_commit`` (see the module doc).

        ``defn``: the execution's definition when the caller knows it (saves a read).
        ``claim``: a sweeper's claim (``claim_transact``); None when another replica holds
        the execution or it is gone. ``group``: may share its database transaction with
        concurrent ones (``GroupCommit``)."""
        if defn is None:
            defn = await self._definitions.of(
                await self._store.get_execution(tenant_id, execution_id)
            )
        base = defn
        known: dict[DefKey, WorkflowDef | None] = {}
        rules = await self._rules.rules(tenant_id)
        while True:

            def decide(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[_Pending]:
                now = self._clock()
                verdict = step(engine.effective_definition(base, execution), execution, nodes, now)
                t = verdict.transition
                if t is None:
                    return Decision(None, _Pending(Applied(None, verdict.value)))
                settled = settle_children(
                    base, t, nodes, now, known, self._settings.max_workflow_depth, new_id
                )
                if not isinstance(settled, Settled):
                    return Decision(None, _Pending(missing=settled))
                done = with_deliveries(settled.transition, execution.status, rules)
                created = tuple(with_deliveries(c, None, rules) for c in settled.created)
                return Decision(
                    done,
                    _Pending(Applied(done, verdict.value, created)),
                    created=created,
                    # Published with the commit: no transaction of its own afterwards.
                    wake=tuple(self._wake_keys((done, *created))),
                )

            if claim:
                out = await self._store.claim_transact(tenant_id, execution_id, decide)
                if out is None:
                    return None
            elif group and self._group is not None:
                out = await self._group.transact(tenant_id, execution_id, decide)
            else:
                out = await self._store.transact(tenant_id, execution_id, decide)
            if out.missing:
                await self._resolve(tenant_id, out.missing, known)
                continue
            applied = out.applied
            assert applied is not None
            if applied.transition is not None:
                await self.committed([applied.transition, *applied.created], published=True)
            return applied  # type: ignore[return-value]

    async def run_step(
        self, tenant_id: str, execution_id: str, step: TransitionStep, *, claim: bool = False
    ) -> Transition | None:
        """``run`` for a step that is just an engine call: the transition, or None."""

        def verdict(
            d: WorkflowDef, e: Execution, n: Mapping[str, NodeRun], now: datetime
        ) -> Verdict[None]:
            return Verdict(step(d, e, n, now), None)

        applied = await self.run(tenant_id, execution_id, verdict, claim=claim)
        return None if applied is None else applied.transition

    async def committed(self, done: Sequence[Transition], *, published: bool = False) -> None:
        """Run every ``after_commit`` step, in order, for transitions just committed. A step
        that fails is logged; the next ones still run (sweepers reconcile after a crash)."""
        for after in self.after_commit:
            try:
                await after(done, published=published)
            except TrellisError as exc:
                log.warning("a step after a commit failed; the sweepers will retry: %s", exc)

    async def new_execution(
        self, defn: WorkflowDef, transition: Transition, now: datetime
    ) -> NewExecution:
        """A start transition with the children it starts, and the notifications of any of
        them that ends at once: what to insert (nothing is stored here)."""
        settled = await self.settle(defn, transition, {}, now)
        rules = await self._rules.rules(transition.execution.tenant_id)
        return NewExecution(
            with_deliveries(settled.transition, None, rules),
            tuple(with_deliveries(c, None, rules) for c in settled.created),
        )

    async def ending(self, transition: Transition, before: Execution) -> Transition:
        """``transition`` with the notifications of the execution it ends (it was
        ``before``), for a transition persisted outside ``run``."""
        rules = await self._rules.rules(before.tenant_id)
        return with_deliveries(transition, before.status, rules)

    async def settle(
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
                defn, transition, nodes, now, known, self._settings.max_workflow_depth, new_id
            )
            if isinstance(settled, Settled):
                return settled
            await self._resolve(transition.execution.tenant_id, settled, known)

    async def _resolve(
        self, tenant_id: str, keys: Iterable[DefKey], known: dict[DefKey, WorkflowDef | None]
    ) -> None:
        for name, version in keys:
            try:
                known[(name, version)] = await self._definitions.get_workflow(
                    tenant_id, name, version or None
                )
            except NotFound:
                known[(name, version)] = None
