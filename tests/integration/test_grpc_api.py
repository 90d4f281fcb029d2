"""The gRPC surface of an in-process coordinator, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.grpc_api import (
    DIAMOND,
    PAYLOAD_LIMIT,
    Api,
    definition,
    expect_status,
    poll,
    register,
    start,
)
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb

# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("defn", "fragments"),
    [
        (definition("cyc", ["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "a")]), ("cycle",)),
        (definition("edge", ["a"], [("a", "zz")]), ("unknown node", "zz")),
        (definition("dup", ["a", "a"], []), ("duplicate node id", "a")),
        (definition("", ["a"], []), ("name",)),
        (definition("empty", [], []), ("node",)),
    ],
    ids=["cycle", "unknown-edge", "duplicate-id", "no-name", "no-nodes"],
)
async def test_bad_definition_is_invalid_argument_and_writes_nothing(
    api: Api, defn: common_pb2.WorkflowDefinition, fragments: tuple[str, ...]
) -> None:
    await expect_status(register(api, defn), grpc.StatusCode.INVALID_ARGUMENT, *fragments)
    listed = await api.workflows.ListWorkflows(fpb.ListWorkflowsRequest())
    assert list(listed.workflows) == []


async def test_bad_start_input_is_invalid_argument_and_starts_nothing(api: Api) -> None:
    await register(api, DIAMOND)
    bad_json = api.workflows.StartExecution(
        fpb.StartExecutionRequest(workflow_name="diamond", input=b'{"n": ')
    )
    await expect_status(bad_json, grpc.StatusCode.INVALID_ARGUMENT, "input is not valid JSON")
    big = json.dumps({"blob": "x" * PAYLOAD_LIMIT}).encode()
    too_big = api.workflows.StartExecution(
        fpb.StartExecutionRequest(workflow_name="diamond", input=big)
    )
    await expect_status(too_big, grpc.StatusCode.INVALID_ARGUMENT, "over the", "byte limit")
    listed = await api.workflows.ListExecutions(fpb.ListExecutionsRequest())
    assert list(listed.executions) == []
    assert await poll(api) == []


async def test_unknown_names_are_not_found(api: Api) -> None:
    await expect_status(
        api.workflows.StartExecution(fpb.StartExecutionRequest(workflow_name="nope")),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    )
    await expect_status(
        api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id="no-such-id")),
        grpc.StatusCode.NOT_FOUND,
        "no-such-id",
    )
    await expect_status(
        api.workflows.GetWorkflow(fpb.GetWorkflowRequest(name="diamond", version=7)),
        grpc.StatusCode.NOT_FOUND,
        "diamond",
    )


# -- versions -----------------------------------------------------------------------------


async def test_versions_same_content_reuses_changed_content_bumps(api: Api) -> None:
    first = await register(api, DIAMOND)
    again = await register(api, DIAMOND)
    assert (first.definition.version, first.created) == (1, True)
    assert (again.definition.version, again.created) == (1, False)
    changed = definition("diamond", ["a", "b"], [("a", "b")])
    second = await register(api, changed)
    assert (second.definition.version, second.created) == (2, True)
    latest = await api.workflows.GetWorkflow(fpb.GetWorkflowRequest(name="diamond"))
    assert [n.id for n in latest.definition.nodes] == ["a", "b"]
    versions = await api.workflows.ListWorkflowVersions(
        fpb.ListWorkflowVersionsRequest(name="diamond")
    )
    assert [d.version for d in versions.definitions] == [1, 2]


# -- the worker protocol -------------------------------------------------------------------


async def run_to_end(api: Api, execution_id: str) -> common_pb2.Execution:
    """Play the worker: echo each node's input wrapped in {node_id: input}."""
    while True:
        got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
        if got.execution.status not in (
            common_pb2.EXECUTION_STATUS_PENDING,
            common_pb2.EXECUTION_STATUS_RUNNING,
        ):
            return got.execution
        for task in await poll(api, wait=1.0):
            out = {task.node_id: json.loads(task.input)}
            await api.workers.CompleteTask(
                wpb.CompleteTaskRequest(
                    lease_token=task.lease_token, output=json.dumps(out).encode()
                )
            )


async def test_diamond_data_passing_and_output(api: Api) -> None:
    await register(api, DIAMOND)
    execution_id = await start(api, "diamond", {"x": 1})
    execution = await run_to_end(api, execution_id)
    assert execution.status == common_pb2.EXECUTION_STATUS_SUCCEEDED
    a = {"a": {"x": 1}}
    expected_d_input = {"b": {"b": a}, "c": {"c": a}}
    assert json.loads(execution.output) == {"d": expected_d_input}
    assert [n.status for n in execution.nodes] == [common_pb2.NODE_STATUS_SUCCEEDED] * 4


