"""JSON Schemas end to end, real processes: a coordinator, an SDK worker and the gateway.

A workflow built with the SDK carries an input_schema and a node output_schema; a bad
input is refused on StartExecution and on a webhook through the gateway (400) with the
failing place; a worker's output that breaks its node's schema fails the attempt, not
retried, and dead-letters it. A hostile (catastrophically backtracking) pattern is cut
short while the coordinator keeps answering its health checks.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format

from coordinator.signing import sign
from tests.support.grpc_api import channel_to, expect_status
from tests.support.hostile import grpc_health, watched
from tests.support.http import until
from tests.support.procs import (
    ROOT,
    spawn_coordinator,
    spawn_gateway,
    spawn_worker,
)
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import worker_service_pb2_grpc as wgrpc
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc
from worker_sdk import Client, InvalidArgumentError, Workflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SECRET = "e2e-schema-secret-0123456789"
ORDER = {
    "type": "object",
    "required": ["customer", "total"],
    "properties": {
        "customer": {
            "type": "object",
            "required": ["email"],
            "properties": {"email": {"type": "string", "format": "email"}},
        },
        "total": {"type": "number"},
    },
}
PRICED = {
    "type": "object",
    "required": ["total"],
    "properties": {"total": {"type": "number", "minimum": 0}},
}
WHERE = "at /customer/email: 'x' is not a 'email'"


def orders() -> Workflow:
    wf = Workflow("orders", input_schema=ORDER)
    price = wf.node("price", "price", retries=2, output_schema=PRICED)
    wf.node("ship", "ship", after=price)
    return wf


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def signed(body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Trellis-Signature": sign(SECRET, body, int(time.time())),
    }


async def test_inputs_and_outputs_are_checked_across_real_processes(tmp_path: Path) -> None:
    coordinator, address = spawn_coordinator(f"sqlite:///{tmp_path}/trellis.db", tmp_path)
    worker = spawn_worker(ROOT / "tests/e2e/schema_worker.py", address, tmp_path, "worker")
    gateway, base = spawn_gateway(address, tmp_path)
    try:
        async with Client(address) as client:
            registered = await client.register_workflow(orders())
            stored = await client.get_workflow("orders")
            assert json_format.MessageToDict(stored.input_schema) == ORDER
            assert registered.version == stored.version

            with pytest.raises(InvalidArgumentError) as refused:
                await client.start_execution("orders", {"customer": {"email": "x"}, "total": 3})
            assert "input does not match the input_schema of workflow 'orders'" in str(
                refused.value
            )
            assert WHERE in refused.value.message

            # The gateway answers a webhook whose input breaks the schema with 400.
            channel = channel_to(address)
            try:
                await tgrpc.TriggerServiceStub(channel).CreateWebhookTrigger(
                    tpb.CreateWebhookTriggerRequest(
                        path="shop/orders", workflow_name="orders", hmac_secret=SECRET
                    )
                )
            finally:
                await channel.close()
            until(f"{base}/readyz", 200, gateway)
            bad = json.dumps({"customer": {"email": "x"}, "total": 3}).encode()
            status, reply = post(f"{base}/api/webhooks/shop/orders", bad, signed(bad))
            assert status == 400, reply
            assert WHERE in str(reply["error"])
            assert await client.list_executions(workflow_name="orders") == []

            # The worker returns a negative total: the attempt fails, not retried.
            broken = await client.start_execution(
                "orders", {"customer": {"email": "a@b.example"}, "total": -5}
            )
            done = await client.wait_for_execution(broken.id, timeout=60)
            assert done.status == "FAILED"
            node = next(n for n in done.nodes if n.node_id == "price")
            assert node.status == "FAILED"
            assert node.attempt == 1, "two retries were allowed; a schema violation has none"
            assert node.error is not None and node.error.type == "OutputSchemaViolation"
            assert "at /total: -5 is less than the minimum of 0" in node.error.message
            [letter] = await client.list_dead_letters(workflow_name="orders")
            assert letter.execution_id == broken.id
            assert letter.attempts[-1].error.type == "OutputSchemaViolation"

            good = json.dumps({"customer": {"email": "a@b.example"}, "total": 7}).encode()
            status, reply = post(f"{base}/api/webhooks/shop/orders", good, signed(good))
            assert status == 202, reply
            done = await client.wait_for_execution(str(reply["execution_id"]), timeout=60)
            assert done.status == "SUCCEEDED"
            assert done.output == {"shipped": 7}
    finally:
        gateway_exit = gateway.stop()
        worker.stop()
        coordinator.stop()
    assert gateway_exit == 0, gateway.output()


async def test_a_backtracking_pattern_does_not_stall_the_coordinator(tmp_path: Path) -> None:
    proc, address = spawn_coordinator(f"sqlite:///{tmp_path}/trellis.db", tmp_path)
    channel = channel_to(address)
    workflows = fgrpc.WorkflowServiceStub(channel)
    workers = wgrpc.WorkerServiceStub(channel)
    hostile = r"^(a|aa)+$"
    wf = Workflow("redos", input_schema={"properties": {"name": {"pattern": hostile}}})
    wf.node("echo", "echo", output_schema={"patternProperties": {hostile: {"type": "null"}}})
    evil = "a" * 5000 + "!"
    try:
        await workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=wf.to_proto()))
        async with watched(proc, grpc_health(address)) as watch:
            for _ in range(5):
                await expect_status(
                    workflows.StartExecution(
                        fpb.StartExecutionRequest(
                            workflow_name="redos", input=json.dumps({"name": evil}).encode()
                        )
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "checking it took over 250 ms",
                )
            batch = [
                fpb.StartExecutionRequest(
                    workflow_name="redos", input=json.dumps({"name": evil}).encode()
                )
                for _ in range(100)
            ]
            await expect_status(
                workflows.BatchStartExecutions(fpb.BatchStartExecutionsRequest(requests=batch)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "requests[0]",
                "nothing was started",
            )
            # A worker's output meets the same pattern as an object key.
            await workflows.StartExecution(
                fpb.StartExecutionRequest(workflow_name="redos", input=b'{"name": "aaaa"}')
            )
            polled = await workers.PollTasks(
                wpb.PollTasksRequest(
                    worker_id="w",
                    task_types=["echo"],
                    max_tasks=1,
                    wait=duration_pb2.Duration(seconds=5),
                ),
                timeout=15,
            )
            [task] = polled.tasks
            await expect_status(
                workers.CompleteTask(
                    wpb.CompleteTaskRequest(
                        lease_token=task.lease_token,
                        worker_id="w",
                        output=json.dumps({evil: None}).encode(),
                    )
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "output of node 'echo' does not match",
                "checking it took over 250 ms",
            )
        assert watch.probes > 0
    finally:
        await channel.close()
        proc.stop()
