"""Identity through the real gRPC surface, on every store: credentials on every RPC, the
cross-tenant matrix (every RPC with tenant B's credential on tenant A's objects), roles and
narrowed grants, signed lease tokens bound to their holder, worker-id ownership, the audit
trail. docs/security.md."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from coordinator.grpc.auth import RULES
from coordinator.service import Store
from tests.support.grpc_api import Api, channel_to, definition, expect_status, serve_api
from trellis.v1 import common_pb2
from trellis.v1 import dispatch_service_pb2 as dpb
from trellis.v1 import dispatch_service_pb2_grpc as dgrpc
from trellis.v1 import identity_service_pb2 as ipb
from trellis.v1 import identity_service_pb2_grpc as igrpc
from trellis.v1 import notification_service_pb2 as npb
from trellis.v1 import notification_service_pb2_grpc as ngrpc
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import worker_service_pb2_grpc as wgrpc
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc

NO_WAIT = duration_pb2.Duration()
OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# Every RPC the coordinator serves, from the protos; each has a rule (what it needs).
SERVED = [
    f"/{service.full_name}/{method.name}"
    for module in (fpb, wpb, tpb, npb, dpb, ipb)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


def test_every_rpc_has_an_access_rule() -> None:
    assert [m for m in SERVED if m not in RULES] == []


@dataclass
class Stubs:
    channel: grpc.aio.Channel
    workflows: fgrpc.WorkflowServiceStub
    workers: wgrpc.WorkerServiceStub
    triggers: tgrpc.TriggerServiceStub
    notifications: ngrpc.NotificationServiceStub
    dispatch: dgrpc.DispatchServiceStub
    identity: igrpc.IdentityServiceStub

    @classmethod
    def over(cls, channel: grpc.aio.Channel) -> Stubs:
        return cls(
            channel,
            fgrpc.WorkflowServiceStub(channel),
            wgrpc.WorkerServiceStub(channel),
            tgrpc.TriggerServiceStub(channel),
            ngrpc.NotificationServiceStub(channel),
            dgrpc.DispatchServiceStub(channel),
            igrpc.IdentityServiceStub(channel),
        )


@dataclass
class World:
    api: Api
    admin: Stubs  # the bootstrap admin (system tenant)
    opened: list[grpc.aio.Channel]

    def as_key(self, key: str | None) -> Stubs:
        channel = channel_to(self.api.address, key)
        self.opened.append(channel)
        return Stubs.over(channel)

    async def key(self, tenant: str, *roles: str, name: str = "") -> str:
        reply = await self.admin.identity.CreateApiKey(
            ipb.CreateApiKeyRequest(tenant=tenant, name=name or "-".join(roles), roles=roles)
        )
        return reply.key


@pytest.fixture
async def world(store: Store) -> AsyncIterator[World]:
    async with serve_api(store) as api:
        opened: list[grpc.aio.Channel] = []
        w = World(api, Stubs.over(api.channel), opened)
        for tenant in ("acme", "umbrella"):
            await w.admin.identity.CreateTenant(ipb.CreateTenantRequest(id=tenant))
        try:
            yield w
        finally:
            for channel in opened:
                await channel.close()


async def status_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


# -- authentication ---------------------------------------------------------------------------


async def test_every_rpc_refuses_a_caller_without_credentials(world: World) -> None:
    anonymous = world.as_key(None)
    forged = world.as_key("tk_0123456789abcdef.not-the-secret")
    for stubs in (anonymous, forged):
        calls = _every_rpc(stubs, _Names())
        assert set(calls) == {m.rsplit("/", 1)[1] for m in SERVED}, "an RPC lacks a call here"
        for name, call in calls.items():
            code = await status_of(call())
            assert code == UNAUTHENTICATED, f"{name}: {code}"
    # Nothing was created by the refused calls.
    listed = await world.admin.workflows.ListWorkflows(fpb.ListWorkflowsRequest())
    assert list(listed.workflows) == []


async def test_refusals_say_nothing_that_helps_an_attacker(world: World) -> None:
    key = await world.key("acme", "viewer")
    key_id = key.split(".")[0]
    details = set()
    for bad in (None, "nonsense", f"{key_id}.wrong-secret", "tk_ffffffffffffffff.x", key + "x"):
        stubs = world.as_key(bad)
        details.add(
            await expect_status(stubs.identity.WhoAmI(ipb.WhoAmIRequest()), UNAUTHENTICATED)
        )
    assert details == {"missing or invalid credentials"}


async def test_a_revoked_or_expired_key_is_refused(world: World) -> None:
    key = await world.key("acme", "viewer")
    stubs = world.as_key(key)
    me = await stubs.identity.WhoAmI(ipb.WhoAmIRequest())
    assert (me.tenant, list(me.roles)) == ("acme", ["viewer"])
    await world.admin.identity.RevokeCredential(
        ipb.RevokeCredentialRequest(tenant="acme", id=me.credential)
    )
    await expect_status(stubs.identity.WhoAmI(ipb.WhoAmIRequest()), UNAUTHENTICATED)
    request = ipb.CreateApiKeyRequest(tenant="acme", name="brief", roles=["viewer"])
    request.expires_in.FromSeconds(1)
    brief = (await world.admin.identity.CreateApiKey(request)).key
    listed = await world.admin.identity.ListCredentials(ipb.ListCredentialsRequest(tenant="acme"))
    assert {c.name for c in listed.credentials} >= {"viewer", "brief"}
    assert all(not c.HasField("last_used_at") or c.name != "brief" for c in listed.credentials)
    await asyncio.sleep(1.2)
    await expect_status(world.as_key(brief).identity.WhoAmI(ipb.WhoAmIRequest()), UNAUTHENTICATED)


async def test_keys_are_stored_only_as_keyed_hashes(world: World, store: Store) -> None:
    key = await world.key("acme", "admin")
    key_id, secret = key.removeprefix("tk_").split(".")
    stored = await store.identity.get_credential(key_id)
    assert secret not in repr(stored) and stored.secret_hash and stored.secret_hash != secret


# -- roles ------------------------------------------------------------------------------------


async def test_roles_limit_what_a_key_may_do(world: World) -> None:
    admin = world.as_key(await world.key("acme", "admin"))
    await admin.workflows.RegisterWorkflow(
        fpb.RegisterWorkflowRequest(definition=definition("orders", ["a"], []))
    )
    viewer = world.as_key(await world.key("acme", "viewer"))
    await viewer.workflows.ListWorkflows(fpb.ListWorkflowsRequest())
    await expect_status(
        viewer.workflows.StartExecution(fpb.StartExecutionRequest(workflow_name="orders")),
        DENIED,
        "executions.start",
    )
    worker = world.as_key(await world.key("acme", "worker"))
    await expect_status(
        worker.workflows.ListWorkflows(fpb.ListWorkflowsRequest()), DENIED, "workflows.read"
    )
    await expect_status(
        viewer.identity.CreateApiKey(ipb.CreateApiKeyRequest(name="x", roles=["admin"])),
        DENIED,
        "keys.write",
    )
    # A tenant's admin cannot make tenants or act on another tenant.
    await expect_status(admin.identity.CreateTenant(ipb.CreateTenantRequest(id="x")), DENIED)
    await expect_status(
        admin.identity.ListCredentials(ipb.ListCredentialsRequest(tenant="umbrella")), DENIED
    )


async def test_custom_roles_narrow_permissions_to_workflows_and_task_types(world: World) -> None:
    admin = world.as_key(await world.key("acme", "admin"))
    for name in ("orders-eu", "payroll"):
        await admin.workflows.RegisterWorkflow(
            fpb.RegisterWorkflowRequest(definition=definition(name, ["a"], [], task_type=name))
        )
    await admin.identity.PutRole(
        ipb.PutRoleRequest(
            name="orders-operator",
            permissions=["executions.start:orders-*", "executions.read:orders-*"],
        )
    )
    await admin.identity.PutRole(
        ipb.PutRoleRequest(name="orders-worker", permissions=["tasks.lease:orders-*"])
    )
    await expect_status(
        admin.identity.PutRole(ipb.PutRoleRequest(name="bad", permissions=["nope"])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown permission 'nope'",
    )
    key = (
        await admin.identity.CreateApiKey(
            ipb.CreateApiKeyRequest(name="ops", roles=["orders-operator"])
        )
    ).key
    ops = world.as_key(key)
    started = await ops.workflows.StartExecution(
        fpb.StartExecutionRequest(workflow_name="orders-eu")
    )
    await ops.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=started.execution.id))
    await expect_status(
        ops.workflows.StartExecution(fpb.StartExecutionRequest(workflow_name="payroll")),
        DENIED,
        "'payroll'",
    )
    other = await admin.workflows.StartExecution(fpb.StartExecutionRequest(workflow_name="payroll"))
    await expect_status(
        ops.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=other.execution.id)),
        DENIED,
    )
    await expect_status(ops.workflows.ListExecutions(fpb.ListExecutionsRequest()), DENIED)
    # A narrowed grant lists the workflows it covers, named in the filter or the older field.
    mine = await ops.workflows.ListExecutions(
        fpb.ListExecutionsRequest(filter=common_pb2.ExecutionFilter(workflow_name="orders-eu"))
    )
    assert [e.id for e in mine.executions] == [started.execution.id]
    await expect_status(
        ops.workflows.ListExecutions(
            fpb.ListExecutionsRequest(filter=common_pb2.ExecutionFilter(workflow_name="payroll"))
        ),
        DENIED,
        "'payroll'",
    )
    await expect_status(
        ops.workflows.ListExecutions(
            fpb.ListExecutionsRequest(
                workflow_name="orders-eu",
                filter=common_pb2.ExecutionFilter(workflow_name="payroll"),
            )
        ),
        DENIED,
        "'payroll'",
    )
    worker_key = (
        await admin.identity.CreateApiKey(
            ipb.CreateApiKeyRequest(name="w", roles=["orders-worker"])
        )
    ).key
    worker = world.as_key(worker_key)
    await expect_status(
        worker.workers.PollTasks(wpb.PollTasksRequest(worker_id="w", task_types=["payroll"])),
        DENIED,
        "tasks.lease",
    )
    reply = await worker.workers.PollTasks(
        wpb.PollTasksRequest(worker_id="w", task_types=["orders-eu"], max_tasks=5)
    )
    assert [t.execution_id for t in reply.tasks] == [started.execution.id]


# -- leases and workers -----------------------------------------------------------------------


async def _leased_task(world: World, stubs: Stubs, worker_id: str) -> wpb.Task:
    await stubs.workers.RegisterWorker(
        wpb.RegisterWorkerRequest(worker_id=worker_id, task_types=["t"], capacity=1)
    )
    reply = await stubs.workers.PollTasks(
        wpb.PollTasksRequest(worker_id=worker_id, task_types=["t"], max_tasks=1)
    )
    assert len(reply.tasks) == 1
    return reply.tasks[0]


async def test_leases_are_signed_and_bound_to_the_worker_that_took_them(world: World) -> None:
    admin = world.as_key(await world.key("acme", "admin"))
    await admin.workflows.RegisterWorkflow(
        fpb.RegisterWorkflowRequest(definition=definition("wf", ["a"], []))
    )
    started = await admin.workflows.StartExecution(fpb.StartExecutionRequest(workflow_name="wf"))
    mine = world.as_key(await world.key("acme", "worker", name="mine"))
    thief = world.as_key(await world.key("acme", "worker", name="thief"))
    task = await _leased_task(world, mine, "w-mine")
    token = task.lease_token
    # A token rebuilt from its public fields with another fencing number does not verify.
    body, kid, mac = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    fields[3] += 1
    forged_body = base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")
    forged = f"{forged_body}.{kid}.{mac}"
    for call in (
        mine.workers.CompleteTask(
            wpb.CompleteTaskRequest(lease_token=forged, output=b'"fake"', worker_id="w-mine")
        ),
        thief.workers.CompleteTask(
            wpb.CompleteTaskRequest(lease_token=token, output=b'"fake"', worker_id="w-thief")
        ),
        thief.workers.FailTask(wpb.FailTaskRequest(lease_token=token, worker_id="w-mine")),
        thief.workers.Heartbeat(
            wpb.HeartbeatRequest(worker_id="w-mine", leases=[wpb.LeaseHeartbeat(lease_token=token)])
        ),
        # Someone else's heartbeat naming my worker id, without tokens: would fail my leases.
        thief.workers.Heartbeat(wpb.HeartbeatRequest(worker_id="w-mine")),
        # Taking over my worker id, or polling under it (its leases would name me).
        thief.workers.RegisterWorker(
            wpb.RegisterWorkerRequest(worker_id="w-mine", task_types=["t"], capacity=1)
        ),
        thief.workers.PollTasks(
            wpb.PollTasksRequest(worker_id="w-mine", task_types=["t"], max_tasks=1)
        ),
    ):
        details = await expect_status(call, DENIED)
        assert "mine" not in details.replace("w-mine", "")  # no identity revealed
    # Nothing changed: the task is still leased to me, and I complete it.
    view = await admin.workflows.GetExecution(
        fpb.GetExecutionRequest(execution_id=started.execution.id)
    )
    assert [n.status for n in view.execution.nodes] == [common_pb2.NODE_STATUS_LEASED]
    done = await mine.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=token, output=b'"real"', worker_id="w-mine")
    )
    assert not done.duplicate
    view = await admin.workflows.GetExecution(
        fpb.GetExecutionRequest(execution_id=started.execution.id)
    )
    assert view.execution.output == b'"real"'


# -- tenants ----------------------------------------------------------------------------------


@dataclass
class _Names:
    """Tenant A's objects, named in tenant B's calls."""

    workflow: str = "nothing"
    execution: str = "nothing"
    node: str = "a"
    dead_letter: str = "nothing"
    token: str = "bm90aGluZw.k.0"
    webhook: str = "nothing"
    schedule: str = "nothing"
    event_trigger: str = "nothing"
    channel: str = "nothing"
    rule: str = "nothing"
    task_type: str = "t"
    credential: str = "nothing"
    role: str = "nothing"


def _every_rpc(s: Stubs, n: _Names) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of every RPC, naming ``n``'s objects."""
    f, w, t, no, d, i = s.workflows, s.workers, s.triggers, s.notifications, s.dispatch, s.identity
    ex = n.execution

    async def watch() -> None:
        async for _ in f.WatchExecution(fpb.WatchExecutionRequest(execution_id=ex)):
            pass

    return {
        "RegisterWorker": lambda: w.RegisterWorker(
            wpb.RegisterWorkerRequest(worker_id="w-b", task_types=[n.task_type], capacity=1)
        ),
        "PollTasks": lambda: w.PollTasks(
            wpb.PollTasksRequest(
                worker_id="w-b", task_types=[n.task_type], max_tasks=10, wait=NO_WAIT
            )
        ),
        "Heartbeat": lambda: w.Heartbeat(
            wpb.HeartbeatRequest(worker_id="w-b", leases=[wpb.LeaseHeartbeat(lease_token=n.token)])
        ),
        "CompleteTask": lambda: w.CompleteTask(
            wpb.CompleteTaskRequest(lease_token=n.token, output=b"1", worker_id="w-b")
        ),
        "FailTask": lambda: w.FailTask(wpb.FailTaskRequest(lease_token=n.token, worker_id="w-b")),
        "ReportResults": lambda: _report(w, n.token),
        "RegisterWorkflow": lambda: f.RegisterWorkflow(
            fpb.RegisterWorkflowRequest(definition=definition(n.workflow, ["z"], []))
        ),
        "GetWorkflow": lambda: f.GetWorkflow(fpb.GetWorkflowRequest(name=n.workflow)),
        "ListWorkflows": lambda: f.ListWorkflows(fpb.ListWorkflowsRequest()),
        "ListWorkflowVersions": lambda: f.ListWorkflowVersions(
            fpb.ListWorkflowVersionsRequest(name=n.workflow)
        ),
        "StartExecution": lambda: f.StartExecution(
            fpb.StartExecutionRequest(workflow_name=n.workflow)
        ),
        "BatchStartExecutions": lambda: f.BatchStartExecutions(
            fpb.BatchStartExecutionsRequest(
                requests=[fpb.StartExecutionRequest(workflow_name=n.workflow)]
            )
        ),
        "GetExecution": lambda: f.GetExecution(fpb.GetExecutionRequest(execution_id=ex)),
        "ListExecutions": lambda: f.ListExecutions(fpb.ListExecutionsRequest()),
        "WatchExecution": watch,
        "CancelExecution": lambda: f.CancelExecution(fpb.CancelExecutionRequest(execution_id=ex)),
        "CancelNode": lambda: f.CancelNode(fpb.CancelNodeRequest(execution_id=ex, node_id=n.node)),
        "PauseExecution": lambda: f.PauseExecution(fpb.PauseExecutionRequest(execution_id=ex)),
        "ResumeExecution": lambda: f.ResumeExecution(fpb.ResumeExecutionRequest(execution_id=ex)),
        "PauseNode": lambda: f.PauseNode(fpb.PauseNodeRequest(execution_id=ex, node_id=n.node)),
        "ResumeNode": lambda: f.ResumeNode(fpb.ResumeNodeRequest(execution_id=ex, node_id=n.node)),
        **_approvals(f, ex, n.node),
        "ListDeadLetters": lambda: f.ListDeadLetters(fpb.ListDeadLettersRequest()),
        "GetDeadLetter": lambda: f.GetDeadLetter(fpb.GetDeadLetterRequest(id=n.dead_letter)),
        "RedriveDeadLetter": lambda: f.RedriveDeadLetter(
            fpb.RedriveDeadLetterRequest(id=n.dead_letter)
        ),
        "CreateWebhookTrigger": lambda: t.CreateWebhookTrigger(
            tpb.CreateWebhookTriggerRequest(
                path=n.webhook, workflow_name=n.workflow, hmac_secret="s" * 32
            )
        ),
        "ListWebhookTriggers": lambda: t.ListWebhookTriggers(tpb.ListWebhookTriggersRequest()),
        "DeleteWebhookTrigger": lambda: t.DeleteWebhookTrigger(
            tpb.DeleteWebhookTriggerRequest(path=n.webhook)
        ),
        "FireWebhook": lambda: t.FireWebhook(tpb.FireWebhookRequest(path=n.webhook, body=b"{}")),
        "CreateSchedule": lambda: t.CreateSchedule(
            tpb.CreateScheduleRequest(id=n.schedule, cron="0 0 1 1 *", workflow_name=n.workflow)
        ),
        "GetSchedule": lambda: t.GetSchedule(tpb.GetScheduleRequest(id=n.schedule)),
        "ListSchedules": lambda: t.ListSchedules(tpb.ListSchedulesRequest()),
        "PauseSchedule": lambda: t.PauseSchedule(tpb.PauseScheduleRequest(id=n.schedule)),
        "ResumeSchedule": lambda: t.ResumeSchedule(tpb.ResumeScheduleRequest(id=n.schedule)),
        "DeleteSchedule": lambda: t.DeleteSchedule(tpb.DeleteScheduleRequest(id=n.schedule)),
        "CreateEventTrigger": lambda: t.CreateEventTrigger(
            tpb.CreateEventTriggerRequest(event_name="paid", workflow_name=n.workflow)
        ),
        "ListEventTriggers": lambda: t.ListEventTriggers(tpb.ListEventTriggersRequest()),
        "DeleteEventTrigger": lambda: t.DeleteEventTrigger(
            tpb.DeleteEventTriggerRequest(id=n.event_trigger)
        ),
        "PublishEvent": lambda: t.PublishEvent(tpb.PublishEventRequest(name="paid", payload=b"{}")),
        "CreateChannel": lambda: no.CreateChannel(
            npb.CreateChannelRequest(
                channel=npb.Channel(
                    name=n.channel,
                    webhook=npb.WebhookChannel(url="https://example.invalid/x", secret="s" * 32),
                )
            )
        ),
        "GetChannel": lambda: no.GetChannel(npb.GetChannelRequest(channel=n.channel)),
        "ListChannels": lambda: no.ListChannels(npb.ListChannelsRequest()),
        "DeleteChannel": lambda: no.DeleteChannel(npb.DeleteChannelRequest(channel=n.channel)),
        "CreateNotificationRule": lambda: no.CreateNotificationRule(
            npb.CreateNotificationRuleRequest(channel=n.channel, workflow_name=n.workflow)
        ),
        "ListNotificationRules": lambda: no.ListNotificationRules(
            npb.ListNotificationRulesRequest()
        ),
        "DeleteNotificationRule": lambda: no.DeleteNotificationRule(
            npb.DeleteNotificationRuleRequest(id=n.rule)
        ),
        "ListDeliveries": lambda: no.ListDeliveries(npb.ListDeliveriesRequest(execution_id=ex)),
        "SetTaskTypeLimits": lambda: d.SetTaskTypeLimits(
            dpb.SetTaskTypeLimitsRequest(
                limits=dpb.TaskTypeLimits(task_type=n.task_type, max_concurrency=1)
            )
        ),
        "GetTaskTypeLimits": lambda: d.GetTaskTypeLimits(
            dpb.GetTaskTypeLimitsRequest(task_type=n.task_type)
        ),
        "ListTaskTypeLimits": lambda: d.ListTaskTypeLimits(dpb.ListTaskTypeLimitsRequest()),
        "DeleteTaskTypeLimits": lambda: d.DeleteTaskTypeLimits(
            dpb.DeleteTaskTypeLimitsRequest(task_type=n.task_type)
        ),
        "ListBreakers": lambda: d.ListBreakers(dpb.ListBreakersRequest()),
        "ResetBreaker": lambda: d.ResetBreaker(dpb.ResetBreakerRequest(task_type=n.task_type)),
        "GetDispatchStatus": lambda: d.GetDispatchStatus(dpb.GetDispatchStatusRequest()),
        "WhoAmI": lambda: i.WhoAmI(ipb.WhoAmIRequest()),
        "CreateTenant": lambda: i.CreateTenant(ipb.CreateTenantRequest(id="new-tenant")),
        "ListTenants": lambda: i.ListTenants(ipb.ListTenantsRequest()),
        "CreateApiKey": lambda: i.CreateApiKey(
            ipb.CreateApiKeyRequest(tenant="acme", name="x", roles=["admin"])
        ),
        "AddCertificateIdentity": lambda: i.AddCertificateIdentity(
            ipb.AddCertificateIdentityRequest(tenant="acme", subject="cn-x", roles=["admin"])
        ),
        "ListCredentials": lambda: i.ListCredentials(ipb.ListCredentialsRequest(tenant="acme")),
        "RevokeCredential": lambda: i.RevokeCredential(
            ipb.RevokeCredentialRequest(id=n.credential)
        ),
        "PutRole": lambda: i.PutRole(
            ipb.PutRoleRequest(tenant="acme", name=n.role, permissions=["workflows.read"])
        ),
        "ListRoles": lambda: i.ListRoles(ipb.ListRolesRequest()),
        "DeleteRole": lambda: i.DeleteRole(ipb.DeleteRoleRequest(name=n.role)),
        "ListAuditRecords": lambda: i.ListAuditRecords(ipb.ListAuditRecordsRequest()),
        "VerifyAudit": lambda: i.VerifyAudit(ipb.VerifyAuditRequest()),
    }


