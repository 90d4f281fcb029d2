"""The Worker: registers, long-polls for tasks, runs handlers, heartbeats and delivers results."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import signal
import socket
import traceback
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc

from trellis.v1 import worker_service_pb2 as pb
from trellis.v1 import worker_service_pb2_grpc as pb_grpc
from worker_sdk._channel import TRANSIENT_CODES, Backoff, Episode, open_channel
from worker_sdk._convert import context_from_proto, decode_json, duration_to_proto, encode_json
from worker_sdk._errors import NonRetryableError, rpc_error
from worker_sdk._reporter import Reporter, Result, too_large
from worker_sdk._result import fill_completion
from worker_sdk._settings import connection_settings
from worker_sdk._task import Task, TaskContext, _LeaseSignals

logger = logging.getLogger(__name__)

_DEFAULT_HEARTBEAT_INTERVAL = 10.0
_MIN_HEARTBEAT_INTERVAL = 0.05
_EARLY_HEARTBEAT_GAP = 1.0  # at most one heartbeat per second triggered by ctx.heartbeat
_RPC_TIMEOUT = 30.0
_POLL_DEADLINE_SLACK = 10.0
_SHUTDOWN_DELIVERY_GRACE = 5.0
_MAX_TRACEBACK = 32_000
_MAX_MESSAGE = 4_000

# Codes that mean the worker itself is misconfigured: the first registration gives up.
_FATAL_REGISTRATION_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
# On delivery these mean the lease is gone (stale, expired, unknown): drop the result.
_LEASE_GONE_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})

_Result = Result


@dataclass(eq=False)
class _Lease:
    """One leased attempt held by this worker, from poll to delivered result."""

    msg: pb.Task
    signals: _LeaseSignals
    extra: dict[str, Any]
    runner: asyncio.Task[None] | None = None
    handler: asyncio.Task[Any] | None = None
    drop_reason: str | None = None  # "cancelled" or "lost": run nothing more, send nothing
    shutdown: bool = False  # the handler was cancelled because the worker is stopping
    reserved: bool = True  # counts against the worker's concurrency
    slot_acquired: bool = False
    thread_running: bool = False
    generation: int = 0  # which serve() run it belongs to

    @property
    def token(self) -> str:
        return self.msg.lease_token


def _fmt_seconds(value: timedelta) -> str:
    return f"{value.total_seconds():g}s"


class Worker:
    """Serves tasks to a Trellis coordinator::

        Worker(tasks=[send_email, resize_image]).run()

    ``address`` is the coordinator's HOST:PORT; without it, ``TRELLIS_ADDRESS`` or else
    ``127.0.0.1:7400`` (as for the ``trellis`` CLI and the Client).
    At most ``concurrency`` handlers run at once (async handlers on the event
    loop, sync handlers in a thread pool of that size). ``poll_wait`` is how long
    one long-poll waits for work. ``stop()`` (or SIGTERM/SIGINT under ``run()``)
    stops polling at once and lets in-flight tasks finish and deliver their
    results; after ``drain_timeout`` seconds (None: no limit) the remaining
    handlers are cancelled and handed back to the coordinator as retryable
    "WorkerShutdown" failures. The worker survives coordinator restarts: it
    retries with backoff, re-registers, and keeps results until delivered.

    Results are delivered in batches (ReportResults): those that finish while a delivery is
    on the wire go together in the next one. ``eager_dispatch``: each result asks the
    coordinator to lease, in the reply, the next ready task for the slot it frees (typically
    the successor it just made ready), which saves a poll round trip per DAG step.
    """

    def __init__(
        self,
        tasks: Iterable[Task],
        *,
        address: str | None = None,
        concurrency: int = 10,
        worker_id: str | None = None,
        poll_wait: float = 20.0,
        labels: Mapping[str, str] | None = None,
        identity: str | None = None,
        drain_timeout: float | None = 60.0,
        eager_dispatch: bool = True,
    ) -> None:
        by_name: dict[str, Task] = {}
        for t in tasks:
            if not isinstance(t, Task):
                raise TypeError(f"Worker tasks must be Task objects (use @task('name')), got {t!r}")
            if t.name in by_name:
                raise ValueError(f"two tasks are named {t.name!r}")
            by_name[t.name] = t
        if not by_name:
            raise ValueError("a Worker needs at least one task")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
        if not poll_wait > 0:
            raise ValueError(f"poll_wait must be positive, got {poll_wait!r}")
        if drain_timeout is not None and drain_timeout < 0:
            raise ValueError(f"drain_timeout must not be negative, got {drain_timeout!r}")
        self._tasks = by_name
        self._task_types = sorted(by_name)
        self._settings = connection_settings(address)
        address = self._settings.address
        self._concurrency = concurrency
        self._eager = eager_dispatch
        self._worker_id = worker_id or ""
        self._poll_wait = float(poll_wait)
        self._labels = dict(labels or {})
        self._identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self._drain_timeout = drain_timeout

        self._serving = False
        self._registered = False
        self._heartbeat_interval = _DEFAULT_HEARTBEAT_INTERVAL
        self._leases: dict[str, _Lease] = {}
        self._reserved = 0
        self._generation = 0
        self._current_call: Any = None  # the poll (or registration) that stop() cancels
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._stopped = asyncio.Event()
        self._capacity = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.WorkerServiceAsyncStub | None = None
        self._reporter: Reporter | None = None
        # Failures are logged once per episode (an outage, a spell of backpressure).
        self._register_episode = Episode(logger, f"registering with {address}")
        self._poll_episode = Episode(logger, f"polling {address}")
        self._deliver_episode = Episode(logger, f"delivering results to {address}")
        self._heartbeat_episode = Episode(logger, f"heartbeating to {address}")

    # Public surface -----------------------------------------------------------

    @property
    def worker_id(self) -> str:
        """The id the coordinator knows this worker by ("" until the first registration)."""
        return self._worker_id

    @property
    def task_types(self) -> tuple[str, ...]:
        """The task types this worker serves, sorted."""
        return tuple(self._task_types)

    def run(self) -> None:
        """Serves until SIGTERM or SIGINT (a second signal cancels running handlers)."""
        asyncio.run(self._serve_with_signals())

    async def serve(self) -> None:
        """Serves until ``stop()``; returns once in-flight tasks are finished and delivered.

        Raises RpcError when the first registration is refused as invalid
        (unknown task types, authentication ...).
        """
        if self._serving:
            raise RuntimeError("this Worker is already serving")
        self._serving = True
        self._registered = False
        self._generation += 1
        self._reserved = 0
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._stopped = asyncio.Event()
        self._capacity = asyncio.Event()
        self._beat_now = asyncio.Event()
        self._slots = asyncio.Semaphore(self._concurrency)
        self._executor = ThreadPoolExecutor(
            max_workers=self._concurrency, thread_name_prefix="trellis-worker"
        )
        self._channel = open_channel(self._settings)
        self._stub = pb_grpc.WorkerServiceStub(self._channel)
        self._reporter = Reporter(
            self._stub, lambda: self._worker_id, self._task_types, orphans=self._start
        )
        heartbeat: asyncio.Task[None] | None = None
        try:
            if await self._register(initial=True):
                heartbeat = asyncio.create_task(self._heartbeat_loop(), name="trellis-heartbeat")
                await self._poll_loop()
                await self._drain()
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
            leftovers = [lease.runner for lease in self._leases.values() if lease.runner]
            for runner in leftovers:
                runner.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            await self._reporter.close()
            self._leases.clear()
            self._reserved = 0
            self._generation += 1  # threads still running no longer count
            await self._channel.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._serving = False
            self._stopped.set()
            logger.info("worker stopped", extra={"worker_id": self._worker_id})

    async def stop(self) -> None:
        """Stops polling at once, waits for in-flight tasks to finish and be delivered.

        Do not await it from inside a handler (it waits for that handler).
        """
        if not self._serving:
            return
        self._begin_stop()
        await self._stopped.wait()

    # Lifecycle -----------------------------------------------------------------

    async def _serve_with_signals(self) -> None:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # Windows, non-main thread
                continue
            installed.append(sig)
        try:
            await self.serve()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stopping.is_set():
            logger.info(
                "received %s: stopping; send it again to cancel running tasks",
                sig.name,
                extra={"worker_id": self._worker_id},
            )
            self._begin_stop()
        else:
            logger.warning(
                "received %s again: cancelling running tasks",
                sig.name,
                extra={"worker_id": self._worker_id},
            )
            self._force.set()

    def _begin_stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._capacity.set()
        if self._current_call is not None:
            self._current_call.cancel()

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)

    @property
    def _log(self) -> dict[str, Any]:
        return {"worker_id": self._worker_id}

    # Registration and polling -------------------------------------------------------

    async def _register(self, *, initial: bool) -> bool:
        """Registers (retrying transient failures); False when stopped first."""
        from worker_sdk import __version__

        assert self._stub is not None
        backoff = Backoff()
        while not self._stopping.is_set():
            request = pb.RegisterWorkerRequest(
                worker_id=self._worker_id,
                task_types=self._task_types,
                capacity=self._concurrency,
                labels=self._labels,
                sdk_language="python",
                sdk_version=__version__,
                identity=self._identity,
            )
            call = self._stub.RegisterWorker(request, timeout=_RPC_TIMEOUT)
            self._current_call = call
            try:
                response = await call
            except asyncio.CancelledError:
                if self._stopping.is_set() and not _being_cancelled():
                    return False
                raise
            except grpc.aio.AioRpcError as exc:
                if self._stopping.is_set():
                    return False
                if initial and exc.code() in _FATAL_REGISTRATION_CODES:
                    raise rpc_error(exc, "RegisterWorker") from exc
                delay = backoff.delay_after(exc)
                self._register_episode.failed(exc, delay, extra=self._log)
                await self._sleep_unless_stopping(delay)
                continue
            finally:
                self._current_call = None
            self._register_episode.succeeded(extra=self._log)
            self._worker_id = response.worker_id or self._worker_id
            interval = _DEFAULT_HEARTBEAT_INTERVAL
            if response.HasField("heartbeat_interval"):
                seconds = response.heartbeat_interval.ToTimedelta().total_seconds()
                if seconds > 0:
                    interval = max(seconds, _MIN_HEARTBEAT_INTERVAL)
            self._heartbeat_interval = interval
            self._registered = True
            logger.info(
                "registered with %s as %s for %s (heartbeat every %gs)",
                self._settings.address,
                self._worker_id,
                ", ".join(self._task_types),
                interval,
                extra=self._log,
            )
            return True
        return False

    async def _poll_loop(self) -> None:
        assert self._stub is not None
        backoff = Backoff()
        wait = duration_to_proto(timedelta(seconds=self._poll_wait))
        while not self._stopping.is_set():
            if not self._registered and not await self._register(initial=False):
                break
            free = self._concurrency - self._reserved
            if free <= 0:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            request = pb.PollTasksRequest(
                worker_id=self._worker_id, task_types=self._task_types, max_tasks=free, wait=wait
            )
            call = self._stub.PollTasks(request, timeout=self._poll_wait + _POLL_DEADLINE_SLACK)
            self._current_call = call
            try:
                response = await call
            except asyncio.CancelledError:
                if self._stopping.is_set() and not _being_cancelled():
                    break
                raise
            except grpc.aio.AioRpcError as exc:
                if self._stopping.is_set():
                    break
                code = exc.code()
                if code in (grpc.StatusCode.UNAVAILABLE, *_LEASE_GONE_CODES):
                    # Reconnected (or the coordinator forgot us): register again first.
                    self._registered = False
                # RESOURCE_EXHAUSTED (too many waiting polls) says when to come back.
                delay = backoff.delay_after(exc)
                level = logging.WARNING if code in TRANSIENT_CODES else logging.ERROR
                self._poll_episode.failed(exc, delay, extra=self._log, level=level)
                await self._sleep_unless_stopping(delay)
                continue
            finally:
                self._current_call = None
            backoff.reset()
            self._poll_episode.succeeded(extra=self._log)
            for msg in response.tasks:
                self._start(msg)

    # Running tasks -----------------------------------------------------------------

    def _start(self, msg: pb.Task) -> None:
        extra = {
            "worker_id": self._worker_id,
            "execution_id": msg.execution_id,
            "node_id": msg.node_id,
            "attempt": msg.attempt,
        }
        if msg.lease_token in self._leases:
            logger.warning("ignoring a lease this worker already holds", extra=extra)
            return
        lease = _Lease(
            msg=msg,
            signals=_LeaseSignals(self._request_heartbeat),
            extra=extra,
            generation=self._generation,
        )
        self._leases[lease.token] = lease
        self._reserved += 1
        if self._reserved > self._concurrency:
            logger.warning(
                "the coordinator sent more tasks than asked for; the extra ones wait",
                extra=extra,
            )
        lease.runner = asyncio.create_task(self._run(lease), name=f"trellis-task-{msg.node_id}")
        if msg.HasField("heartbeat_timeout"):
            timeout = msg.heartbeat_timeout.ToTimedelta().total_seconds()
            if 0 < timeout / 2 < self._heartbeat_interval:
                # The heartbeat loop may be sleeping for a whole (longer) interval: wake it so
                # this lease is reported well within its heartbeat timeout.
                self._beat_now.set()

    async def _run(self, lease: _Lease) -> None:
        eager: list[pb.Task] = []
        try:
            await self._slots.acquire()
            lease.slot_acquired = True
            result = await self._execute(lease)
            if result is not None and lease.drop_reason is None:
                eager = await self._deliver(lease, result)
        finally:
            # The slot is held until the result is delivered (so this worker never holds
            # more than `concurrency` leases), and while a sync handler's thread still runs.
            if not lease.thread_running:
                self._release(lease)
            self._leases.pop(lease.token, None)
        # Eager dispatch: the tasks the completion's reply carried take the freed slot.
        for msg in eager:
            self._start(msg)

    def _release(self, lease: _Lease) -> None:
        if not lease.reserved or lease.generation != self._generation:
            return
        lease.reserved = False
        self._reserved -= 1
        if lease.slot_acquired:
            self._slots.release()
        self._capacity.set()

    async def _execute(self, lease: _Lease) -> _Result | None:
        """Runs the handler; returns the request reporting its outcome (None: send nothing)."""
        msg = lease.msg
        task = self._tasks.get(msg.task_type)
        if task is None:
            return self._failure(
                lease,
                "UnknownTaskType",
                f"worker {self._worker_id} does not serve task type {msg.task_type!r}",
                non_retryable=False,
            )
        if lease.drop_reason is not None:
            return None
        try:
            data = decode_json(msg.input)
            ctx = context_from_proto(msg, worker_id=self._worker_id, signals=lease.signals)
        except ValueError as exc:
            return self._failure(
                lease,
                "InvalidPayload",
                f"the task's input or config is not valid JSON: {exc}",
                non_retryable=True,
            )
        logger.debug("running %s", msg.task_type, extra=lease.extra)
        lease.handler = asyncio.create_task(
            self._call_handler(lease, task, ctx, data), name=f"trellis-handler-{msg.node_id}"
        )
        try:
            await asyncio.wait([lease.handler])
        except asyncio.CancelledError:
            lease.signals.cancel()
            lease.handler.cancel()
            raise
        handler = lease.handler
        if lease.drop_reason is not None:
            logger.info(
                "%s: dropped without a result (%s)",
                msg.task_type,
                "cancelled by the coordinator"
                if lease.drop_reason == "cancelled"
                else "lease lost",
                extra=lease.extra,
            )
            return None
        if handler.cancelled():
            if lease.shutdown:
                return self._failure(
                    lease,
                    "WorkerShutdown",
                    "the worker stopped before the task finished",
                    non_retryable=False,
                )
            return self._failure(
                lease, "CancelledError", "the handler was cancelled", non_retryable=False
            )
        error = handler.exception()
        if error is not None:
            return self._failure_from_exception(lease, error)
        request = pb.CompleteTaskRequest(lease_token=lease.token, worker_id=self._worker_id)
        try:
            fill_completion(request, handler.result())  # a plain value or a Result
        except (TypeError, ValueError) as err:
            return self._failure(
                lease,
                "OutputNotSerializable",
                f"the handler's return value is not JSON-serializable: {err}",
                non_retryable=True,
            )
        logger.debug("%s: succeeded", msg.task_type, extra=lease.extra)
        return request

    async def _call_handler(self, lease: _Lease, task: Task, ctx: TaskContext, data: Any) -> Any:
        seconds = task.timeout.total_seconds() if task.timeout is not None else None
        try:
            async with asyncio.timeout(seconds) as scope:
                if task.is_async:
                    return await task.handler(ctx, data)
                return await self._run_in_thread(lease, task, ctx, data)
        except TimeoutError:
            if scope.expired():
                lease.signals.cancel()
                assert task.timeout is not None
                raise TimeoutError(
                    f"task {task.name!r} exceeded its timeout of {_fmt_seconds(task.timeout)}"
                ) from None
            raise
        except asyncio.CancelledError:
            lease.signals.cancel()  # sync handlers see ctx.cancelled
            raise

    async def _run_in_thread(self, lease: _Lease, task: Task, ctx: TaskContext, data: Any) -> Any:
        assert self._executor is not None and self._loop is not None
        loop = self._loop
        future = self._executor.submit(contextvars.copy_context().run, task.handler, ctx, data)
        lease.thread_running = True

        def finished(_: Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop has nothing left to count
                loop.call_soon_threadsafe(self._thread_finished, lease)

        future.add_done_callback(finished)
        return await asyncio.wrap_future(future)

    def _thread_finished(self, lease: _Lease) -> None:
        lease.thread_running = False
        if lease.runner is None or lease.runner.done():
            self._release(lease)

    def _failure(
        self,
        lease: _Lease,
        error_type: str,
        message: str,
        *,
        non_retryable: bool,
        details: bytes = b"",
    ) -> pb.FailTaskRequest:
        logger.warning(
            "%s failed: %s: %s%s",
            lease.msg.task_type,
            error_type,
            message,
            " (not retryable)" if non_retryable else "",
            extra=lease.extra,
        )
        return pb.FailTaskRequest(
            lease_token=lease.token,
            worker_id=self._worker_id,
            error=pb.TaskError(
                type=error_type,
                message=message[:_MAX_MESSAGE],
                non_retryable=non_retryable,
                details=details,
            ),
        )

    def _failure_from_exception(self, lease: _Lease, exc: BaseException) -> pb.FailTaskRequest:
        trace = "".join(traceback.format_exception(exc))
        if len(trace) > _MAX_TRACEBACK:
            trace = "...\n" + trace[-_MAX_TRACEBACK:]
        logger.debug("handler traceback:\n%s", trace, extra=lease.extra)
        return self._failure(
            lease,
            type(exc).__name__,
            str(exc),
            non_retryable=isinstance(exc, NonRetryableError),
            details=encode_json({"traceback": trace}),
        )

    # Results -----------------------------------------------------------------------

    async def _deliver(self, lease: _Lease, request: _Result) -> list[pb.Task]:
        """Sends the result until it is accepted, refused for good, or the lease is dropped.
        Returns the tasks a completion's reply leased to this worker (eager dispatch)."""
        assert self._reporter is not None
        backoff = Backoff()
        current: _Result | None = request
        while current is not None and lease.drop_reason is None:
            # Eager dispatch: the slot this result frees may go straight to the next task;
            # a poll in flight asked only for the other free slots.
            want_next = self._eager and not self._stopping.is_set() and not lease.thread_running
            try:
                tasks = await self._reporter.report(current, want_next=want_next)
                self._deliver_episode.succeeded(extra=self._log)
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
                        extra=lease.extra,
                    )
                    return []
                if code == grpc.StatusCode.INVALID_ARGUMENT or too_large(exc):
                    current = self._replacement(lease, current, exc)
                    continue
                # Anything else (UNAVAILABLE while the database is down, RESOURCE_EXHAUSTED
                # with its retry hint, ...) keeps the result: it is sent until delivered,
                # for as long as the lease is not known to be gone.
                delay = backoff.delay_after(exc)
                self._deliver_episode.failed(exc, delay, extra=lease.extra)
                await asyncio.sleep(delay)
        return []

    def _replacement(
        self, lease: _Lease, refused: _Result, exc: grpc.aio.AioRpcError
    ) -> pb.FailTaskRequest | None:
        """What to send instead of a result the coordinator refused as invalid (None: give up)."""
        reason = exc.details() or exc.code().name
        if isinstance(refused, pb.CompleteTaskRequest):
            return self._failure(
                lease,
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
            extra=lease.extra,
        )
        return None

    # Heartbeats --------------------------------------------------------------------

    def _request_heartbeat(self) -> None:
        """Called by ctx.heartbeat(), possibly from a handler thread."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(self._beat_now.set)

    def _interval(self) -> float:
        interval = self._heartbeat_interval
        for lease in self._leases.values():
            if lease.msg.HasField("heartbeat_timeout"):
                timeout = lease.msg.heartbeat_timeout.ToTimedelta().total_seconds()
                if timeout > 0:
                    interval = min(interval, timeout / 2)
        return max(interval, _MIN_HEARTBEAT_INTERVAL)

    async def _heartbeat_loop(self) -> None:
        assert self._loop is not None
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
            leases = [lease for lease in self._leases.values() if lease.drop_reason is None]
            if leases:
                last_sent = last_tick
                await self._heartbeat(leases, rpc_timeout=max(1.0, interval))

    async def _heartbeat(self, leases: list[_Lease], *, rpc_timeout: float) -> None:
        assert self._stub is not None
        request = pb.HeartbeatRequest(
            worker_id=self._worker_id,
            leases=[
                pb.LeaseHeartbeat(lease_token=lease.token, details=lease.signals.details)
                for lease in leases
            ],
        )
        try:
            response = await self._stub.Heartbeat(request, timeout=rpc_timeout)
        except grpc.aio.AioRpcError as exc:
            self._heartbeat_episode.failed(exc, self._interval(), extra=self._log)
            return
        self._heartbeat_episode.succeeded(extra=self._log)
        for token in response.cancelled_lease_tokens:
            self._drop(token, "cancelled")
        for token in response.lost_lease_tokens:
            self._drop(token, "lost")

    def _drop(self, token: str, reason: str) -> None:
        lease = self._leases.get(token)
        if lease is None or lease.drop_reason is not None:
            return
        lease.drop_reason = reason
        lease.signals.cancel()
        if lease.handler is not None and not lease.handler.done():
            lease.handler.cancel()
        logger.info(
            "lease %s: stopping the handler",
            "cancelled by the coordinator" if reason == "cancelled" else "lost",
            extra=lease.extra,
        )

    # Shutdown ----------------------------------------------------------------------

    def _pending_runners(self) -> set[asyncio.Task[None]]:
        return {
            lease.runner
            for lease in self._leases.values()
            if lease.runner is not None and not lease.runner.done()
        }

    async def _drain(self) -> None:
        pending = self._pending_runners()
        if not pending:
            return
        assert self._loop is not None
        logger.info(
            "stopping: waiting for %d in-flight tasks%s",
            len(pending),
            "" if self._drain_timeout is None else f" (at most {self._drain_timeout:g}s)",
            extra=self._log,
        )
        deadline = None if self._drain_timeout is None else self._loop.time() + self._drain_timeout
        forced = asyncio.create_task(self._force.wait())
        try:
            while pending and not self._force.is_set():
                remaining = None if deadline is None else deadline - self._loop.time()
                if remaining is not None and remaining <= 0:
                    break
                await asyncio.wait(
                    {*pending, forced}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                pending = self._pending_runners()
        finally:
            forced.cancel()
        if not pending:
            return
        for lease in self._leases.values():
            if lease.handler is not None and not lease.handler.done():
                lease.shutdown = True
                lease.signals.cancel()
                lease.handler.cancel()
        logger.warning(
            "stopping: cancelled %d unfinished tasks; handing them back",
            len(pending),
            extra=self._log,
        )
        await asyncio.wait(pending, timeout=_SHUTDOWN_DELIVERY_GRACE)
        for lease in list(self._leases.values()):
            if lease.runner is not None and not lease.runner.done():
                logger.warning(
                    "stopping: gave up delivering a result; the lease will expire",
                    extra=lease.extra,
                )


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
