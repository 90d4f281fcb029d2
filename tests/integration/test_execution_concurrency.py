"""An execution's max_concurrency through the gRPC API: it caps the execution's leased
nodes, and a waiting poll is woken when one of them ends (no new node became READY)."""

from __future__ import annotations

import asyncio

from tests.support.grpc_api import Api, definition, poll, register
from tests.support.wait import wait_for
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb


async def test_a_capped_execution_wakes_its_waiting_poll_when_a_lease_ends(api: Api) -> None:
    await register(api, definition("fan", ["a", "b", "c"], []))
    reply = await api.workflows.StartExecution(
        fpb.StartExecutionRequest(workflow_name="fan", input=b"null", max_concurrency=2)
    )
    assert reply.execution.max_concurrency == 2
    first = await poll(api)
    assert len(first) == 2  # three READY nodes, at most two leased
    poller = asyncio.create_task(poll(api, wait=20.0))
    coordinator = api.running.coordinator
    await wait_for(lambda: coordinator.notifier.waiting == 1)
    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=first[0].lease_token, output=b"1")
    )
    # Woken by the freed slot, well before its 20 s wait (a generous bound, not a benchmark).
    third = await asyncio.wait_for(poller, 10)
    assert {t.node_id for t in (*first, *third)} == {"a", "b", "c"}