def _approvals(
    f: fgrpc.WorkflowServiceStub, execution_id: str, node_id: str
) -> dict[str, Callable[[], Awaitable[Any]]]:
    """ApproveNode / RejectNode, when the service has them."""
    out: dict[str, Callable[[], Awaitable[Any]]] = {}
    if hasattr(fpb, "ApproveNodeRequest"):
        out["ApproveNode"] = lambda: f.ApproveNode(
            fpb.ApproveNodeRequest(execution_id=execution_id, node_id=node_id)
        )
        out["RejectNode"] = lambda: f.RejectNode(
            fpb.RejectNodeRequest(execution_id=execution_id, node_id=node_id)
        )
    return out


async def _report(w: wgrpc.WorkerServiceStub, token: str) -> None:
    reply = await w.ReportResults(
        wpb.ReportResultsRequest(
            worker_id="w-b",
            results=[
                wpb.TaskResult(completed=wpb.CompleteTaskRequest(lease_token=token, output=b"1"))
            ],
        )
    )
    for outcome in reply.results:
        if outcome.code:
            raise _OutcomeError(outcome.code)


class _OutcomeError(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


# What tenant B gets for each RPC on tenant A's objects. Names are per tenant, so a call
# that creates something (a workflow, a trigger of the same name) creates B's own, and a
# later call on that name acts on B's; what matters is that nothing of A's is returned or
# changed. Calls on A's ids (executions, dead letters, leases, rules) are refused.
_EITHER = {OK, NOT_FOUND}
_EXPECTED: dict[str, set[grpc.StatusCode]] = {
    "Heartbeat": {DENIED},
    "CompleteTask": {DENIED},
    "FailTask": {DENIED},
    "ReportResults": {DENIED},
    "GetWorkflow": _EITHER,
    "ListWorkflowVersions": _EITHER,
    "StartExecution": _EITHER,
    "BatchStartExecutions": _EITHER,
    "GetExecution": {NOT_FOUND},
    "WatchExecution": {NOT_FOUND},
    "CancelExecution": {NOT_FOUND},
    "CancelNode": {NOT_FOUND},
    "PauseExecution": {NOT_FOUND},
    "ResumeExecution": {NOT_FOUND},
    "PauseNode": {NOT_FOUND},
    "ResumeNode": {NOT_FOUND},
    "ApproveNode": {NOT_FOUND},
    "RejectNode": {NOT_FOUND},
    "GetDeadLetter": {NOT_FOUND},
    "RedriveDeadLetter": {NOT_FOUND},
    "CreateWebhookTrigger": _EITHER,
    "DeleteWebhookTrigger": _EITHER,
    "FireWebhook": {NOT_FOUND, UNAUTHENTICATED},
    "CreateSchedule": _EITHER,
    "GetSchedule": _EITHER,
    "PauseSchedule": _EITHER,
    "ResumeSchedule": _EITHER,
    "DeleteSchedule": _EITHER,
    "CreateEventTrigger": _EITHER,
    "DeleteEventTrigger": {NOT_FOUND},
    "GetChannel": _EITHER,
    "DeleteChannel": _EITHER,
    "CreateNotificationRule": _EITHER,
    "DeleteNotificationRule": {NOT_FOUND},
    "ListDeliveries": _EITHER,
    "GetTaskTypeLimits": _EITHER,
    "DeleteTaskTypeLimits": _EITHER,
    "ResetBreaker": _EITHER,
    "CreateTenant": {DENIED},
    "ListTenants": {DENIED},
    "CreateApiKey": {DENIED},
    "AddCertificateIdentity": {DENIED},
    "ListCredentials": {DENIED},
    "RevokeCredential": {NOT_FOUND},
    "PutRole": {DENIED},
    "DeleteRole": _EITHER,
}


async def _tenant_a(world: World) -> tuple[Stubs, _Names]:
    """Tenant A (acme) with one of everything, and the names of it."""
    a = world.as_key(await world.key("acme", "admin"))
    wf = "acme-orders"
    defn = definition(wf, ["a", "b"], [("a", "b")], task_type="t")
    defn.nodes[0].retry_policy.max_attempts = 1
    await a.workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=defn))
    await a.workflows.StartExecution(
        fpb.StartExecutionRequest(workflow_name=wf, input=b'{"secret": "acme-data"}')
    )
    task = (
        await a.workers.PollTasks(wpb.PollTasksRequest(worker_id="w-a", task_types=["t"]))
    ).tasks[0]
    await a.workers.FailTask(
        wpb.FailTaskRequest(
            lease_token=task.lease_token,
            worker_id="w-a",
            error=wpb.TaskError(type="Boom", message="acme-data", non_retryable=True),
        )
    )
    letters = await a.workflows.ListDeadLetters(fpb.ListDeadLettersRequest())
    running = await a.workflows.StartExecution(
        fpb.StartExecutionRequest(workflow_name=wf, input=b'{"secret": "acme-data"}')
    )
    leased = (
        await a.workers.PollTasks(wpb.PollTasksRequest(worker_id="w-a", task_types=["t"]))
    ).tasks[0]
    await a.workflows.StartExecution(fpb.StartExecutionRequest(workflow_name=wf))  # stays READY
    await a.triggers.CreateWebhookTrigger(
        tpb.CreateWebhookTriggerRequest(path="acme-hook", workflow_name=wf, hmac_secret="s" * 32)
    )
    await a.triggers.CreateSchedule(
        tpb.CreateScheduleRequest(id="acme-nightly", cron="0 0 1 1 *", workflow_name=wf)
    )
    event = await a.triggers.CreateEventTrigger(
        tpb.CreateEventTriggerRequest(event_name="paid", workflow_name=wf)
    )
    await a.notifications.CreateChannel(
        npb.CreateChannelRequest(
            channel=npb.Channel(
                name="acme-ops",
                webhook=npb.WebhookChannel(url="https://example.invalid/acme", secret="s" * 32),
            )
        )
    )
    rule = await a.notifications.CreateNotificationRule(
        npb.CreateNotificationRuleRequest(channel="acme-ops", workflow_name=wf)
    )
    await a.dispatch.SetTaskTypeLimits(
        dpb.SetTaskTypeLimitsRequest(
            limits=dpb.TaskTypeLimits(task_type="t", breaker_failure_threshold=5)
        )
    )
    await a.identity.PutRole(ipb.PutRoleRequest(name="acme-role", permissions=["audit.read"]))
    me = await a.identity.WhoAmI(ipb.WhoAmIRequest())
    return a, _Names(
        workflow=wf,
        execution=running.execution.id,
        node="a",
        dead_letter=letters.dead_letters[0].id,
        token=leased.lease_token,
        webhook="acme-hook",
        schedule="acme-nightly",
        event_trigger=event.trigger.id,
        channel="acme-ops",
        rule=rule.rule.id,
        task_type="t",
        credential=me.credential,
        role="acme-role",
    )


