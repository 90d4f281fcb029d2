"""Sweepers: lease expiry, lost workers, schedule-to-start, approval and execution timeouts,
delayed starts, the overflow queue (max_running_executions), sub-workflow reconciliation,
and expired webhook replay records.

Every replica runs them at once; each verdict is a fenced transition (a lease's
``lease_seq``, an execution's ``version``), so two replicas cannot both apply it. A row
whose verdict fails is logged and skipped, so one bad row never stops the others.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from coordinator import engine
from coordinator.errors import FailedPrecondition, NotFound
from coordinator.model import ErrorInfo, Execution, NodeRun, Transition, WorkflowDef
from coordinator.service._coordinator import Coordinator

log = logging.getLogger(__name__)

Row = TypeVar("Row", NodeRun, Execution)


def _time_out_unstarted(
    node_id: str,
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    now: datetime,
) -> Transition:
    return engine.time_out_unstarted(defn, execution, nodes, node_id, now)


def _time_out_approval(
    node_id: str,
    defn: WorkflowDef,
    execution: Execution,
    nodes: Mapping[str, NodeRun],
    now: datetime,
) -> Transition:
    return engine.time_out_approval(defn, execution, nodes, node_id, now)


class Sweeper:
    def __init__(self, coordinator: Coordinator, batch: int = 100) -> None:
        self._c = coordinator
        self._batch = batch
        self._queued_after: tuple[str, str] | None = None
        # Workers cannot heartbeat to a coordinator that was down: give them one liveness
        # window to reconnect before calling any of them lost or silent.
        self._started = coordinator.clock()

    async def sweep(self) -> int:
        """One pass over every kind of overdue work; returns how many verdicts were applied."""
        applied = 0
        for step in (
            self.expire_leases,
            self.release_lost_workers,
            self.time_out_unstarted,
            self.time_out_approvals,
            self.time_out_executions,
            self.start_due,
            self.start_queued,
            self.report_ended_children,
            self.cancel_orphaned_children,
            self.delete_expired_webhook_deliveries,
        ):
            while True:
                seen, done = await step()
                applied += done
                # Go on while full batches keep yielding verdicts; rows that could not be
                # settled come back first, so stop rather than spin on them.
                if seen < self._batch or done == 0:
                    break
        return applied

    def _now(self) -> datetime:
        return self._c.clock()

    async def start_due(self, now: datetime | None = None) -> tuple[int, int]:
        """Delayed executions whose start time has come are started (each a claim: replicas
        sweeping at once skip a row another one is starting)."""
        due = await self._c.store.executions.find_due_executions(now or self._now(), self._batch)

        async def verdict(execution: Execution) -> bool:
            if not await self._c.starts.start_delayed(execution):
                return False
            log.info("delayed execution started", extra={"execution_id": execution.id})
            return True

        return await self._each(due, verdict)

    async def start_queued(self) -> tuple[int, int]:
        """Workflows with queued executions (overflow QUEUE) and room start them, oldest
        first, through the path delayed starts take. A running execution's end starts the
        next queued one at once on the replica that ended it; this step covers the rest
        (a crash in between, another version's cap) within a sweep interval."""
        # Page through every workflow with a queue, a batch per sweep, so that workflows
        # that stay full do not hide the others.
        workflows = await self._c.starts.find_queued_workflows(self._batch, self._queued_after)
        self._queued_after = workflows[-1] if len(workflows) == self._batch else None
        done = 0
        for tenant_id, workflow_name in workflows:
            try:
                done += await self._c.starts.start_queued(tenant_id, workflow_name, self._batch)
            except (FailedPrecondition, NotFound):
                continue  # settled meanwhile
            except Exception:
                log.exception(
                    "starting queued executions failed; skipping this workflow",
                    extra={"tenant_id": tenant_id, "workflow": workflow_name},
                )
        return len(workflows), done

    async def report_ended_children(self) -> tuple[int, int]:
        """A finished child whose parent node still waits on it (the report after its end
        was lost, e.g. in a crash) is reported now."""
        ended = await self._c.store.executions.find_ended_children(self._batch)
        return await self._each(ended, self._c.sub_workflows.report_child_ended)

    async def cancel_orphaned_children(self) -> tuple[int, int]:
        """An unfinished child whose parent no longer waits on it is cancelled."""
        orphans = await self._c.store.executions.find_orphaned_children(self._batch)

        async def verdict(child: Execution) -> bool:
            return await self._c.sub_workflows.cancel_child(child.tenant_id, child.id)

        return await self._each(orphans, verdict)

    async def delete_expired_webhook_deliveries(self) -> tuple[int, int]:
        """Replay records of webhook deliveries whose signatures have left their window
        are deleted (a replay of one is refused by its timestamp by then)."""
        deleted = await self._c.store.triggers.delete_expired_webhook_deliveries(
            self._now(), self._batch
        )
        return deleted, deleted

    def _in_grace(self) -> bool:
        return self._now() - self._started < self._c.settings.worker_liveness_timeout

    async def _each(
        self, rows: Sequence[Row], verdict: Callable[[Row], Awaitable[bool]]
    ) -> tuple[int, int]:
        done = 0
        for row in rows:
            try:
                if await verdict(row):
                    done += 1
            except (FailedPrecondition, NotFound):
                continue  # settled meanwhile (completed, or swept by another replica)
            except Exception:
                log.exception("sweep verdict failed; skipping this row", extra={"row": repr(row)})
        return len(rows), done

    async def expire_leases(self) -> tuple[int, int]:
        """Attempts past their start-to-close or heartbeat deadline fail (retryable)."""
        now = self._now()
        grace = self._in_grace()
        expired = await self._c.store.leases.find_expired_leases(now, self._batch)

        async def verdict(node: NodeRun) -> bool:
            closed = node.lease_deadline is not None and node.lease_deadline < now
            if not closed:
                if grace:
                    return False  # silent only because this coordinator was down
                error = ErrorInfo(
                    "HeartbeatTimeout", f"no heartbeat within {node.heartbeat_timeout}"
                )
            else:
                error = ErrorInfo(
                    "StartToCloseTimeout",
                    f"attempt did not finish within {node.start_to_close_timeout}",
                )
            return await self._fail(node, error)

        return await self._each(expired, verdict)

    async def release_lost_workers(self) -> tuple[int, int]:
        """Leases of workers silent past the liveness window fail (retryable) at once."""
        if self._in_grace():
            return 0, 0
        window = self._c.settings.worker_liveness_timeout
        lost = await self._c.store.leases.find_leases_of_lost_workers(
            self._now() - window, self._batch
        )

        async def verdict(node: NodeRun) -> bool:
            error = ErrorInfo(
                "WorkerLost", f"worker '{node.worker_id}' sent no heartbeat for {window}"
            )
            return await self._fail(node, error)

        return await self._each(lost, verdict)

    async def _fail(self, node: NodeRun, error: ErrorInfo) -> bool:
        if not await self._c.results.fail_lease(node, error, retryable=True):
            return False
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
        return True

    async def time_out_unstarted(self) -> tuple[int, int]:
        """READY nodes not leased within schedule-to-start become TIMED_OUT (not retried)."""
        overdue = await self._c.store.leases.find_unstarted_overdue(self._now(), self._batch)
        return await self._time_out(overdue, _time_out_unstarted, "node not started in time")

    async def time_out_approvals(self) -> tuple[int, int]:
        """WAITING approval nodes past their approval_timeout become TIMED_OUT."""
        overdue = await self._c.store.executions.find_waiting_overdue(self._now(), self._batch)
        return await self._time_out(overdue, _time_out_approval, "approval node timed out")

    async def _time_out(
        self, overdue: list[NodeRun], step: Callable[..., Any], message: str
    ) -> tuple[int, int]:
        """Run ``step(node_id, ...)`` on each overdue node's execution, logging ``message``."""

        async def verdict(node: NodeRun) -> bool:
            await self._c.transactions.run_step(
                node.tenant_id, node.execution_id, functools.partial(step, node.node_id)
            )
            log.warning(message, extra={"execution_id": node.execution_id, "node_id": node.node_id})
            return True

        return await self._each(overdue, verdict)

    async def time_out_executions(self) -> tuple[int, int]:
        """Executions past their deadline become TIMED_OUT; their leases are revoked."""
        overdue = await self._c.store.executions.find_overdue_executions(self._now(), self._batch)

        async def verdict(execution: Execution) -> bool:
            await self._c.transactions.run_step(
                execution.tenant_id, execution.id, engine.time_out_execution
            )
            log.warning("execution timed out", extra={"execution_id": execution.id})
            return True

        return await self._each(overdue, verdict)
