"""The scheduler step on a real store (SQLite and PostgreSQL) with a clock the test moves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from coordinator.model import (
    CatchupPolicy,
    ExecutionFilter,
    ExecutionStatus,
    FireOutcome,
    NodeSpec,
    OverlapPolicy,
    WorkflowDef,
)
from coordinator.service import Coordinator
from coordinator.service._schedules import Schedules, fire_key
from coordinator.store import SqlStore

T0 = datetime(2030, 1, 1, 0, 0, tzinfo=UTC)
TENANT = "default"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def env(store: SqlStore) -> tuple[Coordinator, Schedules, Clock]:
    clock = Clock(T0)
    coordinator = Coordinator(store, clock=clock)
    await coordinator.definitions.register_workflow(
        WorkflowDef(name="job", nodes=(NodeSpec(id="a", task_type="t"),))
    )
    return coordinator, Schedules(coordinator, store.triggers), clock


async def keys(coordinator: Coordinator) -> list[str]:
    rows = await coordinator.store.executions.list_executions(
        TENANT, ExecutionFilter(workflow_name="job"), limit=1000, before=None
    )
    return sorted(e.idempotency_key or "" for e in rows)


@pytest.mark.parametrize(
    ("catchup", "max_catchup", "expected_hours"),
    [
        (CatchupPolicy.SKIP_MISSED, 0, []),
        (CatchupPolicy.RUN_ONCE, 0, [3]),
        (CatchupPolicy.RUN_ALL, 0, [1, 2, 3]),
        (CatchupPolicy.RUN_ALL, 2, [2, 3]),
    ],
)
async def test_catch_up_after_downtime(
    env: tuple[Coordinator, Schedules, Clock],
    catchup: CatchupPolicy,
    max_catchup: int,
    expected_hours: list[int],
) -> None:
    coordinator, schedules, clock = env
    await schedules.create_schedule(
        TENANT,
        "hourly",
        "0 * * * *",
        "UTC",
        "job",
        0,
        b"{}",
        overlap=OverlapPolicy.ALLOW,
        catchup=catchup,
        max_catchup=max_catchup,
    )
    # Nobody ran for 3.5 hours: fire times 01:00, 02:00, 03:00 were missed.
    clock.now = T0 + timedelta(hours=3, minutes=30)
    started = await schedules.tick()
    assert started == len(expected_hours)
    expected = sorted(fire_key("hourly", T0 + timedelta(hours=h)) for h in expected_hours)
    assert await keys(coordinator) == expected
    schedule, fires = await schedules.get_schedule(TENANT, "hourly")
    assert schedule.next_fire_at == T0 + timedelta(hours=4)
    assert schedule.missed_fires == 3 - len(expected_hours)
    assert [f.outcome for f in fires] == [FireOutcome.STARTED] * len(expected_hours)

    # A second step at the same time does nothing; the next on-time fire runs once.
    assert await schedules.tick() == 0
    clock.now = T0 + timedelta(hours=4, seconds=1)
    assert await schedules.tick() == 1
    assert await schedules.tick() == 0
    assert fire_key("hourly", T0 + timedelta(hours=4)) in await keys(coordinator)


async def test_overlap_skip_records_the_skipped_fire(
    env: tuple[Coordinator, Schedules, Clock],
) -> None:
    coordinator, schedules, clock = env
    await schedules.create_schedule(
        TENANT, "s", "*/10 * * * * *", "", "job", 0, b"{}", overlap=OverlapPolicy.SKIP
    )
    clock.now = T0 + timedelta(seconds=10)
    assert await schedules.tick() == 1
    clock.now = T0 + timedelta(seconds=20)  # the first execution is still running
    assert await schedules.tick() == 0
    schedule, fires = await schedules.get_schedule(TENANT, "s")
    assert [(f.fire_at.second, f.outcome) for f in fires] == [
        (20, FireOutcome.SKIPPED),
        (10, FireOutcome.STARTED),
    ]
    assert schedule.skipped_fires == 1
    # Once it has ended, the next fire starts.
    await coordinator.operations.cancel_execution(TENANT, fires[1].execution_id or "", "done")
    clock.now = T0 + timedelta(seconds=30)
    assert await schedules.tick() == 1
    assert len(await keys(coordinator)) == 2


async def test_overlap_buffer_one_starts_the_pending_fire_when_the_running_one_ends(
    env: tuple[Coordinator, Schedules, Clock],
) -> None:
    coordinator, schedules, clock = env
    await schedules.create_schedule(
        TENANT, "b", "*/10 * * * * *", "", "job", 0, b"{}", overlap=OverlapPolicy.BUFFER_ONE
    )
    clock.now = T0 + timedelta(seconds=10)
    assert await schedules.tick() == 1
    for second in (20, 30):  # 20 is buffered, 30 is dropped (only one is kept)
        clock.now = T0 + timedelta(seconds=second)
        assert await schedules.tick() == 0
    schedule, fires = await schedules.get_schedule(TENANT, "b")
    assert schedule.buffered_fire_at == T0 + timedelta(seconds=20)
    assert {f.fire_at.second: f.outcome for f in fires} == {
        10: FireOutcome.STARTED,
        20: FireOutcome.BUFFERED,
        30: FireOutcome.SKIPPED,
    }
    first = fires[-1].execution_id or ""
    await coordinator.operations.cancel_execution(TENANT, first, "done")
    clock.now = T0 + timedelta(seconds=31)
    assert await schedules.tick() == 1
    schedule, fires = await schedules.get_schedule(TENANT, "b")
    assert schedule.buffered_fire_at is None
    buffered = next(f for f in fires if f.fire_at.second == 20)
    assert buffered.outcome is FireOutcome.STARTED and buffered.execution_id
    assert schedule.last_execution_id == buffered.execution_id
    execution = await coordinator.store.executions.get_execution(TENANT, buffered.execution_id)
    assert execution.status is ExecutionStatus.RUNNING
    assert execution.idempotency_key == fire_key("b", T0 + timedelta(seconds=20))


async def test_paused_schedules_do_not_fire_and_resume_skips_the_pause(
    env: tuple[Coordinator, Schedules, Clock],
) -> None:
    coordinator, schedules, clock = env
    await schedules.create_schedule(
        TENANT, "p", "0 * * * *", "", "job", 0, b"{}", catchup=CatchupPolicy.RUN_ALL
    )
    await schedules.pause_schedule(TENANT, "p")
    clock.now = T0 + timedelta(hours=5, minutes=1)
    assert await schedules.tick() == 0
    resumed = await schedules.resume_schedule(TENANT, "p")
    assert resumed.next_fire_at == T0 + timedelta(hours=6)
    assert await schedules.tick() == 0
    assert await keys(coordinator) == []


async def test_two_schedulers_on_one_store_fire_each_time_once(
    env: tuple[Coordinator, Schedules, Clock], store: SqlStore
) -> None:
    coordinator, schedules, clock = env
    other = Schedules(Coordinator(store, clock=clock), store.triggers)
    await schedules.create_schedule(
        TENANT, "dup", "* * * * * *", "", "job", 0, b"{}", overlap=OverlapPolicy.ALLOW
    )
    import asyncio

    for second in range(1, 6):
        clock.now = T0 + timedelta(seconds=second)
        started = await asyncio.gather(schedules.tick(), other.tick())
        assert sum(started) == 1
    assert await keys(coordinator) == sorted(
        fire_key("dup", T0 + timedelta(seconds=s)) for s in range(1, 6)
    )


async def test_a_schedule_whose_entry_node_is_a_sub_workflow_starts_the_child(
    env: tuple[Coordinator, Schedules, Clock],
) -> None:
    from coordinator.service import Sweeper

    coordinator, schedules, clock = env
    await coordinator.definitions.register_workflow(
        WorkflowDef(
            name="parent",
            nodes=(NodeSpec(id="sub", task_type="", kind="workflow", workflow_name="job"),),
        )
    )
    await schedules.create_schedule(
        TENANT,
        "nested",
        "0 * * * *",
        "UTC",
        "parent",
        0,
        b"{}",
        overlap=OverlapPolicy.ALLOW,
        catchup=CatchupPolicy.RUN_ONCE,
        max_catchup=0,
    )
    clock.now = T0 + timedelta(hours=1, seconds=1)
    assert await schedules.tick() == 1
    # The fire is handed to the coordinator's start path, which creates the child.
    await Sweeper(coordinator).start_due(clock.now)
    [parent] = await coordinator.store.executions.list_executions(
        TENANT, ExecutionFilter(workflow_name="parent"), limit=10, before=None
    )
    assert parent.idempotency_key == fire_key("nested", T0 + timedelta(hours=1))
    assert parent.status is ExecutionStatus.RUNNING
    children = await coordinator.store.executions.list_executions(
        TENANT, ExecutionFilter(workflow_name="job"), limit=10, before=None
    )
    assert [c.parent_execution_id for c in children] == [parent.id]
