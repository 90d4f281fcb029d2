"""Leasing: workers register and long-poll for tasks.

A poll claims READY node runs within the dispatch limits (``DispatchPolicy.plan`` → the
store's ``claim_tasks``) and hands each out with its lease token, configuration and
execution context (``handout``). ``poll_waiters`` bounds the polls waiting at once on this
replica (admission: a poll that finds work at once still gets it; only waiting is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from coordinator import engine
from coordinator.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from coordinator.model import (
    COMPENSATION_SUFFIX,
    NULL_JSON,
    ErrorInfo,
    NodeRun,
    WorkerInfo,
    compose_object,
    resolve_references,
)
from coordinator.service._backpressure import PollWaiters
from coordinator.service._common import Clock, Draining, ServiceSettings, check_names
from coordinator.service._definitions import Definitions
from coordinator.service._notifier import Notifier, task_key
from coordinator.service._secrets import SecretVault
from coordinator.service._tokens import LeaseSigner, LeaseToken
from coordinator.service.ports import (
    ClaimPolicy,
    DispatchPolicy,
    ExecutionRepository,
    LeaseRepository,
    WorkerRepository,
)

log = logging.getLogger(__name__)


class WorkerOwners:
    """Which credential registered each worker id: only it may poll, heartbeat or register
    under the id. Known owners are remembered (an id never changes hands: RegisterWorker
    refuses another credential), so the hot path reads the workers table once per id."""

    _LIMIT = 100_000

    def __init__(self, workers: WorkerRepository) -> None:
        self._workers = workers
        self._known: dict[tuple[str, str], str] = {}

    async def check(self, tenant_id: str, worker_id: str, credential: str, what: str) -> None:
        """PermissionDenied when another credential registered ``worker_id``; an id nobody
        registered yet passes (RegisterWorker gives it to the first to come)."""
        owner = self._known.get((tenant_id, worker_id))
        if owner is None:
            try:
                worker = await self._workers.get_worker(tenant_id, worker_id)
            except NotFound:
                return
            owner = self.remember(tenant_id, worker_id, worker.credential)
        if owner != credential:
            raise PermissionDenied(
                f"worker id '{worker_id}' is registered with another credential; a worker "
                f"may {what} only for itself"
            )

    def remember(self, tenant_id: str, worker_id: str, credential: str) -> str:
        if len(self._known) >= self._LIMIT:
            self._known.clear()
        self._known[(tenant_id, worker_id)] = credential
        return credential


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


class Leasing:
    def __init__(
        self,
        leases: LeaseRepository,
        workers: WorkerRepository,
        executions: ExecutionRepository,
        definitions: Definitions,
        dispatch: DispatchPolicy,
        notifier: Notifier,
        settings: ServiceSettings,
        clock: Clock,
        draining: Draining,
        signer: LeaseSigner,
        *,
        poll_waiters: PollWaiters | None = None,
        vault: SecretVault | None = None,
    ) -> None:
        self._signer = signer
        self._vault = vault
        # How a lease whose config names a missing secret is ended: set by the composition
        # root to ``Results.fail_lease`` (which is built over this object).
        self.fail_unresolved: Callable[[NodeRun, ErrorInfo, bool], Awaitable[bool]] | None = None
        self.owners = WorkerOwners(workers)
        self._leases = leases
        self._workers = workers
        self._executions = executions
        self._definitions = definitions
        self._dispatch = dispatch
        self._notifier = notifier
        self._settings = settings
        self._clock = clock
        self._waiters = poll_waiters
        self._draining = draining

    @property
    def draining(self) -> bool:
        return self._draining()

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
        credential: str = "",
    ) -> str:
        if not task_types:
            raise InvalidArgument("task_types is empty; name at least one task type to serve")
        check_names(worker_id=worker_id, task_types=task_types, identity=identity)
        worker_id = worker_id or str(uuid.uuid4())
        now = self._clock()
        try:
            known = await self._workers.get_worker(tenant_id, worker_id)
        except NotFound:
            pass
        else:
            if known.credential != credential:
                # Whatever the other worker's state: an id stays with its credential.
                raise PermissionDenied(
                    f"worker id '{worker_id}' is registered with another credential; give "
                    "each worker process its own worker_id (or leave it empty for one)"
                )
            alive = now - known.last_seen < self._settings.worker_liveness_timeout
            if alive and identity and known.identity and known.identity != identity:
                raise FailedPrecondition(
                    f"worker id '{worker_id}' is in use by another live process (seen "
                    f"{(now - known.last_seen).total_seconds():.0f}s ago); give each worker "
                    "process its own worker_id"
                )
        await self._workers.upsert_worker(
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
                credential=credential,
            )
        )
        self.owners.remember(tenant_id, worker_id, credential)
        return worker_id

    async def poll_tasks(
        self,
        tenant_id: str,
        worker_id: str,
        task_types: Sequence[str],
        max_tasks: int,
        wait: timedelta,
        *,
        credential: str = "",
    ) -> list[LeasedTask]:
        """Long-poll: claim up to ``max_tasks``; if none, sleep until woken or ``wait`` ends.
        Admission: while ``poll_waiters`` is full, a poll that would wait is refused
        (``ResourceExhausted`` with a retry hint) unless it finds work at once.
        Only the credential that registered ``worker_id`` may poll for it (the tasks it
        leases, and their event history, name that worker)."""
        await self._check_owner(tenant_id, worker_id, credential)

        def poll(wait: timedelta) -> Awaitable[list[LeasedTask]]:
            return self._poll(tenant_id, worker_id, task_types, max_tasks, wait, credential)

        waiters = self._waiters
        if waiters is None or wait <= timedelta(0):
            return await poll(wait)
        if waiters.waiting < waiters.limit:
            with waiters.admit():
                return await poll(wait)
        tasks = await poll(timedelta(0))
        if tasks:
            return tasks
        with waiters.admit():  # RESOURCE_EXHAUSTED with a retry hint
            return await poll(wait)

    async def _check_owner(self, tenant_id: str, worker_id: str, credential: str) -> None:
        if worker_id:  # (check_claim refuses an empty one)
            await self.owners.check(tenant_id, worker_id, credential, "poll")

    async def _poll(
        self,
        tenant_id: str,
        worker_id: str,
        task_types: Sequence[str],
        max_tasks: int,
        wait: timedelta,
        credential: str,
    ) -> list[LeasedTask]:
        max_tasks = self.check_claim(worker_id, task_types, max_tasks, "poll")
        if self._draining():
            raise Unavailable("coordinator is shutting down; reconnect to another replica")
        wait = min(wait, self._settings.poll_max_wait)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait.total_seconds(), 0.0)
        with self._notifier.listen(task_key(t) for t in task_types) as wake:
            while True:
                wake.clear()
                claimed, plan, now = await self.claim(tenant_id, worker_id, task_types, max_tasks)
                if claimed:
                    return await self.handout(tenant_id, claimed, credential)
                remaining = deadline - loop.time()
                if remaining <= 0 or self._draining():
                    return []
                if plan.wait_hint is not None:
                    # A rate limit's next token, or an open breaker's probe time.
                    remaining = min(remaining, max(plan.wait_hint, 0.001))
                next_at = await self._leases.next_available_at(tenant_id, task_types, now)
                if next_at is not None:
                    remaining = min(remaining, max((next_at - now).total_seconds(), 0.001))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), remaining)

    def check_claim(
        self, worker_id: str, task_types: Sequence[str], max_tasks: int, what: str
    ) -> int:
        """Validate a claim's arguments; the number of tasks one reply may carry."""
        if not task_types:
            raise InvalidArgument(f"task_types is empty; name at least one task type to {what}")
        if not worker_id:
            raise InvalidArgument(f"worker_id is required for {what}; call RegisterWorker first")
        check_names(worker_id=worker_id, task_types=task_types)
        fit = self._settings.max_reply_bytes // (2 * self._settings.max_payload_bytes)
        return max(1, min(max_tasks, 1000, fit))

    async def claim(
        self, tenant_id: str, worker_id: str, task_types: Sequence[str], max_tasks: int
    ) -> tuple[list[NodeRun], ClaimPolicy, datetime]:
        """One claim within the dispatch limits: the rows leased, the plan, the time."""
        plan = await self._dispatch.plan(tenant_id, task_types)
        now = self._clock()
        claimed = await self._leases.claim_tasks(
            tenant_id, worker_id, task_types, max_tasks, now, plan
        )
        return claimed, plan, now

    async def handout(
        self, tenant_id: str, claimed: Sequence[NodeRun], credential: str
    ) -> list[LeasedTask]:
        """The claimed rows with their configuration and execution context (two reads for
        the whole poll: the executions, and the outputs of the nodes' parents)."""
        executions = await self._executions.get_executions(
            tenant_id, sorted({n.execution_id for n in claimed})
        )
        parents: dict[tuple[str, str], tuple[str, ...]] = {}
        specs: dict[tuple[str, str], bytes] = {}
        refs: dict[tuple[str, str], tuple[str, ...]] = {}
        claimed_all = list(claimed)
        for node in claimed:
            execution = executions.get(node.execution_id)
            registered = defn = await self._definitions.get_workflow(
                node.tenant_id, node.workflow_name, node.workflow_version
            )
            if execution is not None:
                defn = engine.effective_definition(defn, execution)
            # A compensation run gets the configuration of the node it undoes; an element
            # of a map node that of the map node.
            node_spec = spec_id(node.node_id)
            spec = defn.node_map.get(node_spec)
            specs[(node.execution_id, node.node_id)] = spec.config if spec else b""
            parents[(node.execution_id, node.node_id)] = defn.parents.get(node_spec, ())
            # Secrets resolve only into nodes of the registered definition, never into
            # nodes added at run time (``engine.expand`` refuses those too).
            if spec is not None and spec.secret_refs and node_spec in registered.node_map:
                refs[(node.execution_id, node.node_id)] = spec.secret_refs
        unresolved = await self._resolve(tenant_id, specs, refs)
        if unresolved:
            claimed = [n for n in claimed if (n.execution_id, n.node_id) not in unresolved]
            await self._fail_unresolved(claimed_all, unresolved)
        outputs = await self._executions.get_node_outputs(
            tenant_id,
            sorted({(k[0], p) for k, ps in parents.items() for p in ps}),
        )
        tasks = []
        for node in claimed:
            key = (node.execution_id, node.node_id)
            execution = executions.get(node.execution_id)
            tasks.append(
                LeasedTask(
                    self._signer.encode(LeaseToken.of(node, credential)),
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

    async def _resolve(
        self,
        tenant_id: str,
        specs: dict[tuple[str, str], bytes],
        refs: Mapping[tuple[str, str], tuple[str, ...]],
    ) -> dict[tuple[str, str], list[str]]:
        """Resolve the secrets of the configs that reference any (``specs`` updated in
        place); the runs whose secrets are missing, with the missing names."""
        if not refs:
            return {}
        if self._vault is None:
            return {key: list(names) for key, names in refs.items()}
        values = await self._vault.values(
            tenant_id, sorted({n for ns in refs.values() for n in ns})
        )
        missing = {}
        for key, names in refs.items():
            absent = [n for n in names if n not in values]
            if absent:
                missing[key] = absent
            else:
                specs[key] = resolve_references(specs[key], values)
        return missing

    async def _fail_unresolved(
        self, claimed: Sequence[NodeRun], unresolved: Mapping[tuple[str, str], list[str]]
    ) -> None:
        """End each lease whose config names a missing secret: not retryable (a retry would
        find it missing again); set the secret, then rerun or redrive."""
        for node in claimed:
            names = unresolved.get((node.execution_id, node.node_id))
            if names is None:
                continue
            listed = ", ".join(repr(n) for n in names)
            error = ErrorInfo(
                type=SECRET_NOT_FOUND,
                message=(
                    f"node '{node.node_id}' config references secret {listed}, which tenant "
                    f"'{node.tenant_id}' does not have; set it (trellis secrets set NAME), "
                    "then rerun the node or redrive the dead letter"
                ),
            )
            log.warning(
                "lease failed: missing secret %s",
                listed,
                extra={"execution_id": node.execution_id, "node_id": node.node_id},
            )
            if self.fail_unresolved is not None:
                await self.fail_unresolved(node, error, False)


# The error type of an attempt failed because its config names a missing secret.
SECRET_NOT_FOUND = "SecretNotFound"


def spec_id(node_id: str) -> str:
    """The definition node a run belongs to: ``"m[3]"`` (a map element) -> ``"m"``, a
    compensation run -> the node it undoes."""
    node_id = node_id.removesuffix(COMPENSATION_SUFFIX)
    if node_id.endswith("]") and "[" in node_id:
        return node_id[: node_id.rindex("[")]
    return node_id
