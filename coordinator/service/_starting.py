"""Starting executions: now, delayed (a PENDING row a sweeper starts), or many at once."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from coordinator import engine
from coordinator.errors import InvalidArgument, NotFound
from coordinator.model import Execution, ExecutionStatus, NodeRun, Transition, WorkflowDef
from coordinator.service._core import CoordinatorCore, check_names
from coordinator.service._starts import MAX_BATCH_START, StartRequest, start_at
from coordinator.service.ports import NewExecution

log = logging.getLogger(__name__)


class ExecutionStarts(CoordinatorCore):
    """The start use cases (see ``Coordinator``)."""

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
    ) -> tuple[Execution, bool]:
        """Start an execution now, or store it PENDING until ``start_time`` / ``delay``
        (a sweeper starts it then). A repeated ``idempotency_key`` within the idempotency
        window returns the execution it first started (``created`` False)."""
        request = StartRequest(
            workflow_name, version, input, idempotency_key, priority, start_time, delay
        )
        now = self._clock()
        item = await self._prepare(tenant_id, request, now)
        [(execution, created)] = await self.store.create_executions(
            [item], idempotency_cutoff=now - self.settings.idempotency_window
        )
        if created:
            await self._started(item, execution)
        return execution, created

    async def batch_start_executions(
        self, tenant_id: str, requests: Sequence[StartRequest]
    ) -> list[tuple[Execution, bool]]:
        """Start every request, or none: all are validated (definition, input, options)
        before anything is stored, then all are stored in one transaction. Results are in
        request order; idempotency keys behave as in ``start_execution``."""
        if len(requests) > MAX_BATCH_START:
            raise InvalidArgument(
                f"{len(requests)} requests in one batch, over the limit of {MAX_BATCH_START}; "
                "split the batch"
            )
        now = self._clock()
        items: list[NewExecution] = []
        for i, request in enumerate(requests):
            try:
                items.append(await self._prepare(tenant_id, request, now))
            except (InvalidArgument, NotFound) as exc:
                raise InvalidArgument(f"requests[{i}]: {exc}; nothing was started") from exc
        if not items:
            return []
        results = await self.store.create_executions(
            items, idempotency_cutoff=now - self.settings.idempotency_window
        )
        for item, (execution, created) in zip(items, results, strict=True):
            if created:
                await self._started(item, execution)
        return results

    async def _prepare(self, tenant_id: str, request: StartRequest, now: datetime) -> NewExecution:
        """Validate a start and decide it (with the children it starts), storing nothing."""
        payload = self.check_payload("input", request.input)
        if not request.workflow_name:
            raise InvalidArgument("workflow_name is required")
        check_names(workflow_name=request.workflow_name, idempotency_key=request.idempotency_key)
        at = start_at(request, now)
        defn = await self.get_workflow(tenant_id, request.workflow_name, request.workflow_version)
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
        )
        if at is not None:
            # Delayed: a PENDING row with no node runs until the sweeper starts it.
            return NewExecution(Transition(execution=shell))
        transition = engine.start_execution(engine.effective_definition(defn, shell), shell, now)
        settled = await self._settle(defn, transition, {}, now)
        return NewExecution(settled.transition, settled.created)

    async def _started(self, item: NewExecution, execution: Execution) -> None:
        await self._after(item.transition, item.children)
        log.info(
            "execution started" if execution.start_at is None else "execution scheduled",
            extra={"execution_id": execution.id, "workflow": execution.workflow_name},
        )

    async def start_delayed(self, execution: Execution) -> bool:
        """Start a delayed execution that is due (a sweeper's claim: on PostgreSQL a row
        another replica is starting is skipped). False when there was nothing to start."""
        defn = await self.get_workflow(
            execution.tenant_id, execution.workflow_name, execution.workflow_version
        )

        def step(
            d: WorkflowDef, e: Execution, nodes: Mapping[str, NodeRun], now: datetime
        ) -> Transition | None:
            # Due by the sweeper's reading (its clock may be given); not yet started.
            if e.status is not ExecutionStatus.PENDING or e.start_at is None:
                return None
            return engine.start_execution(d, e, now)

        started = await self._transact(
            execution.tenant_id, execution.id, step, defn=defn, claim=True
        )
        return started is not None
