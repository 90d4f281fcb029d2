"""Starting executions: now, delayed (a PENDING row a sweeper starts), or many at once;
within the workflow's max_running_executions (the overflow queue, docs/dispatch.md)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from coordinator import engine
from coordinator.errors import InvalidArgument, NotFound, ResourceExhausted, TrellisError
from coordinator.model import (
    CappedStart,
    ErrorInfo,
    Event,
    EventType,
    Execution,
    ExecutionStatus,
    NewExecution,
    OverflowPolicy,
    PendingStart,
    RunningCap,
    Transition,
    WorkflowDef,
    running_cap,
)
from coordinator.service._backpressure import StartRate
from coordinator.service._children import ends_execution
from coordinator.service._common import Clock, ServiceSettings, check_names
from coordinator.service._definitions import Definitions
from coordinator.service._schemas import batch_budget, check_input
from coordinator.service._starts import (
    MAX_BATCH_START,
    StartRequest,
    execution_concurrency,
    start_at,
)
from coordinator.service._transactions import Transactions
from coordinator.service.ports import ExecutionRepository, QueueRepository

log = logging.getLogger(__name__)

# Queued executions one pass looks at per workflow.
QUEUED_BATCH = 100


class Starts:
    """Starting executions. ``start_rate`` limits how many starts are admitted per second
    (None: no limit)."""

    def __init__(
        self,
        executions: ExecutionRepository,
        queue: QueueRepository,
        transactions: Transactions,
        definitions: Definitions,
        settings: ServiceSettings,
        clock: Clock,
        *,
        start_rate: StartRate | None = None,
    ) -> None:
        self._executions = executions
        self._queue = queue
        self._tx = transactions
        self._definitions = definitions
        self._settings = settings
        self._clock = clock
        self._start_rate = start_rate
        # (tenant, workflow) whose queue this replica is starting right now (see
        # ``start_freed``).
        self._kicking: set[tuple[str, str]] = set()

    async def start_execution(
        self,
        tenant_id: str,
        workflow_name: str,
        version: int | None,
        input: bytes,
        *,
        idempotency_key: str | None = None,
        priority: int = 0,
        start_time: datetime | None = None,
        delay: timedelta | None = None,
        max_concurrency: int = 0,
        rate_limited: bool = True,
    ) -> tuple[Execution, bool]:
        """Start an execution now, or store it PENDING until ``start_time`` / ``delay``
        (a sweeper starts it then). A repeated ``idempotency_key`` within the idempotency
        window returns the execution it first started (``created`` False). When the
        workflow has max_running_executions running, the execution is queued (PENDING,
        ``queued``) or refused (``ResourceExhausted``), as its overflow policy says.
        ``rate_limited``: counted against ``start_rate`` (a client's start; triggers
        are not)."""
        request = StartRequest(
            workflow_name,
            version,
            input,
            idempotency_key,
            priority,
            start_time,
            delay,
            max_concurrency,
        )
        if rate_limited and self._start_rate is not None:
            self._start_rate.take(1)
        now = self._clock()
        start = await self._prepare(tenant_id, request, now)
        [(execution, created)] = await self._create([start], now)
        if created:
            await self._started(start, execution)
        return execution, created

    async def batch_start_executions(
        self, tenant_id: str, requests: Sequence[StartRequest]
    ) -> list[tuple[Execution, bool]]:
        """Start every request, or none: all are validated (definition, input, options)
        before anything is stored, then all are stored in one transaction (a start its
        workflow's max_running_executions refuses refuses the batch). Results are in
        request order; idempotency keys behave as in ``start_execution``."""
        if len(requests) > MAX_BATCH_START:
            raise InvalidArgument(
                f"{len(requests)} requests in one batch, over the limit of {MAX_BATCH_START}; "
                "split the batch"
            )
        if self._start_rate is not None:
            self._start_rate.take(len(requests))
        now = self._clock()
        starts: list[CappedStart] = []
        # One lookup per workflow for the whole batch (the latest version is a database read).
        defs: dict[tuple[str, int | None], WorkflowDef] = {}
        with batch_budget():
            for i, request in enumerate(requests):
                try:
                    starts.append(await self._prepare(tenant_id, request, now, defs))
                except (InvalidArgument, NotFound) as exc:
                    raise InvalidArgument(f"requests[{i}]: {exc}; nothing was started") from exc
        if not starts:
            return []
        try:
            results = await self._create(starts, now)
        except ResourceExhausted as exc:
            raise ResourceExhausted(
                f"{exc}; nothing was started", retry_after=exc.retry_after
            ) from exc
        await self._started_all(
            [
                (start, execution)
                for start, (execution, created) in zip(starts, results, strict=True)
                if created
            ]
        )
        return results

    async def _prepare(
        self,
        tenant_id: str,
        request: StartRequest,
        now: datetime,
        defs: dict[tuple[str, int | None], WorkflowDef] | None = None,
    ) -> CappedStart:
        """Validate a start and decide it (with the children it starts), storing nothing.
        ``defs``: definitions already looked up for this batch, by (name, version asked)."""
        payload = self._settings.check_payload("input", request.input)
        if not request.workflow_name:
            raise InvalidArgument("workflow_name is required")
        check_names(workflow_name=request.workflow_name, idempotency_key=request.idempotency_key)
        at = start_at(request, now)
        asked = (request.workflow_name, request.workflow_version)
        defn = None if defs is None else defs.get(asked)
        if defn is None:
            defn = await self._definitions.get_workflow(tenant_id, *asked)
            if defs is not None:
                defs[asked] = defn
        await check_input(defn, payload)
        shell = Execution(
            id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            workflow_name=defn.name,
            workflow_version=defn.version,
            status=ExecutionStatus.PENDING,
            input=payload,
            created_at=now,
            updated_at=now,
            priority=request.priority,
            idempotency_key=request.idempotency_key or None,
            start_at=at,
            max_concurrency=execution_concurrency(request, defn),
        )
        if at is not None:
            # Delayed: a PENDING row with no node runs until the sweeper starts it (within
            # the cap then, see ``start_pending``).
            return CappedStart(NewExecution(Transition(execution=shell)))
        transition = engine.start_execution(engine.effective_definition(defn, shell), shell, now)
        item = await self._tx.new_execution(defn, transition, now)
        cap = running_cap(defn)
        if cap is None:
            return CappedStart(item)
        return CappedStart(item, cap, Transition(execution=replace(shell, queued=True)))

    async def _create(
        self, starts: Sequence[CappedStart], now: datetime
    ) -> list[tuple[Execution, bool]]:
        cutoff = now - self._settings.idempotency_window
        if any(s.cap is not None for s in starts):
            return await self._queue.create_capped_executions(starts, idempotency_cutoff=cutoff)
        # No cap: no counting, no lock.
        return await self._executions.create_executions(
            [s.item for s in starts], idempotency_cutoff=cutoff
        )

    async def _started(self, start: CappedStart, execution: Execution) -> None:
        await self._started_all([(start, execution)])

    async def _started_all(self, started: Sequence[tuple[CappedStart, Execution]]) -> None:
        """After the commit of new executions: one round of wake-ups for all of them."""
        done: list[tuple[Transition, Sequence[Transition]]] = []
        for start, execution in started:
            if execution.queued and start.queued is not None:
                done.append((start.queued, ()))
                log.info(
                    "execution queued: its workflow has max_running_executions running",
                    extra={"execution_id": execution.id, "workflow": execution.workflow_name},
                )
                continue
            done.append((start.item.transition, start.item.children))
            log.info(
                "execution started" if execution.start_at is None else "execution scheduled",
                extra={"execution_id": execution.id, "workflow": execution.workflow_name},
            )
        if done:
            await self._tx.committed(
                [t for transition, created in done for t in (transition, *created)]
            )

    # -- PENDING executions: delayed starts due, and the overflow queue -------------------

    async def start_delayed(self, execution: Execution) -> bool:
        """Start a delayed execution that is due (a sweeper's claim: on PostgreSQL a row
        another replica is starting is skipped); when its workflow is full, queue or
        refuse it as the overflow policy says. False when nothing was done."""
        outcome = await self.start_pending(execution)
        return outcome in (PendingStart.STARTED, PendingStart.DEFERRED)

    async def start_pending(self, execution: Execution) -> PendingStart:
        """Start a PENDING execution (a delayed start that is due, or a queued one) as read
        in ``execution``: skipped when the row has changed since, or another transaction
        holds it. Under max_running_executions the workflow's running executions are
        counted in the transaction that starts it; when there is no room, a queued one
        stays queued (FULL), a delayed one is queued or, with REJECT, fails (DEFERRED)."""
        defn = await self._definitions.get_workflow(
            execution.tenant_id, execution.workflow_name, execution.workflow_version
        )
        now = self._clock()
        shell = replace(execution, queued=False)
        transition = engine.start_execution(engine.effective_definition(defn, shell), shell, now)
        item = await self._tx.new_execution(defn, transition, now)
        cap = running_cap(defn)
        when_full = None if cap is None or execution.queued else _when_full(execution, cap, now)
        if when_full is not None:  # REJECT fails the execution: its notifications go with it
            when_full = await self._tx.ending(when_full, execution)
        outcome = await self._queue.start_pending(execution, item, cap, when_full)
        if outcome is PendingStart.STARTED:
            await self._tx.committed([item.transition, *item.children])
        elif outcome is PendingStart.DEFERRED and when_full is not None:
            await self._tx.committed([when_full])
        return outcome

    async def start_queued(
        self, tenant_id: str, workflow_name: str, limit: int = QUEUED_BATCH
    ) -> int:
        """Start the workflow's queued executions, oldest first, while it has room; returns
        how many started. Safe on every replica at once (see ``start_pending``)."""
        queued = await self._queue.find_queued_executions(tenant_id, workflow_name, limit)
        if not queued:
            return 0
        defn = await self._definitions.get_workflow(
            tenant_id, workflow_name, queued[0].workflow_version
        )
        cap = running_cap(defn)
        if cap is not None:
            # A cheap look first: a full workflow costs no write transaction.
            running = await self._queue.count_running(tenant_id, workflow_name)
            if running >= cap.max_running:
                return 0
        started = 0
        self._kicking.add((tenant_id, workflow_name))
        try:
            for execution in queued:
                outcome = await self.start_pending(execution)
                if outcome is PendingStart.FULL:
                    break
                if outcome is PendingStart.STARTED:
                    started += 1
                    log.info(
                        "queued execution started",
                        extra={"execution_id": execution.id, "workflow": workflow_name},
                    )
        finally:
            self._kicking.discard((tenant_id, workflow_name))
        return started

    async def find_queued_workflows(
        self, limit: int, after: tuple[str, str] | None = None
    ) -> list[tuple[str, str]]:
        """(tenant, workflow) pairs with queued executions, in order, after ``after``
        (the sweeper's step pages through them)."""
        return await self._queue.find_queued_workflows(limit, after)

    async def start_freed(self, done: Sequence[Transition], *, published: bool) -> None:
        """After a commit: when a transition ended an execution of a workflow with
        max_running_executions, its oldest queued execution starts at once here (the
        sweeper does it within a sweep interval otherwise: after a crash, or when the ended
        execution's version has no cap but the queued one's has)."""
        for tenant_id, workflow_name in self._freed(done):
            try:
                await self.start_queued(tenant_id, workflow_name)
            except TrellisError as exc:
                log.warning(
                    "could not start queued executions; the sweeper will: %s",
                    exc,
                    extra={"workflow": workflow_name},
                )

    def _freed(self, done: Sequence[Transition]) -> list[tuple[str, str]]:
        """Capped workflows (by their cached definition) that ``done`` ended an execution of."""
        freed: list[tuple[str, str]] = []
        for t in done:
            e = t.execution
            if not e.status.terminal or not ends_execution(t):
                continue
            defn = self._definitions.cached(e.tenant_id, e.workflow_name, e.workflow_version)
            key = (e.tenant_id, e.workflow_name)
            if (
                defn is not None
                and defn.max_running_executions > 0
                and key not in freed
                and key not in self._kicking
            ):
                freed.append(key)
        return freed


def _when_full(execution: Execution, cap: RunningCap, now: datetime) -> Transition:
    """What a delayed start that is due finds its workflow full does: wait in the queue
    (QUEUE), or fail (REJECT)."""
    if cap.policy is OverflowPolicy.QUEUE:
        return Transition(execution=replace(execution, queued=True, updated_at=now))
    error = ErrorInfo(
        "MaxRunningExecutions",
        f"workflow '{execution.workflow_name}' had max_running_executions "
        f"({cap.max_running}) running when this execution was due to start; it was refused "
        "(overflow_policy REJECT)",
    )
    return failed_start(execution, error, now)


def failed_start(execution: Execution, error: ErrorInfo, now: datetime) -> Transition:
    """An execution refused as it was due to start: FAILED with ``error``, and its event."""
    failed = replace(
        execution, status=ExecutionStatus.FAILED, error=error, ended_at=now, updated_at=now
    )
    event = Event(
        execution_id=execution.id,
        type=EventType.EXECUTION_FAILED,
        time=now,
        tenant_id=execution.tenant_id,
        details=json.dumps(
            {"error_type": error.type, "message": error.message, "node_id": None},
            separators=(",", ":"),
        ).encode(),
    )
    return Transition(execution=failed, events=(event,))
