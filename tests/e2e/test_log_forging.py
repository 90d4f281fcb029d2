"""A client cannot forge log records: a worker id carrying a newline, a fake record and ANSI
escapes reaches a real coordinator's log (the lease it held times out, and the sweeper logs
the attempt with its worker id) as one escaped line, in the text format and in JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from tests.support.grpc_api import channel_to, definition
from tests.support.hostile import grpc_health, watched
from tests.support.procs import spawn_coordinator
from tests.support.wait import wait_for
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import worker_service_pb2_grpc as wgrpc
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc

pytestmark = pytest.mark.e2e

FAKE = "2026-12-03T18:20:01.123Z ERROR   coordinator.grpc.auth: FORGED admin key accepted"
FORGED_ID = f"w1\n{FAKE}\r\n\x1b[2K\x1b[31mred"
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LOGGED = "attempt failed by the coordinator"


async def _lose_a_lease_as(address: str, worker_id: str) -> None:
    """Take a task as ``worker_id`` and never heartbeat: the sweeper fails the attempt."""
    channel = channel_to(address)
    try:
        workflows = fgrpc.WorkflowServiceStub(channel)
        workers = wgrpc.WorkerServiceStub(channel)
        one = definition("forge", ["a"], [], heartbeat_timeout=duration_pb2.Duration(seconds=1))
        await workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=one), timeout=10)
        await workflows.StartExecution(
            fpb.StartExecutionRequest(workflow_name="forge", input=b"{}"), timeout=10
        )
        polled = await workers.PollTasks(
            wpb.PollTasksRequest(worker_id=worker_id, task_types=["t"], max_tasks=1), timeout=10
        )
        assert len(polled.tasks) == 1
    finally:
        await channel.close()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_forged_worker_id_stays_inside_its_log_record(
    db_url: str, tmp_path: Path, log_format: str
) -> None:
    proc, address = spawn_coordinator(
        db_url, tmp_path, sweep_interval="100ms", log_format=log_format
    )
    try:
        async with watched(proc, grpc_health(address)):
            await _lose_a_lease_as(address, FORGED_ID)
            await wait_for(lambda: LOGGED in proc.output(), timeout=30)
    finally:
        proc.stop()
    lines = proc.output().splitlines()
    assert "\x1b" not in proc.output() and "\r" not in proc.output()
    (record,) = [line for line in lines if LOGGED in line]
    # No line of the log is the fake record: it is inside the real one.
    assert not any(line.startswith(FAKE) for line in lines)
    assert [line for line in lines if "FORGED" in line] == [record]
    if log_format == "text":
        assert all(TIME.match(line) for line in lines), lines
        assert 'worker_id="w1\\n' + FAKE + '\\r\\n\\x1b[2K\\x1b[31mred"' in record
    else:
        docs = [json.loads(line) for line in lines]  # every line is one JSON record
        assert all(TIME.fullmatch(doc["time"]) for doc in docs), docs
        (doc,) = [d for d in docs if d["message"] == LOGGED]
        assert doc["worker_id"] == FORGED_ID
