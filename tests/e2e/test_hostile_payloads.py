"""Hostile payloads and expressions against a real `trellis coordinator serve` process,
each inside ``watched`` (health answers within 200 ms throughout, memory grows < 50 MB):

- a CEL input mapping nesting ``map`` three deep is refused at registration, in a
  workflow and in a webhook trigger; two deep over a 70 KiB input would build a node
  input of megabytes: the node fails with an error naming it and its field, the
  execution fails cleanly, GetExecution works and no node input is over the limit;
- a ``map`` over 9,999 elements (seconds of work in the binding) fails its node at once;
- the same two-deep mapping in a webhook trigger on a 200 KiB body refuses the fire;
- execution inputs, event payloads and task outputs with 100,000 nested lists, NaN,
  Infinity, lone surrogates or a 5,000-digit integer are INVALID_ARGUMENT naming the
  field: nothing starts, the lease stays usable and a legal output then completes it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from coordinator import signing
from tests.support.grpc_api import channel_to, expect_status
from tests.support.hostile import grpc_health, watched
from tests.support.procs import spawn_coordinator
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import worker_service_pb2_grpc as wgrpc
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc

pytestmark = pytest.mark.e2e

LIMIT = 1024 * 1024  # the default TRELLIS_MAX_PAYLOAD_BYTES
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SECRET = "s" * 32
THREE_DEEP = "input.items.map(a, input.items.map(b, input.items.map(c, input.pad)))"
TWO_DEEP = "input.items.map(a, input.items.map(b, input.pad))"
BODY_TWO_DEEP = "body.items.map(a, body.items.map(b, body.pad))"
FAILED = common_pb2.EXECUTION_STATUS_FAILED


def one_node(name: str, mapping: str) -> common_pb2.WorkflowDefinition:
    defn = common_pb2.WorkflowDefinition(name=name)
    defn.nodes.add(id="a", task_type="t", input=mapping)
    return defn


def padded(size: int, items: int = 90) -> dict[str, object]:
    """``{"items": [0..items), "pad": "xxx..."}`` of about ``size`` bytes as JSON."""
    return {"items": list(range(items)), "pad": "x" * (size - 6 * items)}


async def test_expressions_over_large_inputs_fail_cleanly(db_url: str, tmp_path: Path) -> None:
    coordinator, address = spawn_coordinator(db_url, tmp_path)
    channel = channel_to(address)
    workflows = fgrpc.WorkflowServiceStub(channel)
    triggers = tgrpc.TriggerServiceStub(channel)
    try:
        async with watched(coordinator, grpc_health(address)):
            # Three deep: refused where it is written, in a workflow and in a trigger.
            await expect_status(
                workflows.RegisterWorkflow(
                    fpb.RegisterWorkflowRequest(definition=one_node("three", THREE_DEEP))
                ),
                INVALID,
                "node 'a' input",
                "nests comprehensions",
                "3 deep",
            )
            await expect_status(
                triggers.CreateWebhookTrigger(
                    tpb.CreateWebhookTriggerRequest(
                        path="three",
                        workflow_name="two",
                        hmac_secret=SECRET,
                        input=THREE_DEEP.replace("input.", "body."),
                    )
                ),
                INVALID,
                "webhook trigger 'three' input",
                "3 deep",
            )

            # Two deep over 70 KiB: the node input would be ~8100 copies of the pad.
            await workflows.RegisterWorkflow(
                fpb.RegisterWorkflowRequest(definition=one_node("two", TWO_DEEP))
            )
            wide = json.dumps(padded(70 * 1024)).encode()
            two = await workflows.StartExecution(
                fpb.StartExecutionRequest(workflow_name="two", input=wide)
            )
            # Seconds of quadratic work in the binding if it were evaluated.
            await workflows.RegisterWorkflow(
                fpb.RegisterWorkflowRequest(definition=one_node("flat", "input.map(x, x)"))
            )
            flat = await workflows.StartExecution(
                fpb.StartExecutionRequest(
                    workflow_name="flat", input=json.dumps(list(range(9999))).encode()
                )
            )
            executions = {two.execution.id: "more than 1,048,576 bytes"}
            executions[flat.execution.id] = "may take"
            for execution_id, reason in executions.items():

                async def failed(execution_id: str = execution_id) -> common_pb2.Execution | None:
                    reply = await workflows.GetExecution(
                        fpb.GetExecutionRequest(execution_id=execution_id)
                    )
                    execution: common_pb2.Execution = reply.execution
                    return execution if execution.status == FAILED else None

                execution = await wait_for(failed, timeout=60, message="the execution failing")
                (node,) = execution.nodes
                assert node.status == common_pb2.NODE_STATUS_FAILED
                assert node.error.type == "ExpressionError"
                assert "node 'a' input" in node.error.message, node.error.message
                assert reason in node.error.message, node.error.message
                assert len(node.input) <= LIMIT

            # The webhook: the same two-deep mapping on a 200 KiB body refuses the fire.
            await triggers.CreateWebhookTrigger(
                tpb.CreateWebhookTriggerRequest(
                    path="two", workflow_name="two", hmac_secret=SECRET, input=BODY_TWO_DEEP
                )
            )
            body = json.dumps(padded(200 * 1024)).encode()
            header = signing.sign(SECRET, body, int(time.time()))
            await expect_status(
                triggers.FireWebhook(
                    tpb.FireWebhookRequest(
                        path="two", headers={signing.SIGNATURE_HEADER: header}, body=body
                    )
                ),
                INVALID,
                "webhook trigger 'two' input",
                "more than 1,048,576 bytes",
            )
        listed = await workflows.ListExecutions(fpb.ListExecutionsRequest(workflow_name="two"))
        assert [e.id for e in listed.executions] == [two.execution.id]  # the fire started none
        assert "Traceback" not in coordinator.output()
    finally:
        await channel.close()
        assert coordinator.stop() == 0, coordinator.output()[-3000:]


HOSTILE_JSON = {
    "100,000 nested lists": (b"[" * 100_000 + b"]" * 100_000, "deeper than 128"),
    "NaN": (b'{"x": NaN}', "NaN"),
    "Infinity": (b"[Infinity]", "Infinity"),
    "a lone surrogate": (b'{"x": "\\ud800"}', "surrogate"),
    "a lone surrogate in a key": (b'{"\\udfff": 1}', "surrogate"),
    "a 5,000-digit integer": (b"1" * 5000, "5000 digits"),
}


async def test_hostile_json_is_refused_naming_the_field(db_url: str, tmp_path: Path) -> None:
    coordinator, address = spawn_coordinator(db_url, tmp_path)
    channel = channel_to(address)
    workflows = fgrpc.WorkflowServiceStub(channel)
    triggers = tgrpc.TriggerServiceStub(channel)
    workers = wgrpc.WorkerServiceStub(channel)
    try:
        defn = common_pb2.WorkflowDefinition(name="plain")
        defn.nodes.add(id="a", task_type="t")
        await workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=defn))
        async with watched(coordinator, grpc_health(address)):
            for what, (payload, fragment) in HOSTILE_JSON.items():
                details = await expect_status(
                    workflows.StartExecution(
                        fpb.StartExecutionRequest(workflow_name="plain", input=payload)
                    ),
                    INVALID,
                    fragment,
                )
                assert details.startswith("input "), (what, details)
                details = await expect_status(
                    triggers.PublishEvent(tpb.PublishEventRequest(name="e", payload=payload)),
                    INVALID,
                    fragment,
                )
                assert details.startswith("payload "), (what, details)
            # Deep but legal still works.
            legal = b"[" * 100 + b"1" + b"]" * 100
            started = await workflows.StartExecution(
                fpb.StartExecutionRequest(workflow_name="plain", input=legal)
            )
            # Task outputs: refused naming the field, the lease stays usable.
            await workers.RegisterWorker(
                wpb.RegisterWorkerRequest(worker_id="w1", task_types=["t"], capacity=1)
            )
            polled = await workers.PollTasks(
                wpb.PollTasksRequest(
                    worker_id="w1",
                    task_types=["t"],
                    max_tasks=1,
                    wait=duration_pb2.Duration(seconds=10),
                ),
                timeout=30,
            )
            (task,) = polled.tasks
            for what, (payload, fragment) in HOSTILE_JSON.items():
                details = await expect_status(
                    workers.CompleteTask(
                        wpb.CompleteTaskRequest(
                            lease_token=task.lease_token, worker_id="w1", output=payload
                        )
                    ),
                    INVALID,
                    fragment,
                )
                assert details.startswith("output "), (what, details)
            await workers.CompleteTask(
                wpb.CompleteTaskRequest(lease_token=task.lease_token, worker_id="w1", output=legal)
            )
        reply = await workflows.GetExecution(
            fpb.GetExecutionRequest(execution_id=started.execution.id)
        )
        assert reply.execution.status == common_pb2.EXECUTION_STATUS_SUCCEEDED
        assert reply.execution.output == legal
        listed = await workflows.ListExecutions(fpb.ListExecutionsRequest(workflow_name="plain"))
        assert len(listed.executions) == 1
        assert "Traceback" not in coordinator.output()
    finally:
        await channel.close()
        assert coordinator.stop() == 0, coordinator.output()[-3000:]
