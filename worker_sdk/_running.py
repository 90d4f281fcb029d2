"""One leased attempt held by a worker, as the runner runs it and the heartbeater reports
it: its slot, its handler, and its own ``cancel``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

from trellis.v1 import worker_service_pb2 as pb
from worker_sdk._slots import Slot
from worker_sdk._task import _LeaseSignals

logger = logging.getLogger(__name__)

CancelReason = Literal["cancelled", "lost", "shutdown"]


@dataclass(eq=False)
class RunningTask:
    """One leased attempt held by this worker, from its lease to its delivered result."""

    msg: pb.Task
    slot: Slot
    signals: _LeaseSignals
    extra: dict[str, Any]  # for log records
    job: asyncio.Task[None] | None = None  # waits for the slot, runs the handler, delivers
    handler: asyncio.Task[Any] | None = None
    drop_reason: Literal["cancelled", "lost"] | None = None  # run nothing more, send nothing
    shutdown: bool = False  # the handler was cancelled because the worker is stopping
    thread_running: bool = False  # a sync handler's thread has not returned yet

    @property
    def token(self) -> str:
        return self.msg.lease_token

    @property
    def details(self) -> bytes:
        return self.signals.details

    @property
    def heartbeat_timeout(self) -> float | None:
        if not self.msg.HasField("heartbeat_timeout"):
            return None
        return float(self.msg.heartbeat_timeout.ToTimedelta().total_seconds())

    @property
    def dropped(self) -> bool:
        return self.drop_reason is not None

    def cancel(self, reason: CancelReason) -> None:
        """Stops the handler. "cancelled" (by the coordinator) and "lost" (the lease) drop
        the task: nothing more runs or is sent for it. "shutdown" (the worker is stopping)
        hands it back as a retryable WorkerShutdown failure."""
        if reason == "shutdown":
            if self.handler is None or self.handler.done():
                return
            self.shutdown = True
        else:
            if self.drop_reason is not None:
                return
            self.drop_reason = reason
            logger.info(
                "lease %s: stopping the handler",
                "cancelled by the coordinator" if reason == "cancelled" else "lost",
                extra=self.extra,
            )
        self.signals.cancel()  # sync handlers see ctx.cancelled
        if self.handler is not None and not self.handler.done():
            self.handler.cancel()

    def finished_thread(self) -> None:
        """A sync handler's thread returned (called on the event loop): the slot goes back
        now if the job is already over (it outlived its handler: a timeout, a drop)."""
        self.thread_running = False
        if self.job is None or self.job.done():
            self.slot.release()
