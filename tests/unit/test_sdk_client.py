"""The Client against an in-process fake WorkflowService on a real socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.wait import wait_for
from trellis.v1 import common_pb2, workflow_service_pb2, workflow_service_pb2_grpc
from worker_sdk import (
    Client,
    ErrorDetails,
    Event,
    Execution,
    InvalidArgumentError,
    NodeState,
    NotFoundError,
    RegisteredWorkflow,
    RpcError,
    TrellisError,
    UnavailableError,
    Workflow,
    WorkflowSummary,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, 500_000, tzinfo=UTC)


def _ts(msg: Any, when: datetime) -> None:
    msg.FromDatetime(when)


class FakeWorkflowService(workflow_service_pb2_grpc.WorkflowServiceServicer):
    """Serves canned executions and event streams; records requests."""

    def __init__(self) -> None:
        self.address = ""
        self.requests: list[Any] = []
        self.definitions: list[common_pb2.WorkflowDefinition] = []
        self.executions: dict[str, common_pb2.Execution] = {}
        self.events: dict[str, list[common_pb2.Event]] = {}
        self.ended: dict[str, asyncio.Event] = {}
        self.watch_failures = 0  # break this many streams after one event with UNAVAILABLE
        self.watch_requests: list[workflow_service_pb2.WatchExecutionRequest] = []

    async def RegisterWorkflow(
        self, request: workflow_service_pb2.RegisterWorkflowRequest, context: Any
    ) -> workflow_service_pb2.RegisterWorkflowResponse:
        self.requests.append(request)
        if not request.definition.nodes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a workflow needs nodes")
        stored = common_pb2.WorkflowDefinition()
        stored.CopyFrom(request.definition)
        stored.version = len(self.definitions) + 1
        self.definitions.append(stored)
        return workflow_service_pb2.RegisterWorkflowResponse(definition=stored, created=True)

    async def GetWorkflow(
        self, request: workflow_service_pb2.GetWorkflowRequest, context: Any
    ) -> workflow_service_pb2.GetWorkflowResponse:
        self.requests.append(request)
        for d in reversed(self.definitions):
            if d.name == request.name and request.version in (0, d.version):
                return workflow_service_pb2.GetWorkflowResponse(definition=d)
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no workflow {request.name!r}")
        raise AssertionError("unreachable")

    async def ListWorkflowVersions(
        self, request: workflow_service_pb2.ListWorkflowVersionsRequest, context: Any
    ) -> workflow_service_pb2.ListWorkflowVersionsResponse:
        self.requests.append(request)
        return workflow_service_pb2.ListWorkflowVersionsResponse(
            definitions=[d for d in self.definitions if d.name == request.name]
        )

    async def ListWorkflows(
        self, request: workflow_service_pb2.ListWorkflowsRequest, context: Any
    ) -> workflow_service_pb2.ListWorkflowsResponse:
        self.requests.append(request)
        if not request.page_token:
            return workflow_service_pb2.ListWorkflowsResponse(
                workflows=[workflow_service_pb2.WorkflowSummary(name="a", latest_version=2)],
                next_page_token="p2",
            )
        return workflow_service_pb2.ListWorkflowsResponse(
            workflows=[
                workflow_service_pb2.WorkflowSummary(name="b", latest_version=1, description="B")
            ]
        )

    async def StartExecution(
        self, request: workflow_service_pb2.StartExecutionRequest, context: Any
    ) -> workflow_service_pb2.StartExecutionResponse:
        self.requests.append(request)
        execution = common_pb2.Execution(
            id=f"ex-{len(self.executions) + 1}",
            workflow_name=request.workflow_name,
            workflow_version=request.workflow_version or 1,
            status=common_pb2.EXECUTION_STATUS_PENDING,
            input=request.input,
            priority=request.priority,
            idempotency_key=request.idempotency_key,
        )
        _ts(execution.create_time, T0)
        self.executions[execution.id] = execution
        self.events[execution.id] = []
        self.ended[execution.id] = asyncio.Event()
        return workflow_service_pb2.StartExecutionResponse(execution=execution, created=True)

    async def BatchStartExecutions(
        self, request: workflow_service_pb2.BatchStartExecutionsRequest, context: Any
    ) -> workflow_service_pb2.BatchStartExecutionsResponse:
        self.requests.append(request)
        results = []
        for one in request.requests:
            results.append(await self.StartExecution(one, context))
        self.requests[-len(results) :] = []  # keep the batch itself as the last request
        return workflow_service_pb2.BatchStartExecutionsResponse(results=results)

    async def GetExecution(
        self, request: workflow_service_pb2.GetExecutionRequest, context: Any
    ) -> workflow_service_pb2.GetExecutionResponse:
        self.requests.append(request)
        if request.execution_id not in self.executions:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"execution {request.execution_id!r} does not exist"
            )
        return workflow_service_pb2.GetExecutionResponse(
            execution=self.executions[request.execution_id]
        )

    async def ListExecutions(
        self, request: workflow_service_pb2.ListExecutionsRequest, context: Any
    ) -> workflow_service_pb2.ListExecutionsResponse:
        self.requests.append(request)
        matching = [
            e
            for e in self.executions.values()
            if (not request.workflow_name or e.workflow_name == request.workflow_name)
            and (not request.status or e.status == request.status)
        ]
        start = int(request.page_token or 0)
        page = matching[start : start + request.page_size]
        more = start + request.page_size < len(matching)
        return workflow_service_pb2.ListExecutionsResponse(
            executions=page, next_page_token=str(start + request.page_size) if more else ""
        )

    async def WatchExecution(
        self, request: workflow_service_pb2.WatchExecutionRequest, context: Any
    ) -> AsyncIterator[workflow_service_pb2.WatchExecutionResponse]:
        self.watch_requests.append(request)
        sent = 0
        after = request.after_sequence

        def news() -> bool:
            events = self.events[request.execution_id]
            return (
                bool(events and events[-1].sequence > after)
                or self.ended[request.execution_id].is_set()
            )

        while True:
            for event in self.events[request.execution_id]:
                if event.sequence > after:
                    if sent and self.watch_failures:
                        self.watch_failures -= 1
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator restarting")
                    yield workflow_service_pb2.WatchExecutionResponse(event=event)
                    after = event.sequence
                    sent += 1
            if self.ended[request.execution_id].is_set():
                yield workflow_service_pb2.WatchExecutionResponse(
                    execution=self.executions[request.execution_id]
                )
                return
            await wait_for(news, timeout=60, interval=0.01)

    def emit(self, execution_id: str, event_type: str, node_id: str = "", **details: Any) -> None:
        events = self.events[execution_id]
        event = common_pb2.Event(
            sequence=len(events) + 1,
            execution_id=execution_id,
            type=event_type,
            node_id=node_id,
            attempt=1 if node_id else 0,
            worker_id="w-1" if node_id else "",
            details=json.dumps(details).encode() if details else b"",
        )
        _ts(event.time, T0)
        events.append(event)

    def finish(self, execution_id: str) -> None:
        execution = self.executions[execution_id]
        execution.status = common_pb2.EXECUTION_STATUS_FAILED
        execution.output = b""
        execution.error.CopyFrom(
            common_pb2.ErrorInfo(
                type="ValueError",
                message="bad",
                details=b'{"traceback": "..."}',
                node_id="b",
                attempt=3,
                worker_id="w-1",
            )
        )
        _ts(execution.end_time, T0)
        execution.nodes.extend(
            [
                common_pb2.NodeRun(
                    node_id="a",
                    task_type="fetch",
                    status=common_pb2.NODE_STATUS_SUCCEEDED,
                    attempt=1,
                    output=b'{"rows": 3}',
                    worker_id="w-1",
                ),
                common_pb2.NodeRun(
                    node_id="b",
                    task_type="load",
                    status=common_pb2.NODE_STATUS_FAILED,
                    attempt=3,
                    error=common_pb2.ErrorInfo(type="ValueError", message="bad"),
                ),
                common_pb2.NodeRun(
                    node_id="c", task_type="report", status=common_pb2.NODE_STATUS_SKIPPED
                ),
            ]
        )
        self.emit(execution_id, "EXECUTION_FAILED")
        self.ended[execution_id].set()


@pytest.fixture
async def fake() -> AsyncIterator[FakeWorkflowService]:
    service = FakeWorkflowService()
    server = grpc.aio.server()
    workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    service.address = f"127.0.0.1:{port}"
    yield service
    await server.stop(None)


@pytest.fixture
async def client(fake: FakeWorkflowService) -> AsyncIterator[Client]:
    async with Client(fake.address, timeout=5) as c:
        yield c


async def test_register_workflow_from_builder_proto_and_file(
    fake: FakeWorkflowService, client: Client, tmp_path: Path
) -> None:
    wf = Workflow("orders")
    wf.node("b", "price", after=[wf.node("a", "fetch")])
    assert await client.register_workflow(wf) == RegisteredWorkflow("orders", 1, True)
    assert fake.definitions[0].edges[0] == common_pb2.Edge(source="a", target="b")

    assert (await client.register_workflow(wf.to_proto())).version == 2

    path = tmp_path / "orders.yaml"
    path.write_text("name: orders\nnodes:\n  - id: a\n    taskType: fetch\n")
    assert (await client.register_workflow(str(path))).version == 3
    assert fake.definitions[2].nodes[0].task_type == "fetch"

    with pytest.raises(InvalidArgumentError, match="a workflow needs nodes") as info:
        await client.register_workflow(Workflow("empty"))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == "a workflow needs nodes"

    definition = await client.get_workflow("orders")
    assert definition.version == 3
    assert (await client.get_workflow("orders", version=1)).version == 1
    assert fake.requests[-1] == workflow_service_pb2.GetWorkflowRequest(name="orders", version=1)
    versions = await client.list_workflow_versions("orders")
    assert [d.version for d in versions] == [1, 2, 3]


async def test_list_workflows_follows_pages(client: Client) -> None:
    assert await client.list_workflows() == [
        WorkflowSummary("a", 2, ""),
        WorkflowSummary("b", 1, "B"),
    ]


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ({"order": 42, "tags": ["é"]}, '{"order":42,"tags":["é"]}'.encode()),
        (None, b""),
        (b'{"raw": true}', b'{"raw": true}'),
        ([1, 2.5, None], b"[1,2.5,null]"),
    ],
)
async def test_start_execution_encodes_input(
    fake: FakeWorkflowService, client: Client, value: Any, wire: bytes
) -> None:
    execution = await client.start_execution(
        "orders", value, version=2, idempotency_key="k-1", priority=5
    )
    request = fake.requests[-1]
    assert request.input == wire
    assert (request.workflow_version, request.idempotency_key, request.priority) == (2, "k-1", 5)
    assert execution.status == "PENDING"
    assert execution.input == (json.loads(wire) if wire else None)
    assert (execution.priority, execution.idempotency_key) == (5, "k-1")
    assert execution.create_time == T0
    assert execution.end_time is None
    assert not execution.terminal


async def test_start_execution_later(fake: FakeWorkflowService, client: Client) -> None:
    await client.start_execution("orders", {"n": 1}, delay="1m30s")
    request = fake.requests[-1]
    assert request.delay.ToTimedelta() == timedelta(seconds=90)
    assert not request.HasField("start_time")

    when = datetime(2030, 1, 31, 9, 0, tzinfo=timezone(timedelta(hours=1)))
    await client.start_execution("orders", start_at=when)
    request = fake.requests[-1]
    assert request.start_time.ToDatetime(tzinfo=UTC) == when
    assert not request.HasField("delay")

    with pytest.raises(ValueError, match="either delay or start_at"):
        await client.start_execution("orders", delay=5, start_at=when)
    with pytest.raises(ValueError, match="timezone-aware"):
        await client.start_execution("orders", start_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="invalid delay 'soon'"):
        await client.start_execution("orders", delay="soon")


async def test_start_many_sends_one_batch(fake: FakeWorkflowService, client: Client) -> None:
    runs = await client.start_many(
        "orders", [{"n": i} for i in range(3)], idempotency_keys=["a", "b", "c"], delay="10s"
    )
    assert [r.input for r in runs] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [r.idempotency_key for r in runs] == ["a", "b", "c"]
    batch = fake.requests[-1]
    assert isinstance(batch, workflow_service_pb2.BatchStartExecutionsRequest)
    assert [r.workflow_name for r in batch.requests] == ["orders"] * 3
    assert all(r.delay.ToTimedelta() == timedelta(seconds=10) for r in batch.requests)
    with pytest.raises(ValueError, match="one key per input"):
        await client.start_many("orders", [1, 2], idempotency_keys=["a"])


async def test_start_execution_refuses_unserializable_input(client: Client) -> None:
    with pytest.raises(TypeError, match="not JSON-serializable"):
        await client.start_execution("orders", {"x": object()})


async def test_get_execution_converts_nodes_and_errors(
    fake: FakeWorkflowService, client: Client
) -> None:
    started = await client.start_execution("orders", {"n": 1})
    fake.finish(started.id)
    execution = await client.get_execution(started.id)
    assert execution == Execution(
        id=started.id,
        workflow_name="orders",
        workflow_version=1,
        status="FAILED",
        input={"n": 1},
        output=None,
        error=ErrorDetails(
            type="ValueError",
            message="bad",
            node_id="b",
            attempt=3,
            worker_id="w-1",
            details={"traceback": "..."},
        ),
        nodes=(
            NodeState("a", "fetch", "SUCCEEDED", 1, {"rows": 3}, None, "w-1"),
            NodeState("b", "load", "FAILED", 3, None, ErrorDetails("ValueError", "bad")),
            NodeState("c", "report", "SKIPPED"),
        ),
        create_time=T0,
        end_time=T0,
    )
    assert execution.terminal
    assert execution.node("a").output == {"rows": 3}


async def test_get_execution_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError) as info:
        await client.get_execution("nope")
    assert isinstance(info.value, RpcError) and isinstance(info.value, TrellisError)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.message == "execution 'nope' does not exist"
    assert "GetExecution" in str(info.value)


async def test_list_executions_filters_and_limits(
    fake: FakeWorkflowService, client: Client
) -> None:
    for _ in range(5):
        await client.start_execution("orders")
    await client.start_execution("other")
    fake.finish("ex-2")
    failed = await client.list_executions(status="failed")
    assert [e.id for e in failed] == ["ex-2"]
    assert fake.requests[-1].status == common_pb2.EXECUTION_STATUS_FAILED
    limited = await client.list_executions(workflow_name="orders", limit=3)
    assert [e.id for e in limited] == ["ex-1", "ex-2", "ex-3"]
    every = await client.list_executions(limit=100)
    assert len(every) == 6
    with pytest.raises(ValueError, match="unknown execution status 'DONE'"):
        await client.list_executions(status="DONE")


async def test_watch_execution_yields_events(fake: FakeWorkflowService, client: Client) -> None:
    started = await client.start_execution("orders")
    fake.emit(started.id, "EXECUTION_STARTED")
    fake.emit(started.id, "NODE_SUCCEEDED", "a", rows=3)
    fake.finish(started.id)
    events = [e async for e in client.watch_execution(started.id)]
    assert [e.type for e in events] == ["EXECUTION_STARTED", "NODE_SUCCEEDED", "EXECUTION_FAILED"]
    assert events[1] == Event(
        sequence=2,
        type="NODE_SUCCEEDED",
        execution_id=started.id,
        node_id="a",
        attempt=1,
        worker_id="w-1",
        time=T0,
        details={"rows": 3},
    )
    resumed = [e.sequence async for e in client.watch_execution(started.id, after_sequence=2)]
    assert resumed == [3]


async def test_wait_for_execution_resumes_a_broken_stream(
    fake: FakeWorkflowService, client: Client
) -> None:
    started = await client.start_execution("orders")
    fake.emit(started.id, "EXECUTION_STARTED")
    fake.emit(started.id, "NODE_LEASED", "a")
    fake.emit(started.id, "NODE_SUCCEEDED", "a")
    fake.watch_failures = 1
    waiting = asyncio.create_task(client.wait_for_execution(started.id, timeout=10))
    await wait_for(lambda: len(fake.watch_requests) == 2)  # the first stream broke
    assert fake.watch_requests[1].after_sequence == 1
    fake.finish(started.id)
    execution = await waiting
    assert execution.status == "FAILED"
    assert len(execution.nodes) == 3


async def test_wait_for_execution_times_out(fake: FakeWorkflowService, client: Client) -> None:
    started = await client.start_execution("orders")
    with pytest.raises(TimeoutError):
        await client.wait_for_execution(started.id, timeout=0.2)


async def test_unreachable_coordinator_raises_unavailable() -> None:
    async with Client("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(UnavailableError) as info:
            await c.get_execution("x")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
