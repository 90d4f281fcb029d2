"""Sweepers: lease expiry, lost workers, schedule-to-start and execution timeouts.

Every replica runs them at once; each verdict is a fenced transition (a lease's
``lease_seq``, an execution's ``version``), so two replicas cannot both apply it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from datetime import datetime

from coordinator import engine
from coordinator.errors import FailedPrecondition, NotFound
from coordinator.model import ErrorInfo, Execution, NodeRun, Transition, WorkflowDef
from coordinator.service._coordinator import Coordinator

log = logging.getLogger(__name__)


def _time_out_unstarted(
    node_id: str,
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    now: datetime,
) -> Transition:
    return engine.time_out_unstarted(defn, execution, nodes, node_id, now)


class Sweeper:
    def __init__(self, coordinator: Coordinator, batch: int = 100) -> None:
        self._c = coordinator
        self._batch = batch
        # Workers cannot heartbeat to a coordinator that was down: give them one liveness
        # window to reconnect before calling any of them lost.
        self._started = coordinator.clock()

    async def sweep(self) -> int:
        """One pass over every kind of overdue work; returns how many verdicts were found."""
        found = 0
        for step in (
            self.expire_leases,
            self.release_lost_workers,
            self.time_out_unstarted,
            self.time_out_executions,
        ):
            while True:
                n = await step()
                found += n
                if n < self._batch:
                    break
        return found

    def _now(self) -> datetime:
        return self._c.clock()

    async def expire_leases(self) -> int:
        """Attempts past their start-to-close or heartbeat deadline fail (retryable)."""
        now = self._now()
        expired = await self._c.store.find_expired_leases(now, self._batch)
        for node in expired:
            hb = node.heartbeat_deadline is not None and node.heartbeat_deadline < now
            if hb:
                error = ErrorInfo(
                    "HeartbeatTimeout", f"no heartbeat within {node.heartbeat_timeout}"
                )
            else:
                error = ErrorInfo(
                    "StartToCloseTimeout",
                    f"attempt did not finish within {node.start_to_close_timeout}",
                )
            await self._fail(node, error)
        return len(expired)

    async def release_lost_workers(self) -> int:
        """Leases of workers silent past the liveness window fail (retryable) at once."""
        window = self._c.settings.worker_liveness_timeout
        if self._now() - self._started < window:
            return 0
        lost = await self._c.store.find_leases_of_lost_workers(self._now() - window, self._batch)
        for node in lost:
            error = ErrorInfo(
                "WorkerLost", f"worker '{node.worker_id}' sent no heartbeat for {window}"
            )
            await self._fail(node, error)
        return len(lost)

    async def _fail(self, node: NodeRun, error: ErrorInfo) -> None:
        if await self._c.fail_lease(node, error, retryable=True):
            log.warning(
                "attempt failed by the coordinator",
                extra={
                    "execution_id": node.execution_id,
                    "node_id": node.node_id,
                    "attempt": node.attempt,
                    "worker_id": node.worker_id,
                    "reason": error.type,
                },
            )

    async def time_out_unstarted(self) -> int:
        """READY nodes not leased within schedule-to-start become TIMED_OUT (not retried)."""
        overdue = await self._c.store.find_unstarted_overdue(self._now(), self._batch)
        for node in overdue:
            node_id = node.node_id
            try:
                await self._c.run_step(
                    node.tenant_id,
                    node.execution_id,
                    functools.partial(_time_out_unstarted, node_id),
                )
            except (FailedPrecondition, NotFound):
                continue  # leased, released or timed out meanwhile
            log.warning(
                "node not started in time",
                extra={"execution_id": node.execution_id, "node_id": node_id},
            )
        return len(overdue)

    async def time_out_executions(self) -> int:
        """Executions past their deadline become TIMED_OUT; their leases are revoked."""
        overdue = await self._c.store.find_overdue_executions(self._now(), self._batch)
        for execution in overdue:
            try:
                await self._c.run_step(execution.tenant_id, execution.id, engine.time_out_execution)
            except (FailedPrecondition, NotFound):
                continue
            log.warning("execution timed out", extra={"execution_id": execution.id})
        return len(overdue)
