"""The worker's heartbeats: one Heartbeat call for all its leases, and what the reply says
about them (cancelled by the coordinator, or lost)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import Literal

import grpc

from trellis.v1 import worker_service_pb2 as pb
from trellis.v1 import worker_service_pb2_grpc as pb_grpc
from worker_sdk._channel import Episode
from worker_sdk._running import RunningTask

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 10.0
MIN_HEARTBEAT_INTERVAL = 0.05
_EARLY_HEARTBEAT_GAP = 1.0  # at most one heartbeat per second triggered by ctx.heartbeat


class Heartbeater:
    """Every ``interval`` seconds (the coordinator's, set at each registration; shorter when
    a lease's heartbeat timeout asks for it), one Heartbeat carries every tracked lease and
    its latest details. ``request()`` (``ctx.heartbeat``) sends one early, at most one per
    second. Leases the reply names as cancelled or lost are cancelled."""

    def __init__(
        self,
        stub: pb_grpc.WorkerServiceAsyncStub,
        *,
        worker_id: Callable[[], str],
        address: str,
    ) -> None:
        self.interval = DEFAULT_HEARTBEAT_INTERVAL
        self._stub = stub
        self._worker_id = worker_id
        self._loop = asyncio.get_running_loop()
        self._leases: dict[str, RunningTask] = {}
        self._beat_now = asyncio.Event()
        self._episode = Episode(logger, f"heartbeating to {address}")

    def track(self, lease: RunningTask) -> None:
        """Heartbeats ``lease`` from now on, until ``forget``."""
        self._leases[lease.token] = lease
        timeout = lease.heartbeat_timeout
        if timeout is not None and 0 < timeout / 2 < self.interval:
            # The loop may be sleeping for a whole (longer) interval: wake it so this lease
            # is reported well within its heartbeat timeout.
            self._beat_now.set()

    def forget(self, lease: RunningTask) -> None:
        self._leases.pop(lease.token, None)

    def request(self) -> None:
        """Asks for an early send; called by ctx.heartbeat(), possibly from a handler thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self._loop.call_soon_threadsafe(self._beat_now.set)

    async def run(self) -> None:
        """Heartbeats until cancelled."""
        loop = self._loop
        last_tick = loop.time()
        last_sent = -math.inf
        while True:
            interval = self._interval()
            remaining = last_tick + interval - loop.time()
            if remaining > 0:
                try:
                    await asyncio.wait_for(self._beat_now.wait(), remaining)
                except TimeoutError:
                    pass
                else:  # ctx.heartbeat() asked for an early send: at most one per gap
                    gap = last_sent + min(_EARLY_HEARTBEAT_GAP, interval) - loop.time()
                    if gap > 0:
                        await asyncio.sleep(gap)
            self._beat_now.clear()
            last_tick = loop.time()
            leases = [lease for lease in self._leases.values() if not lease.dropped]
            if leases:
                last_sent = last_tick
                await self._heartbeat(leases, rpc_timeout=max(1.0, interval))

    def _interval(self) -> float:
        interval = self.interval
        for lease in self._leases.values():
            timeout = lease.heartbeat_timeout
            if timeout is not None and timeout > 0:
                interval = min(interval, timeout / 2)
        return max(interval, MIN_HEARTBEAT_INTERVAL)

    async def _heartbeat(self, leases: list[RunningTask], *, rpc_timeout: float) -> None:
        request = pb.HeartbeatRequest(
            worker_id=self._worker_id(),
            leases=[
                pb.LeaseHeartbeat(lease_token=lease.token, details=lease.details)
                for lease in leases
            ],
        )
        log = {"worker_id": self._worker_id()}
        try:
            response = await self._stub.Heartbeat(request, timeout=rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            self._episode.failed(exc, self._interval(), extra=log)
            return
        self._episode.succeeded(extra=log)
        for token in response.cancelled_lease_tokens:
            self._drop(token, "cancelled")
        for token in response.lost_lease_tokens:
            self._drop(token, "lost")

    def _drop(self, token: str, reason: Literal["cancelled", "lost"]) -> None:
        lease = self._leases.get(token)
        if lease is not None and not lease.dropped:
            lease.cancel(reason)
