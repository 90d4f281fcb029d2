"""Heartbeats: a worker's batch of leases is extended, and the reply says which it must
drop (cancelled, or lost to another attempt). A lease the worker holds but no longer
reports (its poll reply was lost, say) is failed for a retry."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from coordinator.model import ErrorInfo, NodeStatus
from coordinator.service._common import Clock, ServiceSettings
from coordinator.service._leasing import WorkerOwners
from coordinator.service._results import Results
from coordinator.service._tokens import Holder, LeaseSigner, LeaseToken
from coordinator.service.ports import LeaseRepository, WorkerRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeartbeatResult:
    cancelled: tuple[str, ...]
    lost: tuple[str, ...]


class Heartbeats:
    def __init__(
        self,
        leases: LeaseRepository,
        workers: WorkerRepository,
        results: Results,
        settings: ServiceSettings,
        clock: Clock,
        signer: LeaseSigner,
        owners: WorkerOwners,
    ) -> None:
        self._owners = owners
        self._signer = signer
        self._leases = leases
        self._workers = workers
        self._results = results
        self._settings = settings
        self._clock = clock

    async def heartbeat(
        self, tenant_id: str, worker_id: str, tokens: Sequence[str], *, credential: str = ""
    ) -> HeartbeatResult:
        """Extend the leases the worker reports; say which it must drop. Only the
        credential that registered ``worker_id`` may speak for it, and only of its leases."""
        holder = Holder(worker_id, credential)
        decoded = {t: self._signer.decode(t, holder) for t in tokens}
        now = self._clock()
        if worker_id:
            await self._owners.check(tenant_id, worker_id, credential, "heartbeat")
            await self._workers.touch_worker(tenant_id, worker_id, now)
            await self._release_unreported(tenant_id, worker_id, decoded.values(), now)
        if not decoded:
            return HeartbeatResult((), ())
        rows = await self._leases.touch_leases(tenant_id, [d.key for d in decoded.values()], now)
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
        grace = 2 * self._settings.heartbeat_interval + timedelta(seconds=2)
        for node in await self._leases.list_worker_leases(tenant_id, worker_id):
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
            if await self._results.fail_lease(node, error, retryable=True):
                log.warning(
                    "lease not reported by its worker; released for a retry",
                    extra={
                        "execution_id": node.execution_id,
                        "node_id": node.node_id,
                        "attempt": node.attempt,
                        "worker_id": worker_id,
                    },
                )
