"""Where the SDK finds the coordinator: TRELLIS_ADDRESS, read alike by the Worker, the
Client and the CLI; an explicit address wins. Worker and Client are checked against real
servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from tests.support.fake_worker_service import FakeWorkerService, echo, serving, start_server
from tests.support.wait import wait_for
from trellis.cli import build_parser
from trellis.v1 import workflow_service_pb2, workflow_service_pb2_grpc
from worker_sdk import DEFAULT_ADDRESS, Client, Worker
from worker_sdk._settings import ConnectionSettings

# Nothing listens there: a worker or client that goes there never gets an answer.
NOWHERE = "127.0.0.1:1"


class Workflows(workflow_service_pb2_grpc.WorkflowServiceServicer):
    """Answers ListWorkflows with one workflow, and counts the calls."""

    def __init__(self) -> None:
        self.address = ""
        self.calls = 0

    async def ListWorkflows(
        self, request: workflow_service_pb2.ListWorkflowsRequest, context: Any
    ) -> workflow_service_pb2.ListWorkflowsResponse:
        self.calls += 1
        return workflow_service_pb2.ListWorkflowsResponse(
            workflows=[workflow_service_pb2.WorkflowSummary(name="orders", latest_version=1)]
        )


def test_settings_from_the_environment() -> None:
    assert ConnectionSettings.from_env({}).address == DEFAULT_ADDRESS == "127.0.0.1:7400"
    assert ConnectionSettings.from_env({"TRELLIS_ADDRESS": ""}).address == DEFAULT_ADDRESS
    env = {"TRELLIS_ADDRESS": " coordinator.internal:7400 "}
    assert ConnectionSettings.from_env(env) == ConnectionSettings("coordinator.internal:7400")


@pytest.fixture
async def workers() -> AsyncIterator[FakeWorkerService]:
    service = FakeWorkerService()
    await start_server(service)
    yield service
    assert service.server is not None
    await service.server.stop(None)


@pytest.fixture
async def workflows() -> AsyncIterator[Workflows]:
    service = Workflows()
    server = grpc.aio.server()
    workflow_service_pb2_grpc.add_WorkflowServiceServicer_to_server(service, server)
    service.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    yield service
    await server.stop(None)


async def test_worker_connects_to_trellis_address(
    workers: FakeWorkerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRELLIS_ADDRESS", workers.address)
    worker = Worker([echo])
    async with serving(worker):
        token = await workers.add_task("echo", 7)
        await wait_for(lambda: workers.done(token), timeout=10)
    assert len(workers.registrations) == 1
    assert workers.completions[token] == {"got": 7, "attempt": 1}


async def test_worker_address_argument_wins_over_trellis_address(
    workers: FakeWorkerService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRELLIS_ADDRESS", NOWHERE)
    async with serving(Worker([echo], address=workers.address)):
        token = await workers.add_task("echo", 8)
        await wait_for(lambda: workers.done(token), timeout=10)
    assert workers.completions[token] == {"got": 8, "attempt": 1}


async def test_client_connects_to_trellis_address(
    workflows: Workflows, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRELLIS_ADDRESS", workflows.address)
    async with Client(timeout=5) as client:
        assert client.address == workflows.address
        summaries = await client.list_workflows()
    assert [s.name for s in summaries] == ["orders"]
    assert workflows.calls == 1


async def test_client_address_argument_wins_over_trellis_address(
    workflows: Workflows, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRELLIS_ADDRESS", NOWHERE)
    async with Client(workflows.address, timeout=5) as client:
        assert client.address == workflows.address
        assert [s.name for s in await client.list_workflows()] == ["orders"]


def test_without_trellis_address_the_default_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRELLIS_ADDRESS", raising=False)
    assert Client().address == DEFAULT_ADDRESS


def test_cli_reads_the_same_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRELLIS_ADDRESS", "coordinator.internal:7400")
    assert build_parser().parse_args(["status", "e-1"]).address == "coordinator.internal:7400"
    args = build_parser().parse_args(["--address", "elsewhere:7400", "status", "e-1"])
    assert args.address == "elsewhere:7400"
    monkeypatch.delenv("TRELLIS_ADDRESS")
    assert build_parser().parse_args(["status", "e-1"]).address == DEFAULT_ADDRESS
