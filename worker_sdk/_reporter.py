"""Results on the wire: batched into ReportResults calls.

A worker finishing many short tasks would spend one round trip per result. Instead, the
results that finish while a batch is on the wire wait for it and go together in the next
call, so an idle worker still reports each result at once and a busy one reports many per
call. Each result keeps its own fate: the reply has a status per result, which ``report``
raises as the RpcError that CompleteTask or FailTask would have raised, so the caller's
retry and drop rules do not change. A coordinator without ReportResults (UNIMPLEMENTED)
gets the results one call each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import grpc

from trellis.v1 import worker_service_pb2 as pb
from trellis.v1 import worker_service_pb2_grpc as pb_grpc
from worker_sdk._channel import RETRY_AFTER_KEY

logger = logging.getLogger(__name__)

Result = pb.CompleteTaskRequest | pb.FailTaskRequest

# Most results in one call, and most bytes (a result larger than that goes alone): well
# under the coordinator's limits (1,000 results, its message size).
MAX_BATCH = 256
MAX_BATCH_BYTES = 4 * 1024 * 1024
_RPC_TIMEOUT = 30.0


@dataclass(eq=False)
class _Pending:
    request: Result
    want_next: bool  # eager dispatch: this result frees a slot for a next task
    done: asyncio.Future[list[pb.Task]]


class Reporter:
    """``report`` sends a result, batched with others (see the module doc). Tasks that eager
    dispatch leased but no waiting result can take are handed to ``orphans``."""

    def __init__(
        self,
        stub: pb_grpc.WorkerServiceAsyncStub,
        worker_id: Callable[[], str],
        task_types: Sequence[str],
        orphans: Callable[[pb.Task], None],
    ) -> None:
        self._stub = stub
        self._worker_id = worker_id
        self._task_types = list(task_types)
        self._orphans = orphans
        self._queue: list[_Pending] = []
        self._runner: asyncio.Task[None] | None = None
        self._batched = True  # False once the coordinator says it has no ReportResults

    async def report(self, request: Result, *, want_next: bool) -> list[pb.Task]:
        """Delivers one result; returns the tasks eager dispatch leased for its slot.

        Raises ``grpc.aio.AioRpcError``: the call failed, or the coordinator refused this
        result (its code and details, and its retry hint as trailing metadata)."""
        done: asyncio.Future[list[pb.Task]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(request, want_next, done))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="trellis-report-results")
        return await done

    async def close(self) -> None:
        """Stops sending; results still waiting are failed with CancelledError."""
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        for item in self._queue:
            item.done.cancel()
        self._queue.clear()

    async def _run(self) -> None:
        while self._queue:
            batch = self._take()
            try:
                if self._batched:
                    await self._send_batch(batch)
                else:
                    await self._send_each(batch)
            except BaseException as exc:  # never leave a caller waiting
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue and len(batch) < MAX_BATCH:
            item = self._queue[0]
            if item.done.done():  # its caller gave up (the worker is stopping)
                self._queue.pop(0)
                continue
            size += item.request.ByteSize()
            if batch and size > MAX_BATCH_BYTES:
                break
            batch.append(self._queue.pop(0))
        return batch

    async def _send_batch(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        asking = sum(item.want_next for item in batch)
        request = pb.ReportResultsRequest(
            worker_id=self._worker_id(),
            max_next_tasks=asking,
            task_types=self._task_types if asking else (),
        )
        for item in batch:
            entry = request.results.add()
            if isinstance(item.request, pb.CompleteTaskRequest):
                entry.completed.CopyFrom(item.request)
            else:
                entry.failed.CopyFrom(item.request)
        try:
            reply = await self._stub.ReportResults(request, timeout=_RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                logger.info("the coordinator has no ReportResults; sending results one by one")
                self._batched = False
            elif code != grpc.StatusCode.INVALID_ARGUMENT and not too_large(exc):
                raise
            # Refused as a whole: one call each says which result (if any) is at fault.
            await self._send_each(batch)
            return
        if len(reply.results) != len(batch):
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                f"ReportResults replied {len(reply.results)} statuses for {len(batch)} results",
            )
        accepted = []
        for item, status in zip(batch, reply.results, strict=True):
            if status.code == grpc.StatusCode.OK.value[0]:
                accepted.append(item)
            elif not item.done.done():
                item.done.set_exception(_refused(status))
        self._share(accepted, list(reply.next_tasks))

    def _share(self, accepted: list[_Pending], tasks: list[pb.Task]) -> None:
        """Eager dispatch's tasks go one to each result that freed a slot (its caller starts
        it once the slot is released); any left over go to ``orphans``."""
        shares: dict[int, list[pb.Task]] = {}
        takers = [i for i, item in enumerate(accepted) if item.want_next and not item.done.done()]
        for i, task in zip(takers, tasks, strict=False):
            shares[i] = [task]
        for task in tasks[len(takers) :]:
            self._orphans(task)
        for i, item in enumerate(accepted):
            if not item.done.done():
                item.done.set_result(shares.get(i, []))

    async def _send_each(self, batch: list[_Pending]) -> None:
        await asyncio.gather(*(self._send_one(item) for item in batch))

    async def _send_one(self, item: _Pending) -> None:
        request = item.request
        tasks: list[pb.Task] = []
        try:
            if isinstance(request, pb.CompleteTaskRequest):
                request.max_next_tasks = 1 if item.want_next else 0
                request.task_types[:] = self._task_types if item.want_next else ()
                reply = await self._stub.CompleteTask(request, timeout=_RPC_TIMEOUT)
                tasks = list(reply.next_tasks)
            else:
                await self._stub.FailTask(request, timeout=_RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if not item.done.done():
                item.done.set_exception(exc)
            return
        if item.done.done():
            for task in tasks:
                self._orphans(task)
        else:
            item.done.set_result(tasks)


def _refused(status: pb.ResultStatus) -> grpc.aio.AioRpcError:
    """A result's status in a ReportResults reply, as the error its own call would raise."""
    trailers: tuple[tuple[str, str], ...] = ()
    if status.HasField("retry_after"):
        millis = max(status.retry_after.ToTimedelta() // timedelta(milliseconds=1), 1)
        trailers = ((RETRY_AFTER_KEY, str(millis)),)
    try:
        code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    except StopIteration:
        code = grpc.StatusCode.UNKNOWN
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), status.message
    )


def too_large(exc: grpc.aio.AioRpcError) -> bool:
    """gRPC itself refused a message over the receive limit: sending it again never helps."""
    return (
        exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "larger than max" in (exc.details() or "").lower()
    )
