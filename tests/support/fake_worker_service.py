"""A fake WorkerService on a real socket, for the SDK's Worker: it leases queued tasks and
records everything the worker sends; tests script its refusals and cancellations.

``start_server(service)`` serves it on 127.0.0.1 (``service.address``); ``serving(worker)``
runs a Worker for the length of a block and stops it after; ``echo`` is a task that returns
its input and attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc

from trellis.v1 import worker_service_pb2 as pb
from trellis.v1 import worker_service_pb2_grpc as pb_grpc
from worker_sdk import TaskContext, Worker, task


class FakeWorkerService(pb_grpc.WorkerServiceServicer):
    """Leases queued tasks and records everything the worker sends."""

    def __init__(self) -> None:
        self.address = ""
        self.server: grpc.aio.Server | None = None
        self.heartbeat_interval = 0.1
        self.registrations: list[pb.RegisterWorkerRequest] = []
        self.polls: list[pb.PollTasksRequest] = []
        self.heartbeats: list[pb.HeartbeatRequest] = []
        self.complete_calls: list[pb.CompleteTaskRequest] = []
        self.fail_calls: list[pb.FailTaskRequest] = []
        self.completions: dict[str, Any] = {}  # token → decoded output (accepted only)
        self.failures: dict[str, pb.TaskError] = {}
        # Errors to answer with, first in first out, before behaving normally.
        self.poll_errors: list[tuple[grpc.StatusCode, str]] = []
        self.complete_errors: list[tuple[grpc.StatusCode, str]] = []
        self.cancel_tokens: set[str] = set()
        self.lost_tokens: set[str] = set()
        self.poll_cancelled = asyncio.Event()
        self.overdeliver = False  # hand out every queued task, ignoring max_tasks
        self.eager = True  # serve max_next_tasks (eager dispatch) from the queue
        self.batches = True  # False: a coordinator without ReportResults (UNIMPLEMENTED)
        self.report_calls: list[pb.ReportResultsRequest] = []
        self.eager_leased: list[str] = []
        self.polling = 0
        self.leased: set[str] = set()
        self.max_outstanding = 0
        self._queue: list[pb.Task] = []
        self._cond = asyncio.Condition()
        self._count = 0

    async def add_task(self, task_type: str, data: Any = None, **fields: Any) -> str:
        self._count += 1
        token = f"lease-{self._count}"
        msg = pb.Task(
            lease_token=token,
            execution_id=f"exec-{self._count}",
            node_id=f"node-{self._count}",
            task_type=task_type,
            attempt=1,
            input=b"" if data is None else json.dumps(data).encode(),
            idempotency_key=f"exec-{self._count}/node-{self._count}",
            workflow_name="wf",
            workflow_version=3,
            **fields,
        )
        async with self._cond:
            self._queue.append(msg)
            self._cond.notify_all()
        return token

    def done(self, token: str) -> bool:
        return token in self.completions or token in self.failures

    def detail_seen(self, token: str, details: bytes) -> bool:
        return any(
            lease.lease_token == token and lease.details == details
            for hb in self.heartbeats
            for lease in hb.leases
        )

    async def RegisterWorker(
        self, request: pb.RegisterWorkerRequest, context: Any
    ) -> pb.RegisterWorkerResponse:
        self.registrations.append(request)
        response = pb.RegisterWorkerResponse(worker_id=request.worker_id or "w-1")
        response.heartbeat_interval.FromTimedelta(timedelta(seconds=self.heartbeat_interval))
        return response

    async def PollTasks(self, request: pb.PollTasksRequest, context: Any) -> pb.PollTasksResponse:
        self.polls.append(request)
        if self.poll_errors:
            code, message = self.poll_errors.pop(0)
            await context.abort(code, message)
        self.polling += 1
        try:
            async with self._cond:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._cond.wait_for(lambda: bool(self._queue)),
                        request.wait.ToTimedelta().total_seconds(),
                    )
                n = len(self._queue) if self.overdeliver else request.max_tasks
                batch = self._queue[:n]
                del self._queue[:n]
        except asyncio.CancelledError:
            self.poll_cancelled.set()
            raise
        finally:
            self.polling -= 1
        self.leased.update(t.lease_token for t in batch)
        self.max_outstanding = max(self.max_outstanding, len(self.leased))
        return pb.PollTasksResponse(tasks=batch)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Any) -> pb.HeartbeatResponse:
        self.heartbeats.append(request)
        tokens = {lease.lease_token for lease in request.leases}
        return pb.HeartbeatResponse(
            cancelled_lease_tokens=sorted(tokens & self.cancel_tokens),
            lost_lease_tokens=sorted(tokens & self.lost_tokens),
        )

    async def CompleteTask(
        self, request: pb.CompleteTaskRequest, context: Any
    ) -> pb.CompleteTaskResponse:
        refused = self._complete(request)
        if refused is not None:
            await context.abort(*refused)
        tasks = await self._lease_eager(request.task_types, request.max_next_tasks)
        return pb.CompleteTaskResponse(next_tasks=tasks)

    async def FailTask(self, request: pb.FailTaskRequest, context: Any) -> pb.FailTaskResponse:
        self._fail(request)
        return pb.FailTaskResponse(will_retry=not request.error.non_retryable)

    async def ReportResults(
        self, request: pb.ReportResultsRequest, context: Any
    ) -> pb.ReportResultsResponse:
        if not self.batches:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.report_calls.append(request)
        reply = pb.ReportResultsResponse()
        for entry in request.results:
            refused = None
            if entry.HasField("completed"):
                refused = self._complete(entry.completed)
            else:
                self._fail(entry.failed)
            code, message = refused or (grpc.StatusCode.OK, "")
            reply.results.add(code=code.value[0], message=message)
        reply.next_tasks.extend(await self._lease_eager(request.task_types, request.max_next_tasks))
        return reply

    def _complete(self, request: pb.CompleteTaskRequest) -> tuple[grpc.StatusCode, str] | None:
        self.complete_calls.append(request)
        if self.complete_errors:
            return self.complete_errors.pop(0)
        self.leased.discard(request.lease_token)
        self.completions[request.lease_token] = json.loads(request.output)
        return None

    def _fail(self, request: pb.FailTaskRequest) -> None:
        self.fail_calls.append(request)
        self.leased.discard(request.lease_token)
        self.failures[request.lease_token] = request.error

    async def _lease_eager(self, task_types: Any, count: int) -> list[pb.Task]:
        if not self.eager or count <= 0:
            return []
        async with self._cond:
            batch = [t for t in self._queue if t.task_type in task_types][:count]
            self._queue = [t for t in self._queue if t not in batch]
        self.eager_leased.extend(t.lease_token for t in batch)
        self.leased.update(t.lease_token for t in batch)
        self.max_outstanding = max(self.max_outstanding, len(self.leased))
        return batch


async def start_server(service: FakeWorkerService, port: int = 0) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_WorkerServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    service.address = f"127.0.0.1:{bound}"
    service.server = server
    return server


@contextlib.asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    serve = asyncio.create_task(worker.serve())
    try:
        yield serve
    finally:
        await asyncio.wait_for(worker.stop(), 10)
        await serve


@task("echo")
async def echo(ctx: TaskContext, data: Any) -> Any:
    return {"got": data, "attempt": ctx.attempt}
