"""Backpressure and a database outage through a real gRPC server on a socket.

The coordinator is built here with its PollWaiters / StartRate (the ``api`` fixture uses
the server's own wiring, with unlimited defaults).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from sqlalchemy.engine import make_url

from coordinator.grpc.servicers import WorkerServicer, WorkflowServicer
from coordinator.service import Coordinator, PollWaiters, ServiceSettings, StartRate, Store
from coordinator.store import open_store
from tests.support.grpc_api import channel_to, open_interceptor
from tests.support.tcp_proxy import TcpProxy
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import worker_service_pb2_grpc as wgrpc
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc

RETRY_AFTER = "retry-after-ms"


@dataclass
class Served:
    coordinator: Coordinator
    workflows: fgrpc.WorkflowServiceStub
    workers: wgrpc.WorkerServiceStub


@pytest.fixture
def limits() -> tuple[PollWaiters, StartRate]:
    # A very slow refill: within the test only the burst is available.
    return PollWaiters(1), StartRate(0.001, 2)


@pytest.fixture
async def served(store: Store, limits: tuple[PollWaiters, StartRate]) -> AsyncIterator[Served]:
    async with serve(store, *limits) as s:
        yield s


class serve:
    """An in-process gRPC server over ``store`` with the given limits."""

    def __init__(self, store: Store, waiters: PollWaiters | None, rate: StartRate | None) -> None:
        self.coordinator = Coordinator(
            store,
            ServiceSettings(poll_max_wait=timedelta(seconds=10)),
            poll_waiters=waiters,
            start_rate=rate,
        )
        self.server = grpc.aio.server(interceptors=[open_interceptor(self.coordinator)])
        wgrpc.add_WorkerServiceServicer_to_server(WorkerServicer(self.coordinator), self.server)
        fgrpc.add_WorkflowServiceServicer_to_server(WorkflowServicer(self.coordinator), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Served:
        await self.server.start()
        self.channel = channel_to(f"127.0.0.1:{self.port}")
        return Served(
            self.coordinator,
            fgrpc.WorkflowServiceStub(self.channel),
            wgrpc.WorkerServiceStub(self.channel),
        )

    async def __aexit__(self, *exc: object) -> None:
        assert self.channel is not None
        await self.channel.close()
        self.coordinator.begin_drain()
        await self.server.stop(None)


async def register_one_node(s: Served, name: str = "one") -> None:
    defn = common_pb2.WorkflowDefinition(name=name)
    defn.nodes.add(id="a", task_type="t")
    await s.workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=defn))


def start_request(name: str = "one") -> fpb.StartExecutionRequest:
    return fpb.StartExecutionRequest(workflow_name=name, input=json.dumps({}).encode())


def hint_ms(err: grpc.aio.AioRpcError) -> int:
    values = [v for k, v in (err.trailing_metadata() or ()) if k == RETRY_AFTER]
    assert len(values) == 1, f"no {RETRY_AFTER} trailer in {err.trailing_metadata()!r}"
    return int(values[0])


async def test_starts_over_the_rate_are_refused_with_a_retry_hint(served: Served) -> None:
    await register_one_node(served)
    await served.workflows.StartExecution(start_request())
    await served.workflows.StartExecution(start_request())  # the burst of 2 is used up
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await served.workflows.StartExecution(start_request())
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "start rate limit" in (refused.value.details() or "")
    assert hint_ms(refused.value) > 0
    with pytest.raises(grpc.aio.AioRpcError) as batch:
        await served.workflows.BatchStartExecutions(
            fpb.BatchStartExecutionsRequest(requests=[start_request(), start_request()])
        )
    assert batch.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert hint_ms(batch.value) > 0
    listed = await served.workflows.ListExecutions(fpb.ListExecutionsRequest())
    assert len(listed.executions) == 2  # the refused starts started nothing


async def test_polls_over_the_waiter_bound_are_refused_with_a_retry_hint(
    served: Served, limits: tuple[PollWaiters, StartRate]
) -> None:
    waiters, _ = limits
    await register_one_node(served)
    worker = await served.workers.RegisterWorker(
        wpb.RegisterWorkerRequest(task_types=["t"], capacity=4)
    )

    def poll(wait: float) -> grpc.aio.UnaryUnaryCall[wpb.PollTasksRequest, wpb.PollTasksResponse]:
        return served.workers.PollTasks(
            wpb.PollTasksRequest(
                worker_id=worker.worker_id,
                task_types=["t"],
                max_tasks=1,
                wait=duration_pb2.Duration(seconds=int(wait)),
            )
        )

    async def one_waiting() -> bool:
        return waiters.waiting == 1

    first = poll(8)  # nothing to claim: it waits, taking the only waiting slot
    await wait_for(one_waiting)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await poll(8)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many waiting polls" in (refused.value.details() or "")
    assert hint_ms(refused.value) == 1000

    # A poll that finds work claims it without waiting, even when the waiters are full...
    started = await served.workflows.StartExecution(start_request())
    got = await first  # ... and the waiting poll is woken by the start and gets it
    assert [t.execution_id for t in got.tasks] == [started.execution.id]
    assert waiters.waiting == 0
    await served.workflows.StartExecution(start_request())
    assert len((await poll(8)).tasks) == 1


@pytest.mark.postgres
async def test_database_outage_answers_unavailable_then_recovers(
    fresh_postgres_url: str,
) -> None:
    url = make_url(fresh_postgres_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        store = await open_store(proxied)
        try:
            async with serve(store, None, None) as s:
                await register_one_node(s)
                started = await s.workflows.StartExecution(start_request())
                get = fpb.GetExecutionRequest(execution_id=started.execution.id)
                proxy.cut()
                with pytest.raises(grpc.aio.AioRpcError) as down:
                    await s.workflows.GetExecution(get, timeout=30)
                assert down.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "database unavailable" in (down.value.details() or "")
                proxy.restore()

                async def readable() -> bool:
                    try:
                        await s.workflows.GetExecution(get, timeout=30)
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                        return False
                    return True

                await wait_for(readable, timeout=30, interval=0.2)
        finally:
            await store.close()


@pytest.mark.slow
async def test_sqlite_locked_database_answers_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "trellis.db"
    store = await open_store(f"sqlite:///{path}")
    try:
        async with serve(store, None, None) as s:
            await register_one_node(s)
            blocker = sqlite3.connect(path, isolation_level=None)
            try:
                blocker.execute("BEGIN EXCLUSIVE")
                with pytest.raises(grpc.aio.AioRpcError) as locked:
                    await s.workflows.StartExecution(start_request(), timeout=60)
            finally:
                blocker.close()
            assert locked.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "database unavailable" in (locked.value.details() or "")
            assert "locked" in (locked.value.details() or "")
            await s.workflows.StartExecution(start_request(), timeout=30)
    finally:
        await store.close()
