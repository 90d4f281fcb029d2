"""Use cases. Each is: load under lock → engine → persist, in one store transaction.

This module imports neither grpc nor SQLAlchemy: it talks to the ``Store`` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
    WorkflowSummary,
)
from coordinator.service._notifier import Notifier, execution_key, task_key
from coordinator.service._tokens import LeaseToken
from coordinator.service.ports import Decision, Store

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# One engine step over a loaded execution: (definition, execution, nodes, now) -> Transition.
Step = Callable[[WorkflowDef, Execution, Mapping[str, NodeRun], datetime], Transition]


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


@dataclass(frozen=True)
class LeasedTask:
    """A claimed node run as handed to a worker."""

    token: str
    node: NodeRun
    config: bytes


@dataclass(frozen=True)
class HeartbeatResult:
    cancelled: tuple[str, ...]
    lost: tuple[str, ...]


@dataclass(frozen=True)
class ExecutionView:
    execution: Execution
    nodes: tuple[NodeRun, ...]


class Coordinator:
    """The coordinator's use cases, shared by every gRPC servicer and the sweepers."""

    def __init__(
        self,
        store: Store,
        settings: ServiceSettings | None = None,
        *,
        notifier: Notifier | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.store = store
        self.settings = settings or ServiceSettings()
        self.notifier = notifier or Notifier()
        self._clock = clock
        self._definitions: dict[tuple[str, str, int], WorkflowDef] = {}
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
        stored, created = await self.store.register_workflow(defn, self._clock())
        self._definitions[(stored.tenant_id, stored.name, stored.version)] = stored
        return stored, created

    async def get_workflow(self, tenant_id: str, name: str, version: int | None) -> WorkflowDef:
        if version is not None:
            cached = self._definitions.get((tenant_id, name, version))
            if cached is not None:
                return cached
        defn = await self.store.get_workflow(tenant_id, name, version)
        self._definitions[(tenant_id, defn.name, defn.version)] = defn
        return defn

    async def list_workflows(
        self, tenant_id: str, page_size: int, page_token: str
    ) -> tuple[list[WorkflowSummary], str]:
        limit = _page_size(page_size)
        rows = await self.store.list_workflows(tenant_id, limit + 1, page_token or None)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].name if more else "")

    async def list_workflow_versions(self, tenant_id: str, name: str) -> list[WorkflowDef]:
        versions = await self.store.list_workflow_versions(tenant_id, name)
        if not versions:
            raise NotFound(f"workflow '{name}' not found; register it first")
        return versions

    # -- executions -----------------------------------------------------------------------

    async def start_execution(
        self,
        tenant_id: str,
        workflow_name: str,
        version: int | None,
        input: bytes,
        *,
        idempotency_key: str | None = None,
        priority: int = 0,
    ) -> tuple[Execution, bool]:
        payload = self.check_payload("input", input)
        if not workflow_name:
            raise InvalidArgument("workflow_name is required")
        _check_names(workflow_name=workflow_name, idempotency_key=idempotency_key)
        defn = await self.get_workflow(tenant_id, workflow_name, version)
        now = self._clock()
        shell = Execution(
            id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            workflow_name=defn.name,
            workflow_version=defn.version,
            status=ExecutionStatus.PENDING,
            input=payload,
            created_at=now,
            updated_at=now,
            priority=priority,
            idempotency_key=idempotency_key or None,
        )
        transition = engine.start_execution(defn, shell, now)
        execution, created = await self.store.create_execution(transition)
        if created:
            await self._after(transition)
            log.info(
                "execution started",
                extra={"execution_id": execution.id, "workflow": defn.name},
            )
        return execution, created

    async def get_execution(self, tenant_id: str, execution_id: str) -> ExecutionView:
        execution = await self.store.get_execution(tenant_id, execution_id)
        nodes = await self.store.list_node_runs(tenant_id, execution_id)
        defn = await self.get_workflow(
            tenant_id, execution.workflow_name, execution.workflow_version
        )
        order = {n.id: i for i, n in enumerate(defn.nodes)}
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
        limit = _page_size(page_size)
        before = _decode_cursor(page_token) if page_token else None
        rows = await self.store.list_executions(
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
        await self.store.get_execution(tenant_id, execution_id)  # NotFound early
        after = after_sequence
        seen: set[int] = set()
        with self.notifier.listen([execution_key(execution_id)]) as wake:
            while True:
                wake.clear()
                events = await self.store.list_events(tenant_id, execution_id, after, 500)
                for event in events:
                    after = max(after, event.sequence)
                    seen.add(event.sequence)
                    yield event
                if len(events) == 500:
                    continue
                execution = await self.store.get_execution(tenant_id, execution_id)
                if execution.status.terminal:
                    # Sequences are assigned at insert and become visible at commit, so an
                    # event of a concurrent claim may appear below one already sent: once the
                    # execution has ended (nothing more can commit), send any such stragglers.
                    for event in await self.store.list_events(
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
        _check_names(worker_id=worker_id, task_types=task_types, identity=identity)
        worker_id = worker_id or str(uuid.uuid4())
        now = self._clock()
        try:
            known = await self.store.get_worker(tenant_id, worker_id)
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
        await self.store.upsert_worker(
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
        if not task_types:
            raise InvalidArgument("task_types is empty; name at least one task type to poll")
        if not worker_id:
            raise InvalidArgument("worker_id is required; call RegisterWorker first")
        _check_names(worker_id=worker_id, task_types=task_types)
        if self._draining:
            raise Unavailable("coordinator is shutting down; reconnect to another replica")
        fit = self.settings.max_reply_bytes // (2 * self.settings.max_payload_bytes)
        max_tasks = max(1, min(max_tasks, 1000, fit))
        wait = min(wait, self.settings.poll_max_wait)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait.total_seconds(), 0.0)
        with self.notifier.listen(task_key(t) for t in task_types) as wake:
            while True:
                wake.clear()
                now = self._clock()
                claimed = await self.store.claim_tasks(
                    tenant_id, worker_id, task_types, max_tasks, now
                )
                if claimed:
                    return [await self._leased(n) for n in claimed]
                remaining = deadline - loop.time()
                if remaining <= 0 or self._draining:
                    return []
                next_at = await self.store.next_available_at(tenant_id, task_types, now)
                if next_at is not None:
                    remaining = min(remaining, max((next_at - now).total_seconds(), 0.001))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), remaining)

    async def _leased(self, node: NodeRun) -> LeasedTask:
        defn = await self.get_workflow(node.tenant_id, node.workflow_name, node.workflow_version)
        # A compensation run gets the configuration of the node it undoes.
        spec = defn.node_map.get(node.node_id.removesuffix(COMPENSATION_SUFFIX))
        token = LeaseToken(
            node.execution_id,
            node.node_id,
            node.lease_seq,
            node.workflow_name,
            node.workflow_version,
        )
        return LeasedTask(token.encode(), node, spec.config if spec else b"")

    async def heartbeat(
        self, tenant_id: str, worker_id: str, tokens: Sequence[str]
    ) -> HeartbeatResult:
        """Extend the leases the worker reports; say which it must drop. A lease this worker
        holds but no longer reports (its poll reply was lost, say) is failed for a retry."""
        decoded = {t: LeaseToken.decode(t) for t in tokens}
        now = self._clock()
        if worker_id:
            await self.store.touch_worker(tenant_id, worker_id, now)
            await self._release_unreported(tenant_id, worker_id, decoded.values(), now)
        if not decoded:
            return HeartbeatResult((), ())
        rows = await self.store.touch_leases(tenant_id, [d.key for d in decoded.values()], now)
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
        for node in await self.store.list_worker_leases(tenant_id, worker_id):
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
        self, tenant_id: str, token_text: str, output: bytes, worker_id: str = ""
    ) -> bool:
        """Record a result. Returns True when it was a duplicate of an accepted result."""
        token = LeaseToken.decode(token_text)
        payload = self.check_payload("output", output)
        defn = await self.get_workflow(tenant_id, token.workflow_name, token.workflow_version)

        def decide(
            execution: Execution, nodes: Mapping[str, NodeRun]
        ) -> Decision[tuple[bool, Transition | None]]:
            node = _held_node(nodes, token, accept_done=_SUCCESS_RECORDED)
            if node is None:
                return Decision(None, (True, None))
            t = engine.complete_node(defn, execution, nodes, token.node_id, payload, self._clock())
            return Decision(t, (False, t))

        duplicate, transition = await self.store.transact(tenant_id, token.execution_id, decide)
        if transition is not None:
            await self._after(transition)
        return duplicate

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
        def decide(
            execution: Execution, nodes: Mapping[str, NodeRun]
        ) -> Decision[tuple[bool, bool, Transition | None]]:
            node = _held_node(nodes, token, accept_done=_FAILURE_RECORDED)
            if node is None:
                return Decision(None, (False, True, None))
            full = replace(
                error, node_id=node.node_id, attempt=node.attempt, worker_id=node.worker_id
            )
            t = engine.fail_node(
                defn, execution, nodes, token.node_id, full, retryable, self._clock()
            )
            changed = next(n for n in t.nodes if n.node_id == token.node_id)
            return Decision(t, (changed.status is NodeStatus.READY, False, t))

        will_retry, duplicate, transition = await self.store.transact(
            tenant_id, token.execution_id, decide
        )
        if transition is not None:
            await self._after(transition)
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

    async def run_step(self, tenant_id: str, execution_id: str, step: Step) -> Transition:
        """Apply one engine step to an execution in a transaction; wake whoever it concerns."""
        execution = await self.store.get_execution(tenant_id, execution_id)
        defn = await self.get_workflow(
            tenant_id, execution.workflow_name, execution.workflow_version
        )

        def decide(execution: Execution, nodes: Mapping[str, NodeRun]) -> Decision[Transition]:
            transition = step(defn, execution, nodes, self._clock())
            return Decision(transition, transition)

        transition = await self.store.transact(tenant_id, execution_id, decide)
        await self._after(transition)
        return transition

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
        limit = _page_size(page_size)
        rows = await self.store.list_dead_letters(
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
        return await self.store.get_dead_letter(tenant_id, dead_letter_id)

    async def redrive_dead_letter(self, tenant_id: str, dead_letter_id: str) -> ExecutionView:
        """Run the dead-lettered node again with a fresh attempt budget; the execution rolls
        forward from there (finished nodes are not run again)."""
        letter = await self.store.get_dead_letter(tenant_id, dead_letter_id)
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

    # -- helpers --------------------------------------------------------------------------

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

    async def _after(self, transition: Transition) -> None:
        """Wake pollers for newly ready task types and watchers of the execution, here and
        on every other replica. The transition is committed: a failed publish is logged,
        and other replicas' pollers then find the work at their next poll."""
        keys = [execution_key(transition.execution.id)]
        keys.extend(task_key(t) for t in {n.task_type for n in transition.ready})
        self.notifier.notify(keys)
        try:
            await self.store.publish_wakeups(keys)
        except TrellisError as exc:
            log.warning("could not publish wake-ups to other replicas: %s", exc)


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


def _check_names(**values: str | Sequence[str] | None) -> None:
    """Identifiers from clients must not carry NUL characters (stores differ on them)."""
    for name, value in values.items():
        items = [value] if isinstance(value, str) else list(value or ())
        if any("\x00" in item for item in items):
            raise InvalidArgument(f"{name} contains a NUL character; remove it")


def _page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(requested or 100, 1000)


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
