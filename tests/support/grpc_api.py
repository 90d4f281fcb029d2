"""An in-process coordinator on a real socket, and the gRPC calls the integration tests
share: workflow definitions, register / start / poll, expected error statuses, histories.

``serve_api(store)`` starts the coordinator (the ``api`` fixture of tests/integration); the
helpers take the ``Api`` it yields.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from coordinator.config import CoordinatorConfig
from coordinator.grpc.auth import AuthInterceptor
from coordinator.grpc.server import OPEN_PRINCIPAL, RunningServer
from coordinator.grpc.server import start as start_server
from coordinator.service import Coordinator, Store
from tests.support.procs import ADMIN_KEY
from trellis.v1 import common_pb2, worker_service_pb2_grpc, workflow_service_pb2_grpc
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb
from worker_sdk._channel import open_channel
from worker_sdk._settings import ConnectionSettings

PAYLOAD_LIMIT = 64 * 1024


@dataclass
class Api:
    address: str
    running: RunningServer
    channel: grpc.aio.Channel
    workflows: workflow_service_pb2_grpc.WorkflowServiceStub
    workers: worker_service_pb2_grpc.WorkerServiceStub


def channel_to(address: str, key: str | None = ADMIN_KEY) -> grpc.aio.Channel:
    """A channel to a test coordinator that sends ``key`` (default: the admin key; None:
    no credential at all), as the SDK does."""
    return open_channel(ConnectionSettings(address, api_key=key or ""))


def open_interceptor(coordinator: Coordinator) -> AuthInterceptor:
    """The interceptor of a test server built from servicers alone: every caller acts as an
    admin of the default tenant (what the servicers need: a caller)."""
    return AuthInterceptor(coordinator.authenticator, coordinator, open_as=OPEN_PRINCIPAL)


@contextlib.asynccontextmanager
async def serve_api(store: Store, **settings: Any) -> AsyncIterator[Api]:
    """A coordinator over ``store`` on 127.0.0.1 (a free port), and a channel to it;
    ``settings`` override fields of its ``CoordinatorConfig``."""
    config = CoordinatorConfig(
        listen="127.0.0.1:0",
        bootstrap_admin_key=ADMIN_KEY,
        max_payload_bytes=PAYLOAD_LIMIT,
        sweep_interval=timedelta(milliseconds=100),
        shutdown_grace=timedelta(seconds=2),
    )
    config = replace(config, **settings)
    running = await start_server(config, store)
    address = f"127.0.0.1:{running.port}"
    channel = channel_to(address)
    try:
        yield Api(
            address,
            running,
            channel,
            workflow_service_pb2_grpc.WorkflowServiceStub(channel),
            worker_service_pb2_grpc.WorkerServiceStub(channel),
        )
    finally:
        await channel.close()
        await running.stop()


# -- definitions ------------------------------------------------------------------------------


def definition(
    name: str,
    nodes: list[str],
    edges: list[tuple[str, str]],
    task_type: str = "t",
    **node_opts: object,
) -> common_pb2.WorkflowDefinition:
    msg = common_pb2.WorkflowDefinition(name=name)
    for node_id in nodes:
        msg.nodes.add(id=node_id, task_type=task_type, **node_opts)  # type: ignore[arg-type]
    for source, target in edges:
        msg.edges.add(source=source, target=target)
    return msg


DIAMOND = definition(
    "diamond", ["a", "b", "c", "d"], [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]
)


# -- calls ------------------------------------------------------------------------------------


async def register(api: Api, defn: common_pb2.WorkflowDefinition) -> fpb.RegisterWorkflowResponse:
    reply: fpb.RegisterWorkflowResponse = await api.workflows.RegisterWorkflow(
        fpb.RegisterWorkflowRequest(definition=defn)
    )
    return reply


async def start(api: Api, name: str, payload: object = None) -> str:
    reply = await api.workflows.StartExecution(
        fpb.StartExecutionRequest(workflow_name=name, input=json.dumps(payload).encode())
    )
    execution_id: str = reply.execution.id
    return execution_id


async def poll(
    api: Api, max_tasks: int = 10, wait: float = 0.0, types: tuple[str, ...] = ("t",)
) -> list[wpb.Task]:
    reply = await api.workers.PollTasks(
        wpb.PollTasksRequest(
            worker_id="w1",
            task_types=list(types),
            max_tasks=max_tasks,
            wait=duration_pb2.Duration(nanos=int(wait * 1e9) % 10**9, seconds=int(wait)),
        ),
        timeout=wait + 10,
    )
    return list(reply.tasks)


async def expect_status(call: object, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    for fragment in fragments:
        assert fragment in details, details
    return details


async def events_of(api: Api, execution_id: str) -> list[common_pb2.Event]:
    """Every event of an ended execution (the watch ends with it)."""
    return [
        event
        async for m in api.workflows.WatchExecution(
            fpb.WatchExecutionRequest(execution_id=execution_id)
        )
        for event in m.events
    ]
