"""Lease bookkeeping in the service with an injectable clock, on both stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from coordinator.model import NodeSpec, NodeStatus, RetryPolicy, WorkflowDef
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
    await c.register_workflow(two_independent_nodes())
    execution, _ = await c.start_execution(TENANT, "pair", None, b"1")
    await c.register_worker(TENANT, "w1", ["t"], 2)
    first, second = await c.poll_tasks(TENANT, "w1", ["t"], 2, timedelta(0))

    # Within the grace period a lease missing from a heartbeat is left alone (the heartbeat
    # may have been built before the poll reply arrived).
    clock.now += timedelta(seconds=1)
    await c.heartbeat(TENANT, "w1", [second.token])
    view = await c.get_execution(TENANT, execution.id)
    assert [n.status for n in view.nodes] == [NodeStatus.LEASED, NodeStatus.LEASED]

    clock.now += timedelta(seconds=10)
    reply = await c.heartbeat(TENANT, "w1", [second.token])
    assert reply.lost == () and reply.cancelled == ()
    view = await c.get_execution(TENANT, execution.id)
    lost, kept = view.nodes
    assert lost.node_id == first.node.node_id
    assert lost.status is NodeStatus.READY  # retried
    assert lost.error is not None and lost.error.type == "LeaseNotHeld"
    assert kept.status is NodeStatus.LEASED


async def test_lost_workers_are_not_swept_right_after_a_coordinator_start(store: Store) -> None:
    clock = Clock()
    settings = ServiceSettings(worker_liveness_timeout=timedelta(seconds=5))
    c = Coordinator(store, settings, clock=clock)
    await c.register_workflow(two_independent_nodes())
    await c.start_execution(TENANT, "pair", None, b"1")
    await c.register_worker(TENANT, "w1", ["t"], 2)
    await c.poll_tasks(TENANT, "w1", ["t"], 2, timedelta(0))

    clock.now += timedelta(seconds=60)  # the coordinator was down; w1 could not heartbeat
    sweeper = Sweeper(c)
    assert await sweeper.release_lost_workers() == 0
    clock.now += timedelta(seconds=6)  # a whole liveness window since the restart
    assert await sweeper.release_lost_workers() == 2
