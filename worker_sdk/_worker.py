"""The Worker: registers, then serves with three parts sharing one count of slots (a
poller, a runner and a heartbeater) until it is stopped, and drains what runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from trellis.v1 import worker_service_pb2 as pb
from trellis.v1 import worker_service_pb2_grpc as pb_grpc
from worker_sdk._channel import Backoff, Episode, open_channel
from worker_sdk._errors import rpc_error
from worker_sdk._heartbeater import DEFAULT_HEARTBEAT_INTERVAL, MIN_HEARTBEAT_INTERVAL, Heartbeater
from worker_sdk._poller import Poller, being_cancelled
from worker_sdk._runner import Runner
from worker_sdk._settings import TlsSettings, connection_settings
from worker_sdk._slots import Slots
from worker_sdk._task import Task

logger = logging.getLogger(__name__)

_RPC_TIMEOUT = 30.0
_SHUTDOWN_DELIVERY_GRACE = 5.0

# Codes that mean the worker itself is misconfigured: the first registration gives up.
_FATAL_REGISTRATION_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


@dataclass(frozen=True)
class _Parts:
    """What one ``serve()`` run is made of: three parts sharing one count of slots."""

    stub: pb_grpc.WorkerServiceAsyncStub
    slots: Slots
    heartbeater: Heartbeater
    poller: Poller
    runner: Runner


class Worker:
    """Serves tasks to a Trellis coordinator::

        Worker(tasks=[send_email, resize_image]).run()

    ``address`` is the coordinator's HOST:PORT; without it, ``TRELLIS_ADDRESS`` or else
    ``127.0.0.1:7400`` (as for the ``trellis`` CLI and the Client). ``api_key`` (else
    ``TRELLIS_API_KEY``) is its credential, ``tls`` (else ``TRELLIS_CA_FILE`` and friends)
    how it checks the coordinator and, for mutual TLS, proves itself (``TlsSettings``).
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
        api_key: str | None = None,
        tls: TlsSettings | None = None,
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
        self._settings = connection_settings(address, api_key=api_key, tls=tls)
        self._concurrency = concurrency
        self._eager = eager_dispatch
        self._worker_id = worker_id or ""
        self._poll_wait = float(poll_wait)
        self._labels = dict(labels or {})
        self._identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self._drain_timeout = drain_timeout

        self._serving = False
        self._parts: _Parts | None = None
        self._registration: Any = None  # the RegisterWorker call stop() cancels
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._stopped = asyncio.Event()
        # Failures are logged once per episode (an outage, a spell of backpressure).
        self._register_episode = Episode(logger, f"registering with {self._settings.address}")

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
        self._stopping = asyncio.Event()
        self._force = asyncio.Event()
        self._stopped = asyncio.Event()
        channel = open_channel(self._settings)
        parts = self._parts = self._compose(pb_grpc.WorkerServiceStub(channel))
        heartbeat: asyncio.Task[None] | None = None
        try:
            if await self._register(initial=True):
                heartbeat = asyncio.create_task(parts.heartbeater.run(), name="trellis-heartbeat")
                await parts.poller.run()
                await self._drain(parts.runner)
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)
            await parts.runner.close()
            await channel.close()
            self._parts = None
            self._serving = False
            self._stopped.set()
            logger.info("worker stopped", extra=self._log)

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
                extra=self._log,
            )
            self._begin_stop()
        else:
            logger.warning("received %s again: cancelling running tasks", sig.name, extra=self._log)
            self._force.set()

    def _begin_stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._parts is not None:
            self._parts.poller.stop()
        if self._registration is not None:
            self._registration.cancel()

    def _compose(self, stub: pb_grpc.WorkerServiceAsyncStub) -> _Parts:
        """The parts of one ``serve()`` run, wired to each other."""
        address = self._settings.address
        slots = Slots(self._concurrency)
        heartbeater = Heartbeater(stub, worker_id=lambda: self._worker_id, address=address)
        # Tasks enter through the poller, from its polls and from results' replies (eager
        # dispatch); the runner runs them.
        poller = Poller(
            stub,
            slots,
            worker_id=lambda: self._worker_id,
            task_types=self._task_types,
            poll_wait=self._poll_wait,
            eager_dispatch=self._eager,
            address=address,
            register=lambda: self._register(initial=False),
            start=lambda msg: runner.start(msg),
        )
        runner = Runner(
            self._tasks,
            slots,
            stub,
            heartbeater,
            poller,
            worker_id=lambda: self._worker_id,
            task_types=self._task_types,
            address=address,
        )
        return _Parts(stub, slots, heartbeater, poller, runner)

    @property
    def _log(self) -> dict[str, Any]:
        return {"worker_id": self._worker_id}

    # Registration ----------------------------------------------------------------

    async def _register(self, *, initial: bool) -> bool:
        """Registers (retrying transient failures); False when stopped first."""
        from worker_sdk import __version__

        assert self._parts is not None
        stub = self._parts.stub
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
            call = stub.RegisterWorker(request, timeout=_RPC_TIMEOUT)
            self._registration = call
            try:
                response = await call
            except asyncio.CancelledError:
                if self._stopping.is_set() and not being_cancelled():
                    return False
                raise
            except grpc.aio.AioRpcError as exc:
                if self._stopping.is_set():
                    return False
                if initial and exc.code() in _FATAL_REGISTRATION_CODES:
                    raise rpc_error(exc, "RegisterWorker") from exc
                delay = backoff.delay_after(exc)
                self._register_episode.failed(exc, delay, extra=self._log)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                continue
            finally:
                self._registration = None
            self._register_episode.succeeded(extra=self._log)
            self._worker_id = response.worker_id or self._worker_id
            interval = DEFAULT_HEARTBEAT_INTERVAL
            if response.HasField("heartbeat_interval"):
                seconds = response.heartbeat_interval.ToTimedelta().total_seconds()
                if seconds > 0:
                    interval = max(seconds, MIN_HEARTBEAT_INTERVAL)
            self._parts.heartbeater.interval = interval
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

    # Shutdown ----------------------------------------------------------------------

    async def _drain(self, runner: Runner) -> None:
        pending = runner.pending()
        if not pending:
            return
        loop = asyncio.get_running_loop()
        logger.info(
            "stopping: waiting for %d in-flight tasks%s",
            len(pending),
            "" if self._drain_timeout is None else f" (at most {self._drain_timeout:g}s)",
            extra=self._log,
        )
        deadline = None if self._drain_timeout is None else loop.time() + self._drain_timeout
        forced = asyncio.create_task(self._force.wait())
        try:
            while pending and not self._force.is_set():
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    break
                await asyncio.wait(
                    {*pending, forced}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                pending = runner.pending()
        finally:
            forced.cancel()
        if not pending:
            return
        for running in runner.running:
            running.cancel("shutdown")
        logger.warning(
            "stopping: cancelled %d unfinished tasks; handing them back",
            len(pending),
            extra=self._log,
        )
        await asyncio.wait(pending, timeout=_SHUTDOWN_DELIVERY_GRACE)
        for running in runner.running:
            if running.job is not None and not running.job.done():
                logger.warning(
                    "stopping: gave up delivering a result; the lease will expire",
                    extra=running.extra,
                )
