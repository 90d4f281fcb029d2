"""An in-process coordinator on a real socket, over the store fixture (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import grpc
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.grpc.server import RunningServer, start
from coordinator.service import Store
from trellis.v1 import worker_service_pb2_grpc, workflow_service_pb2_grpc

PAYLOAD_LIMIT = 64 * 1024


@dataclass
class Api:
    address: str
    running: RunningServer
    channel: grpc.aio.Channel
    workflows: workflow_service_pb2_grpc.WorkflowServiceStub
    workers: worker_service_pb2_grpc.WorkerServiceStub


@pytest.fixture
async def api(store: Store) -> AsyncIterator[Api]:
    config = CoordinatorConfig(
        listen="127.0.0.1:0",
        max_payload_bytes=PAYLOAD_LIMIT,
        sweep_interval=timedelta(milliseconds=100),
        shutdown_grace=timedelta(seconds=2),
    )
    running = await start(config, store)
    address = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(address)
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
