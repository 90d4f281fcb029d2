"""Two coordinator replicas on one PostgreSQL database: wake-ups cross replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.grpc.server import RunningServer, start
from coordinator.store import SqlStore, open_store
from tests.support.grpc_api import DIAMOND, channel_to
from tests.support.procs import ADMIN_KEY
from tests.support.wait import wait_for
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import worker_service_pb2_grpc, workflow_service_pb2_grpc
from trellis.v1 import workflow_service_pb2 as fpb

pytestmark = pytest.mark.postgres


@pytest.fixture
async def replicas(fresh_postgres_url: str) -> AsyncIterator[list[tuple[RunningServer, SqlStore]]]:
    config = CoordinatorConfig(
        listen="127.0.0.1:0", poll_max_wait=timedelta(seconds=30), bootstrap_admin_key=ADMIN_KEY
    )
    running: list[tuple[RunningServer, SqlStore]] = []
    try:
        for _ in range(2):
            store = await open_store(fresh_postgres_url)
            running.append((await start(config, store), store))
        yield running
    finally:
        for server, _ in running:
            await server.stop()


async def test_a_poll_on_one_replica_is_woken_by_work_made_ready_on_another(
    replicas: list[tuple[RunningServer, SqlStore]],
) -> None:
    (a, store_a), (b, store_b) = replicas
    await wait_for(lambda: store_a.listening and store_b.listening)
    async with (
        channel_to(f"127.0.0.1:{a.port}") as chan_a,
        channel_to(f"127.0.0.1:{b.port}") as chan_b,
    ):
        workers_a = worker_service_pb2_grpc.WorkerServiceStub(chan_a)
        workflows_b = workflow_service_pb2_grpc.WorkflowServiceStub(chan_b)
        await workflows_b.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=DIAMOND))
        request = wpb.PollTasksRequest(worker_id="w1", task_types=["t"], max_tasks=1)
        request.wait.FromSeconds(20)
        poll = asyncio.ensure_future(workers_a.PollTasks(request, timeout=30))
        await wait_for(lambda: a.coordinator.notifier.waiting == 1)
        started = time.perf_counter()
        await workflows_b.StartExecution(
            fpb.StartExecutionRequest(workflow_name="diamond", input=b"1")
        )
        reply = await poll
        latency = time.perf_counter() - started
    assert [t.node_id for t in reply.tasks] == ["a"]
    print(f"\ncross-replica wake-up latency: {latency * 1000:.1f} ms")
    # Far below the 20 s wait: replica A was woken through LISTEN/NOTIFY, not by its timeout.
    assert latency < 5.0
