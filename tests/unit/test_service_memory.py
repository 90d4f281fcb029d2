"""The service's use cases end to end on a ``MemoryStore``: fast, no network, no database.

Each test drives ``Coordinator`` as the gRPC servicers and sweepers do, with a clock the test
moves; tests/integration runs the same use cases on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from coordinator import errors
from coordinator.model import (
    Channel,
    ChannelKind,
    DeliveryStatus,
    ErrorInfo,
    EventType,
    ExecutionStatus,
    NodeSpec,
    NodeStatus,
    NotificationRule,
    RetryPolicy,
    WorkflowDef,
)
from coordinator.service import Coordinator, LeasedTask, ServiceSettings, Sweeper
from coordinator.store import MemoryStore

TENANT = "default"
T0 = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
NO_WAIT = timedelta(0)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Env:
    store: MemoryStore
    clock: Clock
    c: Coordinator
    sweeper: Sweeper = field(init=False)

    def __post_init__(self) -> None:
        self.sweeper = Sweeper(self.c)

    async def poll(self, *task_types: str, limit: int = 10) -> list[LeasedTask]:
        return await self.c.leasing.poll_tasks(TENANT, "w1", task_types or ("t",), limit, NO_WAIT)

    async def status(self, execution_id: str) -> ExecutionStatus:
        return (await self.c.executions.get_execution(TENANT, execution_id)).execution.status

    async def nodes(self, execution_id: str) -> dict[str, NodeStatus]:
        view = await self.c.executions.get_execution(TENANT, execution_id)
        return {n.node_id: n.status for n in view.nodes}

    async def events(self, execution_id: str) -> list[EventType]:
        listed = await self.store.executions.list_events(TENANT, execution_id, 0, 1000)
        return [e.type for e in listed]


@pytest.fixture
async def env() -> Env:
    clock = Clock()
    settings = ServiceSettings(heartbeat_interval=timedelta(seconds=1))
    c = Coordinator(MemoryStore(), settings, clock=clock)
    await c.leasing.register_worker(TENANT, "w1", ["t", "u"], 10)
    assert isinstance(c.store, MemoryStore)
    return Env(c.store, clock, c)


def workflow(
    name: str,
    nodes: Sequence[str | NodeSpec],
    edges: Sequence[tuple[str, str]] = (),
    **fields: object,
) -> WorkflowDef:
    specs = tuple(NodeSpec(id=n, task_type="t") if isinstance(n, str) else n for n in nodes)
    return WorkflowDef(name=name, nodes=specs, edges=tuple(edges), **fields)  # type: ignore[arg-type]


DIAMOND = workflow(
    "diamond",
    ["a", "b", "c", "d"],
    [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
)


async def test_a_diamond_runs_to_success(env: Env) -> None:
    await env.c.definitions.register_workflow(DIAMOND)
    execution, created = await env.c.starts.start_execution(TENANT, "diamond", None, b'{"n":3}')
    assert created and execution.status is ExecutionStatus.RUNNING

    (a,) = await env.poll()
    assert (a.node.node_id, a.node.attempt, json.loads(a.execution_input)) == ("a", 1, {"n": 3})
    assert (await env.c.results.complete_task(TENANT, a.token, b"1", "w1"))[0] is False
    middle = {t.node.node_id: t for t in await env.poll()}
    assert set(middle) == {"b", "c"}
    await env.c.results.complete_task(TENANT, middle["b"].token, b"2", "w1")
    assert await env.poll() == []  # d waits for c
    await env.c.results.complete_task(TENANT, middle["c"].token, b"3", "w1")
    (d,) = await env.poll()
    assert json.loads(d.parent_outputs) == {"b": 2, "c": 3}
    await env.c.results.complete_task(TENANT, d.token, b'{"sum":5}', "w1")

    view = await env.c.executions.get_execution(TENANT, execution.id)
    assert view.execution.status is ExecutionStatus.SUCCEEDED
    assert json.loads(view.execution.output or b"") == {"sum": 5}
    assert [n.status for n in view.nodes] == [NodeStatus.SUCCEEDED] * 4
    events = await env.events(execution.id)
    assert events[0] is EventType.EXECUTION_STARTED
    assert events[-1] is EventType.EXECUTION_SUCCEEDED
    assert events.count(EventType.NODE_LEASED) == 4
    # A duplicate result is acknowledged and changes nothing.
    assert (await env.c.results.complete_task(TENANT, d.token, b'{"sum":5}', "w1"))[0] is True
    assert await env.events(execution.id) == events


async def test_an_idempotency_key_starts_one_execution(env: Env) -> None:
    await env.c.definitions.register_workflow(DIAMOND)
    first, created = await env.c.starts.start_execution(
        TENANT, "diamond", None, b"1", idempotency_key="k"
    )
    again, created_again = await env.c.starts.start_execution(
        TENANT, "diamond", None, b"2", idempotency_key="k"
    )
    assert (created, created_again, again.id) == (True, False, first.id)


async def test_failures_retry_then_dead_letter_and_redrive(env: Env) -> None:
    retry = RetryPolicy(max_attempts=2, initial_interval=timedelta(seconds=5))
    await env.c.definitions.register_workflow(
        workflow("chain", ["a", NodeSpec(id="b", task_type="t", retry_policy=retry)], [("a", "b")])
    )
    execution, _ = await env.c.starts.start_execution(TENANT, "chain", None, b"{}")
    (a,) = await env.poll()
    await env.c.results.complete_task(TENANT, a.token, b'"a-out"', "w1")

    (b,) = await env.poll()
    boom = ErrorInfo(type="Boom", message="first")
    assert await env.c.results.fail_task(TENANT, b.token, boom, True) == (True, False)  # will retry
    assert await env.poll() == []  # backing off
    env.clock.advance(5)
    (b,) = await env.poll()
    assert b.node.attempt == 2
    last = ErrorInfo(type="Boom", message="second")
    assert await env.c.results.fail_task(TENANT, b.token, last, True) == (
        False,
        False,
    )  # out of attempts
    assert await env.status(execution.id) is ExecutionStatus.FAILED

    letters, _ = await env.c.dead_letters.list_dead_letters(
        TENANT,
        workflow_name=None,
        task_type=None,
        include_redriven=False,
        page_size=10,
        page_token="",
    )
    (letter,) = letters
    assert (letter.execution_id, letter.node_id, json.loads(letter.input or b"")) == (
        execution.id,
        "b",
        "a-out",
    )
    assert [(f.attempt, f.error.message) for f in letter.attempts] == [(1, "first"), (2, "second")]

    redriven = await env.c.dead_letters.redrive_dead_letter(TENANT, letter.id)
    assert redriven.execution.status is ExecutionStatus.RUNNING
    with pytest.raises(errors.FailedPrecondition, match="already redriven"):
        await env.c.dead_letters.redrive_dead_letter(TENANT, letter.id)
    (b,) = await env.poll()
    assert b.node.node_id == "b"  # a is not run again
    await env.c.results.complete_task(TENANT, b.token, b'"b-out"', "w1")
    assert await env.status(execution.id) is ExecutionStatus.SUCCEEDED
    stamped = await env.c.dead_letters.get_dead_letter(TENANT, letter.id)
    assert stamped.redriven_at is not None


async def test_cancel_revokes_the_lease_and_refuses_late_results(env: Env) -> None:
    await env.c.definitions.register_workflow(DIAMOND)
    execution, _ = await env.c.starts.start_execution(TENANT, "diamond", None, b"{}")
    (a,) = await env.poll()
    view = await env.c.operations.cancel_execution(TENANT, execution.id, "operator")
    assert view.execution.status is ExecutionStatus.CANCELLED
    assert (await env.c.heartbeats.heartbeat(TENANT, "w1", [a.token])).cancelled == (a.token,)
    before = await env.events(execution.id)
    assert before[-1] is EventType.EXECUTION_CANCELLED
    with pytest.raises(errors.FailedPrecondition):
        await env.c.results.complete_task(TENANT, a.token, b'"late"', "w1")
    assert await env.events(execution.id) == before
    assert await env.poll() == []


async def test_pause_holds_dispatch_until_resume(env: Env) -> None:
    await env.c.definitions.register_workflow(DIAMOND)
    execution, _ = await env.c.starts.start_execution(TENANT, "diamond", None, b"{}")
    paused = await env.c.operations.pause_execution(TENANT, execution.id)
    assert paused.execution.status is ExecutionStatus.PAUSED
    assert await env.poll() == []
    resumed = await env.c.operations.resume_execution(TENANT, execution.id)
    assert resumed.execution.status is ExecutionStatus.RUNNING
    (a,) = await env.poll()
    assert a.node.node_id == "a"
    events = await env.events(execution.id)
    assert events.index(EventType.EXECUTION_RESUMED) < events.index(EventType.NODE_LEASED)


async def test_a_lost_heartbeat_releases_the_lease_for_a_retry(env: Env) -> None:
    retry = RetryPolicy(max_attempts=2, initial_interval=timedelta(milliseconds=1))
    beating = NodeSpec(
        id="a", task_type="t", heartbeat_timeout=timedelta(seconds=10), retry_policy=retry
    )
    await env.c.definitions.register_workflow(workflow("beating", [beating]))
    execution, _ = await env.c.starts.start_execution(TENANT, "beating", None, b"{}")
    (first,) = await env.poll()
    env.clock.advance(8)
    assert (await env.c.heartbeats.heartbeat(TENANT, "w1", [first.token])).lost == ()
    env.clock.advance(8)  # 8 s since the heartbeat: still alive
    assert await env.sweeper.expire_leases() == (0, 0)
    env.clock.advance(3)  # 11 s: past the heartbeat timeout
    assert await env.sweeper.expire_leases() == (1, 1)
    assert (await env.nodes(execution.id)) == {"a": NodeStatus.READY}
    assert (await env.c.heartbeats.heartbeat(TENANT, "w1", [first.token])).lost == (first.token,)

    env.clock.advance(1)
    (second,) = await env.poll()
    assert (second.node.attempt, second.node.lease_seq) == (2, first.node.lease_seq + 1)
    with pytest.raises(errors.FailedPrecondition):
        await env.c.results.complete_task(TENANT, first.token, b'"stale"', "w1")
    await env.c.results.complete_task(TENANT, second.token, b'"ok"', "w1")
    assert await env.status(execution.id) is ExecutionStatus.SUCCEEDED


async def test_a_sub_workflow_runs_and_its_output_becomes_the_parents(env: Env) -> None:
    await env.c.definitions.register_workflow(
        workflow("leaf", [NodeSpec(id="only", task_type="u")])
    )
    child_node = NodeSpec(id="sub", task_type="", kind="workflow", workflow_name="leaf")
    await env.c.definitions.register_workflow(
        workflow("top", [child_node, "after"], [("sub", "after")])
    )
    top, _ = await env.c.starts.start_execution(TENANT, "top", None, b'{"x":1}')
    view = await env.c.executions.get_execution(TENANT, top.id)
    [sub] = [n for n in view.nodes if n.node_id == "sub"]
    assert sub.status is NodeStatus.WAITING and sub.child_execution_id is not None
    child = (await env.c.executions.get_execution(TENANT, sub.child_execution_id)).execution
    assert (child.parent_execution_id, child.depth) == (top.id, 1)

    (only,) = await env.poll("u")
    assert json.loads(only.execution_input) == {"x": 1}
    await env.c.results.complete_task(TENANT, only.token, b'{"leaf":true}', "w1")
    assert await env.status(child.id) is ExecutionStatus.SUCCEEDED
    (after,) = await env.poll()
    assert json.loads(after.parent_outputs) == {"sub": {"leaf": True}}
    await env.c.results.complete_task(TENANT, after.token, b'"done"', "w1")
    assert await env.status(top.id) is ExecutionStatus.SUCCEEDED


async def test_cancelling_a_parent_cancels_its_running_child(env: Env) -> None:
    await env.c.definitions.register_workflow(workflow("leaf", ["only"]))
    child_node = NodeSpec(id="sub", task_type="", kind="workflow", workflow_name="leaf")
    await env.c.definitions.register_workflow(workflow("top", [child_node]))
    top, _ = await env.c.starts.start_execution(TENANT, "top", None, b"{}")
    [sub] = (await env.c.executions.get_execution(TENANT, top.id)).nodes
    assert sub.child_execution_id is not None
    await env.c.operations.cancel_execution(TENANT, top.id, "operator")
    await env.sweeper.sweep()
    assert await env.status(sub.child_execution_id) is ExecutionStatus.CANCELLED
    assert await env.poll() == []


async def _notify_on(env: Env, workflow_name: str, *statuses: ExecutionStatus) -> Channel:
    channel = await env.store.notifications.create_channel(
        Channel("c1", "ops", ChannelKind.WEBHOOK, {"url": "http://127.0.0.1:9/"}, T0, TENANT)
    )
    await env.store.notifications.create_rule(
        NotificationRule("r1", channel.id, statuses, T0, TENANT, workflow_name=workflow_name)
    )
    return channel


async def test_an_execution_ending_queues_its_notification(env: Env) -> None:
    channel = await _notify_on(env, "one", ExecutionStatus.FAILED)
    await env.c.definitions.register_workflow(workflow("one", ["a"]))
    ok, _ = await env.c.starts.start_execution(TENANT, "one", None, b"{}")
    (a,) = await env.poll()
    await env.c.results.complete_task(TENANT, a.token, b"1", "w1")
    failing, _ = await env.c.starts.start_execution(TENANT, "one", None, b"{}")
    (a,) = await env.poll()
    await env.c.results.fail_task(TENANT, a.token, ErrorInfo(type="Boom", message="no"), False)

    deliveries = await env.store.notifications.list_deliveries(
        TENANT, execution_id=None, channel_id=None, status=None, limit=10, before=None
    )
    (delivery,) = deliveries  # the SUCCEEDED one matches no rule
    assert (delivery.execution_id, delivery.channel_id, delivery.rule_id) == (
        failing.id,
        channel.id,
        "r1",
    )
    assert delivery.status is DeliveryStatus.PENDING
    assert delivery.execution_status is ExecutionStatus.FAILED
    document = json.loads(delivery.payload)
    assert (document["execution_id"], document["status"]) == (failing.id, "FAILED")
    assert document["error"]["type"] == "Boom"
    assert ok.id != failing.id

    (claimed,) = await env.store.notifications.claim_deliveries(T0, 10, timedelta(seconds=30))
    assert claimed.delivery.id == delivery.id and claimed.channel == channel


async def test_a_workflow_cap_queues_the_start_until_a_running_one_ends(env: Env) -> None:
    await env.c.definitions.register_workflow(workflow("capped", ["a"], max_running_executions=1))
    first, _ = await env.c.starts.start_execution(TENANT, "capped", None, b"1")
    second, _ = await env.c.starts.start_execution(TENANT, "capped", None, b"2")
    assert (first.status, second.status, second.queued) == (
        ExecutionStatus.RUNNING,
        ExecutionStatus.PENDING,
        True,
    )
    (a,) = await env.poll()
    await env.c.results.complete_task(TENANT, a.token, b"1", "w1")
    await env.sweeper.sweep()
    assert await env.status(second.id) is ExecutionStatus.RUNNING
    (a,) = await env.poll()
    assert a.node.execution_id == second.id
