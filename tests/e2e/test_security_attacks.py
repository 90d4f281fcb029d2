"""Attacks on a real `trellis coordinator serve` process, each refused with the status it
must get and changing nothing (checked afterwards with the admin key), on SQLite and
PostgreSQL wherever the attack reaches the store:

- server reflection: off by default; when on, it needs a credential; health stays open;
- anonymous calls that would register, read, cancel or change limits;
- forged lease tokens (an altered body under the old MAC, one built from scratch) sent
  with a real worker's credential, while that worker holds the lease;
- a heartbeat naming another worker's id, which would release that worker's leases;
- taking over another worker's id, and whether the refusal leaks who holds it;
- publishing an event straight to the coordinator without ``events.publish``;
- two tenants made with the CLI: a worker of one never gets the other's tasks.

tests/integration/test_security.py has the in-process matrix (every RPC, every tenant);
tests/e2e/test_security_jwt.py the OIDC bearer tokens; test_audit_tampering.py the trail.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.cli import cli
from tests.support.grpc_api import channel_to, expect_status
from tests.support.procs import ADMIN_KEY, ROOT, Proc, spawn_coordinator, spawn_worker
from tests.support.wait import wait_for
from trellis.v1 import dispatch_service_pb2 as dpb
from trellis.v1 import dispatch_service_pb2_grpc as dgrpc
from trellis.v1 import identity_service_pb2 as ipb
from trellis.v1 import identity_service_pb2_grpc as igrpc
from trellis.v1 import trigger_service_pb2 as tpb
from trellis.v1 import trigger_service_pb2_grpc as tgrpc
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import worker_service_pb2_grpc as wgrpc
from trellis.v1 import workflow_service_pb2 as fpb
from trellis.v1 import workflow_service_pb2_grpc as fgrpc
from worker_sdk import Client, Execution, Workflow

pytestmark = pytest.mark.e2e

FAULT_WORKER = ROOT / "tests/e2e/fault_worker.py"
WAIT = 60.0
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
ENDED = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"}


@dataclass
class Stubs:
    workflows: fgrpc.WorkflowServiceStub
    workers: wgrpc.WorkerServiceStub
    triggers: tgrpc.TriggerServiceStub
    dispatch: dgrpc.DispatchServiceStub
    identity: igrpc.IdentityServiceStub


@dataclass
class Cluster:
    """A coordinator process; channels and fault_worker processes the test opens on it."""

    address: str
    log_dir: Path
    admin: Client
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)

    def stubs(self, key: str | None) -> Stubs:
        """Stubs sending ``key`` (None: no credential at all)."""
        channel = channel_to(self.address, key)
        self.channels.append(channel)
        return Stubs(
            fgrpc.WorkflowServiceStub(channel),
            wgrpc.WorkerServiceStub(channel),
            tgrpc.TriggerServiceStub(channel),
            dgrpc.DispatchServiceStub(channel),
            igrpc.IdentityServiceStub(channel),
        )

    async def key(self, *roles: str, name: str, tenant: str = "") -> str:
        """A new API key (the admin's tenant unless ``tenant``)."""
        reply = await self.stubs(ADMIN_KEY).identity.CreateApiKey(
            ipb.CreateApiKeyRequest(tenant=tenant, name=name, roles=roles)
        )
        return reply.key

    def worker(self, name: str, key: str, tasks: str, **env: str) -> Proc:
        """tests/e2e/fault_worker.py serving ``tasks`` with ``key``; records to
        ``records(name)``."""
        proc = spawn_worker(
            FAULT_WORKER,
            self.address,
            self.log_dir,
            name,
            TRELLIS_API_KEY=key,
            RECORD_FILE=str(self.log_dir / f"{name}.records"),
            FAULT_TASKS=tasks,
            **env,
        )
        self.workers.append(proc)
        return proc

    def records(self, name: str) -> list[list[str]]:
        """``[what, execution_id, node_id, attempt, pid, worker_id]`` per handler event."""
        path = self.log_dir / f"{name}.records"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@contextlib.asynccontextmanager
async def cluster(db_url: str, tmp_path: Path, **settings: str) -> AsyncIterator[Cluster]:
    coordinator, address = spawn_coordinator(db_url, tmp_path, **settings)
    c: Cluster | None = None
    try:
        async with Client(address, api_key=ADMIN_KEY, timeout=30) as admin:
            c = Cluster(address, tmp_path, admin)
            try:
                yield c
            finally:
                for channel in c.channels:
                    await channel.close()
    finally:
        exits = [w.stop() for w in (c.workers if c else [])]
        coordinator_exit = coordinator.stop()
    assert exits == [0] * len(exits), [w.output()[-3000:] for w in c.workers]
    assert coordinator_exit == 0, coordinator.output()[-3000:]


def key_id(key: str) -> str:
    """The id part of ``tk_<id>.<secret>``."""
    return key.removeprefix("tk_").split(".")[0]


def one_node(name: str, task_type: str) -> Workflow:
    wf = Workflow(name)
    wf.node("work", task_type, retries=0)
    return wf


async def wait_ended(client: Client, execution_id: str) -> Execution:
    return await client.wait_for_execution(execution_id, timeout=WAIT)


async def wait_started(c: Cluster, worker: str, execution_id: str) -> list[str]:
    """The worker's ``start`` record of the execution's node, once its handler runs."""

    def started() -> list[str] | None:
        for r in c.records(worker):
            if r[0] == "start" and r[1] == execution_id:
                return r
        return None

    return await wait_for(started, timeout=WAIT, message=f"{worker} starting {execution_id}")


async def wait_registered(proc: Proc) -> None:
    def registered() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited:\n{proc.output()}")
        return "registered with" in proc.output()

    await wait_for(registered, timeout=WAIT, message=f"{proc.name} registering")


# -- reflection and health ----------------------------------------------------------------------


def _list_services(address: str, key: str | None) -> list[str]:
    metadata = [("authorization", f"Bearer {key}")] if key else None
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
        return [s.name for r in replies for s in r.list_services_response.service]


def _reflection_status(address: str, key: str | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        _list_services(address, key)
    code: grpc.StatusCode = info.value.code()  # type: ignore[attr-defined]
    return code


def _health_without_credential(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        return int(reply.status)


def test_reflection_is_off_by_default_and_health_is_open(tmp_path: Path) -> None:
    coordinator, address = spawn_coordinator(f"sqlite:///{tmp_path}/trellis.db", tmp_path)
    try:
        for key in (None, ADMIN_KEY):
            assert _reflection_status(address, key) == grpc.StatusCode.UNIMPLEMENTED
        assert _health_without_credential(address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert coordinator.stop() == 0, coordinator.output()[-3000:]


def test_reflection_when_enabled_needs_a_credential(tmp_path: Path) -> None:
    coordinator, address = spawn_coordinator(
        f"sqlite:///{tmp_path}/trellis.db", tmp_path, reflection="true"
    )
    try:
        assert _reflection_status(address, None) == UNAUTHENTICATED
        assert _reflection_status(address, "tk_0123456789abcdef.wrong") == UNAUTHENTICATED
        services = _list_services(address, ADMIN_KEY)
        assert {
            "trellis.v1.WorkflowService",
            "trellis.v1.WorkerService",
            "trellis.v1.IdentityService",
            "grpc.health.v1.Health",
        } <= set(services), services
        assert _health_without_credential(address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert coordinator.stop() == 0, coordinator.output()[-3000:]


# -- anonymous calls --------------------------------------------------------------------------


async def test_anonymous_calls_are_refused_and_change_nothing(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path) as c:
        await c.admin.register_workflow(one_node("orders", "first"))
        run = await c.admin.start_execution("orders", {"n": 1})
        intruder = one_node("intruder", "first").to_proto()
        limits = dpb.TaskTypeLimits(task_type="first", max_concurrency=1)
        for key in (None, "tk_0123456789abcdef.not-the-secret", "not-even-a-key"):
            s = c.stubs(key)
            for call in (
                s.workflows.RegisterWorkflow(fpb.RegisterWorkflowRequest(definition=intruder)),
                s.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=run.id)),
                s.workflows.CancelExecution(fpb.CancelExecutionRequest(execution_id=run.id)),
                s.dispatch.SetTaskTypeLimits(dpb.SetTaskTypeLimitsRequest(limits=limits)),
            ):
                details = await expect_status(call, UNAUTHENTICATED)
                assert details == "missing or invalid credentials"
        # Nothing changed.
        assert [w.name for w in await c.admin.list_workflows()] == ["orders"]
        after = await c.admin.get_execution(run.id)
        assert after.status in {"PENDING", "RUNNING"}, after
        assert after.node("work").status == "READY", after
        admin = c.stubs(ADMIN_KEY)
        listed = await admin.dispatch.ListTaskTypeLimits(dpb.ListTaskTypeLimitsRequest())
        assert list(listed.limits) == []
        # Refused before anyone was known: nothing to audit either.
        trail = await admin.identity.ListAuditRecords(ipb.ListAuditRecordsRequest())
        assert [r.action for r in trail.records] == ["RegisterWorkflow", "StartExecution"]


# -- forged lease tokens ----------------------------------------------------------------------

_TOKEN_FIELDS = (
    "version",
    "execution_id",
    "node_id",
    "lease_seq",
    "workflow_name",
    "workflow_version",
    "worker_id",
    "credential",
)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _token_body(fields: dict[str, Any]) -> str:
    return _b64(json.dumps([fields[f] for f in _TOKEN_FIELDS], separators=(",", ":")).encode())


def forge_keeping_mac(token: str, **changes: Any) -> str:
    """``token`` with fields of its body changed, under its old key id and MAC."""
    body, kid, mac = token.split(".")
    values = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    fields = dict(zip(_TOKEN_FIELDS, values, strict=True))
    fields.update(changes)
    return f"{_token_body(fields)}.{kid}.{mac}"


def forge_from_scratch(kid: str, **fields: Any) -> str:
    """A token of the right form, signed with a guessed secret."""
    body = _token_body({"version": 2, **fields})
    mac = hmac.new(b"a-guessed-secret-0123456789", body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{kid}.{mac}"


async def _history(client: Client, execution_id: str) -> list[tuple[str, str, int]]:
    return [(e.type, e.node_id, e.attempt) async for e in client.watch_execution(execution_id)]


async def test_forged_lease_tokens_change_nothing(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path) as c:
        key = await c.key("worker", name="billing-workers")
        worker_credential = key_id(key)
        await c.admin.register_workflow(one_node("decoy", "first"))
        await c.admin.register_workflow(one_node("guarded", "hold"))
        # The attacker holds the worker credential (a compromised host of the same pool)
        # and a real token of its own lease to start from.
        attacker = c.stubs(key)
        decoy = await c.admin.start_execution("decoy", {"n": 0})
        await attacker.workers.RegisterWorker(
            wpb.RegisterWorkerRequest(worker_id="attacker", task_types=["first"], capacity=1)
        )
        polled = await attacker.workers.PollTasks(
            wpb.PollTasksRequest(
                worker_id="attacker",
                task_types=["first"],
                max_tasks=1,
                wait=duration_pb2.Duration(seconds=10),
            )
        )
        assert [t.execution_id for t in polled.tasks] == [decoy.id]
        own = polled.tasks[0].lease_token
        kid = own.split(".")[1]

        # The real worker runs the guarded task (held for a few seconds).
        guarded = await c.admin.start_execution("guarded", {"n": 1})
        c.worker("real", key, "hold", WORKER_ID="real-worker", HOLD_SECONDS="8")
        await wait_started(c, "real", guarded.id)
        target = {
            "execution_id": guarded.id,
            "node_id": "work",
            "workflow_name": "guarded",
            "worker_id": "real-worker",
        }
        forged = [
            forge_keeping_mac(own, **target),
            forge_keeping_mac(own, execution_id=guarded.id),
            forge_keeping_mac(own, lease_seq=2),  # another fencing number of my own lease
            forge_from_scratch(
                kid, lease_seq=1, workflow_version=1, credential=worker_credential, **target
            ),
            forge_from_scratch(
                "k1", lease_seq=1, workflow_version=1, credential=worker_credential, **target
            ),
        ]
        for token in forged:
            for worker_id in ("real-worker", "attacker"):
                await expect_status(
                    attacker.workers.CompleteTask(
                        wpb.CompleteTaskRequest(
                            lease_token=token, output=b'{"forged": true}', worker_id=worker_id
                        )
                    ),
                    DENIED,
                    "not signed by this coordinator",
                )
                await expect_status(
                    attacker.workers.FailTask(
                        wpb.FailTaskRequest(
                            lease_token=token,
                            worker_id=worker_id,
                            error=wpb.TaskError(type="Forged", message="x", non_retryable=True),
                        )
                    ),
                    DENIED,
                    "not signed by this coordinator",
                )
            report = await attacker.workers.ReportResults(
                wpb.ReportResultsRequest(
                    worker_id="real-worker",
                    results=[
                        wpb.TaskResult(
                            completed=wpb.CompleteTaskRequest(lease_token=token, output=b"1")
                        )
                    ],
                )
            )
            assert [r.code for r in report.results] == [DENIED.value[0]], report
        # The guarded task is untouched: still leased to the real worker, first attempt.
        during = await c.admin.get_execution(guarded.id)
        node = during.node("work")
        assert (during.status, node.status, node.attempt, node.worker_id, node.output) == (
            "RUNNING",
            "LEASED",
            1,
            "real-worker",
            None,
        ), during
        assert (await c.admin.get_execution(decoy.id)).node("work").status == "LEASED"

        # The genuine token still works; the real worker finishes the guarded run.
        await attacker.workers.CompleteTask(
            wpb.CompleteTaskRequest(lease_token=own, output=b'{"mine": true}', worker_id="attacker")
        )
        assert (await wait_ended(c.admin, decoy.id)).output == {"mine": True}
        done = await wait_ended(c.admin, guarded.id)
        assert done.status == "SUCCEEDED", done
        assert done.output == {"held_by": "real-worker"}
        assert (done.node("work").attempt, done.node("work").worker_id) == (1, "real-worker")
        history = await _history(c.admin, guarded.id)
        assert [h for h in history if h[0].startswith("NODE_") and h[0] != "NODE_READY"] == [
            ("NODE_LEASED", "work", 1),
            ("NODE_SUCCEEDED", "work", 1),
        ], history
        assert [r[0] for r in c.records("real")] == ["start", "done"]


# -- another worker's heartbeat and worker id ---------------------------------------------------


async def test_a_heartbeat_naming_another_worker_is_refused(db_url: str, tmp_path: Path) -> None:
    # Heartbeats every second: a lease unreported by its worker's heartbeat is released
    # after 2 intervals + 2 s, so the attack below would fail the victim's lease if it
    # were accepted.
    async with cluster(db_url, tmp_path, heartbeat_interval="1s") as c:
        victim_key = await c.key("worker", name="victim-workers")
        attacker = c.stubs(await c.key("worker", name="attacker-workers"))
        await attacker.workers.RegisterWorker(
            wpb.RegisterWorkerRequest(worker_id="intruder", task_types=["hold"], capacity=1)
        )
        await c.admin.register_workflow(one_node("guarded", "hold"))
        run = await c.admin.start_execution("guarded", {"n": 1})
        c.worker("victim", victim_key, "hold", WORKER_ID="victim", HOLD_SECONDS="10")
        await wait_started(c, "victim", run.id)
        started = time.monotonic()
        attacks: list[float] = []

        async def attack_until_done() -> bool:
            await expect_status(
                attacker.workers.Heartbeat(wpb.HeartbeatRequest(worker_id="victim")),
                DENIED,
                "may heartbeat only for itself",
            )
            attacks.append(time.monotonic() - started)
            return (await c.admin.get_execution(run.id)).status in ENDED

        await wait_for(attack_until_done, timeout=WAIT, interval=0.5)
        done = await c.admin.get_execution(run.id)
        assert done.status == "SUCCEEDED", done
        assert max(attacks) > 5, attacks  # some came after the victim's lease was 4 s old
        assert done.output == {"held_by": "victim"}
        assert (done.node("work").attempt, done.node("work").worker_id) == (1, "victim")
        assert [r[0] for r in c.records("victim")] == ["start", "done"]
        history = await _history(c.admin, run.id)
        assert not [h for h in history if h[0] in {"NODE_FAILED", "NODE_RETRYING"}], history


async def test_another_credential_cannot_take_over_a_worker_id(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path) as c:
        victim_key = await c.key("worker", name="victim-workers")
        attacker_key = await c.key("worker", name="attacker-workers")
        attacker = c.stubs(attacker_key)
        victim = c.worker("victim", victim_key, "first", WORKER_ID="victim")
        await wait_registered(victim)
        identity = f"{socket.gethostname()}:{victim.popen.pid}"
        for request in (
            wpb.RegisterWorkerRequest(worker_id="victim", task_types=["first"], capacity=1),
            wpb.RegisterWorkerRequest(
                worker_id="victim", task_types=["first"], capacity=1, identity=identity
            ),
            wpb.RegisterWorkerRequest(
                worker_id="victim", task_types=["first"], capacity=1, identity="attacker:1"
            ),
        ):
            details = await expect_status(attacker.workers.RegisterWorker(request), DENIED)
            for secret in (identity, key_id(victim_key), "victim-workers"):
                assert secret not in details, details
        # Polling as the victim from another credential is refused too.
        details = await expect_status(
            attacker.workers.PollTasks(
                wpb.PollTasksRequest(worker_id="victim", task_types=["first"], max_tasks=1)
            ),
            DENIED,
        )
        assert identity not in details and key_id(victim_key) not in details, details
        # The victim keeps its id and its work.
        await c.admin.register_workflow(one_node("after", "first"))
        run = await c.admin.start_execution("after", {"n": 2})
        done = await wait_ended(c.admin, run.id)
        assert done.status == "SUCCEEDED", done
        assert done.node("work").worker_id == "victim"
        assert [r[5] for r in c.records("victim")] == ["victim", "victim"]
        # The refused registrations are in the trail, as the attacker's.
        trail = await c.stubs(ADMIN_KEY).identity.ListAuditRecords(
            ipb.ListAuditRecordsRequest(actor="attacker-workers")
        )
        assert {(r.action, r.target, r.outcome) for r in trail.records} == {
            ("RegisterWorker", "worker/victim", "error: PERMISSION_DENIED")
        }, trail


# -- events straight to the coordinator ---------------------------------------------------------


async def test_publishing_an_event_needs_events_publish(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path) as c:
        await c.admin.register_workflow(one_node("welcome", "first"))
        admin = c.stubs(ADMIN_KEY)
        await admin.triggers.CreateEventTrigger(
            tpb.CreateEventTriggerRequest(event_name="user.signup", workflow_name="welcome")
        )
        event = tpb.PublishEventRequest(name="user.signup", payload=b'{"user": 7}')
        viewer = c.stubs(await c.key("viewer", name="dashboard"))
        worker = c.stubs(await c.key("worker", name="workers"))
        await expect_status(viewer.triggers.PublishEvent(event), DENIED, "needs 'events.publish'")
        await expect_status(worker.triggers.PublishEvent(event), DENIED)
        await expect_status(c.stubs(None).triggers.PublishEvent(event), UNAUTHENTICATED)
        assert await c.admin.list_executions() == []
        trail = await admin.identity.ListAuditRecords(
            ipb.ListAuditRecordsRequest(actor="dashboard")
        )
        assert [(r.action, r.target, r.outcome) for r in trail.records] == [
            ("PublishEvent", "event/user.signup", "denied")
        ]

        for role in ("gateway", "operator"):
            publisher = c.stubs(await c.key(role, name=f"{role}-key"))
            reply = await publisher.triggers.PublishEvent(
                tpb.PublishEventRequest(
                    name="user.signup", payload=b'{"user": 7}', idempotency_key=role
                )
            )
            assert [e.created for e in reply.executions] == [True], reply
        started = await c.admin.list_executions()
        assert len(started) == 2 and {e.workflow_name for e in started} == {"welcome"}
        assert all(e.input == {"user": 7} for e in started)


# -- tenants, at the process level ------------------------------------------------------------


def _created_key(address: str, tenant: str, role: str, name: str) -> str:
    out = cli(address, "keys", "create", "--tenant", tenant, "--role", role, "--name", name)
    key = out.splitlines()[0].strip()
    assert key.startswith("tk_") and "." in key, out
    return key


async def test_a_worker_of_another_tenant_never_gets_its_tasks(db_url: str, tmp_path: Path) -> None:
    async with cluster(db_url, tmp_path) as c:
        for tenant in ("acme", "umbrella"):
            assert cli(c.address, "tenants", "create", tenant).strip() == f"tenant {tenant} created"
        keys = {
            (tenant, role): _created_key(c.address, tenant, role, f"{tenant}-{role}")
            for tenant in ("acme", "umbrella")
            for role in ("developer", "worker")
        }
        async with (
            Client(c.address, api_key=keys["acme", "developer"], timeout=30) as acme,
            Client(c.address, api_key=keys["umbrella", "developer"], timeout=30) as umbrella,
        ):
            # The same workflow name and task type in both tenants.
            for client in (acme, umbrella):
                await client.register_workflow(one_node("shared", "first"))
            theirs = await acme.start_execution("shared", {"n": "acme"})
            ours = await umbrella.start_execution("shared", {"n": "umbrella"})
            c.worker("umbrella-worker", keys["umbrella", "worker"], "first")
            # Umbrella's worker polls and runs umbrella's execution, started after acme's...
            done = await wait_ended(umbrella, ours.id)
            assert done.status == "SUCCEEDED", done
            # ... and never acme's, which waits for a worker of its own tenant.
            waiting = await acme.get_execution(theirs.id)
            assert waiting.status in {"PENDING", "RUNNING"}, waiting
            assert (waiting.node("work").status, waiting.node("work").attempt) == ("READY", 0)
            assert {r[1] for r in c.records("umbrella-worker")} == {ours.id}
            c.worker("acme-worker", keys["acme", "worker"], "first", WORKER_ID="acme-w")
            done = await wait_ended(acme, theirs.id)
            assert done.status == "SUCCEEDED", done
            assert done.node("work").worker_id == "acme-w"
            assert {r[1] for r in c.records("acme-worker")} == {theirs.id}
            assert {r[1] for r in c.records("umbrella-worker")} == {ours.id}
