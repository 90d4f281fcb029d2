"""Lease bookkeeping in the service with an injectable clock, on both stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from coordinator.model import ErrorInfo, NodeRun, NodeSpec, NodeStatus, RetryPolicy, WorkflowDef
from coordinator.service import Coordinator, ServiceSettings, Store, Sweeper

TENANT = "default"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def two_independent_nodes() -> WorkflowDef:
    retry = RetryPolicy(max_attempts=3, initial_interval=timedelta(milliseconds=1))
    return WorkflowDef(
        name="pair",
        nodes=(
            NodeSpec(id="a", task_type="t", retry_policy=retry),
            NodeSpec(id="b", task_type="t", retry_policy=retry),
        ),
    )


async def test_a_lease_the_worker_stops_reporting_is_released_for_a_retry(store: Store) -> None:
    clock = Clock()
    c = Coordinator(store, ServiceSettings(heartbeat_interval=timedelta(seconds=1)), clock=clock)
    await c.definitions.register_workflow(two_independent_nodes())
    execution, _ = await c.starts.start_execution(TENANT, "pair", None, b"1")
    await c.leasing.register_worker(TENANT, "w1", ["t"], 2)
    first, second = await c.leasing.poll_tasks(TENANT, "w1", ["t"], 2, timedelta(0))

    # Within the grace period a lease missing from a heartbeat is left alone (the heartbeat
    # may have been built before the poll reply arrived).
    clock.now += timedelta(seconds=1)
    await c.heartbeats.heartbeat(TENANT, "w1", [second.token])
    view = await c.executions.get_execution(TENANT, execution.id)
    assert [n.status for n in view.nodes] == [NodeStatus.LEASED, NodeStatus.LEASED]

    clock.now += timedelta(seconds=10)
    reply = await c.heartbeats.heartbeat(TENANT, "w1", [second.token])
    assert reply.lost == () and reply.cancelled == ()
    view = await c.executions.get_execution(TENANT, execution.id)
    lost, kept = view.nodes
    assert lost.node_id == first.node.node_id
    assert lost.status is NodeStatus.READY  # retried
    assert lost.error is not None and lost.error.type == "LeaseNotHeld"
    assert kept.status is NodeStatus.LEASED


async def test_lost_workers_are_not_swept_right_after_a_coordinator_start(store: Store) -> None:
    clock = Clock()
    settings = ServiceSettings(worker_liveness_timeout=timedelta(seconds=5))
    c = Coordinator(store, settings, clock=clock)
    await c.definitions.register_workflow(two_independent_nodes())
    await c.starts.start_execution(TENANT, "pair", None, b"1")
    await c.leasing.register_worker(TENANT, "w1", ["t"], 2)
    await c.leasing.poll_tasks(TENANT, "w1", ["t"], 2, timedelta(0))

    clock.now += timedelta(seconds=60)  # the coordinator was down; w1 could not heartbeat
    sweeper = Sweeper(c)
    assert await sweeper.release_lost_workers() == (0, 0)
    clock.now += timedelta(seconds=6)  # a whole liveness window since the restart
    assert await sweeper.release_lost_workers() == (2, 2)


async def test_silent_leases_survive_a_coordinator_outage_until_workers_can_heartbeat(
    store: Store,
) -> None:
    clock = Clock()
    settings = ServiceSettings(worker_liveness_timeout=timedelta(seconds=5))
    c = Coordinator(store, settings, clock=clock)
    defn = WorkflowDef(
        name="beating",
        nodes=(NodeSpec(id="a", task_type="t", heartbeat_timeout=timedelta(seconds=10)),),
    )
    await c.definitions.register_workflow(defn)
    execution, _ = await c.starts.start_execution(TENANT, "beating", None, b"1")
    await c.leasing.register_worker(TENANT, "w1", ["t"], 1)
    (task,) = await c.leasing.poll_tasks(TENANT, "w1", ["t"], 1, timedelta(0))

    clock.now += timedelta(seconds=20)  # down for 20 s: the heartbeat deadline passed
    sweeper = Sweeper(c)  # the restarted coordinator
    assert await sweeper.expire_leases() == (1, 0)
    reply = await c.heartbeats.heartbeat(TENANT, "w1", [task.token])  # the worker is back
    assert reply.lost == ()
    clock.now += timedelta(seconds=6)
    assert await sweeper.expire_leases() == (0, 0)
    view = await c.executions.get_execution(TENANT, execution.id)
    assert view.nodes[0].status is NodeStatus.LEASED


async def test_one_failing_verdict_does_not_stop_the_sweep(store: Store) -> None:
    clock = Clock()
    c = Coordinator(store, ServiceSettings(), clock=clock)
    defn = WorkflowDef(
        name="pair",
        nodes=(
            NodeSpec(id="a", task_type="t", start_to_close_timeout=timedelta(seconds=1)),
            NodeSpec(id="b", task_type="t", start_to_close_timeout=timedelta(seconds=1)),
        ),
    )
    await c.definitions.register_workflow(defn)
    execution, _ = await c.starts.start_execution(TENANT, "pair", None, b"1")
    await c.leasing.poll_tasks(TENANT, "w1", ["t"], 2, timedelta(0))
    clock.now += timedelta(seconds=2)

    real = c.results.fail_lease

    async def flaky(node: NodeRun, error: ErrorInfo, retryable: bool) -> bool:
        if node.node_id == "a":
            raise RuntimeError("corrupt row")
        return await real(node, error, retryable)

    c.results.fail_lease = flaky  # type: ignore[method-assign]
    assert await Sweeper(c).sweep() == 1
    view = await c.executions.get_execution(TENANT, execution.id)
    # b was failed despite the error on a (and, out of attempts, ended the execution).
    assert [n.status for n in view.nodes] == [NodeStatus.CANCELLED, NodeStatus.FAILED]


async def test_a_poll_hands_out_only_what_fits_one_reply(store: Store) -> None:
    settings = ServiceSettings(max_payload_bytes=1000, max_reply_bytes=4000)
    c = Coordinator(store, settings)
    await c.definitions.register_workflow(
        WorkflowDef(name="one", nodes=(NodeSpec(id="a", task_type="t"),))
    )
    for _ in range(5):
        await c.starts.start_execution(TENANT, "one", None, b'"x"')
    first = await c.leasing.poll_tasks(TENANT, "w1", ["t"], 5, timedelta(0))
    assert len(first) == 2  # 4000 bytes / (input + config at the 1000-byte limit)
    assert len(await c.leasing.poll_tasks(TENANT, "w1", ["t"], 5, timedelta(0))) == 2
