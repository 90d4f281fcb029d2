"""Eager dispatch: a CompleteTask reply carries the next task for the completing worker."""

from __future__ import annotations

import json

import grpc

from tests.support.grpc_api import Api, definition, events_of, expect_status, poll, register, start
from trellis.v1 import common_pb2
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb


def complete(task: wpb.Task, output: object, **eager: object) -> wpb.CompleteTaskRequest:
    return wpb.CompleteTaskRequest(
        lease_token=task.lease_token,
        output=json.dumps(output).encode(),
        worker_id="w1",
        **eager,  # type: ignore[arg-type]
    )


async def test_a_chain_runs_on_completion_replies_alone(api: Api) -> None:
    """After the first poll, each completion's reply leases the successor it made ready, with
    its input and parents' outputs: no further poll is needed."""
    await register(api, definition("chain3", ["a", "b", "c"], [("a", "b"), ("b", "c")]))
    execution_id = await start(api, "chain3", {"n": 0})
    (task,) = await poll(api)
    seen = []
    while True:
        seen.append(task.node_id)
        reply = await api.workers.CompleteTask(
            complete(task, {"done": task.node_id}, max_next_tasks=1, task_types=["t"])
        )
        assert reply.duplicate is False
        if not reply.next_tasks:
            break
        (task,) = reply.next_tasks
        assert task.execution_id == execution_id
        assert task.attempt == 1
        assert json.loads(task.parent_outputs) == {seen[-1]: {"done": seen[-1]}}
    assert seen == ["a", "b", "c"]
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    assert got.execution.status == common_pb2.EXECUTION_STATUS_SUCCEEDED
    leased = [e for e in await events_of(api, execution_id) if e.type == "NODE_LEASED"]
    assert [(e.node_id, e.worker_id) for e in leased] == [("a", "w1"), ("b", "w1"), ("c", "w1")]


async def test_eager_dispatch_takes_at_most_what_is_asked_and_only_when_asked(api: Api) -> None:
    """A fan-out makes three tasks ready: the reply carries max_next_tasks of them, the rest
    stay READY for polls. Without max_next_tasks the reply carries none."""
    await register(
        api, definition("fan3", ["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("a", "d")])
    )
    await start(api, "fan3", 1)
    (task,) = await poll(api)
    reply = await api.workers.CompleteTask(complete(task, 1, max_next_tasks=2, task_types=["t"]))
    assert len(reply.next_tasks) == 2
    rest = await poll(api)
    assert len(rest) == 1
    assert {t.node_id for t in [*reply.next_tasks, *rest]} == {"b", "c", "d"}
    plain = await api.workers.CompleteTask(complete(rest[0], 1))
    assert list(plain.next_tasks) == []


async def test_eager_dispatch_serves_only_the_types_named(api: Api) -> None:
    defn = definition("two", ["a"], [])
    defn.nodes.add(id="b", task_type="other")
    defn.edges.add(source="a", target="b")
    await register(api, defn)
    await start(api, "two", 1)
    (task,) = await poll(api)
    reply = await api.workers.CompleteTask(complete(task, 1, max_next_tasks=1, task_types=["t"]))
    assert list(reply.next_tasks) == []
    (other,) = await poll(api, types=("other",))
    assert other.node_id == "b"


async def test_a_bad_eager_request_is_refused_and_records_nothing(api: Api) -> None:
    await register(api, definition("one", ["a"], []))
    execution_id = await start(api, "one", 1)
    (task,) = await poll(api)
    await expect_status(
        api.workers.CompleteTask(complete(task, 1, max_next_tasks=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "task_types is empty",
    )
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    assert got.execution.status == common_pb2.EXECUTION_STATUS_RUNNING
    # The lease is still held: the same result, sent right, is accepted.
    reply = await api.workers.CompleteTask(complete(task, 1, max_next_tasks=1, task_types=["t"]))
    assert reply.duplicate is False


async def test_a_draining_replica_records_the_result_but_leases_nothing(api: Api) -> None:
    await register(api, definition("pair", ["a", "b"], [("a", "b")]))
    execution_id = await start(api, "pair", 1)
    (task,) = await poll(api)
    api.running.coordinator.begin_drain()
    reply = await api.workers.CompleteTask(complete(task, 1, max_next_tasks=1, task_types=["t"]))
    assert list(reply.next_tasks) == []
    nodes = {
        n.node_id: n.status
        for n in (
            await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
        ).execution.nodes
    }
    assert nodes == {"a": common_pb2.NODE_STATUS_SUCCEEDED, "b": common_pb2.NODE_STATUS_READY}


async def test_a_result_that_makes_nothing_ready_leases_nothing(api: Api) -> None:
    """Independent tasks are left to polls (which lease many per claim): a completion that
    made no task of the worker's types ready carries none, though others are READY."""
    await register(api, definition("solo", ["a"], []))
    for _ in range(3):
        await start(api, "solo", 1)
    (task, *_) = await poll(api, max_tasks=1)
    reply = await api.workers.CompleteTask(complete(task, 1, max_next_tasks=1, task_types=["t"]))
    assert list(reply.next_tasks) == []
    assert len(await poll(api)) == 2
