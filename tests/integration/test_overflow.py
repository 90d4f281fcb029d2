"""max_running_executions (overflow QUEUE / REJECT) and per-execution max_concurrency,
through the gRPC API of an in-process coordinator, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import duration_pb2

from coordinator.service import Sweeper
from tests.support.grpc_api import Api
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb

RUNNING = common_pb2.EXECUTION_STATUS_RUNNING
PENDING = common_pb2.EXECUTION_STATUS_PENDING
CANCELLED = common_pb2.EXECUTION_STATUS_CANCELLED
FAILED = common_pb2.EXECUTION_STATUS_FAILED


def capped(
    name: str,
    max_running: int,
    policy: common_pb2.OverflowPolicy.ValueType = common_pb2.OVERFLOW_POLICY_QUEUE,
    **options: int,
) -> common_pb2.WorkflowDefinition:
    msg = common_pb2.WorkflowDefinition(
        name=name, max_running_executions=max_running, overflow_policy=policy, **options
    )
    msg.nodes.add(id="a", task_type=f"{name}-t")
    return msg


async def register(api: Api, defn: common_pb2.WorkflowDefinition) -> None:
    await api.workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=defn))


async def start(api: Api, name: str, **options: object) -> common_pb2.Execution:
    reply = await api.workflows.StartExecution(
        fpb.StartExecutionRequest(workflow_name=name, input=b"{}", **options)  # type: ignore[arg-type]
    )
    return reply.execution


async def get(api: Api, execution_id: str) -> common_pb2.Execution:
    reply = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    return reply.execution


async def cancel(api: Api, execution_id: str) -> None:
    await api.workflows.CancelExecution(fpb.CancelExecutionRequest(execution_id=execution_id))


async def listed(api: Api, name: str) -> list[common_pb2.Execution]:
    reply = await api.workflows.ListExecutions(
        fpb.ListExecutionsRequest(workflow_name=name, page_size=1000)
    )
    return list(reply.executions)


async def refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def becomes(api: Api, execution_id: str, status: int) -> common_pb2.Execution:
    async def probe() -> common_pb2.Execution | None:
        execution = await get(api, execution_id)
        return execution if execution.status == status else None

    return await wait_for(probe, timeout=15)


async def test_reject_refuses_the_start_beyond_the_cap_and_stores_nothing(api: Api) -> None:
    await register(api, capped("rj", 2, common_pb2.OVERFLOW_POLICY_REJECT))
    first = await start(api, "rj")
    second = await start(api, "rj")
    assert first.status == second.status == RUNNING

    details = await refused(start(api, "rj"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "workflow 'rj' has 2 running executions (max_running_executions 2)" in details
    # A batch is refused whole, even with a start that would have fitted elsewhere.
    batch = fpb.BatchStartExecutionsRequest(
        requests=[fpb.StartExecutionRequest(workflow_name="rj", input=b"{}")]
    )
    details = await refused(
        api.workflows.BatchStartExecutions(batch), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert "nothing was started" in details
    assert sorted(e.id for e in await listed(api, "rj")) == sorted([first.id, second.id])

    # A paused execution still counts; an ended one frees its slot.
    await api.workflows.PauseExecution(fpb.PauseExecutionRequest(execution_id=first.id))
    await refused(start(api, "rj"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    await cancel(api, first.id)
    third = await start(api, "rj")
    assert third.status == RUNNING
    assert not third.queued


async def test_queue_holds_the_start_until_a_running_execution_ends(api: Api) -> None:
    await register(api, capped("qq", 1))
    first = await start(api, "qq")
    waiting = await start(api, "qq")
    assert first.status == RUNNING and not first.queued
    assert waiting.status == PENDING and waiting.queued
    assert list((await get(api, waiting.id)).nodes) == []

    # The running one completes: the queued one starts.
    poll = await api.workers.PollTasks(
        wpb.PollTasksRequest(worker_id="w", task_types=["qq-t"], max_tasks=5)
    )
    assert [t.execution_id for t in poll.tasks] == [first.id]
    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=poll.tasks[0].lease_token, output=b"1", worker_id="w")
    )
    started = await becomes(api, waiting.id, RUNNING)
    assert not started.queued
    assert [n.node_id for n in started.nodes] == ["a"]


async def test_queued_executions_start_oldest_first(api: Api) -> None:
    await register(api, capped("fifo", 1))
    first = await start(api, "fifo")
    queued = [await start(api, "fifo") for _ in range(3)]
    assert all(e.queued for e in queued)
    running = first
    for expected in queued:
        await cancel(api, running.id)
        running = await becomes(api, expected.id, RUNNING)
        for later in queued[queued.index(expected) + 1 :]:
            assert (await get(api, later.id)).status == PENDING


async def test_a_queued_execution_can_be_cancelled(api: Api) -> None:
    await register(api, capped("qc", 1))
    first = await start(api, "qc")
    waiting = await start(api, "qc")
    reply = await api.workflows.CancelExecution(
        fpb.CancelExecutionRequest(execution_id=waiting.id, reason="not needed")
    )
    assert reply.execution.status == CANCELLED
    await cancel(api, first.id)
    last = await start(api, "qc")
    assert last.status == RUNNING  # the cancelled one left no queue behind
    assert (await get(api, waiting.id)).status == CANCELLED


async def test_a_delayed_start_due_while_full_waits_in_the_queue(api: Api) -> None:
    await register(api, capped("dq", 1))
    first = await start(api, "dq")
    delayed = await start(api, "dq", delay=duration_pb2.Duration(nanos=200_000_000))
    assert delayed.status == PENDING and not delayed.queued

    async def queued() -> bool:
        return (await get(api, delayed.id)).queued

    await wait_for(queued, timeout=15)  # the sweeper found it due, and no room
    await cancel(api, first.id)
    await becomes(api, delayed.id, RUNNING)


async def test_a_delayed_start_due_while_full_fails_under_reject(api: Api) -> None:
    await register(api, capped("dr", 1, common_pb2.OVERFLOW_POLICY_REJECT))
    await start(api, "dr")
    delayed = await start(api, "dr", delay=duration_pb2.Duration(nanos=200_000_000))
    failed = await becomes(api, delayed.id, FAILED)
    assert failed.error.type == "MaxRunningExecutions"


@pytest.mark.parametrize("policy", ["queue", "reject"])
async def test_concurrent_starts_never_exceed_the_cap(api: Api, policy: str) -> None:
    value = {
        "queue": common_pb2.OVERFLOW_POLICY_QUEUE,
        "reject": common_pb2.OVERFLOW_POLICY_REJECT,
    }[policy]
    name = f"race-{policy}"
    await register(api, capped(name, 3, value))
    results = await asyncio.gather(*(start(api, name) for _ in range(20)), return_exceptions=True)
    started = [r for r in results if isinstance(r, common_pb2.Execution) and r.status == RUNNING]
    assert len(started) == 3
    rows = await listed(api, name)
    assert sum(e.status == RUNNING for e in rows) == 3
    if policy == "queue":
        assert sum(e.status == PENDING and e.queued for e in rows) == 17
    else:
        errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(errors) == 17
        assert {e.code() for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(rows) == 3


async def test_max_concurrency_round_trip(api: Api) -> None:
    await register(api, capped("mc", 0, max_concurrency=4))
    definition = (await api.workflows.GetWorkflow(fpb.GetWorkflowRequest(name="mc"))).definition
    assert definition.max_concurrency == 4

    default = await start(api, "mc")
    assert (await get(api, default.id)).max_concurrency == 4
    own = await start(api, "mc", max_concurrency=7)
    assert (await get(api, own.id)).max_concurrency == 7
    batch = await api.workflows.BatchStartExecutions(
        fpb.BatchStartExecutionsRequest(
            requests=[fpb.StartExecutionRequest(workflow_name="mc", input=b"{}", max_concurrency=9)]
        )
    )
    assert (await get(api, batch.results[0].execution.id)).max_concurrency == 9

    for bad in (-1, 10_001):
        details = await refused(
            start(api, "mc", max_concurrency=bad), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert "max_concurrency" in details


async def test_definition_limits_round_trip_and_are_validated(api: Api) -> None:
    await register(api, capped("lim", 5, common_pb2.OVERFLOW_POLICY_REJECT, max_concurrency=2))
    got = (await api.workflows.GetWorkflow(fpb.GetWorkflowRequest(name="lim"))).definition
    assert (got.max_running_executions, got.overflow_policy, got.max_concurrency) == (
        5,
        common_pb2.OVERFLOW_POLICY_REJECT,
        2,
    )
    # Unset policy means QUEUE.
    await register(api, capped("lim2", 1, common_pb2.OVERFLOW_POLICY_UNSPECIFIED))
    got = (await api.workflows.GetWorkflow(fpb.GetWorkflowRequest(name="lim2"))).definition
    assert got.overflow_policy == common_pb2.OVERFLOW_POLICY_QUEUE

    for field in ("max_running_executions", "max_concurrency"):
        bad = capped("bad", 0)
        setattr(bad, field, -1)
        details = await refused(
            api.workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=bad)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert field in details


async def test_the_sweeper_pages_through_every_workflow_with_a_queue(api: Api) -> None:
    for name in ("page-a", "page-b"):
        await register(api, capped(name, 1))
        await start(api, name)
        assert (await start(api, name)).queued
    coordinator = api.running.coordinator
    assert await coordinator.starts.find_queued_workflows(1) == [("default", "page-a")]
    assert await coordinator.starts.find_queued_workflows(1, ("default", "page-a")) == [
        ("default", "page-b")
    ]
    assert await coordinator.starts.find_queued_workflows(1, ("default", "page-b")) == []
    # A sweeper whose batch is one workflow reaches the second one on its next pass.
    sweeper = Sweeper(coordinator, batch=1)
    assert (await sweeper.start_queued())[0] == 1
    assert sweeper._queued_after == ("default", "page-a")
    assert (await sweeper.start_queued())[0] == 1
    assert sweeper._queued_after == ("default", "page-b")
    assert (await sweeper.start_queued())[0] == 0
    assert sweeper._queued_after is None
