"""Use cases. Each is: load under lock → engine → persist, in one store transaction.

This module imports neither grpc nor SQLAlchemy: it talks to the ``Store`` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from coordinator import engine
from coordinator.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TrellisError,
    Unavailable,
)
from coordinator.model import (
    COMPENSATION_SUFFIX,
    NULL_JSON,
    DeadLetter,
    ErrorInfo,
    Event,
    Execution,
    ExecutionStatus,
    NodeRun,
    NodeStatus,
    Transition,
    WorkerInfo,
    WorkflowDef,
    compose_object,
)
from coordinator.service._core import (
    Clock,
    ServiceSettings,
    Step,
    check_names,
    clamp_page_size,
    utcnow,
)
from coordinator.service._notifier import execution_key, task_key
from coordinator.service._starting import ExecutionStarts
from coordinator.service._tokens import LeaseToken
from coordinator.service.ports import ClaimPolicy

__all__ = [
    "MAX_REPORT_BATCH",
    "Clock",
    "Completion",
    "Coordinator",
    "ExecutionView",
    "Failure",
    "HeartbeatResult",
    "LeasedTask",
    "ResultOutcome",
    "ServiceSettings",
    "Step",
    "utcnow",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeasedTask:
    """A claimed node run as handed to a worker."""

    token: str
    node: NodeRun
    config: bytes
    # The execution's context: when it started, its input, and the outputs of the node's
    # parents as a JSON object (parent id -> output; null for a parent without one).
    execution_start_time: datetime | None = None
    execution_input: bytes = NULL_JSON
    parent_outputs: bytes = b"{}"


@dataclass(frozen=True)
class HeartbeatResult:
    cancelled: tuple[str, ...]
    lost: tuple[str, ...]


@dataclass(frozen=True)
class Completion:
    """A worker's result: the attempt succeeded (see ``Coordinator.complete_task``)."""

    token: str
    output: bytes
    next: Sequence[str] | None = None
    expansion: engine.Expansion | None = None


@dataclass(frozen=True)
class Failure:
    """A worker's result: the attempt failed (see ``Coordinator.fail_task``)."""

    token: str
    error: ErrorInfo
    retryable: bool


@dataclass(frozen=True)
class ResultOutcome:
    """What became of one result of a batch: accepted (``error`` None) or refused."""

    duplicate: bool = False
    will_retry: bool = False
    error: Exception | None = None


# Most results one ReportResults call may carry.
MAX_REPORT_BATCH = 1000


@dataclass(frozen=True)
class ExecutionView:
    execution: Execution
    nodes: tuple[NodeRun, ...]