async def test_tenant_b_never_sees_or_touches_tenant_a(world: World, store: Store) -> None:
    a, names = await _tenant_a(world)
    b = world.as_key(await world.key("umbrella", "admin"))
    before = await a.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=names.execution))
    for name, call in _every_rpc(b, names).items():
        try:
            reply = await call()
            code = OK
        except grpc.aio.AioRpcError as exc:
            code, reply = exc.code(), None
            assert "acme-data" not in (exc.details() or ""), name
        except _OutcomeError as exc:
            code, reply = _status_by_value(exc.code), None
        expected = _EXPECTED.get(name, {OK})
        assert code in expected, f"{name}: {code}, expected one of {expected}"
        # B's audit trail names the ids B tried (its own calls), nothing else of A's.
        if reply is not None and name != "ListAuditRecords":
            text = str(reply)
            for secret in (
                "acme-data",
                names.execution,
                names.dead_letter,
                names.rule,
                names.event_trigger,
                names.credential,
            ):
                assert secret not in text, f"{name} returned tenant A's {secret!r}: {text}"
    # B's worker polling the same task type got none of A's READY task (asserted above by
    # the reply check); A's objects are as they were.
    after = await a.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=names.execution))
    assert after.execution.status == before.execution.status
    assert [n.status for n in after.execution.nodes] == [n.status for n in before.execution.nodes]
    polled = await a.workers.PollTasks(
        wpb.PollTasksRequest(worker_id="w-a", task_types=["t"], max_tasks=10)
    )
    assert len(polled.tasks) == 1  # A's READY task is still there for A
    schedules = await a.triggers.ListSchedules(tpb.ListSchedulesRequest())
    assert [(x.id, x.paused) for x in schedules.schedules] == [("acme-nightly", False)]
    hooks = await a.triggers.ListWebhookTriggers(tpb.ListWebhookTriggersRequest())
    assert [x.path for x in hooks.triggers] == ["acme-hook"]
    rules = await a.notifications.ListNotificationRules(npb.ListNotificationRulesRequest())
    assert [x.id for x in rules.rules] == [names.rule]
    letters = await a.workflows.ListDeadLetters(fpb.ListDeadLettersRequest())
    assert [x.id for x in letters.dead_letters] == [names.dead_letter]
    limits = await a.dispatch.GetTaskTypeLimits(dpb.GetTaskTypeLimitsRequest(task_type="t"))
    assert limits.limits.breaker_failure_threshold == 5
    roles = await a.identity.ListRoles(ipb.ListRolesRequest())
    assert "acme-role" in [x.name for x in roles.roles]
    await a.identity.WhoAmI(ipb.WhoAmIRequest())  # A's credential was not revoked


