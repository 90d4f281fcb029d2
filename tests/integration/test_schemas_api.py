"""JSON Schemas over gRPC (in process; SQLite, PostgreSQL and memory): a workflow's
input_schema refuses a bad input on every kind of start with the failing place in the
message, a node's output_schema fails the attempt that returned a bad output (not
retried), and a schema that is not one is refused at registration."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from coordinator.signing import sign
from tests.support.grpc_api import Api, expect_status, poll, register, start
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb

SECRET = "s3cret-s3cret-s3cret"

ORDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["customer"],
    "properties": {
        "customer": {
            "type": "object",
            "required": ["email"],
            "properties": {"email": {"type": "string", "format": "email"}},
        }
    },
}
GOOD = {"customer": {"email": "ann@example.com"}}
BAD = {"customer": {"email": "x"}}
# What every refusal of BAD names: the failing place (a JSON Pointer) and why.
WHERE = "at /customer/email: 'x' is not a 'email'"


def struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(doc)
    return s


def orders(
    name: str = "orders", schema: dict[str, Any] | None = ORDER_SCHEMA
) -> common_pb2.WorkflowDefinition:
    msg = common_pb2.WorkflowDefinition(name=name)
    msg.nodes.add(id="a", task_type="t")
    if schema is not None:
        msg.input_schema.CopyFrom(struct(schema))
    return msg


def payload(doc: object) -> bytes:
    return json.dumps(doc).encode()


async def execution_ids(api: Api, name: str = "orders") -> list[str]:
    reply = await api.workflows.ListExecutions(fpb.ListExecutionsRequest(workflow_name=name))
    return [e.id for e in reply.executions]


# -- registration --------------------------------------------------------------------------


async def test_registration_refuses_what_is_not_a_schema_and_get_workflow_returns_them(
    api: Api,
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"type": "nope"}, "workflow 'orders': input_schema is not a valid JSON Schema at /type"),
        (
            {"$ref": "https://example.com/schemas/order.json"},
            "$ref 'https://example.com/schemas/order.json' does not resolve inside the schema",
        ),
        ({"$schema": "https://example.com/my-draft"}, "is not a supported draft"),
        ({"enum": ["x" * 1000] * 80}, "over the 65536-byte limit"),
    ]
    for schema, fragment in cases:
        await expect_status(
            api.workflows.RegisterWorkflow(
                fpb.RegisterWorkflowRequest(definition=orders(schema=schema))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            fragment,
        )
    bad_output = orders(schema=None)
    bad_output.nodes[0].output_schema.CopyFrom(struct({"minimum": "zero"}))
    await expect_status(
        api.workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=bad_output)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "workflow 'orders' node 'a': output_schema is not a valid JSON Schema",
    )
    on_switch = orders(schema=None)
    on_switch.nodes.add(
        id="s", kind="switch", default_targets=["b"], output_schema=struct({"type": "object"})
    )
    on_switch.nodes.add(id="b", task_type="t")
    on_switch.edges.add(source="a", target="s")
    on_switch.edges.add(source="s", target="b")
    await expect_status(
        api.workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=on_switch)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "node 's' sets output_schema but is a switch node",
    )
    listed = await api.workflows.ListWorkflows(fpb.ListWorkflowsRequest())
    assert list(listed.workflows) == []

    good = orders()
    good.nodes[0].output_schema.CopyFrom(struct({"type": "object", "required": ["total"]}))
    await register(api, good)
    got = (await api.workflows.GetWorkflow(fpb.GetWorkflowRequest(name="orders"))).definition
    assert got.input_schema == struct(ORDER_SCHEMA)
    assert got.nodes[0].output_schema == struct({"type": "object", "required": ["total"]})
    # The same definition again is the same version (the schema is part of its content).
    again = await register(api, good)
    assert again.definition.version == got.version and not again.created


# -- every kind of start ------------------------------------------------------------------


async def test_start_execution_refuses_a_bad_input_naming_the_place(api: Api) -> None:
    await register(api, orders())
    details = await expect_status(
        api.workflows.StartExecution(
            fpb.StartExecutionRequest(workflow_name="orders", input=payload(BAD))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input does not match the input_schema of workflow 'orders' version 1",
        WHERE,
    )
    assert "fix the input" in details
    await expect_status(
        api.workflows.StartExecution(
            fpb.StartExecutionRequest(workflow_name="orders", input=payload({}))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at / (the whole document): 'customer' is a required property",
    )
    # A delayed start is checked now, not when it is due.
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    await expect_status(
        api.workflows.StartExecution(
            fpb.StartExecutionRequest(workflow_name="orders", input=payload(BAD), start_time=later)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        WHERE,
    )
    assert await execution_ids(api) == []
    started = await start(api, "orders", GOOD)
    assert await execution_ids(api) == [started]


async def test_a_batch_with_one_bad_input_starts_nothing(api: Api) -> None:
    await register(api, orders())
    requests = [
        fpb.StartExecutionRequest(workflow_name="orders", input=payload(GOOD)),
        fpb.StartExecutionRequest(workflow_name="orders", input=payload(BAD)),
    ]
    await expect_status(
        api.workflows.BatchStartExecutions(fpb.BatchStartExecutionsRequest(requests=requests)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "requests[1]: input does not match",
        WHERE,
        "nothing was started",
    )
    assert await execution_ids(api) == []


async def test_a_webhook_with_a_bad_input_is_refused(api: Api) -> None:
    await register(api, orders())
    triggers = tgrpc.TriggerServiceStub(api.channel)
    await triggers.CreateWebhookTrigger(
        tpb.CreateWebhookTriggerRequest(
            path="orders", workflow_name="orders", hmac_secret=SECRET, input="body.order"
        )
    )
    body = payload({"order": BAD})
    headers = {"X-Trellis-Signature": sign(SECRET, body, int(time.time()))}
    await expect_status(
        triggers.FireWebhook(tpb.FireWebhookRequest(path="orders", headers=headers, body=body)),
        grpc.StatusCode.INVALID_ARGUMENT,
        WHERE,
    )
    assert await execution_ids(api) == []
    body = payload({"order": GOOD})
    headers = {"X-Trellis-Signature": sign(SECRET, body, int(time.time()))}
    fired = await triggers.FireWebhook(
        tpb.FireWebhookRequest(path="orders", headers=headers, body=body)
    )
    assert await execution_ids(api) == [fired.execution_id]


async def test_a_published_event_with_a_bad_input_reports_the_trigger_failed(api: Api) -> None:
    await register(api, orders())
    triggers = tgrpc.TriggerServiceStub(api.channel)
    trigger = (
        await triggers.CreateEventTrigger(
            tpb.CreateEventTriggerRequest(event_name="order.placed", workflow_name="orders")
        )
    ).trigger
    reply = await triggers.PublishEvent(
        tpb.PublishEventRequest(name="order.placed", payload=payload(BAD))
    )
    assert list(reply.executions) == []
    [failure] = reply.failures
    assert failure.trigger_id == trigger.id
    assert "input does not match the input_schema" in failure.message
    assert WHERE in failure.message
    assert await execution_ids(api) == []
    ok = await triggers.PublishEvent(
        tpb.PublishEventRequest(name="order.placed", payload=payload(GOOD))
    )
    assert len(ok.executions) == 1 and list(ok.failures) == []


async def test_a_schedule_is_checked_when_created_and_when_it_fires(api: Api) -> None:
    await register(api, orders())
    triggers = tgrpc.TriggerServiceStub(api.channel)
    await expect_status(
        triggers.CreateSchedule(
            tpb.CreateScheduleRequest(
                id="nightly", cron="0 3 * * *", workflow_name="orders", input=payload(BAD)
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        WHERE,
    )
    assert list((await triggers.ListSchedules(tpb.ListSchedulesRequest())).schedules) == []

    # A schedule of the latest version meets a newer schema when it fires: that fire's
    # execution fails at once, saying why (a scheduled start has nobody to answer to).
    await register(api, orders("drifting", schema=None))
    await triggers.CreateSchedule(
        tpb.CreateScheduleRequest(
            id="tick",
            cron="* * * * * *",
            workflow_name="drifting",
            input=payload(BAD),
            overlap=tpb.OVERLAP_POLICY_ALLOW,
        )
    )
    await register(api, orders("drifting"))

    async def refused() -> common_pb2.Execution | None:
        reply = await api.workflows.ListExecutions(
            fpb.ListExecutionsRequest(workflow_name="drifting")
        )
        return next((e for e in reply.executions if e.workflow_version == 2), None)

    execution = await wait_for(refused, timeout=20)
    await triggers.PauseSchedule(tpb.PauseScheduleRequest(id="tick"))
    assert execution.status == common_pb2.EXECUTION_STATUS_FAILED
    assert execution.error.type == "InputSchemaViolation"
    assert WHERE in execution.error.message
    assert "workflow 'drifting' version 2" in execution.error.message


async def test_a_child_start_with_a_bad_input_fails_the_parent_node(api: Api) -> None:
    await register(api, orders("child"))
    parent = common_pb2.WorkflowDefinition(name="parent")
    parent.nodes.add(id="run", kind="workflow", workflow_name="child", input="input.order")
    await register(api, parent)
    execution_id = await start(api, "parent", {"order": BAD})

    async def ended() -> common_pb2.Execution | None:
        got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
        return got.execution if got.execution.status == common_pb2.EXECUTION_STATUS_FAILED else None

    execution = await wait_for(ended, timeout=10)
    [node] = execution.nodes
    assert node.status == common_pb2.NODE_STATUS_FAILED
    assert node.error.type == "InputSchemaViolation"
    assert "node 'run' could not start its child execution" in node.error.message
    assert WHERE in node.error.message
    assert await execution_ids(api, "child") == []


# -- node outputs -------------------------------------------------------------------------


def with_output_schema() -> common_pb2.WorkflowDefinition:
    msg = common_pb2.WorkflowDefinition(name="priced")
    node = msg.nodes.add(id="price", task_type="t")
    node.retry_policy.max_attempts = 3
    node.output_schema.CopyFrom(
        struct(
            {
                "type": "object",
                "required": ["total"],
                "properties": {"total": {"type": "number", "minimum": 0}},
            }
        )
    )
    msg.nodes.add(id="after", task_type="t")
    msg.edges.add(source="price", target="after")
    return msg


async def test_an_output_that_breaks_the_schema_fails_the_attempt_for_good(api: Api) -> None:
    await register(api, with_output_schema())
    execution_id = await start(api, "priced", {})
    [task] = await poll(api, wait=5)
    complete = wpb.CompleteTaskRequest(
        lease_token=task.lease_token, worker_id="w1", output=payload({"total": -5})
    )
    expected = (
        "output of node 'price' does not match the node's output_schema at /total: "
        "-5 is less than the minimum of 0"
    )
    details = await expect_status(
        api.workers.CompleteTask(complete), grpc.StatusCode.INVALID_ARGUMENT, expected
    )
    assert "not retried" in details
    # The same result again (a retried call) finds the attempt failed already.
    await expect_status(
        api.workers.CompleteTask(complete),
        grpc.StatusCode.INVALID_ARGUMENT,
        expected,
        "reported before",
    )
    # The SDK answers a refused output with a FailTask: a duplicate of the recorded failure.
    failed = await api.workers.FailTask(
        wpb.FailTaskRequest(
            lease_token=task.lease_token,
            worker_id="w1",
            error=wpb.TaskError(type="OutputRejected", message="refused", non_retryable=True),
        )
    )
    assert failed.duplicate and not failed.will_retry

    got = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    assert got.execution.status == common_pb2.EXECUTION_STATUS_FAILED
    price = next(n for n in got.execution.nodes if n.node_id == "price")
    assert price.status == common_pb2.NODE_STATUS_FAILED
    assert price.attempt == 1, "retries were allowed, but a schema violation is not retried"
    assert price.error.type == "OutputSchemaViolation"
    assert expected in price.error.message
    letters = await api.workflows.ListDeadLetters(fpb.ListDeadLettersRequest())
    [letter] = letters.dead_letters
    assert letter.node_id == "price"
    assert letter.attempts[-1].error.type == "OutputSchemaViolation"
    assert await poll(api) == []


async def test_a_matching_output_passes_and_map_elements_are_each_checked(api: Api) -> None:
    await register(api, with_output_schema())
    execution_id = await start(api, "priced", {})
    [task] = await poll(api, wait=5)
    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(
            lease_token=task.lease_token, worker_id="w1", output=payload({"total": 12.5})
        )
    )
    [after] = await poll(api, wait=5)
    assert after.node_id == "after" and after.execution_id == execution_id

    mapped = common_pb2.WorkflowDefinition(name="mapped")
    mapped.nodes.add(
        id="each",
        kind="map",
        task_type="m",
        items="input",
        output_schema=struct({"type": "string"}),
    )
    await register(api, mapped)
    await start(api, "mapped", [1, 2])
    tasks = sorted(await poll(api, wait=5, types=("m",)), key=lambda t: t.node_id)
    assert [t.node_id for t in tasks] == ["each[0]", "each[1]"]
    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=tasks[0].lease_token, worker_id="w1", output=b'"ok"')
    )
    await expect_status(
        api.workers.CompleteTask(
            wpb.CompleteTaskRequest(lease_token=tasks[1].lease_token, worker_id="w1", output=b"2")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "output of node 'each[1]' does not match the node's output_schema at / (the whole "
        "document): 2 is not of type 'string'",
    )


@pytest.mark.timeout(60)
async def test_a_backtracking_pattern_is_cut_short_and_refuses_the_input(api: Api) -> None:
    hostile = orders(schema={"type": "string", "pattern": "^(a|aa)+$"})
    await register(api, hostile)
    # Unbounded, this backtrack on 5,000 characters outlasts the test's timeout.
    await expect_status(
        api.workflows.StartExecution(
            fpb.StartExecutionRequest(workflow_name="orders", input=payload("a" * 5000 + "!"))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "checking it took over 250 ms",
        "so it was refused",
    )
    await start(api, "orders", "aaaa")
