"""Running tasks: each leased attempt as a ``RunningTask``, from its slot to its delivered
result; sync handlers in a thread pool."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Protocol

import grpc

from trellis.v1 import worker_service_pb2 as pb
from trellis.v1 import worker_service_pb2_grpc as pb_grpc
from worker_sdk._channel import Backoff, Episode
from worker_sdk._convert import context_from_proto, decode_json, encode_json
from worker_sdk._errors import NonRetryableError
from worker_sdk._heartbeater import Heartbeater
from worker_sdk._reporter import Reporter, Result, too_large
from worker_sdk._result import fill_completion
from worker_sdk._running import RunningTask
from worker_sdk._slots import Slots
from worker_sdk._task import Task, TaskContext, _LeaseSignals

logger = logging.getLogger(__name__)

_MAX_TRACEBACK = 32_000
_MAX_MESSAGE = 4_000
# On delivery these mean the lease is gone (stale, expired, unknown): drop the result.
_LEASE_GONE_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})


class Intake(Protocol):
    """Where tasks enter the worker (its poller); results' replies bring tasks too."""

    @property
    def wants_next(self) -> bool:
        """Eager dispatch: whether a result should ask for a next task in its reply."""

    def receive(self, msg: pb.Task) -> None: ...


class Runner:
    """Runs each task ``start`` is given, as one ``RunningTask``: it waits for its slot,
    runs the handler (sync ones in a thread pool of ``slots.capacity`` threads), and
    delivers the outcome through a ``Reporter``, retrying until it is accepted, refused
    for good, or the lease is dropped. The slot is given back once the result is delivered
    and the handler's thread has returned; the tasks the result's reply carried (eager
    dispatch) then go to ``intake``."""

    def __init__(
        self,
        tasks: Mapping[str, Task],
        slots: Slots,
        stub: pb_grpc.WorkerServiceAsyncStub,
        heartbeater: Heartbeater,
        intake: Intake,
        *,
        worker_id: Callable[[], str],
        task_types: Sequence[str],
        address: str,
    ) -> None:
        self._tasks = tasks
        self._slots = slots
        self._heartbeater = heartbeater
        self._intake = intake
        self._worker_id = worker_id
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=slots.capacity, thread_name_prefix="trellis-worker"
        )
        self._reporter = Reporter(stub, worker_id, task_types, orphans=intake.receive)
        self._running: dict[str, RunningTask] = {}
        self._deliver_episode = Episode(logger, f"delivering results to {address}")

    @property
    def running(self) -> list[RunningTask]:
        """Every task held, from its lease until its job ends."""
        return list(self._running.values())

    def pending(self) -> set[asyncio.Task[None]]:
        """The jobs not finished yet (a handler running, or a result not delivered)."""
        return {t.job for t in self._running.values() if t.job is not None and not t.job.done()}

    def start(self, msg: pb.Task) -> None:
        """Takes a task leased to this worker: claims its slot and starts its job."""
        extra = {
            "worker_id": self._worker_id(),
            "execution_id": msg.execution_id,
            "node_id": msg.node_id,
            "attempt": msg.attempt,
        }
        if msg.lease_token in self._running:
            logger.warning("ignoring a lease this worker already holds", extra=extra)
            return
        slot = self._slots.claim()
        if not slot.admitted:
            logger.warning(
                "the coordinator sent more tasks than asked for; the extra ones wait",
                extra=extra,
            )
        running = RunningTask(
            msg=msg, slot=slot, signals=_LeaseSignals(self._heartbeater.request), extra=extra
        )
        self._running[running.token] = running
        running.job = asyncio.create_task(self._run(running), name=f"trellis-task-{msg.node_id}")
        self._heartbeater.track(running)

    async def close(self) -> None:
        """Cancels what still runs and stops delivering; threads are left to finish alone."""
        jobs = [t.job for t in self._running.values() if t.job is not None]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await self._reporter.close()
        self._running.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, running: RunningTask) -> None:
        eager: list[pb.Task] = []
        try:
            await running.slot.ready()
            result = await self._execute(running)
            if result is not None and running.drop_reason is None:
                eager = await self._deliver(running, result)
        finally:
            # The slot is held until the result is delivered (so this worker never holds
            # more than `concurrency` leases), and while a sync handler's thread still runs.
            if not running.thread_running:
                running.slot.release()
            self._running.pop(running.token, None)
            self._heartbeater.forget(running)
        # Eager dispatch: the tasks the result's reply carried take the freed slot.
        for msg in eager:
            self._intake.receive(msg)

    # Running the handler ---------------------------------------------------------------

    async def _execute(self, running: RunningTask) -> Result | None:
        """Runs the handler; returns the request reporting its outcome (None: send nothing)."""
        msg = running.msg
        task = self._tasks.get(msg.task_type)
        if task is None:
            return self._failure(
                running,
                "UnknownTaskType",
                f"worker {self._worker_id()} does not serve task type {msg.task_type!r}",
                non_retryable=False,
            )
        if running.drop_reason is not None:
            return None
        try:
            data = decode_json(msg.input)
            ctx = context_from_proto(msg, worker_id=self._worker_id(), signals=running.signals)
        except ValueError as exc:
            return self._failure(
                running,
                "InvalidPayload",
                f"the task's input or config is not valid JSON: {exc}",
                non_retryable=True,
            )
        logger.debug("running %s", msg.task_type, extra=running.extra)
        handler = asyncio.create_task(
            self._call_handler(running, task, ctx, data), name=f"trellis-handler-{msg.node_id}"
        )
        running.handler = handler
        try:
            await asyncio.wait([handler])
        except asyncio.CancelledError:
            running.signals.cancel()
            handler.cancel()
            raise
        if running.drop_reason is not None:
            logger.info(
                "%s: dropped without a result (%s)",
                msg.task_type,
                "cancelled by the coordinator"
                if running.drop_reason == "cancelled"
                else "lease lost",
                extra=running.extra,
            )
            return None
        if handler.cancelled():
            if running.shutdown:
                return self._failure(
                    running,
                    "WorkerShutdown",
                    "the worker stopped before the task finished",
                    non_retryable=False,
                )
            return self._failure(
                running, "CancelledError", "the handler was cancelled", non_retryable=False
            )
        error = handler.exception()
        if error is not None:
            return self._failure_from_exception(running, error)
        request = pb.CompleteTaskRequest(lease_token=running.token, worker_id=self._worker_id())
        try:
            fill_completion(request, handler.result())  # a plain value or a Result
        except (TypeError, ValueError) as err:
            return self._failure(
                running,
                "OutputNotSerializable",
                f"the handler's return value is not JSON-serializable: {err}",
                non_retryable=True,
            )
        logger.debug("%s: succeeded", msg.task_type, extra=running.extra)
        return request

    async def _call_handler(
        self, running: RunningTask, task: Task, ctx: TaskContext, data: Any
    ) -> Any:
        seconds = task.timeout.total_seconds() if task.timeout is not None else None
        try:
            async with asyncio.timeout(seconds) as scope:
                if task.is_async:
                    return await task.handler(ctx, data)
                return await self._run_in_thread(running, task, ctx, data)
        except TimeoutError:
            if scope.expired():
                running.signals.cancel()
                assert task.timeout is not None
                raise TimeoutError(
                    f"task {task.name!r} exceeded its timeout of {_fmt_seconds(task.timeout)}"
                ) from None
            raise
        except asyncio.CancelledError:
            running.signals.cancel()  # sync handlers see ctx.cancelled
            raise

    async def _run_in_thread(
        self, running: RunningTask, task: Task, ctx: TaskContext, data: Any
    ) -> Any:
        loop = self._loop
        future = self._executor.submit(contextvars.copy_context().run, task.handler, ctx, data)
        running.thread_running = True

        def finished(_: Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop has nothing left to count
                loop.call_soon_threadsafe(running.finished_thread)

        future.add_done_callback(finished)
        return await asyncio.wrap_future(future)

    def _failure(
        self,
        running: RunningTask,
        error_type: str,
        message: str,
        *,
        non_retryable: bool,
        details: bytes = b"",
    ) -> pb.FailTaskRequest:
        logger.warning(
            "%s failed: %s: %s%s",
            running.msg.task_type,
            error_type,
            message,
            " (not retryable)" if non_retryable else "",
            extra=running.extra,
        )
        return pb.FailTaskRequest(
            lease_token=running.token,
            worker_id=self._worker_id(),
            error=pb.TaskError(
                type=error_type,
                message=message[:_MAX_MESSAGE],
                non_retryable=non_retryable,
                details=details,
            ),
        )

    def _failure_from_exception(
        self, running: RunningTask, exc: BaseException
    ) -> pb.FailTaskRequest:
        trace = "".join(traceback.format_exception(exc))
        if len(trace) > _MAX_TRACEBACK:
            trace = "...\n" + trace[-_MAX_TRACEBACK:]
        logger.debug("handler traceback:\n%s", trace, extra=running.extra)
        return self._failure(
            running,
            type(exc).__name__,
            str(exc),
            non_retryable=isinstance(exc, NonRetryableError),
            details=encode_json({"traceback": trace}),
        )

    # Delivering the result ------------------------------------------------------------

    async def _deliver(self, running: RunningTask, request: Result) -> list[pb.Task]:
        """Sends the result until it is accepted, refused for good, or the lease is dropped.
        Returns the tasks a completion's reply leased to this worker (eager dispatch)."""
        backoff = Backoff()
        current: Result | None = request
        while current is not None and running.drop_reason is None:
            # Eager dispatch: the slot this result frees may go straight to the next task;
            # a poll in flight asked only for the other free slots.
            want_next = self._intake.wants_next and not running.thread_running
            try:
                tasks = await self._reporter.report(current, want_next=want_next)
                self._deliver_episode.succeeded(extra={"worker_id": self._worker_id()})
                return tasks
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                method = (
                    "CompleteTask" if isinstance(current, pb.CompleteTaskRequest) else "FailTask"
                )
                if code in _LEASE_GONE_CODES:
                    logger.warning(
                        "%s refused (%s: %s): the lease is gone; result dropped",
                        method,
                        code.name,
                        exc.details(),
                        extra=running.extra,
                    )
                    return []
                if code == grpc.StatusCode.INVALID_ARGUMENT or too_large(exc):
                    current = self._replacement(running, current, exc)
                    continue
                # Anything else (UNAVAILABLE while the database is down, RESOURCE_EXHAUSTED
                # with its retry hint, ...) keeps the result: it is sent until delivered,
                # for as long as the lease is not known to be gone.
                delay = backoff.delay_after(exc)
                self._deliver_episode.failed(exc, delay, extra=running.extra)
                await asyncio.sleep(delay)
        return []

    def _replacement(
        self, running: RunningTask, refused: Result, exc: grpc.aio.AioRpcError
    ) -> pb.FailTaskRequest | None:
        """What to send instead of a result the coordinator refused as invalid (None: give up)."""
        reason = exc.details() or exc.code().name
        if isinstance(refused, pb.CompleteTaskRequest):
            return self._failure(
                running,
                "OutputRejected",
                f"the coordinator refused the task's result: {reason}",
                non_retryable=True,
            )
        if refused.error.details or len(refused.error.message) > 200:
            # Perhaps the traceback or the message was too large: send the bare minimum.
            slim = pb.FailTaskRequest()
            slim.CopyFrom(refused)
            slim.error.details = b""
            slim.error.message = refused.error.message[:200]
            return slim
        logger.error(
            "the coordinator refused the failure report (%s); giving up on it",
            reason,
            extra=running.extra,
        )
        return None


def _fmt_seconds(value: timedelta) -> str:
    return f"{value.total_seconds():g}s"
