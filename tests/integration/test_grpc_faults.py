"""Cancellation, pause and dead letters through the gRPC surface of an in-process
coordinator, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import grpc
from google.protobuf import duration_pb2

from coordinator.model import Event
from tests.support.grpc_api import Api, definition, expect_status, poll, register, start
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb


async def events_of(api: Api, execution_id: str) -> list[Event]:
    """The event history so far, read from the store (a watch stays open while running)."""
    return await api.running.coordinator.store.executions.list_events(
        "default", execution_id, 0, 10_000
    )


async def execution(api: Api, execution_id: str) -> common_pb2.Execution:
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    return got.execution


def statuses(execution_msg: common_pb2.Execution) -> dict[str, int]:
    return {n.node_id: n.status for n in execution_msg.nodes}


async def heartbeat(api: Api, *tokens: str) -> wpb.HeartbeatResponse:
    reply: wpb.HeartbeatResponse = await api.workers.Heartbeat(
        wpb.HeartbeatRequest(
            worker_id="w1", leases=[wpb.LeaseHeartbeat(lease_token=t) for t in tokens]
        )
    )
    return reply


async def complete(api: Api, task: wpb.Task, output: object) -> wpb.CompleteTaskResponse:
    reply: wpb.CompleteTaskResponse = await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=task.lease_token, output=json.dumps(output).encode())
    )
    return reply


# -- cancellation -------------------------------------------------------------------------


async def test_result_after_cancellation_is_refused_and_changes_nothing(api: Api) -> None:
    await register(api, definition("one", ["a"], []))
    execution_id = await start(api, "one", 1)
    (task,) = await poll(api)
    reply = await api.workflows.CancelExecution(
        fpb.CancelExecutionRequest(execution_id=execution_id, reason="operator")
    )
    assert reply.execution.status == common_pb2.EXECUTION_STATUS_CANCELLED
    hb = await heartbeat(api, task.lease_token)
    assert list(hb.cancelled_lease_tokens) == [task.lease_token]
    assert list(hb.lost_lease_tokens) == []
    before = await events_of(api, execution_id)
    assert [e.type for e in before][-2:] == ["NODE_CANCELLED", "EXECUTION_CANCELLED"]

    await expect_status(complete(api, task, "late"), grpc.StatusCode.FAILED_PRECONDITION)
    await expect_status(
        api.workers.FailTask(
            wpb.FailTaskRequest(lease_token=task.lease_token, error=wpb.TaskError(type="X"))
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert await events_of(api, execution_id) == before
    after = await execution(api, execution_id)
    assert after.status == common_pb2.EXECUTION_STATUS_CANCELLED
    assert statuses(after) == {"a": common_pb2.NODE_STATUS_CANCELLED}
    assert after.output == b""
    assert await poll(api) == []


async def test_cancel_node_skips_its_descendants_while_another_branch_completes(
    api: Api,
) -> None:
    # b -> d, and c on its own branch.
    await register(api, definition("branches", ["b", "c", "d"], [("b", "d")]))
    execution_id = await start(api, "branches", 1)
    tasks = {t.node_id: t for t in await poll(api)}
    assert set(tasks) == {"b", "c"}
    reply = await api.workflows.CancelNode(
        fpb.CancelNodeRequest(execution_id=execution_id, node_id="b", reason="not needed")
    )
    assert statuses(reply.execution) == {
        "b": common_pb2.NODE_STATUS_CANCELLED,
        "c": common_pb2.NODE_STATUS_LEASED,
        "d": common_pb2.NODE_STATUS_SKIPPED,
    }
    assert reply.execution.status == common_pb2.EXECUTION_STATUS_RUNNING  # the other branch goes on
    hb = await heartbeat(api, tasks["b"].lease_token, tasks["c"].lease_token)
    assert list(hb.cancelled_lease_tokens) == [tasks["b"].lease_token]
    assert list(hb.lost_lease_tokens) == []
    await expect_status(complete(api, tasks["b"], "late"), grpc.StatusCode.FAILED_PRECONDITION)

    assert (await complete(api, tasks["c"], "c-done")).duplicate is False
    final = await execution(api, execution_id)
    assert statuses(final) == {
        "b": common_pb2.NODE_STATUS_CANCELLED,
        "c": common_pb2.NODE_STATUS_SUCCEEDED,
        "d": common_pb2.NODE_STATUS_SKIPPED,
    }
    assert final.status == common_pb2.EXECUTION_STATUS_CANCELLED  # docs/architecture.md
    events = await events_of(api, execution_id)
    outcomes = [(e.type, e.node_id) for e in events if e.type in ("NODE_SKIPPED", "NODE_SUCCEEDED")]
    assert outcomes == [("NODE_SKIPPED", "d"), ("NODE_SUCCEEDED", "c")]
    assert await poll(api) == []


# -- pause ----------------------------------------------------------------------------------


async def test_pause_holds_dispatch_until_resume(api: Api) -> None:
    await register(api, definition("one", ["a"], []))
    execution_id = await start(api, "one", 1)
    paused = await api.workflows.PauseExecution(
        fpb.PauseExecutionRequest(execution_id=execution_id)
    )
    assert paused.execution.status == common_pb2.EXECUTION_STATUS_PAUSED
    assert await poll(api, wait=0.5) == []
    # A poll waiting while the execution is paused gets the task as soon as it is resumed.
    poller = asyncio.create_task(poll(api, wait=20.0))
    notifier = api.running.coordinator.notifier
    await wait_for(lambda: notifier.waiting == 1)
    resumed = await api.workflows.ResumeExecution(
        fpb.ResumeExecutionRequest(execution_id=execution_id)
    )
    assert resumed.execution.status == common_pb2.EXECUTION_STATUS_RUNNING
    (task,) = await asyncio.wait_for(poller, 5)
    assert (task.node_id, task.attempt) == ("a", 1)
    await complete(api, task, "ok")
    assert (await execution(api, execution_id)).status == common_pb2.EXECUTION_STATUS_SUCCEEDED
    types = [e.type for e in await events_of(api, execution_id)]
    assert types.index("EXECUTION_PAUSED") < types.index("EXECUTION_RESUMED")
    assert types.index("EXECUTION_RESUMED") < types.index("NODE_LEASED")


async def test_pause_node_on_a_leased_node_is_failed_precondition(api: Api) -> None:
    await register(api, definition("one", ["a"], []))
    execution_id = await start(api, "one", 1)
    (task,) = await poll(api)
    before = await events_of(api, execution_id)
    await expect_status(
        api.workflows.PauseNode(fpb.PauseNodeRequest(execution_id=execution_id, node_id="a")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "a",
    )
    assert await events_of(api, execution_id) == before
    assert statuses(await execution(api, execution_id)) == {"a": common_pb2.NODE_STATUS_LEASED}
    await complete(api, task, "ok")
    assert (await execution(api, execution_id)).status == common_pb2.EXECUTION_STATUS_SUCCEEDED


# -- dead letters ---------------------------------------------------------------------------


async def test_dead_letter_is_redriven_once(api: Api) -> None:
    await register(api, definition("chain", ["a", "b"], [("a", "b")]))
    execution_id = await start(api, "chain", {"x": 1})
    (first,) = await poll(api)
    await complete(api, first, "a-out")
    (task,) = await poll(api)
    assert task.node_id == "b"
    reply = await api.workers.FailTask(
        wpb.FailTaskRequest(
            lease_token=task.lease_token,
            error=wpb.TaskError(type="ValueError", message="bad", non_retryable=True),
        )
    )
    assert reply.will_retry is False
    assert (await execution(api, execution_id)).status == common_pb2.EXECUTION_STATUS_FAILED

    listed = await api.workflows.ListDeadLetters(fpb.ListDeadLettersRequest())
    (letter,) = listed.dead_letters
    assert (letter.execution_id, letter.node_id, letter.task_type) == (execution_id, "b", "t")
    assert json.loads(letter.input) == "a-out"
    assert [(a.attempt, a.error.type) for a in letter.attempts] == [(1, "ValueError")]
    shown = await api.workflows.GetDeadLetter(fpb.GetDeadLetterRequest(id=letter.id))
    assert shown.dead_letter.id == letter.id

    redriven = await api.workflows.RedriveDeadLetter(fpb.RedriveDeadLetterRequest(id=letter.id))
    assert redriven.execution.status == common_pb2.EXECUTION_STATUS_RUNNING
    assert statuses(redriven.execution)["a"] == common_pb2.NODE_STATUS_SUCCEEDED
    events_after_redrive = await events_of(api, execution_id)
    await expect_status(
        api.workflows.RedriveDeadLetter(fpb.RedriveDeadLetterRequest(id=letter.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        letter.id,
    )
    assert await events_of(api, execution_id) == events_after_redrive

    (again,) = await poll(api, wait=5.0)
    assert again.node_id == "b"  # `a` is not run again
    await complete(api, again, "b-out")
    final = await execution(api, execution_id)
    assert final.status == common_pb2.EXECUTION_STATUS_SUCCEEDED
    assert json.loads(final.output) == "b-out"
    listed = await api.workflows.ListDeadLetters(fpb.ListDeadLettersRequest())
    assert list(listed.dead_letters) == []
    listed = await api.workflows.ListDeadLetters(fpb.ListDeadLettersRequest(include_redriven=True))
    assert [d.id for d in listed.dead_letters] == [letter.id]
    assert listed.dead_letters[0].HasField("redrive_time")


async def test_unknown_dead_letter_is_not_found(api: Api) -> None:
    await expect_status(
        api.workflows.GetDeadLetter(fpb.GetDeadLetterRequest(id="no-such-letter")),
        grpc.StatusCode.NOT_FOUND,
        "no-such-letter",
    )
    await expect_status(
        api.workflows.RedriveDeadLetter(fpb.RedriveDeadLetterRequest(id="no-such-letter")),
        grpc.StatusCode.NOT_FOUND,
        "no-such-letter",
    )


async def test_unstarted_node_times_out_and_is_dead_lettered(api: Api) -> None:
    defn = definition(
        "nobody-home",
        ["a", "b"],
        [("a", "b")],
        schedule_to_start_timeout=duration_pb2.Duration(nanos=200_000_000),
    )
    await register(api, defn)
    execution_id = await start(api, "nobody-home", 1)

    async def ended() -> common_pb2.Execution | None:
        got = await execution(api, execution_id)
        return got if got.status == common_pb2.EXECUTION_STATUS_FAILED else None

    failed = await wait_for(ended, timeout=10)
    assert statuses(failed) == {
        "a": common_pb2.NODE_STATUS_TIMED_OUT,
        "b": common_pb2.NODE_STATUS_SKIPPED,
    }
    assert failed.error.type == "ScheduleToStartTimeout"
    letters = await api.workflows.ListDeadLetters(fpb.ListDeadLettersRequest())
    assert [(d.execution_id, d.node_id) for d in letters.dead_letters] == [(execution_id, "a")]
    assert await poll(api) == [], "a timed-out node is not dispatched any more"


async def test_execution_timeout_revokes_running_leases(api: Api) -> None:
    defn = definition("deadline", ["a"], [])
    defn.execution_timeout.FromMilliseconds(300)
    await register(api, defn)
    execution_id = await start(api, "deadline", 1)
    (task,) = await poll(api)

    async def timed_out() -> bool:
        got = await execution(api, execution_id)
        return got.status == common_pb2.EXECUTION_STATUS_TIMED_OUT

    await wait_for(timed_out, timeout=10)
    beat = await api.workers.Heartbeat(
        wpb.HeartbeatRequest(
            worker_id="w1", leases=[wpb.LeaseHeartbeat(lease_token=task.lease_token)]
        )
    )
    assert list(beat.cancelled_lease_tokens) == [task.lease_token]
    await expect_status(
        api.workers.CompleteTask(
            wpb.CompleteTaskRequest(lease_token=task.lease_token, output=b"1")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    ended = await execution(api, execution_id)
    assert ended.error.type == "ExecutionTimeout"
    assert statuses(ended) == {"a": common_pb2.NODE_STATUS_CANCELLED}