async def test_stale_token_refused_and_duplicate_completion_changes_nothing(api: Api) -> None:
    await register(api, definition("one", ["a"], []))
    execution_id = await start(api, "one", 1)
    (task,) = await poll(api)
    first = await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=task.lease_token, output=b'"done"')
    )
    assert first.duplicate is False
    events_before = [
        e
        async for e in api.workflows.WatchExecution(
            fpb.WatchExecutionRequest(execution_id=execution_id)
        )
    ]
    again = await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=task.lease_token, output=b'"other"')
    )
    assert again.duplicate is True
    events_after = [
        e
        async for e in api.workflows.WatchExecution(
            fpb.WatchExecutionRequest(execution_id=execution_id)
        )
    ]
    assert events_after == events_before
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    assert got.execution.output == b'"done"'
    await expect_status(
        api.workers.FailTask(
            wpb.FailTaskRequest(lease_token=task.lease_token, error=wpb.TaskError(type="X"))
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no longer held",
    )
    await expect_status(
        api.workers.CompleteTask(wpb.CompleteTaskRequest(lease_token="garbage!", output=b"1")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "lease_token",
    )


async def test_expired_lease_is_retried_and_old_token_is_fenced(api: Api) -> None:
    defn = definition(
        "slow",
        ["a"],
        [],
        start_to_close_timeout=duration_pb2.Duration(nanos=300_000_000),
        retry_policy=common_pb2.RetryPolicy(
            max_attempts=2, initial_interval=duration_pb2.Duration(nanos=1)
        ),
    )
    await register(api, defn)
    execution_id = await start(api, "slow", 1)
    (first,) = await poll(api)
    assert first.attempt == 1
    (second,) = await poll(api, wait=10.0)  # woken once the sweeper expires the first lease
    assert second.attempt == 2
    hb = await api.workers.Heartbeat(
        wpb.HeartbeatRequest(
            worker_id="w1",
            leases=[wpb.LeaseHeartbeat(lease_token=t.lease_token) for t in (first, second)],
        )
    )
    assert list(hb.lost_lease_tokens) == [first.lease_token]
    await expect_status(
        api.workers.CompleteTask(
            wpb.CompleteTaskRequest(lease_token=first.lease_token, output=b"1")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=second.lease_token, output=b"2")
    )
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    assert got.execution.status == common_pb2.EXECUTION_STATUS_SUCCEEDED
    assert got.execution.output == b"2"


async def test_non_retryable_failure_fails_execution_with_error_chain(api: Api) -> None:
    await register(api, definition("fails", ["a", "b"], [("a", "b")]))
    execution_id = await start(api, "fails", 1)
    (task,) = await poll(api)
    reply = await api.workers.FailTask(
        wpb.FailTaskRequest(
            lease_token=task.lease_token,
            error=wpb.TaskError(type="ValueError", message="bad row 7", non_retryable=True),
        )
    )
    assert reply.will_retry is False
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    assert got.execution.status == common_pb2.EXECUTION_STATUS_FAILED
    assert got.execution.error.node_id == "a"
    assert "bad row 7" in got.execution.error.message
    assert [n.status for n in got.execution.nodes] == [
        common_pb2.NODE_STATUS_FAILED,
        common_pb2.NODE_STATUS_SKIPPED,  # depends on the failed node: it can no longer run
    ]


async def test_waiting_poll_is_woken_when_a_task_becomes_ready(api: Api) -> None:
    await register(api, definition("wake", ["a"], []))
    poller = asyncio.create_task(poll(api, wait=20.0))
    coordinator = api.running.coordinator
    await wait_for(lambda: coordinator.notifier.waiting == 1)
    started = time.perf_counter()
    await start(api, "wake", 1)
    tasks = await poller
    latency = time.perf_counter() - started
    assert [t.node_id for t in tasks] == ["a"]
    print(f"\nlong-poll wake-up latency: {latency * 1000:.1f} ms")
    # Far below the 20 s wait: the poll was woken, not timed out. (Generous bound; not a benchmark.)
    assert latency < 5.0


async def test_watch_streams_every_event_then_the_final_execution(api: Api) -> None:
    await register(api, DIAMOND)
    execution_id = await start(api, "diamond", 1)
    watched: list[fpb.WatchExecutionResponse] = []

    async def watch() -> None:
        async for item in api.workflows.WatchExecution(
            fpb.WatchExecutionRequest(execution_id=execution_id)
        ):
            watched.append(item)

    watcher = asyncio.create_task(watch())
    await run_to_end(api, execution_id)
    await asyncio.wait_for(watcher, 10)
    events = [e for w in watched for e in w.events]
    assert watched[-1].execution.status == common_pb2.EXECUTION_STATUS_SUCCEEDED
    types = [e.type for e in events]
    assert types[0] == "EXECUTION_STARTED"
    assert types[-1] == "EXECUTION_SUCCEEDED"
    assert types.count("NODE_SUCCEEDED") == 4
    assert types.count("NODE_LEASED") == 4
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)


async def test_health_service_reports_serving(api: Api) -> None:
    stub = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", "trellis.v1.WorkerService", "trellis.v1.WorkflowService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_drain_answers_waiting_polls_and_refuses_new_ones(api: Api) -> None:
    await register(api, definition("d", ["a"], []))
    poller = asyncio.create_task(poll(api, wait=20.0))
    coordinator = api.running.coordinator
    await wait_for(lambda: coordinator.notifier.waiting == 1)
    coordinator.begin_drain()
    assert await asyncio.wait_for(poller, 5) == []
    await expect_status(poll(api), grpc.StatusCode.UNAVAILABLE, "shutting down")


async def test_failure_resent_is_a_duplicate_and_long_error_text_is_clipped(api: Api) -> None:
    retry = common_pb2.RetryPolicy(
        max_attempts=2, initial_interval=duration_pb2.Duration(seconds=60)
    )
    await register(api, definition("twice", ["a"], [], retry_policy=retry))
    execution_id = await start(api, "twice", 1)
    (task,) = await poll(api)
    error = wpb.TaskError(type="E" * 1000, message="m" * 100_000)
    first = await api.workers.FailTask(
        wpb.FailTaskRequest(lease_token=task.lease_token, error=error)
    )
    assert (first.will_retry, first.duplicate) == (True, False)
    again = await api.workers.FailTask(
        wpb.FailTaskRequest(lease_token=task.lease_token, error=error)
    )
    assert again.duplicate is True
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    (node,) = got.execution.nodes
    assert node.status == common_pb2.NODE_STATUS_READY
    assert len(node.error.type) == 256 and len(node.error.message) == 8192
    assert node.error.message.endswith("(truncated)")


async def test_nul_characters_are_refused_in_names_and_dropped_from_error_text(api: Api) -> None:
    await register(api, definition("nul", ["a"], []))
    execution_id = await start(api, "nul", 1)
    await expect_status(
        api.workers.PollTasks(wpb.PollTasksRequest(worker_id="w\x00", task_types=["t"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "NUL",
    )
    (task,) = await poll(api)
    bad = wpb.TaskError(type="E", message="bad \x00 byte", non_retryable=True)
    await api.workers.FailTask(wpb.FailTaskRequest(lease_token=task.lease_token, error=bad))
    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    assert got.execution.nodes[0].error.message == "bad  byte"


async def test_a_second_process_cannot_take_a_live_worker_id(api: Api) -> None:
    first = wpb.RegisterWorkerRequest(worker_id="emails", task_types=["t"], identity="host-a:1")
    await api.workers.RegisterWorker(first)
    await api.workers.RegisterWorker(first)  # the same process reconnecting is fine
    other = wpb.RegisterWorkerRequest(worker_id="emails", task_types=["t"], identity="host-b:2")
    details = await expect_status(
        api.workers.RegisterWorker(other), grpc.StatusCode.FAILED_PRECONDITION, "in use"
    )
    assert "host-a" not in details  # the other process's identity is not revealed


# -- listing executions -------------------------------------------------------------------


async def test_list_executions_filters_over_grpc(api: Api) -> None:
    await register(api, DIAMOND)
    keyed = await api.workflows.StartExecution(
        fpb.StartExecutionRequest(workflow_name="diamond", input=b"1", idempotency_key="k-1")
    )
    others = [await start(api, "diamond") for _ in range(3)]

    async def listed(**fields: object) -> list[str]:
        reply = await api.workflows.ListExecutions(
            fpb.ListExecutionsRequest(filter=common_pb2.ExecutionFilter(**fields))  # type: ignore[arg-type]
        )
        return [e.id for e in reply.executions]

    assert await listed(idempotency_key="k-1") == [keyed.execution.id]
    assert await listed(id_prefix=keyed.execution.id[:8]) == [keyed.execution.id]
    assert set(await listed(workflow_name="diamond", workflow_version=1)) == {
        *others,
        keyed.execution.id,
    }
    assert await listed(statuses=[common_pb2.EXECUTION_STATUS_SUCCEEDED]) == []
    # The older fields narrow the filter.
    both = await api.workflows.ListExecutions(
        fpb.ListExecutionsRequest(
            workflow_name="diamond", filter=common_pb2.ExecutionFilter(idempotency_key="k-1")
        )
    )
    assert [e.id for e in both.executions] == [keyed.execution.id]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"workflow_version": 2}, "a workflow version needs the workflow name"),
        ({"id_prefix": "x" * 65}, "longer than 64"),
        (
            {
                "created_after": {"seconds": 2_000_000_000},
                "created_before": {"seconds": 1_000_000_000},
            },
            "the created range is empty",
        ),
        ({"statuses": [99]}, "unknown execution status 99"),
    ],
    ids=["version-without-name", "long-prefix", "empty-range", "bad-status"],
)
async def test_a_filter_that_cannot_match_is_invalid_argument(
    api: Api, fields: dict[str, object], fragment: str
) -> None:
    request = fpb.ListExecutionsRequest(filter=common_pb2.ExecutionFilter(**fields))  # type: ignore[arg-type]
    await expect_status(
        api.workflows.ListExecutions(request), grpc.StatusCode.INVALID_ARGUMENT, fragment
    )