def _status_by_value(value: int) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == value)


# -- audit ------------------------------------------------------------------------------------


async def test_mutating_calls_are_audited_with_outcome(world: World) -> None:
    admin = world.as_key(await world.key("acme", "admin", name="alice"))
    viewer = world.as_key(await world.key("acme", "viewer", name="victor"))
    await admin.workflows.RegisterWorkflow(
        fpb.RegisterWorkflowRequest(definition=definition("wf", ["a"], []))
    )
    started = await admin.workflows.StartExecution(fpb.StartExecutionRequest(workflow_name="wf"))
    await admin.workflows.CancelExecution(
        fpb.CancelExecutionRequest(execution_id=started.execution.id)
    )
    await status_of(
        viewer.workflows.CancelExecution(
            fpb.CancelExecutionRequest(execution_id=started.execution.id)
        )
    )
    await status_of(
        admin.workflows.CancelExecution(fpb.CancelExecutionRequest(execution_id="missing"))
    )
    reply = await admin.identity.ListAuditRecords(ipb.ListAuditRecordsRequest())
    rows = [(r.actor, r.action, r.target, r.outcome) for r in reply.records]
    assert rows[-5:] == [
        ("alice", "RegisterWorkflow", "workflow/wf", "ok"),
        ("alice", "StartExecution", "workflow/wf", "ok"),
        ("alice", "CancelExecution", f"execution/{started.execution.id}", "ok"),
        ("victor", "CancelExecution", f"execution/{started.execution.id}", "denied"),
        ("alice", "CancelExecution", "execution/missing", "error: NOT_FOUND"),
    ]
    assert [r.seq for r in reply.records] == list(range(1, len(reply.records) + 1))
    assert all(r.request_id for r in reply.records)
    verified = await admin.identity.VerifyAudit(ipb.VerifyAuditRequest())
    assert verified.ok and verified.seq == len(reply.records)
    # Another tenant's trail is its own.
    other = world.as_key(await world.key("umbrella", "admin"))
    theirs = await other.identity.ListAuditRecords(ipb.ListAuditRecordsRequest())
    assert all(r.actor != "alice" for r in theirs.records)


