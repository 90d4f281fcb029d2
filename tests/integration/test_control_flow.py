"""Control flow through the gRPC surface and the service, on SQLite and PostgreSQL:
sub-workflows, delayed starts, batch starts, the idempotency window, branching and
expansion at completion, and the execution context handed to workers."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from coordinator.model import ANY_EXECUTION, ExecutionStatus, NodeSpec, NodeStatus, WorkflowDef
from coordinator.service import Coordinator, ServiceSettings, Store, Sweeper
from coordinator.store import open_store
from tests.support.grpc_api import Api, expect_status, poll, register
from tests.support.wait import wait_for
from trellis.v1 import common_pb2
from trellis.v1 import worker_service_pb2 as wpb
from trellis.v1 import workflow_service_pb2 as fpb

TENANT = "default"
OK = grpc.StatusCode.INVALID_ARGUMENT


def one_task(name: str, task_type: str = "t") -> common_pb2.WorkflowDefinition:
    msg = common_pb2.WorkflowDefinition(name=name)
    msg.nodes.add(id="only", task_type=task_type)
    return msg


def runs(name: str, child: str, *, version: int = 0) -> common_pb2.WorkflowDefinition:
    """A definition whose only node runs ``child`` as a sub-workflow."""
    msg = common_pb2.WorkflowDefinition(name=name)
    msg.nodes.add(id="sub", kind="workflow", workflow_name=child, workflow_version=version)
    return msg


async def get(api: Api, execution_id: str) -> common_pb2.Execution:
    reply = await api.workflows.GetExecution(fpb.GetExecutionRequest(execution_id=execution_id))
    execution: common_pb2.Execution = reply.execution
    return execution


async def start(
    api: Api, name: str, payload: object = None, **opts: object
) -> fpb.StartExecutionResponse:
    reply: fpb.StartExecutionResponse = await api.workflows.StartExecution(
        fpb.StartExecutionRequest(
            workflow_name=name,
            input=json.dumps(payload).encode(),
            **opts,  # type: ignore[arg-type]
        )
    )
    return reply


async def ended(api: Api, execution_id: str) -> common_pb2.Execution:
    async def probe() -> common_pb2.Execution | None:
        execution = await get(api, execution_id)
        terminal = execution.status in (
            common_pb2.EXECUTION_STATUS_SUCCEEDED,
            common_pb2.EXECUTION_STATUS_FAILED,
            common_pb2.EXECUTION_STATUS_CANCELLED,
            common_pb2.EXECUTION_STATUS_TIMED_OUT,
        )
        return execution if terminal else None

    return await wait_for(probe, timeout=20)


async def all_executions(api: Api) -> list[common_pb2.Execution]:
    reply = await api.workflows.ListExecutions(fpb.ListExecutionsRequest(page_size=1000))
    return list(reply.executions)


# -- sub-workflows ------------------------------------------------------------------------


async def test_sub_workflow_output_becomes_the_parents(api: Api) -> None:
    await register(api, one_task("child", "c"))
    await register(api, runs("parent", "child"))
    parent_id = (await start(api, "parent", {"n": 1})).execution.id

    [task] = await poll(api, types=("c",), wait=5)
    assert json.loads(task.execution_input) == {"n": 1}  # the child's input: the node's
    child = await get(api, task.execution_id)
    assert child.parent_execution_id == parent_id
    assert (child.parent_node_id, child.depth) == ("sub", 1)
    parent = await get(api, parent_id)
    [sub] = parent.nodes
    assert sub.status == common_pb2.NODE_STATUS_WAITING
    assert sub.child_execution_id == child.id

    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=task.lease_token, output=b'{"v":7}')
    )
    done = await ended(api, parent_id)
    assert done.status == common_pb2.EXECUTION_STATUS_SUCCEEDED
    assert json.loads(done.output) == {"v": 7}


async def test_child_failure_fails_the_parent_with_its_message(api: Api) -> None:
    await register(api, one_task("child", "c"))
    await register(api, runs("parent", "child"))
    parent_id = (await start(api, "parent")).execution.id
    [task] = await poll(api, types=("c",), wait=5)
    await api.workers.FailTask(
        wpb.FailTaskRequest(
            lease_token=task.lease_token,
            error=wpb.TaskError(type="Boom", message="card declined", non_retryable=True),
        )
    )
    done = await ended(api, parent_id)
    assert done.status == common_pb2.EXECUTION_STATUS_FAILED
    assert "card declined" in done.error.message, done.error


async def test_cancelling_the_parent_cancels_a_running_child(api: Api) -> None:
    await register(api, one_task("child", "c"))
    await register(api, runs("parent", "child"))
    parent_id = (await start(api, "parent")).execution.id
    [task] = await poll(api, types=("c",), wait=5)  # the child's task is running
    await api.workflows.CancelExecution(fpb.CancelExecutionRequest(execution_id=parent_id))
    child = await ended(api, task.execution_id)
    assert child.status == common_pb2.EXECUTION_STATUS_CANCELLED
    beat = await api.workers.Heartbeat(
        wpb.HeartbeatRequest(
            worker_id="w1", leases=[wpb.LeaseHeartbeat(lease_token=task.lease_token)]
        )
    )
    assert list(beat.cancelled_lease_tokens) == [task.lease_token]


async def test_registration_refuses_unknown_deep_and_recursive_references(api: Api) -> None:
    await expect_status(
        register(api, runs("parent", "nowhere")),
        OK,
        "node 'sub' runs workflow 'nowhere', which is not registered; register it first",
    )
    await register(api, one_task("w0"))
    for i in range(1, 11):  # w10 -> w9 -> ... -> w0: w0 runs at depth 10, the limit
        await register(api, runs(f"w{i}", f"w{i - 1}"))
    details = await expect_status(
        register(api, runs("w11", "w10")), OK, "w11 -> w10", "-> w0", "limit of 10"
    )
    assert "TRELLIS_MAX_WORKFLOW_DEPTH" in details
    # A new version of w0 that runs w2, which runs w1, which runs w0: recursion.
    await expect_status(register(api, runs("w0", "w2")), OK, "cycle w0 -> w2 -> w1 -> w0")
    listed = await api.workflows.ListWorkflows(fpb.ListWorkflowsRequest())
    assert {w.name for w in listed.workflows} == {f"w{i}" for i in range(11)}


async def test_run_time_depth_limit_fails_the_node_and_starts_nothing(store: Store) -> None:
    registrar = Coordinator(store)
    for defn in (
        WorkflowDef(name="leaf", nodes=(NodeSpec(id="only", task_type="t"),)),
        workflow_runs("mid", "leaf"),
        workflow_runs("top", "mid"),
    ):
        await registrar.definitions.register_workflow(defn)
    # The limit was lowered after registration: mid (depth 1) may not start leaf (depth 2).
    c = Coordinator(store, ServiceSettings(max_workflow_depth=1))
    top, _ = await c.starts.start_execution(TENANT, "top", None, b"1")
    view = await c.executions.get_execution(TENANT, top.id)
    assert view.execution.status is ExecutionStatus.FAILED, view
    assert view.execution.error is not None
    assert "sub-workflow nesting depth 2 exceeds the limit of 1 (TRELLIS_MAX_WORKFLOW_DEPTH)" in (
        view.execution.error.message
    )
    listed = await store.executions.list_executions(TENANT, ANY_EXECUTION, limit=10, before=None)
    assert sorted(e.workflow_name for e in listed) == ["mid", "top"]  # no leaf row
    [mid] = [e for e in listed if e.workflow_name == "mid"]
    assert mid.status is ExecutionStatus.FAILED and mid.depth == 1


async def test_unknown_child_at_run_time_fails_the_node(store: Store) -> None:
    c = Coordinator(store)
    # Stored past the registration checks (as if the child had been removed since).
    await store.workflows.register_workflow(workflow_runs("orphan", "gone"), datetime.now(UTC))
    execution, _ = await c.starts.start_execution(TENANT, "orphan", None, b"1")
    view = await c.executions.get_execution(TENANT, execution.id)
    assert view.execution.status is ExecutionStatus.FAILED
    assert view.execution.error is not None
    assert "runs workflow 'gone', which is not registered" in view.execution.error.message
    [sub] = view.nodes
    assert sub.status is NodeStatus.FAILED and sub.child_execution_id is None
    listed = await store.executions.list_executions(TENANT, ANY_EXECUTION, limit=10, before=None)
    assert [e.id for e in listed] == [execution.id]


async def test_sweeper_reports_a_finished_child_and_cancels_orphans(store: Store) -> None:
    c = Coordinator(store)
    await c.definitions.register_workflow(
        WorkflowDef(name="leaf", nodes=(NodeSpec(id="only", task_type="t"),))
    )
    await c.definitions.register_workflow(workflow_runs("top", "leaf"))
    top, _ = await c.starts.start_execution(TENANT, "top", None, b"1")
    [sub] = (await c.executions.get_execution(TENANT, top.id)).nodes
    assert sub.child_execution_id is not None
    # The child finishes but the report to the parent is lost (a crash right after commit).
    [task] = await c.leasing.poll_tasks(TENANT, "w", ["t"], 1, timedelta(0))
    reported = c.sub_workflows.report_child_ended
    c.sub_workflows.report_child_ended = _lost  # type: ignore[method-assign]
    await c.results.complete_task(TENANT, task.token, b'{"ok":true}')
    assert (
        await c.executions.get_execution(TENANT, top.id)
    ).execution.status is ExecutionStatus.RUNNING
    c.sub_workflows.report_child_ended = reported  # type: ignore[method-assign]
    await Sweeper(c).sweep()
    done = (await c.executions.get_execution(TENANT, top.id)).execution
    assert done.status is ExecutionStatus.SUCCEEDED and json.loads(done.output or b"") == {
        "ok": True
    }

    # A parent cancelled while its child's cancellation is lost: the sweeper cancels it.
    top, _ = await c.starts.start_execution(TENANT, "top", None, b"2")
    [sub] = (await c.executions.get_execution(TENANT, top.id)).nodes
    cancel_child = c.sub_workflows.cancel_child
    c.sub_workflows.cancel_child = _lost_cancel  # type: ignore[method-assign]
    await c.operations.cancel_execution(TENANT, top.id, "")
    assert sub.child_execution_id is not None
    child = (await c.executions.get_execution(TENANT, sub.child_execution_id)).execution
    assert child.status is ExecutionStatus.RUNNING
    c.sub_workflows.cancel_child = cancel_child  # type: ignore[method-assign]
    await Sweeper(c).sweep()
    child = (await c.executions.get_execution(TENANT, sub.child_execution_id)).execution
    assert child.status is ExecutionStatus.CANCELLED


async def _lost(*args: object) -> bool:
    return False


async def _lost_cancel(*args: object) -> bool:
    return False


def workflow_runs(name: str, child: str) -> WorkflowDef:
    return WorkflowDef(
        name=name, nodes=(NodeSpec(id="sub", task_type="", kind="workflow", workflow_name=child),)
    )


# -- delayed starts -----------------------------------------------------------------------


async def test_delayed_start_waits_until_due_and_the_sweeper_starts_it(api: Api) -> None:
    await register(api, one_task("later"))
    reply = await start(api, "later", {"x": 1}, delay=duration_pb2.Duration(seconds=3600))
    execution = reply.execution
    assert execution.status == common_pb2.EXECUTION_STATUS_PENDING
    due = execution.start_time.ToDatetime(tzinfo=UTC)
    assert due - datetime.now(UTC) > timedelta(minutes=59)
    assert list((await get(api, execution.id)).nodes) == []
    assert await poll(api) == []

    sweeper = Sweeper(api.running.coordinator)
    assert await sweeper.start_due(now=due - timedelta(seconds=1)) == (0, 0)
    assert (await get(api, execution.id)).status == common_pb2.EXECUTION_STATUS_PENDING
    waiting = asyncio.create_task(poll(api, wait=10))
    assert await sweeper.start_due(now=due + timedelta(seconds=1)) == (1, 1)
    [task] = await waiting  # the waiting poll was woken
    assert task.execution_id == execution.id
    assert json.loads(task.execution_input) == {"x": 1}


async def test_delayed_start_survives_reopening_the_store(db_url: str) -> None:
    store = await open_store(db_url)
    c = Coordinator(store)
    await c.definitions.register_workflow(
        WorkflowDef(name="later", nodes=(NodeSpec(id="only", task_type="t"),))
    )
    execution, _ = await c.starts.start_execution(
        TENANT, "later", None, b"1", delay=timedelta(hours=2)
    )
    await store.close()

    store = await open_store(db_url)
    try:
        c = Coordinator(store)
        assert (
            await c.executions.get_execution(TENANT, execution.id)
        ).execution.status is ExecutionStatus.PENDING
        assert execution.start_at is not None
        await Sweeper(c).start_due(now=execution.start_at)
        view = await c.executions.get_execution(TENANT, execution.id)
        assert view.execution.status is ExecutionStatus.RUNNING
        assert [n.status for n in view.nodes] == [NodeStatus.READY]
    finally:
        await store.close()


async def test_start_options_are_checked(api: Api) -> None:
    await register(api, one_task("later"))
    now = datetime.now(UTC)
    past = timestamp_pb2.Timestamp()
    past.FromDatetime(now - timedelta(hours=1))
    reply = await start(api, "later", start_time=past)  # in the past: starts now
    assert reply.execution.status == common_pb2.EXECUTION_STATUS_RUNNING
    await expect_status(
        start(api, "later", start_time=past, delay=duration_pb2.Duration(seconds=5)),
        OK,
        "at most one of start_time and delay",
    )
    await expect_status(
        start(api, "later", delay=duration_pb2.Duration(seconds=3651 * 86400)), OK, "3650 days"
    )
    assert len(await all_executions(api)) == 1


async def test_a_pending_delayed_execution_can_be_cancelled(api: Api) -> None:
    await register(api, one_task("later"))
    execution = (await start(api, "later", delay=duration_pb2.Duration(seconds=3600))).execution
    await api.workflows.CancelExecution(fpb.CancelExecutionRequest(execution_id=execution.id))
    assert (await get(api, execution.id)).status == common_pb2.EXECUTION_STATUS_CANCELLED
    sweeper = Sweeper(api.running.coordinator)
    assert await sweeper.start_due(now=datetime.now(UTC) + timedelta(hours=2)) == (0, 0)


# -- batch starts and idempotency ---------------------------------------------------------


async def test_batch_start_is_all_or_nothing(api: Api) -> None:
    await register(api, one_task("b"))
    good = fpb.StartExecutionRequest(workflow_name="b", input=b"1")
    bad = [
        (fpb.StartExecutionRequest(workflow_name="nope"), "requests[2]: workflow 'nope'"),
        (fpb.StartExecutionRequest(workflow_name="b", input=b"{"), "requests[2]: input is not"),
        (
            fpb.StartExecutionRequest(workflow_name="b", delay=duration_pb2.Duration(seconds=-1)),
            "requests[2]: delay",
        ),
    ]
    for request, fragment in bad:
        batch = fpb.BatchStartExecutionsRequest(requests=[good, good, request, good])
        await expect_status(api.workflows.BatchStartExecutions(batch), OK, fragment)
    assert await all_executions(api) == []

    keyed = fpb.StartExecutionRequest(workflow_name="b", idempotency_key="k")
    later = fpb.StartExecutionRequest(workflow_name="b", delay=duration_pb2.Duration(seconds=600))
    reply = await api.workflows.BatchStartExecutions(
        fpb.BatchStartExecutionsRequest(requests=[good, keyed, later, keyed])
    )
    results = list(reply.results)
    assert [r.created for r in results] == [True, True, True, False]
    assert results[1].execution.id == results[3].execution.id
    assert results[2].execution.status == common_pb2.EXECUTION_STATUS_PENDING
    assert len(await all_executions(api)) == 3
    assert len(await poll(api)) == 2

    too_many = fpb.BatchStartExecutionsRequest(requests=[good] * 1001)
    await expect_status(
        api.workflows.BatchStartExecutions(too_many),
        OK,
        "BatchStartExecutionsRequest.requests: 1001 entries, at most 1000",
    )


async def test_fifty_concurrent_starts_with_one_key_make_one_execution(api: Api) -> None:
    await register(api, one_task("once"))
    replies = await asyncio.gather(
        *(start(api, "once", {"i": i}, idempotency_key="same-key") for i in range(50))
    )
    assert sum(r.created for r in replies) == 1
    assert len({r.execution.id for r in replies}) == 1
    assert len(await all_executions(api)) == 1


async def test_idempotency_key_expires_after_the_window(store: Store) -> None:
    now = [datetime.now(UTC)]
    c = Coordinator(
        store, ServiceSettings(idempotency_window=timedelta(hours=1)), clock=lambda: now[0]
    )
    await c.definitions.register_workflow(
        WorkflowDef(name="w", nodes=(NodeSpec(id="only", task_type="t"),))
    )
    first, created = await c.starts.start_execution(TENANT, "w", None, b"1", idempotency_key="k")
    assert created
    now[0] += timedelta(minutes=59)
    again, created = await c.starts.start_execution(TENANT, "w", None, b"1", idempotency_key="k")
    assert (again.id, created) == (first.id, False)
    now[0] += timedelta(minutes=2)
    fresh, created = await c.starts.start_execution(TENANT, "w", None, b"1", idempotency_key="k")
    assert created and fresh.id != first.id


# -- completion options and the task's context --------------------------------------------


async def test_invalid_expansion_or_next_changes_nothing(api: Api) -> None:
    defn = common_pb2.WorkflowDefinition(name="grow")
    defn.nodes.add(id="a", task_type="t")
    defn.nodes.add(id="b", task_type="t")
    defn.edges.add(source="a", target="b")
    await register(api, defn)
    execution_id = (await start(api, "grow")).execution.id
    [task] = await poll(api, wait=5)
    before = await get(api, execution_id)

    duplicate = wpb.DagExpansion(nodes=[common_pb2.NodeDefinition(id="a", task_type="t")])
    cycle = wpb.DagExpansion(
        nodes=[common_pb2.NodeDefinition(id="x", task_type="t")],
        edges=[common_pb2.Edge(source="x", target="a")],
    )
    for expansion in (duplicate, cycle):
        await expect_status(
            api.workers.CompleteTask(
                wpb.CompleteTaskRequest(lease_token=task.lease_token, expansion=expansion)
            ),
            OK,
        )
    await expect_status(
        api.workers.CompleteTask(
            wpb.CompleteTaskRequest(lease_token=task.lease_token, next=["zz"])
        ),
        OK,
        "zz",
    )
    assert await get(api, execution_id) == before
    # The lease is still valid: a good completion with an expansion is accepted.
    grow = wpb.DagExpansion(
        nodes=[common_pb2.NodeDefinition(id="x", task_type="t")],
        edges=[common_pb2.Edge(source="a", target="x")],
    )
    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=task.lease_token, output=b"1", expansion=grow)
    )
    after = await get(api, execution_id)
    assert {n.node_id for n in after.nodes} == {"a", "b", "x"}
    assert {t.node_id for t in await poll(api, wait=5)} == {"b", "x"}


async def test_tasks_carry_the_execution_context(api: Api) -> None:
    defn = common_pb2.WorkflowDefinition(name="ctx")
    for node_id in ("a", "b", "c", "d"):
        defn.nodes.add(id=node_id, task_type="t")
    for source, target in (("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")):
        defn.edges.add(source=source, target=target)
    await register(api, defn)
    started = (await start(api, "ctx", {"order": 5})).execution
    [a] = await poll(api, wait=5)
    assert a.map_index == -1
    assert json.loads(a.parent_outputs) == {}
    assert json.loads(a.execution_input) == {"order": 5}
    assert a.execution_start_time == started.create_time
    await api.workers.CompleteTask(
        wpb.CompleteTaskRequest(lease_token=a.lease_token, output=b'"A"')
    )
    tasks = await poll(api, wait=5)
    assert sorted(t.node_id for t in tasks) == ["b", "c"]
    for t in tasks:
        assert json.loads(t.parent_outputs) == {"a": "A"}
        await api.workers.CompleteTask(
            wpb.CompleteTaskRequest(
                lease_token=t.lease_token, output=json.dumps(t.node_id).encode()
            )
        )
    [d] = await poll(api, wait=5)
    assert json.loads(d.parent_outputs) == {"b": "b", "c": "c"}
    assert json.loads(d.execution_input) == {"order": 5}


async def test_map_elements_carry_their_index(api: Api) -> None:
    defn = common_pb2.WorkflowDefinition(name="fan")
    defn.nodes.add(id="m", kind="map", task_type="t", items="input")
    await register(api, defn)
    await start(api, "fan", [10, 20, 30])
    tasks: list[wpb.Task] = []

    async def all_three() -> bool:
        tasks.extend(await poll(api, max_tasks=3))
        return len(tasks) >= 3

    await wait_for(all_three, timeout=10)
    assert sorted((t.node_id, t.map_index, json.loads(t.input)) for t in tasks) == [
        ("m[0]", 0, 10),
        ("m[1]", 1, 20),
        ("m[2]", 2, 30),
    ]
