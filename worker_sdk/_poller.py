"""Where the worker's tasks come from: long polls (PollTasks) for as many tasks as it has
free slots, and the replies to its results (eager dispatch)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import grpc

from trellis.v1 import worker_service_pb2 as pb
from trellis.v1 import worker_service_pb2_grpc as pb_grpc
from worker_sdk._channel import TRANSIENT_CODES, Backoff, Episode
from worker_sdk._convert import duration_to_proto
from worker_sdk._slots import Slots

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_POLL_DEADLINE_SLACK = 10.0
# A poll refused with these means the coordinator restarted or forgot this worker.
_REGISTER_AGAIN_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
)


class Poller:
    """Long-polls for ``slots.free`` tasks at a time (waiting while none is free) until
    ``stop()``, and hands each task it receives to ``start``. A failed poll is retried
    with backoff (or after the coordinator's retry hint); one that says the coordinator
    restarted or forgot this worker calls ``register`` first (False: stopped meanwhile).

    ``receive`` is the one way in for tasks: the polls' replies, and the tasks that
    results' replies carry (eager dispatch, asked for while ``wants_next``).
    """

    def __init__(
        self,
        stub: pb_grpc.WorkerServiceAsyncStub,
        slots: Slots,
        *,
        worker_id: Callable[[], str],
        task_types: Sequence[str],
        poll_wait: float,
        eager_dispatch: bool,
        address: str,
        register: Callable[[], Awaitable[bool]],
        start: Callable[[pb.Task], None],
    ) -> None:
        self._stub = stub
        self._slots = slots
        self._worker_id = worker_id
        self._task_types = list(task_types)
        self._poll_wait = poll_wait
        self._eager = eager_dispatch
        self._register = register
        self._start = start
        self._stopping = asyncio.Event()
        self._current: Any = None  # the poll (or the wait for a free slot) stop() cancels
        self._episode = Episode(logger, f"polling {address}")

    @property
    def wants_next(self) -> bool:
        """Eager dispatch: whether a result should ask for a next task in its reply."""
        return self._eager and not self._stopping.is_set()

    def receive(self, msg: pb.Task) -> None:
        self._start(msg)

    def stop(self) -> None:
        """Stops polling at once: the poll on the wire is cancelled."""
        self._stopping.set()
        if self._current is not None:
            self._current.cancel()

    async def run(self) -> None:
        """Polls until ``stop()``."""
        backoff = Backoff()
        wait = duration_to_proto(timedelta(seconds=self._poll_wait))
        registered = True
        while not self._stopping.is_set():
            if not registered:
                if not await self._register():
                    break
                registered = True
            free = self._slots.free
            if free <= 0:
                waiting = asyncio.ensure_future(self._slots.wait_free())
                if await self._until_stopped(waiting) is None:
                    break
                continue
            request = pb.PollTasksRequest(
                worker_id=self._worker_id(),
                task_types=self._task_types,
                max_tasks=free,
                wait=wait,
            )
            call = self._stub.PollTasks(request, timeout=self._poll_wait + _POLL_DEADLINE_SLACK)
            try:
                response = await self._until_stopped(call)
            except grpc.aio.AioRpcError as exc:
                if self._stopping.is_set():
                    break
                code = exc.code()
                if code in _REGISTER_AGAIN_CODES:
                    registered = False
                # RESOURCE_EXHAUSTED (too many waiting polls) says when to come back.
                delay = backoff.delay_after(exc)
                level = logging.WARNING if code in TRANSIENT_CODES else logging.ERROR
                self._episode.failed(exc, delay, extra=self._log, level=level)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                continue
            if response is None:
                break
            backoff.reset()
            self._episode.succeeded(extra=self._log)
            for msg in response.tasks:
                self.receive(msg)

    async def _until_stopped(self, pending: Awaitable[_T]) -> _T | None:
        """Awaits ``pending`` (a call, or a task) where ``stop()`` can cancel it; None when
        it did."""
        self._current = pending
        try:
            return await pending
        except asyncio.CancelledError:
            if self._stopping.is_set() and not being_cancelled():
                return None
            raise
        finally:
            self._current = None

    @property
    def _log(self) -> dict[str, Any]:
        return {"worker_id": self._worker_id()}


def being_cancelled() -> bool:
    """Whether the current task itself is being cancelled (rather than a call it awaits)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