async def test_identity_admin_refuses_hostile_names_and_changes_nothing(world: World) -> None:
    admin = world.admin.identity
    bad = grpc.StatusCode.INVALID_ARGUMENT
    for tenant in ("", "a" * 64, "../etc", "tenant:x", "t\x00"):
        await expect_status(admin.CreateTenant(ipb.CreateTenantRequest(id=tenant)), bad)
    await expect_status(
        admin.PutRole(ipb.PutRoleRequest(name="r x", permissions=["workflows.read"])),
        bad,
        "role name",
    )
    await expect_status(
        admin.PutRole(ipb.PutRoleRequest(name="many", permissions=["workflows.read"] * 101)),
        bad,
        "at most 100",
    )
    await expect_status(
        admin.CreateApiKey(ipb.CreateApiKeyRequest(name="k" * 257, roles=["viewer"])),
        bad,
        "at most 256",
    )
    await expect_status(
        admin.CreateApiKey(ipb.CreateApiKeyRequest(name="k", roles=["viewer"] * 101)), bad
    )
    tenants = await admin.ListTenants(ipb.ListTenantsRequest())
    assert sorted(t.id for t in tenants.tenants) == ["acme", "default", "umbrella"]
    roles = await admin.ListRoles(ipb.ListRolesRequest())
    assert {r.name for r in roles.roles if not r.builtin} == set()
    keys = await admin.ListCredentials(ipb.ListCredentialsRequest())
    assert list(keys.credentials) == []
