"""ReportResults: many results in one call, each with its own status (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import grpc

from tests.support.grpc_api import Api, definition, events_of, expect_status, poll, register, start
from trellis.v1 import common_pb2
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb

OK = grpc.StatusCode.OK.value[0]


def completed(task: wpb.Task, output: object) -> wpb.TaskResult:
    return wpb.TaskResult(
        completed=wpb.CompleteTaskRequest(
            lease_token=task.lease_token, output=json.dumps(output).encode()
        )
    )


def failed(task: wpb.Task, message: str, *, non_retryable: bool = False) -> wpb.TaskResult:
    return wpb.TaskResult(
        failed=wpb.FailTaskRequest(
            lease_token=task.lease_token,
            error=wpb.TaskError(type="Boom", message=message, non_retryable=non_retryable),
        )
    )


async def report(api: Api, *results: wpb.TaskResult, **eager: object) -> wpb.ReportResultsResponse:
    reply: wpb.ReportResultsResponse = await api.workers.ReportResults(
        wpb.ReportResultsRequest(worker_id="w1", results=results, **eager)  # type: ignore[arg-type]
    )
    assert len(reply.results) == len(results)
    return reply


async def status_of(api: Api, execution_id: str) -> common_pb2.Execution:
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    return got.execution


async def test_a_batch_of_completions_and_failures_is_applied_result_by_result(api: Api) -> None:
    await register(api, definition("one", ["a"], [], retry_policy=common_pb2.RetryPolicy()))
    ids = [await start(api, "one", i) for i in range(4)]
    tasks = {t.execution_id: t for t in await poll(api, max_tasks=4)}
    assert set(tasks) == set(ids)
    reply = await report(
        api,
        completed(tasks[ids[0]], "r0"),
        completed(tasks[ids[1]], "r1"),
        failed(tasks[ids[2]], "fatal", non_retryable=True),
        failed(tasks[ids[3]], "flaky"),
    )
    assert [s.code for s in reply.results] == [OK] * 4
    assert [s.duplicate for s in reply.results] == [False] * 4
    assert reply.results[2].will_retry is False
    assert list(reply.next_tasks) == []
    assert (await status_of(api, ids[0])).status == common_pb2.EXECUTION_STATUS_SUCCEEDED
    assert json.loads((await status_of(api, ids[1])).output) == "r1"
    assert (await status_of(api, ids[2])).status == common_pb2.EXECUTION_STATUS_FAILED
    retried = (await status_of(api, ids[3])).status
    assert retried in (common_pb2.EXECUTION_STATUS_RUNNING, common_pb2.EXECUTION_STATUS_FAILED)
    assert reply.results[3].will_retry is (retried == common_pb2.EXECUTION_STATUS_RUNNING)

    # Sent again (a reply lost on the way): accepted as duplicates, nothing changes.
    again = await report(api, completed(tasks[ids[0]], "r0"), completed(tasks[ids[1]], "other"))
    assert [(s.code, s.duplicate) for s in again.results] == [(OK, True), (OK, True)]
    assert json.loads((await status_of(api, ids[1])).output) == "r1"


async def test_a_refused_result_does_not_refuse_the_others(api: Api) -> None:
    """Bad, stale and repeated results get their own status; the others are applied."""
    await register(api, definition("one", ["a"], []))
    ids = [await start(api, "one", i) for i in range(3)]
    tasks = {t.execution_id: t for t in await poll(api, max_tasks=3)}
    stale = wpb.Task(lease_token=tasks[ids[2]].lease_token)
    assert (await report(api, completed(stale, "first"))).results[0].code == OK
    reply = await report(
        api,
        wpb.TaskResult(),  # neither completed nor failed
        completed(wpb.Task(lease_token="not-a-token"), 1),
        completed(tasks[ids[0]], "kept"),
        completed(tasks[ids[0]], "again"),  # the same lease twice in one batch
        failed(stale, "too late"),  # its success was recorded already
        completed(tasks[ids[1]], "kept too"),
    )
    codes = [next(c for c in grpc.StatusCode if c.value[0] == s.code) for s in reply.results]
    assert codes == [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OK,
    ]
    assert "results[0] is empty" in reply.results[0].message
    assert "results[3] reports the lease of results[2] again" in reply.results[3].message
    assert json.loads((await status_of(api, ids[0])).output) == "kept"
    assert json.loads((await status_of(api, ids[1])).output) == "kept too"
    assert json.loads((await status_of(api, ids[2])).output) == "first"


async def test_a_fan_in_reported_in_one_batch_runs_the_join_once(api: Api) -> None:
    """Results of one execution in one batch (they may share a transaction) each see the
    one before: the join becomes ready once, and the history has no gaps."""
    await register(
        api,
        definition(
            "fan",
            ["a", "b", "c", "d", "z"],
            [("a", "b"), ("a", "c"), ("a", "d"), ("b", "z"), ("c", "z"), ("d", "z")],
        ),
    )
    execution_id = await start(api, "fan", 0)
    (root,) = await poll(api)
    await report(api, completed(root, "a"))
    middle = await poll(api, max_tasks=10)
    assert sorted(t.node_id for t in middle) == ["b", "c", "d"]
    reply = await report(
        api, *(completed(t, t.node_id) for t in middle), max_next_tasks=3, task_types=["t"]
    )
    assert [s.code for s in reply.results] == [OK] * 3
    (join,) = reply.next_tasks  # eager dispatch: the join, to the worker that made it ready
    assert join.node_id == "z"
    assert json.loads(join.parent_outputs) == {"b": "b", "c": "c", "d": "d"}
    assert await poll(api) == []
    await report(api, completed(join, "z"))
    assert (await status_of(api, execution_id)).status == common_pb2.EXECUTION_STATUS_SUCCEEDED
    events = await events_of(api, execution_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [e.node_id for e in events if e.type == "NODE_SUCCEEDED"].count("z") == 1


async def test_eager_dispatch_for_a_batch_leases_up_to_what_it_asks(api: Api) -> None:
    await register(api, definition("pair", ["a", "b"], [("a", "b")]))
    for i in range(3):
        await start(api, "pair", i)
    roots = await poll(api, max_tasks=3)
    reply = await report(api, *(completed(t, 1) for t in roots), max_next_tasks=2, task_types=["t"])
    assert len(reply.next_tasks) == 2
    assert {t.node_id for t in reply.next_tasks} == {"b"}
    assert len(await poll(api)) == 1
    none_asked = await report(api, *(completed(t, 2) for t in reply.next_tasks))
    assert list(none_asked.next_tasks) == []


async def test_a_malformed_batch_is_refused_whole(api: Api) -> None:
    too_many = [completed(wpb.Task(lease_token=f"t{i}"), 1) for i in range(1001)]
    await expect_status(
        api.workers.ReportResults(wpb.ReportResultsRequest(worker_id="w1", results=too_many)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ReportResultsRequest.results: 1001 entries, at most 1000; send fewer per call",
    )
    await expect_status(
        api.workers.ReportResults(
            wpb.ReportResultsRequest(worker_id="w1", results=too_many[:1], max_next_tasks=1)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "task_types is empty",
    )
