"""Hostile requests against a real `trellis coordinator serve` process (SQLite), each
answered with a clear error or bounded behaviour while the process stays responsive
(health within 200 ms throughout) and small (< 50 MB growth): tests/support/hostile.py.

- PollTasks with 100,000 task types, RegisterWorker with 100,000 labels: INVALID_ARGUMENT
  naming the field (coordinator/grpc/limits.py);
- 50 concurrent WatchExecution streams of an execution with 20,000 events (under the
  default caps): each gets the whole history in pages of at most 100 events (about a minute
  on a loaded 2-core machine: the replica reads one page at a time, so it stays responsive);
- 30 watches that stop reading: each holds a page, not the history, and hold up no one;
- WatchExecution past TRELLIS_MAX_WATCHES_PER_CALLER: RESOURCE_EXHAUSTED saying so;
- bytes that do not decode, sent to every RPC of every service: INVALID_ARGUMENT, and no
  traceback in the coordinator's log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from coordinator.grpc.limits import services
from coordinator.model import SYSTEM_TENANT, Event, EventType, ExecutionStatus, Transition
from coordinator.service._executions import WATCH_PAGE
from coordinator.store import open_store
from tests.support.grpc_api import channel_to
from tests.support.hostile import grpc_health, watched
from tests.support.procs import Proc, spawn_coordinator
from tests.support.store_builders import NOW, make_execution
from tests.support.wait import wait_for
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import worker_service_pb2_grpc as wgrpc
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc

pytestmark = pytest.mark.e2e

HISTORY = 20_000
WATCHERS = 50


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'trellis.db'}"


@contextlib.asynccontextmanager
async def coordinator(
    tmp_path: Path, **settings: str
) -> AsyncIterator[tuple[Proc, str, grpc.aio.Channel]]:
    proc, address = spawn_coordinator(_sqlite(tmp_path), tmp_path, **settings)
    channel = channel_to(address)
    try:
        yield proc, address, channel
    finally:
        await channel.close()
        code = proc.stop()
    assert code == 0, proc.output()[-3000:]


async def _execution_with_history(tmp_path: Path, status: ExecutionStatus, events: int) -> str:
    """An execution of ``events`` events, written through the store before the coordinator
    process starts on the same file."""
    store = await open_store(_sqlite(tmp_path))
    try:
        execution = make_execution(f"e-{status.name.lower()}", tenant=SYSTEM_TENANT, status=status)
        history = tuple(
            Event(
                execution.id,
                EventType.NODE_READY,
                NOW,
                tenant_id=SYSTEM_TENANT,
                node_id=f"node-{i}",
                details=b'{"why": "history"}',
            )
            for i in range(events)
        )
        created, _ = await store.executions.create_execution(
            Transition(execution=execution, events=history)
        )
        return created.id
    finally:
        await store.close()


async def test_huge_lists_are_refused_naming_the_field(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as (proc, address, channel):
        workers = wgrpc.WorkerServiceStub(channel)
        async with watched(proc, grpc_health(address)):
            with pytest.raises(grpc.aio.AioRpcError) as polled:
                await workers.PollTasks(
                    wpb.PollTasksRequest(
                        worker_id="w", task_types=[f"type-{i}" for i in range(100_000)]
                    ),
                    timeout=30,
                )
            assert polled.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (polled.value.details() or "").startswith(
                "PollTasksRequest.task_types: 100000 entries, at most 256"
            )
            with pytest.raises(grpc.aio.AioRpcError) as registered:
                await workers.RegisterWorker(
                    wpb.RegisterWorkerRequest(
                        worker_id="w",
                        task_types=["t"],
                        capacity=1,
                        labels={f"label-{i}": "v" for i in range(100_000)},
                    ),
                    timeout=30,
                )
            assert registered.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (registered.value.details() or "").startswith(
                "RegisterWorkerRequest.labels: 100000 entries, at most 64"
            )
        # Nothing was written: the worker is unknown, its poll is refused as such.
        reply = await workers.RegisterWorker(
            wpb.RegisterWorkerRequest(worker_id="w", task_types=["t"], capacity=1), timeout=10
        )
        assert reply.worker_id == "w"


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_fifty_watches_of_a_long_history_stream_it_in_pages(tmp_path: Path) -> None:
    execution_id = await _execution_with_history(tmp_path, ExecutionStatus.SUCCEEDED, HISTORY)
    async with coordinator(tmp_path) as (proc, address, channel):
        workflows = fgrpc.WorkflowServiceStub(channel)

        async def watch() -> tuple[int, int, int]:
            pages = events = largest = 0
            async for reply in workflows.WatchExecution(
                fpb.WatchExecutionRequest(execution_id=execution_id), timeout=120
            ):
                if reply.events:
                    pages += 1
                    events += len(reply.events)
                    largest = max(largest, len(reply.events))
                assert not reply.HasField("event")
            return pages, events, largest

        async with watched(proc, grpc_health(address)):
            results = await asyncio.gather(*(watch() for _ in range(WATCHERS)))
        assert results == [(HISTORY // WATCH_PAGE, HISTORY, WATCH_PAGE)] * WATCHERS


@pytest.mark.slow
async def test_slow_readers_hold_a_page_each_and_hold_up_no_one(tmp_path: Path) -> None:
    """30 watches that read one page and then nothing: the coordinator writes each only as
    fast as it is read (it does not buffer the 20,000 events per watch: growth < 50 MB),
    and a watch that reads gets the whole history meanwhile."""
    execution_id = await _execution_with_history(tmp_path, ExecutionStatus.SUCCEEDED, HISTORY)
    async with coordinator(tmp_path) as (proc, address, channel):
        workflows = fgrpc.WorkflowServiceStub(channel)
        request = fpb.WatchExecutionRequest(execution_id=execution_id)
        slow = [workflows.WatchExecution(request, timeout=120) for _ in range(30)]
        try:
            async with watched(proc, grpc_health(address)):
                for call in slow:
                    assert len((await call.read()).events) == WATCH_PAGE
                read = 0
                async for reply in workflows.WatchExecution(request, timeout=120):
                    read += len(reply.events)
                assert read == HISTORY
        finally:
            for call in slow:
                call.cancel()


async def test_watches_past_the_per_caller_cap_are_refused(tmp_path: Path) -> None:
    execution_id = await _execution_with_history(tmp_path, ExecutionStatus.RUNNING, 3)
    async with coordinator(tmp_path, max_watches_per_caller="5") as (proc, address, channel):
        workflows = fgrpc.WorkflowServiceStub(channel)
        request = fpb.WatchExecutionRequest(execution_id=execution_id)
        held = [workflows.WatchExecution(request, timeout=60) for _ in range(5)]
        try:
            async with watched(proc, grpc_health(address)):
                for call in held:  # each is admitted once its first page arrives
                    first = await call.read()
                    assert len(first.events) == 3
                extra = workflows.WatchExecution(request, timeout=30)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await extra.read()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "TRELLIS_MAX_WATCHES_PER_CALLER" in (refused.value.details() or "")
                held.pop().cancel()

                async def admitted_again() -> bool:
                    again = workflows.WatchExecution(request, timeout=30)
                    try:
                        return len((await again.read()).events) == 3
                    except grpc.aio.AioRpcError:
                        return False
                    finally:
                        again.cancel()

                await wait_for(admitted_again, timeout=30)
        finally:
            for call in held:
                call.cancel()


NEVER_DECODES = [
    b"\xff",  # a truncated tag
    b"\x0a\x05ab",  # field 1, length 5, 2 bytes follow
]
# Field 1 holding bytes that are not UTF-8: undecodable where field 1 is a string; where it
# is not, the request decodes (an unknown field) and gets whatever answer it deserves.
NOT_UTF8 = b"\x0a\x02\xff\xfe"


async def _send(channel: grpc.aio.Channel, path: str, streaming: bool, data: bytes) -> None:
    if streaming:
        call = channel.unary_stream(path)(data, timeout=10)
        try:
            await call.read()
        finally:
            call.cancel()
    else:
        await channel.unary_unary(path)(data, timeout=10)


async def test_undecodable_requests_to_every_rpc_are_invalid_argument(tmp_path: Path) -> None:
    async with coordinator(tmp_path) as (proc, address, channel):
        codes: dict[str, list[grpc.StatusCode]] = {}
        async with watched(proc, grpc_health(address)):
            for service in services():
                for method in service.methods:
                    path = f"/{service.full_name}/{method.name}"
                    for data in NEVER_DECODES:
                        with pytest.raises(grpc.aio.AioRpcError) as refused:
                            await _send(channel, path, method.server_streaming, data)
                        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
                        assert f"not a valid {method.input_type.full_name} message" in (
                            refused.value.details() or ""
                        )
                    try:
                        await _send(channel, path, method.server_streaming, NOT_UTF8)
                    except grpc.aio.AioRpcError as exc:
                        codes.setdefault(path, []).append(exc.code())
        assert not {
            path: got
            for path, got in codes.items()
            if {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN} & set(got)
        }
        assert codes["/trellis.v1.WorkerService/PollTasks"] == [grpc.StatusCode.INVALID_ARGUMENT]
        assert "Traceback" not in proc.output()
        assert "deserializing" not in proc.output()
