"""Approval nodes through the gRPC surface and the service, on SQLite, PostgreSQL and the
memory store: waiting, ApproveNode, RejectNode, who may decide (the caller's roles),
refusals, timeouts."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import duration_pb2

from coordinator.errors import PermissionDenied
from tests.support.grpc_api import Api, channel_to, events_of, expect_status, poll, register
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import identity_service_pb2 as ipb
from trellis.v1 import identity_service_pb2_grpc as igrpc
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc

TENANT = "default"
# The subject of the admin key the test channel sends (the bootstrap key).
ADMIN = "bootstrap-admin"
WAITING = common_pb2.NODE_STATUS_WAITING


def review_flow(name: str = "orders", **review: object) -> common_pb2.WorkflowDefinition:
    """prepare (task) -> review (approval, role operator) -> ship (task)."""
    msg = common_pb2.WorkflowDefinition(name=name)
    msg.nodes.add(id="prepare", task_type="t")
    review.setdefault("required_role", "operator")
    msg.nodes.add(id="review", kind="approval", prompt="Check the amount", **review)  # type: ignore[arg-type]
    msg.nodes.add(id="ship", task_type="t")
    msg.edges.add(source="prepare", target="review")
    msg.edges.add(source="review", target="ship")
    return msg


async def get(api: Api, execution_id: str) -> common_pb2.Execution:
    reply = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    execution: common_pb2.Execution = reply.execution
    return execution


def node(execution: common_pb2.Execution, node_id: str) -> common_pb2.NodeRun:
    return next(n for n in execution.nodes if n.node_id == node_id)


async def complete(api: Api, output: object) -> wpb.Task:
    [task] = await poll(api, wait=5)
    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=task.lease_token, output=json.dumps(output).encode())
    )
    return task


async def awaiting_review(api: Api, name: str = "orders", **review: object) -> str:
    """An execution of ``review_flow`` whose review node is WAITING."""
    await register(api, review_flow(name, **review))
    reply = await api.workflows.StartExecution(
        fpb.StartExecutionRequest(workflow_name=name, input=b'{"order": 7}')
    )
    execution_id: str = reply.execution.id
    await complete(api, {"amount": 4800})
    assert node(await get(api, execution_id), "review").status == WAITING
    return execution_id


async def ended(api: Api, execution_id: str) -> common_pb2.Execution:
    async def probe() -> common_pb2.Execution | None:
        execution = await get(api, execution_id)
        running = execution.status == common_pb2.EXECUTION_STATUS_RUNNING
        return None if running else execution

    return await wait_for(probe, timeout=20)


async def test_a_waiting_approval_holds_no_worker_and_approving_continues(api: Api) -> None:
    execution_id = await awaiting_review(api)
    review = node(await get(api, execution_id), "review")
    assert (review.worker_id, review.attempt, review.task_type) == ("", 0, "")
    assert json.loads(review.input) == {"amount": 4800}
    assert await poll(api) == []  # nothing for workers while it waits

    reply = await api.workflows.ApproveNode(
        fpb.ApproveNodeRequest(execution_id=execution_id, node_id="review", comment="ok by me")
    )
    review = node(reply.execution, "review")
    assert review.status == common_pb2.NODE_STATUS_SUCCEEDED
    decision = json.loads(review.output)
    assert decision.pop("at").endswith("Z")
    assert decision == {"approved": True, "by": ADMIN, "comment": "ok by me"}

    task = await complete(api, "shipped")
    assert task.node_id == "ship"
    assert json.loads(task.input)["approved"] is True
    done = await ended(api, execution_id)
    assert done.status == common_pb2.EXECUTION_STATUS_SUCCEEDED
    events = await events_of(api, execution_id)
    types = [(e.type, e.node_id) for e in events]
    assert types.index(("NODE_WAITING", "review")) < types.index(("NODE_APPROVED", "review"))
    assert types.index(("NODE_APPROVED", "review")) < types.index(("NODE_SUCCEEDED", "review"))
    waiting = next(e for e in events if e.type == "NODE_WAITING")
    assert json.loads(waiting.details) == {
        "required_role": "operator",
        "prompt": "Check the amount",
    }
    approved = next(e for e in events if e.type == "NODE_APPROVED")
    assert json.loads(approved.details)["by"] == ADMIN
    assert json.loads(approved.details)["comment"] == "ok by me"


async def test_rejecting_fails_the_node_with_the_comment_as_reason(api: Api) -> None:
    execution_id = await awaiting_review(api)
    reply = await api.workflows.RejectNode(
        fpb.RejectNodeRequest(execution_id=execution_id, node_id="review", comment="too much")
    )
    review = node(reply.execution, "review")
    assert review.status == common_pb2.NODE_STATUS_FAILED
    assert (review.error.type, review.error.message) == ("ApprovalRejected", "too much")
    decision = json.loads(review.error.details)
    assert (decision["approved"], decision["by"], decision["comment"]) == (
        False,
        ADMIN,
        "too much",
    )
    assert node(reply.execution, "ship").status == common_pb2.NODE_STATUS_SKIPPED
    done = await ended(api, execution_id)
    assert done.status == common_pb2.EXECUTION_STATUS_FAILED
    assert done.error.message == "node 'review' was rejected by bootstrap-admin: too much"
    assert await poll(api) == []
    rejected = [e for e in await events_of(api, execution_id) if e.type == "NODE_REJECTED"]
    assert [json.loads(e.details)["comment"] for e in rejected] == ["too much"]
    # Nothing to redrive: people decided.
    letters = await api.workflows.ListDeadLetters(fpb.ListDeadLettersRequest())
    assert list(letters.dead_letters) == []


async def test_only_the_required_role_or_admin_may_decide(api: Api) -> None:
    execution_id = await awaiting_review(api)
    approvals = api.running.coordinator.approvals
    with pytest.raises(PermissionDenied) as info:
        await approvals.approve(
            TENANT, execution_id, "review", by="eve", roles=frozenset({"viewer"}), comment=""
        )
    assert "needs the role 'operator' (or 'admin'); eve has roles: 'viewer'" in str(info.value)
    with pytest.raises(PermissionDenied, match="eve has roles: none"):
        await approvals.reject(
            TENANT, execution_id, "review", by="eve", roles=frozenset(), comment="no"
        )
    assert node(await get(api, execution_id), "review").status == WAITING  # unchanged

    view = await approvals.approve(
        TENANT, execution_id, "review", by="olga", roles=frozenset({"operator"}), comment=""
    )
    review = next(n for n in view.nodes if n.node_id == "review")
    assert review.output is not None and json.loads(review.output)["by"] == "olga"


async def test_admin_decides_any_approval(api: Api) -> None:
    execution_id = await awaiting_review(api)
    view = await api.running.coordinator.approvals.reject(
        TENANT, execution_id, "review", by="root", roles=frozenset({"admin"}), comment="stop"
    )
    review = next(n for n in view.nodes if n.node_id == "review")
    assert review.error is not None and review.error.message == "stop"


async def test_the_callers_own_roles_decide_over_grpc(api: Api) -> None:
    identity = igrpc.IdentityServiceStub(api.channel)
    opened: list[grpc.aio.Channel] = []

    async def as_key(name: str, *roles: str) -> fgrpc.WorkflowServiceStub:
        reply = await identity.CreateApiKey(
            ipb.CreateApiKeyRequest(tenant=TENANT, name=name, roles=roles)
        )
        opened.append(channel_to(api.address, reply.key))
        return fgrpc.WorkflowServiceStub(opened[-1])

    try:
        orders = await awaiting_review(api)  # needs the role operator
        refunds = await awaiting_review(api, "refunds", required_role="finance")
        olga = await as_key("olga", "operator")
        dev = await as_key("dev", "developer")
        denied = grpc.StatusCode.PERMISSION_DENIED

        # No executions.approve at all: refused before the use case.
        await expect_status(
            dev.ApproveNode(fpb.ApproveNodeRequest(execution_id=orders, node_id="review")), denied
        )
        # Allowed to approve, but not holding the node's role.
        await expect_status(
            olga.RejectNode(fpb.RejectNodeRequest(execution_id=refunds, node_id="review")),
            denied,
            "it needs the role 'finance' (or 'admin'); olga has roles: 'operator'",
        )
        assert node(await get(api, refunds), "review").status == WAITING

        reply = await olga.ApproveNode(
            fpb.ApproveNodeRequest(execution_id=orders, node_id="review", comment="fine")
        )
        decision = json.loads(node(reply.execution, "review").output)
        assert (decision["by"], decision["comment"]) == ("olga", "fine")
    finally:
        for channel in opened:
            await channel.close()


async def test_deciding_anything_but_a_waiting_approval_node_is_refused(api: Api) -> None:
    execution_id = await awaiting_review(api)
    approve = api.workflows.ApproveNode
    reject = api.workflows.RejectNode
    precondition = grpc.StatusCode.FAILED_PRECONDITION
    await expect_status(
        approve(fpb.ApproveNodeRequest(execution_id=execution_id, node_id="prepare")),
        precondition,
        "cannot approve node 'prepare': it is a task node, not an approval node",
    )
    await expect_status(
        reject(fpb.RejectNodeRequest(execution_id=execution_id, node_id="ship")),
        precondition,
        "not an approval node",
    )
    await expect_status(
        approve(fpb.ApproveNodeRequest(execution_id=execution_id, node_id="nope")),
        grpc.StatusCode.NOT_FOUND,
        "has no node 'nope'",
    )
    await expect_status(
        approve(fpb.ApproveNodeRequest(execution_id="no-such-execution", node_id="review")),
        grpc.StatusCode.NOT_FOUND,
        "no-such-execution",
    )
    await approve(fpb.ApproveNodeRequest(execution_id=execution_id, node_id="review"))
    await expect_status(
        reject(fpb.RejectNodeRequest(execution_id=execution_id, node_id="review")),
        precondition,
        "node is SUCCEEDED, not WAITING; it was approved already",
    )
    await expect_status(
        approve(
            fpb.ApproveNodeRequest(execution_id=execution_id, node_id="ship", comment="x" * 5000)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ApproveNodeRequest.comment: 5000 characters, at most 4096",
    )


async def test_an_undecided_approval_times_out(api: Api) -> None:
    execution_id = await awaiting_review(
        api, approval_timeout=duration_pb2.Duration(nanos=200_000_000)
    )
    done = await ended(api, execution_id)  # the sweeper (every 100 ms) times it out
    assert done.status == common_pb2.EXECUTION_STATUS_FAILED
    review = node(done, "review")
    assert review.status == common_pb2.NODE_STATUS_TIMED_OUT
    assert review.error.type == "ApprovalTimeout"
    assert "no decision within 0.2s" in review.error.message
    assert node(done, "ship").status == common_pb2.NODE_STATUS_SKIPPED
    await expect_status(
        api.workflows.ApproveNode(
            fpb.ApproveNodeRequest(execution_id=execution_id, node_id="review")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "is FAILED",
    )


async def test_registration_refuses_a_bad_approval_node(api: Api) -> None:
    missing = common_pb2.WorkflowDefinition(name="bad")
    missing.nodes.add(id="review", kind="approval")
    await expect_status(
        register(api, missing),
        grpc.StatusCode.INVALID_ARGUMENT,
        "node 'review' is an approval node with no required_role",
    )
    worker_setting = common_pb2.WorkflowDefinition(name="bad")
    worker_setting.nodes.add(id="review", kind="approval", required_role="ops", task_type="t")
    await expect_status(
        register(api, worker_setting),
        grpc.StatusCode.INVALID_ARGUMENT,
        "is an approval node and sets task_type",
    )
    stored = await register(api, review_flow(approval_timeout=duration_pb2.Duration(seconds=90)))
    review = stored.definition.nodes[1]
    assert (review.kind, review.required_role, review.prompt) == (
        "approval",
        "operator",
        "Check the amount",
    )
    assert review.approval_timeout.seconds == 90