class Coordinator(ExecutionStarts):
    """The coordinator's use cases, shared by every gRPC servicer and the sweepers."""

    async def get_execution(self, tenant_id: str, execution_id: str) -> ExecutionView:
        execution = await self.store.executions.get_execution(tenant_id, execution_id)
        nodes = await self.store.executions.list_node_runs(tenant_id, execution_id)
        defn = await self.get_workflow(
            tenant_id, execution.workflow_name, execution.workflow_version
        )
        order = {n.id: i for i, n in enumerate(engine.effective_definition(defn, execution).nodes)}
        nodes.sort(key=lambda n: order.get(n.node_id, len(order)))
        return ExecutionView(execution, tuple(nodes))

    async def list_executions(
        self,
        tenant_id: str,
        *,
        workflow_name: str | None,
        status: ExecutionStatus | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Execution], str]:
        limit = clamp_page_size(page_size)
        before = _decode_cursor(page_token) if page_token else None
        rows = await self.store.executions.list_executions(
            tenant_id, workflow_name=workflow_name, status=status, limit=limit + 1, before=before
        )
        more = len(rows) > limit
        rows = rows[:limit]
        token = _encode_cursor(rows[-1]) if more else ""
        return rows, token

    async def watch_execution(
        self, tenant_id: str, execution_id: str, after_sequence: int, *, fallback: float = 2.0
    ) -> AsyncIterator[Event | Execution]:
        """Yield events after ``after_sequence``; end with the execution once it is terminal.

        Woken by in-process notifications; ``fallback`` bounds the wait so events written
        by another replica are seen too.
        """
        await self.store.executions.get_execution(tenant_id, execution_id)  # NotFound early
        after = after_sequence
        seen: set[int] = set()
        with self.notifier.listen([execution_key(execution_id)]) as wake:
            while True:
                wake.clear()
                events = await self.store.executions.list_events(
                    tenant_id, execution_id, after, 500
                )
                for event in events:
                    after = max(after, event.sequence)
                    seen.add(event.sequence)
                    yield event
                if len(events) == 500:
                    continue
                execution = await self.store.executions.get_execution(tenant_id, execution_id)
                if execution.status.terminal:
                    # Sequences are assigned at insert and become visible at commit, so an
                    # event of a concurrent claim may appear below one already sent: once the
                    # execution has ended (nothing more can commit), send any such stragglers.
                    for event in await self.store.executions.list_events(
                        tenant_id, execution_id, after_sequence, 1_000_000
                    ):
                        if event.sequence not in seen:
                            yield event
                    yield execution
                    return
                if self._draining:
                    raise Unavailable("coordinator is shutting down; watch again to resume")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), fallback)

    # -- workers --------------------------------------------------------------------------

    async def register_worker(
        self,
        tenant_id: str,
        worker_id: str,
        task_types: Sequence[str],
        capacity: int,
        *,
        labels: Mapping[str, str] | None = None,
        sdk_language: str = "",
        sdk_version: str = "",
        identity: str = "",
    ) -> str:
        if not task_types:
            raise InvalidArgument("task_types is empty; name at least one task type to serve")
        check_names(worker_id=worker_id, task_types=task_types, identity=identity)
        worker_id = worker_id or str(uuid.uuid4())
        now = self._clock()
        try:
            known = await self.store.workers.get_worker(tenant_id, worker_id)
        except NotFound:
            pass
        else:
            alive = now - known.last_seen < self.settings.worker_liveness_timeout
            if alive and identity and known.identity and known.identity != identity:
                raise FailedPrecondition(
                    f"worker id '{worker_id}' is in use by {known.identity} (seen "
                    f"{(now - known.last_seen).total_seconds():.0f}s ago); give each worker "
                    "process its own worker_id"
                )
        await self.store.workers.upsert_worker(
            WorkerInfo(
                id=worker_id,
                tenant_id=tenant_id,
                task_types=tuple(task_types),
                capacity=max(capacity, 1),
                last_seen=now,
                labels=dict(labels or {}),
                sdk_language=sdk_language,
                sdk_version=sdk_version,
                identity=identity,
            )
        )
        return worker_id

    async def poll_tasks(
        self,
        tenant_id: str,
        worker_id: str,
        task_types: Sequence[str],
        max_tasks: int,
        wait: timedelta,
    ) -> list[LeasedTask]:
        """Long-poll: claim up to ``max_tasks``; if none, sleep until woken or ``wait`` ends."""
        max_tasks = self._check_claim(worker_id, task_types, max_tasks, "poll")
        if self._draining:
            raise Unavailable("coordinator is shutting down; reconnect to another replica")
        wait = min(wait, self.settings.poll_max_wait)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait.total_seconds(), 0.0)
        with self.notifier.listen(task_key(t) for t in task_types) as wake:
            while True:
                wake.clear()
                claimed, plan, now = await self._claim(tenant_id, worker_id, task_types, max_tasks)
                if claimed:
                    return await self._leased(tenant_id, claimed)
                remaining = deadline - loop.time()
                if remaining <= 0 or self._draining:
                    return []
                if plan.wait_hint is not None:
                    # A rate limit's next token, or an open breaker's probe time.
                    remaining = min(remaining, max(plan.wait_hint, 0.001))
                next_at = await self.store.leases.next_available_at(tenant_id, task_types, now)
                if next_at is not None:
                    remaining = min(remaining, max((next_at - now).total_seconds(), 0.001))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), remaining)

    def _check_claim(
        self, worker_id: str, task_types: Sequence[str], max_tasks: int, what: str
    ) -> int:
        """Validate a claim's arguments; the number of tasks one reply may carry."""
        if not task_types:
            raise InvalidArgument(f"task_types is empty; name at least one task type to {what}")
        if not worker_id:
            raise InvalidArgument(f"worker_id is required for {what}; call RegisterWorker first")
        check_names(worker_id=worker_id, task_types=task_types)
        fit = self.settings.max_reply_bytes // (2 * self.settings.max_payload_bytes)
        return max(1, min(max_tasks, 1000, fit))

    async def _claim(
        self, tenant_id: str, worker_id: str, task_types: Sequence[str], max_tasks: int
    ) -> tuple[list[NodeRun], ClaimPolicy, datetime]:
        """One claim within the dispatch limits: the rows leased, the plan, the time."""
        plan = await self.dispatch.plan(tenant_id, task_types)
        now = self._clock()
        claimed = await self.store.leases.claim_tasks(
            tenant_id, worker_id, task_types, max_tasks, now, plan
        )
        return claimed, plan, now

    async def _leased(self, tenant_id: str, claimed: Sequence[NodeRun]) -> list[LeasedTask]:
        """The claimed rows with their configuration and execution context (two reads for
        the whole poll: the executions, and the outputs of the nodes' parents)."""
        executions = await self.store.executions.get_executions(
            tenant_id, sorted({n.execution_id for n in claimed})
        )
        parents: dict[tuple[str, str], tuple[str, ...]] = {}
        specs: dict[tuple[str, str], bytes] = {}
        for node in claimed:
            execution = executions.get(node.execution_id)
            defn = await self.get_workflow(
                node.tenant_id, node.workflow_name, node.workflow_version
            )
            if execution is not None:
                defn = engine.effective_definition(defn, execution)
            # A compensation run gets the configuration of the node it undoes; an element
            # of a map node that of the map node.
            spec_id = _spec_id(node.node_id)
            spec = defn.node_map.get(spec_id)
            specs[(node.execution_id, node.node_id)] = spec.config if spec else b""
            parents[(node.execution_id, node.node_id)] = defn.parents.get(spec_id, ())
        outputs = await self.store.executions.get_node_outputs(
            tenant_id,
            sorted({(k[0], p) for k, ps in parents.items() for p in ps}),
        )
        tasks = []
        for node in claimed:
            key = (node.execution_id, node.node_id)
            token = LeaseToken(
                node.execution_id,
                node.node_id,
                node.lease_seq,
                node.workflow_name,
                node.workflow_version,
            )
            execution = executions.get(node.execution_id)
            tasks.append(
                LeasedTask(
                    token.encode(),
                    node,
                    specs[key],
                    execution_start_time=None
                    if execution is None
                    else execution.start_at or execution.created_at,
                    execution_input=NULL_JSON if execution is None else execution.input,
                    parent_outputs=compose_object(
                        [(p, outputs.get((node.execution_id, p))) for p in parents[key]]
                    ),
                )
            )
        return tasks

    async def heartbeat(
        self, tenant_id: str, worker_id: str, tokens: Sequence[str]
    ) -> HeartbeatResult:
        """Extend the leases the worker reports; say which it must drop. A lease this worker
        holds but no longer reports (its poll reply was lost, say) is failed for a retry."""
        decoded = {t: LeaseToken.decode(t) for t in tokens}
        now = self._clock()
        if worker_id:
            await self.store.workers.touch_worker(tenant_id, worker_id, now)
            await self._release_unreported(tenant_id, worker_id, decoded.values(), now)
        if not decoded:
            return HeartbeatResult((), ())
        rows = await self.store.leases.touch_leases(
            tenant_id, [d.key for d in decoded.values()], now
        )
        cancelled: list[str] = []
        lost: list[str] = []
        for raw, token in decoded.items():
            row = rows.get(token.key)
            if row is not None and row.lease_seq == token.lease_seq:
                if row.status is NodeStatus.LEASED:
                    continue
                if row.status is NodeStatus.CANCELLED:
                    cancelled.append(raw)
                    continue
            lost.append(raw)
        return HeartbeatResult(tuple(cancelled), tuple(lost))

    async def _release_unreported(
        self, tenant_id: str, worker_id: str, reported: Iterable[LeaseToken], now: datetime
    ) -> None:
        held = {(t.execution_id, t.node_id, t.lease_seq) for t in reported}
        # A lease claimed just now may not be in a heartbeat that was already on its way.
        grace = 2 * self.settings.heartbeat_interval + timedelta(seconds=2)
        for node in await self.store.leases.list_worker_leases(tenant_id, worker_id):
            if (node.execution_id, node.node_id, node.lease_seq) in held:
                continue
            if node.lease_deadline is None:
                continue
            leased_at = node.lease_deadline - node.start_to_close_timeout
            if now - leased_at < grace:
                continue
            error = ErrorInfo(
                "LeaseNotHeld",
                f"worker '{worker_id}' no longer reports this lease in its heartbeats "
                "(its poll reply was probably lost)",
            )
            if await self.fail_lease(node, error, retryable=True):
                log.warning(
                    "lease not reported by its worker; released for a retry",
                    extra={
                        "execution_id": node.execution_id,
                        "node_id": node.node_id,
                        "attempt": node.attempt,
                        "worker_id": worker_id,
                    },
                )

    async def complete_task(
        self,
        tenant_id: str,
        token_text: str,
        output: bytes,
        worker_id: str = "",
        *,
        next: Sequence[str] | None = None,
        expansion: engine.Expansion | None = None,
    ) -> bool:
        """Record a result, with the children to take (``next``) and nodes to add
        (``expansion``). Returns True when it was a duplicate of an accepted result. A bad
        ``next`` or ``expansion`` raises InvalidArgument and changes nothing (the lease is
        still held)."""
        duplicate, _ = await self._complete(
            tenant_id, token_text, output, next=next, expansion=expansion
        )
        return duplicate

    async def complete_and_lease(
        self,
        tenant_id: str,
        token_text: str,
        output: bytes,
        worker_id: str,
        task_types: Sequence[str],
        max_next: int,
        *,
        next: Sequence[str] | None = None,
        expansion: engine.Expansion | None = None,
    ) -> tuple[bool, list[LeasedTask]]:
        """``complete_task``, then eager dispatch (``_eager``) for the same worker. The result
        is committed first: a failure to lease is logged and leases nothing."""
        self._check_claim(worker_id, task_types, 1, "eager dispatch")
        duplicate, transition = await self._complete(
            tenant_id, token_text, output, next=next, expansion=expansion
        )
        return duplicate, await self._eager(
            tenant_id, worker_id, task_types, max_next, [transition]
        )

    async def report_results(
        self,
        tenant_id: str,
        worker_id: str,
        results: Sequence[Completion | Failure | TrellisError],
        task_types: Sequence[str] = (),
        max_next: int = 0,
    ) -> tuple[list[ResultOutcome], list[LeasedTask]]:
        """Several results at once, each handled as ``complete_task`` or ``fail_task`` handles
        it. They run concurrently, so on PostgreSQL they share group commits. A refused result
        does not refuse the others: each outcome carries its own error (an error in
        ``results`` stands for a result that could not be decoded: it is its outcome). Then
        eager dispatch (``_eager``) for the batch, after every result is committed."""
        if len(results) > MAX_REPORT_BATCH:
            raise InvalidArgument(
                f"{len(results)} results in one batch; send at most {MAX_REPORT_BATCH} per call"
            )
        if max_next > 0:
            self._check_claim(worker_id, task_types, 1, "eager dispatch")
        transitions: list[Transition | None] = []
        first: dict[str, int] = {}
        for index, result in enumerate(results):
            if not isinstance(result, TrellisError):
                first.setdefault(result.token, index)

        async def one(index: int, result: Completion | Failure | TrellisError) -> ResultOutcome:
            try:
                if isinstance(result, TrellisError):
                    raise result
                if first[result.token] != index:
                    raise InvalidArgument(
                        f"results[{index}] reports the lease of results[{first[result.token]}] "
                        "again; report each lease once per batch"
                    )
                if isinstance(result, Completion):
                    duplicate, transition = await self._complete(
                        tenant_id,
                        result.token,
                        result.output,
                        next=result.next,
                        expansion=result.expansion,
                    )
                    transitions.append(transition)
                    return ResultOutcome(duplicate=duplicate)
                will_retry, duplicate = await self.fail_task(
                    tenant_id, result.token, result.error, result.retryable
                )
                return ResultOutcome(duplicate=duplicate, will_retry=will_retry)
            except TrellisError as exc:
                return ResultOutcome(error=exc)
            except Exception as exc:  # one result's fault must not lose the others' replies
                log.exception("reporting a result failed", extra={"worker_id": worker_id})
                return ResultOutcome(error=exc)

        outcomes = await asyncio.gather(*(one(i, r) for i, r in enumerate(results)))
        return list(outcomes), await self._eager(
            tenant_id, worker_id, task_types, max_next, transitions
        )

    async def _eager(
        self,
        tenant_id: str,
        worker_id: str,
        task_types: Sequence[str],
        max_next: int,
        transitions: Iterable[Transition | None],
    ) -> list[LeasedTask]:
        """Eager dispatch: when the ``transitions`` (just committed results) made tasks of
        ``task_types`` ready (the successors in a chain or a fan-out), lease up to
        ``max_next`` ready tasks to the worker at once. A failure to lease leases nothing."""
        made_ready = any(
            t is not None and any(n.task_type in task_types for n in t.ready) for t in transitions
        )
        if not made_ready or max_next <= 0 or self._draining:
            # Independent tasks are better served by the worker's polls, which lease many
            # per claim; an eager claim per completion would cost one claim per task.
            return []
        try:
            max_next = self._check_claim(worker_id, task_types, max_next, "eager dispatch")
            claimed, _, _ = await self._claim(tenant_id, worker_id, task_types, max_next)
            return await self._leased(tenant_id, claimed) if claimed else []
        except TrellisError as exc:
            log.debug("eager dispatch skipped: %s", exc)
            return []

    async def _complete(
        self,
        tenant_id: str,
        token_text: str,
        output: bytes,
        *,
        next: Sequence[str] | None,
        expansion: engine.Expansion | None,
    ) -> tuple[bool, Transition | None]:
        token = LeaseToken.decode(token_text)
        payload = self.check_payload("output", output)
        defn = await self.get_workflow(tenant_id, token.workflow_name, token.workflow_version)
        taken = None if next is None else tuple(next)
        duplicate = False
        task_type = ""

        def step(
            d: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
        ) -> Transition | None:
            nonlocal duplicate, task_type
            held = _held_node(nodes, token, accept_done=_SUCCESS_RECORDED)
            duplicate = held is None
            if held is None:
                return None
            task_type = held.task_type
            return engine.complete_node(
                d, execution, nodes, token.node_id, payload, now, next=taken, expansion=expansion
            )

        transition = await self._transact(
            tenant_id, token.execution_id, step, defn=defn, group=True
        )
        if not duplicate:
            await self.dispatch.record_outcome(tenant_id, task_type, ok=True)
        return duplicate, transition

    async def fail_task(
        self, tenant_id: str, token_text: str, error: ErrorInfo, retryable: bool
    ) -> tuple[bool, bool]:
        """Record a failed attempt. Returns ``(will_retry, duplicate)``."""
        token = LeaseToken.decode(token_text)
        if error.details:
            self.check_payload("error.details", error.details)
        # Error text is copied into events, the execution and dead letters: keep it bounded.
        error = replace(
            error,
            type=_clip(error.type, MAX_ERROR_TYPE),
            message=_clip(error.message, MAX_ERROR_MESSAGE),
        )
        defn = await self.get_workflow(tenant_id, token.workflow_name, token.workflow_version)
        return await self._fail(tenant_id, defn, token, error, retryable)

    async def _fail(
        self,
        tenant_id: str,
        defn: WorkflowDef,
        token: LeaseToken,
        error: ErrorInfo,
        retryable: bool,
    ) -> tuple[bool, bool]:
        will_retry = duplicate = False
        task_type = ""

        def step(
            d: WorkflowDef, execution: Execution, nodes: Mapping[str, NodeRun], now: datetime
        ) -> Transition | None:
            nonlocal will_retry, duplicate, task_type
            node = _held_node(nodes, token, accept_done=_FAILURE_RECORDED)
            duplicate, will_retry = node is None, False
            if node is None:
                return None
            full = replace(
                error, node_id=node.node_id, attempt=node.attempt, worker_id=node.worker_id
            )
            t = engine.fail_node(d, execution, nodes, token.node_id, full, retryable, now)
            changed = next(n for n in t.nodes if n.node_id == token.node_id)
            will_retry = changed.status is NodeStatus.READY
            task_type = node.task_type
            return t

        await self._transact(tenant_id, token.execution_id, step, defn=defn, group=True)
        if not duplicate and error.type not in _NOT_THE_TYPES_FAULT:
            await self.dispatch.record_outcome(tenant_id, task_type, ok=False)
        return will_retry, duplicate

    async def fail_lease(self, node: NodeRun, error: ErrorInfo, retryable: bool) -> bool:
        """Fail the attempt ``node`` currently holds (a sweeper's verdict). False when the
        lease changed meanwhile (completed, or already failed by another replica)."""
        token = LeaseToken(
            node.execution_id,
            node.node_id,
            node.lease_seq,
            node.workflow_name,
            node.workflow_version,
        )
        defn = await self.get_workflow(node.tenant_id, node.workflow_name, node.workflow_version)
        try:
            await self._fail(node.tenant_id, defn, token, error, retryable)
        except (FailedPrecondition, NotFound):
            return False
        return True

    # -- operators ------------------------------------------------------------------------

    async def cancel_execution(
        self, tenant_id: str, execution_id: str, reason: str
    ) -> ExecutionView:
        why = reason or "cancelled by request"
        await self.run_step(
            tenant_id, execution_id, lambda d, e, n, now: engine.cancel_execution(d, e, n, why, now)
        )
        return await self.get_execution(tenant_id, execution_id)

    async def cancel_node(
        self, tenant_id: str, execution_id: str, node_id: str, reason: str
    ) -> ExecutionView:
        why = reason or "cancelled by request"
        await self.run_step(
            tenant_id,
            execution_id,
            lambda d, e, n, now: engine.cancel_node(d, e, n, node_id, why, now),
        )
        return await self.get_execution(tenant_id, execution_id)

    async def pause_execution(self, tenant_id: str, execution_id: str) -> ExecutionView:
        await self.run_step(tenant_id, execution_id, engine.pause_execution)
        return await self.get_execution(tenant_id, execution_id)

    async def resume_execution(self, tenant_id: str, execution_id: str) -> ExecutionView:
        await self.run_step(tenant_id, execution_id, engine.resume_execution)
        return await self.get_execution(tenant_id, execution_id)

    async def pause_node(self, tenant_id: str, execution_id: str, node_id: str) -> ExecutionView:
        await self.run_step(
            tenant_id, execution_id, lambda d, e, n, now: engine.pause_node(d, e, n, node_id, now)
        )
        return await self.get_execution(tenant_id, execution_id)

    async def resume_node(self, tenant_id: str, execution_id: str, node_id: str) -> ExecutionView:
        await self.run_step(
            tenant_id, execution_id, lambda d, e, n, now: engine.resume_node(d, e, n, node_id, now)
        )
        return await self.get_execution(tenant_id, execution_id)

    async def list_dead_letters(
        self,
        tenant_id: str,
        *,
        workflow_name: str | None,
        task_type: str | None,
        include_redriven: bool,
        page_size: int,
        page_token: str,
    ) -> tuple[list[DeadLetter], str]:
        limit = clamp_page_size(page_size)
        rows = await self.store.dead_letters.list_dead_letters(
            tenant_id,
            workflow_name=workflow_name,
            task_type=task_type,
            include_redriven=include_redriven,
            limit=limit + 1,
            before=_decode_cursor(page_token) if page_token else None,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (_cursor(rows[-1].created_at, rows[-1].id) if more else "")

    async def get_dead_letter(self, tenant_id: str, dead_letter_id: str) -> DeadLetter:
        return await self.store.dead_letters.get_dead_letter(tenant_id, dead_letter_id)

    async def redrive_dead_letter(self, tenant_id: str, dead_letter_id: str) -> ExecutionView:
        """Run the dead-lettered node again with a fresh attempt budget; the execution rolls
        forward from there (finished nodes are not run again)."""
        letter = await self.store.dead_letters.get_dead_letter(tenant_id, dead_letter_id)
        if letter.redriven_at is not None:
            raise FailedPrecondition(
                f"dead letter '{dead_letter_id}' was already redriven at "
                f"{letter.redriven_at.isoformat()}"
            )
        await self.run_step(
            tenant_id,
            letter.execution_id,
            lambda d, e, n, now: engine.redrive(d, e, n, letter.node_id, letter.id, now),
        )
        log.info(
            "dead letter redriven",
            extra={"execution_id": letter.execution_id, "node_id": letter.node_id},
        )
        return await self.get_execution(tenant_id, letter.execution_id)


def _spec_id(node_id: str) -> str:
    """The definition node a run belongs to: ``"m[3]"`` (a map element) -> ``"m"``, a
    compensation run -> the node it undoes."""
    node_id = node_id.removesuffix(COMPENSATION_SUFFIX)
    if node_id.endswith("]") and "[" in node_id:
        return node_id[: node_id.rindex("[")]
    return node_id


# Failed attempts a task type's breaker does not count: the worker went away, or its poll
# reply was lost; the handler itself did not fail.
_NOT_THE_TYPES_FAULT = frozenset({"WorkerLost", "LeaseNotHeld", "LeaseRevoked"})

# After a recorded failure the row is READY (retry scheduled) or FAILED, with the same
# lease_seq until the next claim and the error of that attempt.
_FAILURE_RECORDED = frozenset({NodeStatus.READY, NodeStatus.FAILED})
_SUCCESS_RECORDED = frozenset({NodeStatus.SUCCEEDED})


def _held_node(
    nodes: Mapping[str, NodeRun], token: LeaseToken, accept_done: frozenset[NodeStatus]
) -> NodeRun | None:
    """The node the token still leases, None for a duplicate of the result that ended the
    lease (its status is in ``accept_done``), else raise FailedPrecondition."""
    node = nodes.get(token.node_id)
    if node is None:
        raise NotFound(f"node '{token.node_id}' not found in execution '{token.execution_id}'")
    if node.lease_seq == token.lease_seq:
        if node.status is NodeStatus.LEASED:
            return node
        failed_here = node.error is not None and node.error.attempt == node.attempt
        if node.status in accept_done and (node.status is NodeStatus.SUCCEEDED or failed_here):
            return None
    raise FailedPrecondition(
        f"lease on node '{token.node_id}' of execution '{token.execution_id}' is no longer held "
        f"(node is {node.status.value}, attempt {node.attempt}); drop this result"
    )


MAX_ERROR_TYPE = 256
MAX_ERROR_MESSAGE = 8192


_CLIPPED = " …(truncated)"


def _clip(text: str, limit: int) -> str:
    """Bounded error text without NUL characters (which PostgreSQL text cannot hold)."""
    text = text.replace("\x00", "")
    return text if len(text) <= limit else text[: limit - len(_CLIPPED)] + _CLIPPED


def _encode_cursor(execution: Execution) -> str:
    return _cursor(execution.created_at, execution.id)


def _cursor(created_at: datetime, ident: str) -> str:
    return f"{int(created_at.timestamp() * 1000)}:{ident}"


def _decode_cursor(token: str) -> tuple[datetime, str]:
    try:
        ms, _, ident = token.partition(":")
        return datetime.fromtimestamp(int(ms) / 1000, UTC), ident
    except ValueError as exc:
        raise InvalidArgument("page_token is malformed; pass next_page_token unchanged") from exc
